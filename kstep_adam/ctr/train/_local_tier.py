"""The trainer's seam to the embedding tier: keys to rows, a batch's rows, pushes, stats.

All tier calls of a run go through :class:`SparseTier`, on the trainer's thread (except
:meth:`SparseTier.index`, pure NumPy, which the reader thread runs). The tier is
:func:`kstep_adam.embedding.open_table`; this class only adapts its arrays to the step's
shapes: a batch of ``G`` examples with ``F`` fields has its keys hashed and deduplicated once
into ``row_ids_U`` and an ``inverse_GxF``, and the rows' values are padded to ``P >= U`` rows,
a shape bucket, so the jitted step sees few shapes.

Two ways a training step meets the table:

* host optimizer (``device_cache_rows=0``): the step gets the rows' values (uploaded) and
  returns their gradient (downloaded), which :meth:`SparseTier.push` hands to the table;
* device optimizer (``device_cache_rows > 0``): the rows and their Adam state stay in device
  memory; the step gets the device tier's arrays and the batch's slots
  (:meth:`kstep_adam.embedding.EmbeddingTable.begin_device_step`), reads and updates the rows
  in its own program, and returns the new arrays. Only misses and evictions cross the link.

Every host-device copy is counted (:attr:`SparseTier.meter` and the table's device tier), so
the run reports its bytes per step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kstep_adam import embedding
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._optimizer import sparse_optimizer
from kstep_adam.ctr.train._tier import TableTier
from kstep_adam.ctr.train._tier import bucket_size


class BatchRows(NamedTuple):
  """The embedding rows one batch reads: each table row once, padded to a shape bucket.

  ``rows_PxD[inverse_GxF]`` is the ``[G, F, D]`` embedding of the batch's ``G`` examples.
  """

  row_ids_U: np.ndarray  # int64 [U], the batch's table rows, sorted, each once
  rows_PxD: np.ndarray | None  # float32 [P, D], P >= U: row u's values, then zeros (None
  # when the rows stay on the device)
  inverse_GxF: np.ndarray  # int32 [G, F], the index into row_ids_U of every key
  step_input: tuple = ()  # what the train step takes for the rows (train pulls only):
  # (rows_PxD, None or a pending push), or the device tier's (DeviceRows, DeviceBatch)

  @property
  def num_unique(self) -> int:
    """U, the rows before the padding."""
    return int(self.row_ids_U.shape[0])


class SparseTier(TableTier):
  """One embedding table for all fields (keys are field-aware), synchronous per step.

  Args:
    config: the run's configuration (rows, caches, sparse learning rate, seed).
    table_dir: directory of the table's on-disk tier.
    temporary: the directory is scratch space and ``close`` skips the final flush;
      otherwise ``close`` flushes, so the directory holds the trained table.
    flush_on_close: override that: a run that saves checkpoints flushes only in them, so
      the table's committed state is always a checkpoint's.
    version: open the table at this earlier flush (``embedding.TableVersion``), reverting
      any later one; None opens it as it is.
    mesh: the step's mesh; the rows it reads are replicated over it (and so is the device
      tier, whose optimizer every worker runs on the same averaged gradient). None: the
      first device.

  Attributes:
    meter: the host-device copies this class makes (rows and gradients of the host
      optimizer, the trainer's batch inputs); the device tier counts its own.
  """

  def __init__(
    self,
    config: TrainConfig,
    table_dir: str,
    *,
    temporary: bool = False,
    flush_on_close: bool | None = None,
    version: embedding.TableVersion | None = None,
    mesh=None,
  ):
    self.num_rows, self.dim, self._salt = config.table_rows, config.embed_dim, config.seed
    self._replicated = NamedSharding(mesh, P()) if mesh is not None else jax.devices()[0]
    self.meter = embedding.TransferMeter()
    self.table = embedding.open_table(
      table_dir,
      num_rows=config.table_rows,
      dim=config.embed_dim,
      optimizer=sparse_optimizer(config),
      host_cache_rows=config.host_cache_rows,
      device_cache_rows=config.device_cache_rows,
      device_sharding=self._replicated if config.device_cache_rows else None,
      seed=config.seed,
      init_scale=config.init_scale,
      version=version,
    )
    self._flush_on_close = not temporary if flush_on_close is None else flush_on_close
    self._pad_to = {"train": 0, "eval": 0}  # shape bucket per kind of batch

  def prefetch(self, row_ids_U: np.ndarray) -> None:
    """Start staging these rows into the host tier (asynchronous)."""
    self.table.prefetch(row_ids_U)

  @property
  def device_optimizer(self):
    """The sparse optimizer the device tier runs inside the step (None: the host runs it)."""
    return self.table.device_optimizer

  def pull(
    self,
    row_ids_U: np.ndarray,
    inverse_GxF: np.ndarray,
    *,
    kind: str = "train",
    before_push: tuple | None = None,
  ) -> BatchRows:
    """Pull a batch's rows (from :meth:`index`) once, padded to a power of two ``P >= U``.

    ``kind="train"`` also prepares ``step_input`` for the train step (copied to the
    device); a train pull must be followed by :meth:`push` of the step's sparse output.

    ``before_push``: ``(rows, sparse_output, loss, finite_W)`` of a step whose push is still
    to come (its :class:`BatchRows` and outputs, still computing). The rows are read before
    that push, and ``step_input`` carries what the step needs to apply it to the rows the two
    batches share (``embedding.apply_pending_push``); the next push must be that step's.
    Host optimizer only (lazy ``SparseAdam``).
    """
    # A bucket never shrinks, so the step compiles once per new high-water mark only. Train
    # and eval batches keep separate buckets: the larger eval batches would otherwise pad
    # (and recompile) every training step after the first evaluation.
    pad_to = self._pad_to[kind] = max(self._pad_to[kind], bucket_size(len(row_ids_U)))
    if kind == "train" and self.device_optimizer is not None:
      step = self.table.begin_device_step(row_ids_U, pad_to=pad_to)
      return BatchRows(row_ids_U, None, inverse_GxF, (step.rows, step.batch))
    if before_push is not None:
      pushed, sparse_output, loss, finite_W = before_push
      rows, pending = self.table.working_set_before_push(row_ids_U, pushed.row_ids_U, pad_to=pad_to)
      # Handed to the step as NumPy: its call copies them (see TransferMeter.lend).
      pending = self.meter.lend(pending, self._replicated, "pending")
      rows_PxD = rows.rows
      step_input = (
        self.meter.lend(rows_PxD, self._replicated, "rows"),
        (pending, sparse_output, _pushed(loss, finite_W)),
      )
      return BatchRows(row_ids_U, rows_PxD, inverse_GxF, step_input)
    # The rows are unique already, so the table's own deduplication returns them unchanged.
    rows_PxD = self.table.working_set(row_ids_U, pad_to=pad_to).rows
    step_input = ()
    if kind == "train":  # handed to the step as NumPy: its call copies them
      step_input = (self.meter.lend(rows_PxD, self._replicated, "rows"), None)
    return BatchRows(row_ids_U, rows_PxD, inverse_GxF, step_input)

  @property
  def can_pull_before_push(self) -> bool:
    """Whether :meth:`pull` can read a batch before the previous step's push
    (``before_push``): a lazy ``SparseAdam`` on the host tier."""
    return self.table.can_read_before_push

  def push(self, rows: BatchRows, sparse_output, *, applied: bool = True) -> None:
    """End a train :meth:`pull` with the step's sparse output: the rows' gradient
    ``[P, D]`` (host optimizer: downloaded and pushed) or the device tier's new arrays
    (device optimizer: installed). ``applied=False``: a skipped step, no row changes (the
    device step left its rows as it read them)."""
    if self.device_optimizer is not None:
      self.table.end_device_step(sparse_output, pushed=applied)
    elif applied:
      grads_PxD = self.meter.get(sparse_output, "grads")
      self.table.push(rows.row_ids_U, grads_PxD[: rows.num_unique])

  def abandon(self, rows: BatchRows, sparse_output, finite: bool) -> None:
    """End a train :meth:`pull` whose step the run stops at (it diverged): the host
    optimizer pushes nothing; the device tier takes its arrays back, updated only if the
    step's values were finite (an exploding but finite loss; see ``make_ctr_train_step``)."""
    if self.device_optimizer is not None:
      self.table.end_device_step(sparse_output, pushed=finite)

  def eval_rows(
    self, row_ids_U: np.ndarray, inverse_GxF: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray]:
    """A held-out batch's rows ``[P, D]`` and where each key's row is among them."""
    rows = self.pull(row_ids_U, inverse_GxF, kind="eval")
    return rows.rows_PxD, rows.inverse_GxF

  def transfer_bytes(self) -> dict:
    """Host-device bytes so far, by direction and kind (this class's and the device tier's)."""
    totals = self.meter.totals()
    device = self.table.stats().get("device_transfer_bytes")
    for direction, by_kind in (device or {}).items():
      for kind, nbytes in by_kind.items():
        totals[direction][kind] = totals[direction].get(kind, 0) + nbytes
    return totals


@jax.jit
def _pushed(loss, finite_W):
  """Whether the host pushes a step with this loss and per-worker finite flags (the
  trainer skips, or stops at, any other), as a replicated scalar, without waiting for it."""
  return jax.numpy.all(finite_W) & jax.numpy.isfinite(loss)
