"""A stepper against a fake tier: the order of its calls, and what a skipped or diverged step
pushes (nothing of a diverged one)."""

import types

import numpy as np
import pytest

from kstep_adam.ctr.data._prefetch import IndexedBatch
from kstep_adam.ctr.data._records import CTRBatch
from kstep_adam.ctr.train._divergence import DivergenceError
from kstep_adam.ctr.train._meters import Timer
from kstep_adam.ctr.train._steppers import LocalStepper
from kstep_adam.ctr.train._steppers import Replicas


class FakeTier:
  """Records every call; rows are their ids."""

  def __init__(self):
    self.calls = []
    self.meter = types.SimpleNamespace(put=lambda arrays, sharding, kind: arrays)

  def pull(self, row_ids_U, inverse_GxF, *, kind="train"):
    self.calls.append(("pull", int(row_ids_U[0])))
    return types.SimpleNamespace(row_ids_U=row_ids_U, inverse_GxF=inverse_GxF, step_input=())

  def prefetch(self, row_ids_U):
    self.calls.append(("prefetch", int(row_ids_U[0])))

  def push(self, rows, sparse_output, *, applied=True):
    self.calls.append(("push", int(rows.row_ids_U[0]), applied))

  def abandon(self, rows, sparse_output, finite):
    self.calls.append(("abandon", int(rows.row_ids_U[0])))


class FakeStep:
  """A step function: the parameters count the steps; the loss is the step's."""

  def __init__(self, losses):
    self.losses, self.step, self.last_call_compiled = list(losses), 0, False

  def __call__(self, params_W, opt_state_W, *inputs):
    self.step += 1
    loss = self.losses[self.step - 1]
    return params_W + 1, opt_state_W, None, loss, np.array([np.isfinite(loss)])


class Monitor:
  """Skips a non-finite step at step 2, diverges on one at step 3."""

  def check(self, step, loss, finite, *, last):
    if not finite and step == 3:
      raise DivergenceError(step, "nonfinite", loss, "diverged")
    return not finite


class Batches:
  def __init__(self, count):
    self.items = [_batch(i) for i in range(1, count + 1)]

  def get(self):
    if not self.items:
      raise StopIteration
    return self.items.pop(0)


def _batch(i):
  batch = CTRBatch(np.zeros((2, 26), np.int64), np.zeros((2, 13), np.float32), np.zeros(2))
  return IndexedBatch(batch, np.array([i]), np.zeros((2, 26), np.int32), position=i)


def _stepper(losses):
  tier = FakeTier()
  replicas = Replicas(params_W=0, opt_state_W=None)
  stepper = LocalStepper(FakeStep(losses), tier, Timer(), Monitor(), replicas, per_worker=None)
  return stepper, tier, replicas


def test_a_step_pulls_then_stages_the_next_batch_then_pushes():
  stepper, tier, replicas = _stepper([0.5, 0.4])
  batches = Batches(2)
  current = batches.get()
  result, upcoming = stepper.advance(current, batches)
  assert tier.calls == [("pull", 1), ("prefetch", 2), ("push", 1, True)]
  assert (result.step, result.loss, result.last, result.skipped) == (1, 0.5, False, False)
  result, upcoming = stepper.advance(upcoming, batches)
  assert upcoming is None and result.last and replicas.params_W == 2


def test_a_skipped_step_pushes_not_applied_and_a_diverged_one_abandons():
  stepper, tier, _ = _stepper([0.5, np.nan, np.nan])
  batches = Batches(3)
  current = batches.get()
  for _ in range(2):
    result, current = stepper.advance(current, batches)
  assert result.skipped and tier.calls[-1] == ("push", 2, False)
  with pytest.raises(DivergenceError):
    stepper.advance(current, batches)
  assert tier.calls[-1] == ("abandon", 3) and not any(
    c[0] == "push" and c[1] == 3 for c in tier.calls
  )
