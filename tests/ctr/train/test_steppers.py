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

  def pull(self, row_ids_U, inverse_GxF, *, kind="train", before_push=None):
    before = () if before_push is None else (int(before_push[0].row_ids_U[0]),)
    self.calls.append(("pull", int(row_ids_U[0]), *before))
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
    self.losses, self.step, self.compiles, self.adaptive = list(losses), 0, 0, None

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


def _stepper(losses, pipeline=False):
  tier = FakeTier()
  replicas = Replicas(params_W=0, opt_state_W=None)
  stepper = LocalStepper(
    FakeStep(losses), tier, Timer(), Monitor(), replicas, per_worker=None, pipeline=pipeline
  )
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


def test_a_pipelined_step_reads_the_next_batch_before_its_own_push():
  stepper, tier, replicas = _stepper([0.5, 0.4, 0.3], pipeline=True)
  batches = Batches(3)
  result, upcoming = stepper.advance(batches.get(), batches)
  # batch 2 is read before batch 1's push, with what it needs to apply that push itself
  assert tier.calls == [("pull", 1), ("prefetch", 2), ("pull", 2, 1), ("prefetch", 3)] + [
    ("push", 1, True)
  ]
  # the hooks see step 1's state, though step 2 already computes
  assert (result.step, stepper.step, replicas.params_W) == (1, 1, 1)
  tier.calls.clear()
  result, upcoming = stepper.advance(upcoming, batches)
  assert tier.calls == [("pull", 3, 2), ("push", 2, True)]
  assert (result.step, replicas.params_W, upcoming.position) == (2, 2, 3)
  tier.calls.clear()
  result, upcoming = stepper.advance(upcoming, batches)
  assert tier.calls == [("push", 3, True)] and result.last and upcoming is None  # none ahead


def test_a_step_launched_ahead_is_dropped_when_the_run_stops_before_it():
  stepper, tier, replicas = _stepper([0.5, 0.4, 0.3, 0.2], pipeline=True)
  batches = Batches(4)
  _, upcoming = stepper.advance(batches.get(), batches)
  stepper.discard_ahead()  # e.g. an interrupt after step 1's hooks
  assert (stepper.step, replicas.params_W) == (1, 1) and not any(
    c[0] == "push" and c[1] == 2 for c in tier.calls
  )
  # the next advance on the same batch starts it afresh from step 1's state
  tier.calls.clear()
  stepper.advance(upcoming, batches)
  assert tier.calls[0] == ("pull", 2) and ("push", 2, True) in tier.calls
  assert replicas.params_W == 2  # from step 1's state, not the dropped step's


def test_a_pipelined_run_pushes_nothing_of_a_diverged_step_or_the_one_after():
  stepper, tier, _ = _stepper([0.5, np.nan, np.nan, 0.1], pipeline=True)
  batches = Batches(4)
  current = batches.get()
  for _ in range(2):
    result, current = stepper.advance(current, batches)
  assert result.skipped and ("push", 2, False) in tier.calls
  with pytest.raises(DivergenceError):
    stepper.advance(current, batches)
  assert not any(c[0] == "push" and c[1] >= 3 for c in tier.calls)
