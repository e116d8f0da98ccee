"""Steppers: one per sparse-tier strategy, the same ``advance`` for the loop.

A stepper takes one training step on an indexed batch and reads the next one while the step
computes: it pulls the batch's rows from its tier, runs the jitted step on the dense
:class:`Replicas`, checks the loss (:class:`~._divergence.DivergenceMonitor`) and pushes the
rows' update. :class:`LocalStepper` runs one process's step (:mod:`._step`),
:class:`ShardedStepper` a multi-process one (:mod:`._sharded_step`, rows exchanged between the
shards). Each keeps today's exact order of timer phases, pull, prefetch, compute, check, push
and abandon: the run's bits and its time breakdown depend on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import numpy as np

from kstep_adam import parallel
from kstep_adam.ctr.data._prefetch import IndexedBatch
from kstep_adam.ctr.data._prefetch import Prefetcher
from kstep_adam.ctr.train._divergence import DivergenceError
from kstep_adam.ctr.train._loop import StepResult
from kstep_adam.ctr.train._loop import next_or_none
from kstep_adam.embedding import NonFiniteRowsError


@dataclasses.dataclass
class Replicas:
  """The dense state a stepper advances: per-worker parameters and optimizer state."""

  params_W: Any = None
  opt_state_W: Any = None


class LocalStepper:
  """The step of a one-process run over a :class:`~._local_tier.SparseTier`.

  Attributes:
    sparse_cost: the last step's sparse exchange cost; None here (one process exchanges
      nothing).
  """

  sparse_cost = None

  def __init__(self, step_fn, tier, timer, monitor, replicas: Replicas, per_worker):
    self.step_fn, self.tier, self.timer, self.monitor = step_fn, tier, timer, monitor
    self.replicas, self.per_worker = replicas, per_worker

  def advance(self, current: IndexedBatch, prefetcher: Prefetcher):
    """One synchronous step on ``current``; returns its result and the next indexed batch
    (None after the last), read (and its rows staged) while the step computes."""
    timer, tier = self.timer, self.tier
    with timer("pull"):
      rows = tier.pull(current.row_ids_U, current.inverse_GxF)
      batch = current.batch
      # Copied here, not on the reader thread: on a CPU host the reader's copy competes with
      # the step for the same cores and did not measure faster.
      inputs = tier.meter.put(
        (rows.inverse_GxF, batch.dense_BxI, batch.label_B), self.per_worker, "batch"
      )
    with timer("compute"):
      self.replicas.params_W, self.replicas.opt_state_W, sparse_output, loss, finite_W = (
        self.step_fn(self.replicas.params_W, self.replicas.opt_state_W, *rows.step_input, *inputs)
      )
    with timer("data"):
      upcoming = next_or_none(prefetcher)
    if upcoming is not None:
      tier.prefetch(upcoming.row_ids_U)  # stages rows while the step still computes
    with timer("compute"):  # waits for the step
      loss, finite = float(loss), bool(np.all(jax.device_get(finite_W)))
    step = self.step_fn.step
    try:  # raises if the run diverged
      skipped = self.monitor.check(step, loss, finite, last=upcoming is None)
    except BaseException:
      tier.abandon(rows, sparse_output, finite)
      raise
    with timer("push"), _nonfinite_rows_diverge(step, loss):
      tier.push(rows, sparse_output, applied=not skipped)
    last = upcoming is None
    compiled = self.step_fn.last_call_compiled
    return StepResult(step, loss, rows.row_ids_U, compiled, last, skipped), upcoming

  def state(self, row_ids: np.ndarray) -> dict:
    """Every worker's dense replica (NumPy) and the current values of ``row_ids``."""
    return {
      "params_W": jax.device_get(self.replicas.params_W),
      "row_ids": row_ids,
      "rows": self.tier.table.pull(row_ids),
    }


class ShardedStepper:
  """The step of a multi-process run over a :class:`~._sharded_tier.ShardedSparseTier`.

  Attributes:
    sparse_cost: the last step's exchange cost (a :class:`kstep_adam.CommCost`).
  """

  def __init__(self, step_fn, tier, timer, monitor, replicas: Replicas, mesh):
    self.step_fn, self.tier, self.timer, self.monitor = step_fn, tier, timer, monitor
    self.replicas, self.mesh = replicas, mesh
    self.sparse_cost = None

  def advance(self, current: IndexedBatch, prefetcher: Prefetcher):
    """:meth:`LocalStepper.advance` of a multi-process run (:mod:`._sharded_tier`): the
    owners answer this step's rows, the next step's ids are exchanged (its owners then stage
    their rows while this step computes), the step runs, and the owners push the gradients
    they got back.

    The next step's exchange comes before this step's program, not while it runs: the
    processes' collectives run one at a time in launch order, so an exchange launched
    behind the step would only wait for it.
    """
    timer, tier = self.timer, self.tier
    with timer("pull"):
      rows = tier.pull(current.row_ids_U, current.inverse_GxF)
      batch = current.batch
      inputs = [
        self._place_share(x, tier.meter) for x in (rows.inverse_GxF, batch.dense_BxI, batch.label_B)
      ]
    with timer("data"):
      upcoming = next_or_none(prefetcher)
    if upcoming is not None:  # the same on every process: they read the same steps
      with timer("exchange"):
        tier.prefetch(upcoming.row_ids_U)
    with timer("compute"):
      self.replicas.params_W, self.replicas.opt_state_W, grads_to_owners, loss, finite = (
        self.step_fn(self.replicas.params_W, self.replicas.opt_state_W, rows.rows, *inputs)
      )
      loss, finite = float(loss), bool(finite)
    step = self.step_fn.step
    # the same decision on every process
    skipped = self.monitor.check(step, loss, finite, last=upcoming is None)
    pushed_U = np.zeros(0, np.int64)
    if not skipped:
      with timer("push"), _nonfinite_rows_diverge(step, loss):
        pushed_U = tier.push(rows, grads_to_owners)
    self.sparse_cost = rows.exchange.cost
    last = upcoming is None
    compiled = self.step_fn.last_call_compiled
    return StepResult(step, loss, pushed_U, compiled, last, skipped), upcoming

  def state(self, row_ids: np.ndarray) -> dict:
    """This process's workers' dense replicas (NumPy; ``workers`` says which) and the
    current values of ``row_ids``, rows of its own shard."""
    params_W = self.replicas.params_W
    workers = [w for w in range(self.mesh.size) if _addressable(params_W, w)]
    replicas = [parallel.unreplicate(params_W, worker=w) for w in workers]
    return {
      "workers": np.asarray(workers),
      "params_W": jax.tree.map(lambda *xs: np.stack(xs), *replicas),
      "row_ids": row_ids,
      "rows": self.tier.rows(row_ids),
    }

  def _place_share(self, share: np.ndarray, meter) -> jax.Array:
    """This process's rows of a per-worker step input, as its part of the global array
    (counted as ``batch`` by ``meter``)."""
    global_shape = (share.shape[0] * self.mesh.shape["node"], *share.shape[1:])
    sharding = parallel.worker_sharding(self.mesh, share.ndim)
    return meter.place(share, sharding, global_shape, "batch")


def _addressable(tree_W, worker: int) -> bool:
  """Whether this process holds ``worker``'s replica."""
  leaf = jax.tree.leaves(tree_W)[0]
  return any(
    (s.index[0].start or 0) <= worker < (s.index[0].start or 0) + s.data.shape[0]
    for s in leaf.addressable_shards
  )


@contextlib.contextmanager
def _nonfinite_rows_diverge(step: int, loss: float):
  """A push that would store non-finite rows (``embedding.NonFiniteRowsError``) is divergence
  at ``step``: nothing of it was stored, and nothing later is (the table keeps its last
  commit). In a multi-process run only the shard that holds such rows finds out: its process
  stops with this error and the launcher ends the others."""
  try:
    yield
  except NonFiniteRowsError as error:
    raise DivergenceError(
      step,
      "nonfinite",
      loss,
      f"the update of {len(error.row_ids)} embedding rows is not finite in float32 (e.g. rows "
      f"{list(map(int, error.row_ids[:5]))}: a parameter or optimizer moment overflows); "
      "lower sparse_learning_rate",
    ) from error
