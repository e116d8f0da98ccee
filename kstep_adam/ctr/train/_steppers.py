"""Steppers: one per sparse-tier strategy, the same ``advance`` for the loop.

A stepper takes one training step on an indexed batch and reads the next one while the step
computes: it pulls the batch's rows from its tier, runs the jitted step on the dense
:class:`Replicas`, checks the loss (:class:`~._divergence.DivergenceMonitor`) and pushes the
rows' update. :class:`LocalStepper` runs one process's step (:mod:`._step`),
:class:`ShardedStepper` a multi-process one (:mod:`._sharded_step`, rows exchanged between the
shards). Each keeps its order of timer phases, pull, prefetch, compute, check, push and
abandon: the time breakdown depends on it. A pipelined :class:`LocalStepper` launches the next
step (pull, compute) before this step's wait, check and push; the bits are the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any
from typing import NamedTuple

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


class _Flight(NamedTuple):
  """A step dispatched and not yet finished: its batch, rows, outputs and step count."""

  batch: IndexedBatch
  rows: Any  # BatchRows
  outputs: tuple  # (params_W, opt_state_W, sparse_output, loss, finite_W), still computing
  step: int


class LocalStepper:
  """The step of a one-process run over a :class:`~._local_tier.SparseTier`.

  With ``pipeline`` (a lazy ``SparseAdam`` on the host tier), the next step's program is
  launched before this step's rows are pushed: its rows are read before the push, and its
  program applies the push to the rows both batches share (``SparseTier.pull`` with
  ``before_push``). The host's push, its pulls and the dispatch then run while a program
  computes, instead of between programs; the bits are those of the synchronous order. A
  step's result (and the dense state the hooks read) is still the step's own: the step
  launched ahead keeps its outputs apart until its own :meth:`advance`, and is dropped if
  the run stops first.

  Attributes:
    sparse_cost: the last step's sparse exchange cost; None here (one process exchanges
      nothing).
  """

  sparse_cost = None

  def __init__(
    self, step_fn, tier, timer, monitor, replicas: Replicas, per_worker, *, pipeline=False
  ):
    self.step_fn, self.tier, self.timer, self.monitor = step_fn, tier, timer, monitor
    self.replicas, self.per_worker = replicas, per_worker
    self.pipeline = pipeline
    self._ahead: _Flight | None = None  # the next step, launched before this one's push
    self._after_ahead: IndexedBatch | None = None  # the batch after it, read already
    self._step: int | None = None  # the last finished step

  @property
  def step(self) -> int | None:
    """The optimizer's step after the last finished step (None before the first, unless
    the step function knows its start)."""
    return self._step if self._step is not None else self.step_fn.step

  def discard_ahead(self) -> None:
    """Drop a step launched ahead (the run stopped before it): nothing of it was pushed.
    The batch read after it is dropped too, so the prefetcher it came from is done with: a
    run that goes on reads its data again from its position (as ``Trainer.fit`` does)."""
    self._ahead = self._after_ahead = None

  def advance(self, current: IndexedBatch, prefetcher: Prefetcher):
    """One step on ``current``; returns its result and the next indexed batch (None after
    the last), read (and its rows staged) while the step computes. Pipelined, the next
    step is launched before ``current``'s push, and the batch after it is read."""
    timer, tier = self.timer, self.tier
    compiles = self.step_fn.compiles
    flight, self._ahead = self._ahead, None
    if flight is not None and flight.batch is current:
      upcoming, self._after_ahead = self._after_ahead, None
    else:
      self.discard_ahead()
      flight = self._launch(current)
      upcoming = self._read_next(prefetcher)
    if self.pipeline and upcoming is not None and self.step_fn.adaptive is None:
      # The next step, before this one's push: its rows are read as they are now.
      self._ahead = self._launch(upcoming, before=flight)
      self._after_ahead = self._read_next(prefetcher)
    params_W, opt_state_W, sparse_output, loss, finite_W = flight.outputs
    with timer("compute"):  # waits for the step
      loss, finite = float(loss), bool(np.all(jax.device_get(finite_W)))
    self.replicas.params_W, self.replicas.opt_state_W = params_W, opt_state_W
    step = self._step = flight.step
    try:  # raises if the run diverged
      skipped = self.monitor.check(step, loss, finite, last=upcoming is None)
    except BaseException:
      self.discard_ahead()
      tier.abandon(flight.rows, sparse_output, finite)
      raise
    try:
      with timer("push"), _nonfinite_rows_diverge(step, loss):
        tier.push(flight.rows, sparse_output, applied=not skipped)
    except BaseException:
      self.discard_ahead()
      raise
    last = upcoming is None
    compiled = self.step_fn.compiles > compiles
    return StepResult(step, loss, flight.rows.row_ids_U, compiled, last, skipped), upcoming

  def _read_next(self, prefetcher: Prefetcher) -> IndexedBatch | None:
    """The next indexed batch (None after the last), its rows staged while a step computes."""
    with self.timer("data"):
      batch = next_or_none(prefetcher)
    if batch is not None:
      self.tier.prefetch(batch.row_ids_U)
    return batch

  def _launch(self, batch: IndexedBatch, *, before: _Flight | None = None) -> _Flight:
    """Pull ``batch``'s rows and dispatch its step (after ``before``'s, and before its push
    when given: the step then applies that push itself)."""
    timer, tier = self.timer, self.tier
    with timer("pull"):
      before_push = None if before is None else (before.rows, *before.outputs[2:])
      rows = tier.pull(batch.row_ids_U, batch.inverse_GxF, before_push=before_push)
      b = batch.batch
      # Copied here, not on the reader thread: on a CPU host the reader's copy competes with
      # the step for the same cores and did not measure faster.
      inputs = tier.meter.put((rows.inverse_GxF, b.dense_BxI, b.label_B), self.per_worker, "batch")
    state = self.replicas if before is None else Replicas(*before.outputs[:2])
    with timer("compute"):
      outputs = self.step_fn(state.params_W, state.opt_state_W, *rows.step_input, *inputs)
    return _Flight(batch, rows, outputs, self.step_fn.step)

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

  @property
  def step(self) -> int | None:
    """The optimizer's step after the last step (None before the first, unless the step
    function knows its start)."""
    return self.step_fn.step

  def discard_ahead(self) -> None:
    """Nothing to drop: this stepper launches no step ahead."""

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
