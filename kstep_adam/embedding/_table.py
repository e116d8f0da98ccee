"""EmbeddingTable: pull/push rows through the host cache, with the disk tier below it.

The design notes (step semantics, durability and the flush sequence, history, I/O errors,
the device tier, concurrency) are in docs/embedding.md, "Design notes". A map of this file:

* ``__init__``: lock, redo an interrupted flush (``_apply_pending``), revert to a
  ``version``;
* ``pull``/``working_set``/``push``/``prefetch``: the host cache, misses via ``_acquire``;
* ``begin_device_step``/``end_device_step``: the device tier;
* ``flush``/``_flush_locked``/``_apply_pending``: the pending log's commit point, then its
  rows into the database as segments, merged into the zarr chunks in the background past
  ``_BACKGROUND_MERGE_FRACTION`` (``_start_merge``/``_finish_merge``), in the flush itself
  past ``_SEGMENT_FRACTION``; ``compact``: a fresh database;
* ``_failure_is_fatal``/``_raise_failed``: the failed state after an I/O error.
"""

import collections
import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import threading
import time
import warnings
from typing import NamedTuple
from typing import NoReturn

import jax
import numpy as np

from kstep_adam import _faults
from kstep_adam import _validation
from kstep_adam.embedding import _batch
from kstep_adam.embedding import _device_adam
from kstep_adam.embedding import _init
from kstep_adam.embedding import _malloc
from kstep_adam.embedding import _store
from kstep_adam.embedding._config import TableConfig
from kstep_adam.embedding._device_adam import DeviceBatch
from kstep_adam.embedding._device_adam import DeviceRows
from kstep_adam.embedding._device_adam import PendingPush
from kstep_adam.embedding._device_cache import DeviceCache
from kstep_adam.embedding._errors import NonFiniteRowsError
from kstep_adam.embedding._errors import TableFailedError
from kstep_adam.embedding._errors import TableLockedError
from kstep_adam.embedding._host_cache import HostCache
from kstep_adam.embedding._optimizers import RowPush
from kstep_adam.embedding._optimizers import RowwiseAdagrad
from kstep_adam.embedding._optimizers import SparseAdam
from kstep_adam.embedding._optimizers import row_push as row_push_for
from kstep_adam.embedding._pending import Commit
from kstep_adam.embedding._pending import PendingLog
from kstep_adam.embedding._store import TableVersion

# Uncompressed bytes per flush write batch (rows appended to the log, a segment, a batch of
# chunks). 64 MiB and pieces of 2^21 records took about 0.2 GiB more at a flush's peak than
# these, and were no faster (a 2^26-row table, 1.8M rows a flush).
_FLUSH_BATCH_BYTES = 16 << 20
# Log records sorted at once while copying a committed log into zarr (``newest_records``
# pieces): a few arrays of 8 bytes per record, about 25 MiB in all.
_FLUSH_PIECE_RECORDS = 1 << 19
# A flush writes the rows it changed as segments beside the zarr chunks (their in-memory
# index takes about 1.5 bytes a segment row, ``_segment_index``). Once they hold more than
# 1/_BACKGROUND_MERGE_FRACTION of the table's rows (0: never), the flush starts merging them
# into the chunks in the background; a flush that would take them past 1/_SEGMENT_FRACTION
# waits for that merge, and if they are still too many, merges them itself. A merge pass
# rewrites every chunk holding a merged row (with hashed ids, every chunk), so the fewer
# passes the better: a merge waits for about two flushes of the 2^28-row benchmark (7.4M
# rows each), goes on with another pass while they are past the threshold, and the limit
# leaves room for the flushes during a pass (docs/embedding.md).
_BACKGROUND_MERGE_FRACTION = 16
_SEGMENT_FRACTION = 3


def dense_id_maps(num_rows: int, row_bytes: int, host_cache_rows: int) -> int | None:
  """``num_rows`` if the host cache's slot map and the pending log's index should be direct
  arrays over all row ids (``_id_map.DenseIdMap``), else None (hash maps).

  Direct arrays take 12 bytes per table row (an int32 slot and an int64 log position)
  whatever is cached; the hash maps take 36 bytes per cached row and 32 per row evicted
  since the last flush, and cost several NumPy passes per lookup. So a table takes the
  arrays when they are no larger than its cached rows (a table up to about 16 times its
  host cache, for exact Adam at dim 16), and the hash maps for larger tables.
  """
  return num_rows if 12 * num_rows <= row_bytes * host_cache_rows else None


class WorkingSet(NamedTuple):
  """A batch's deduplicated rows: ``rows[inverse]`` equals ``pull(ids)``."""

  unique_ids: np.ndarray  # shape=[U], int64, sorted ascending
  rows: np.ndarray | jax.Array  # shape=[U or pad_to, dim], float32; a jax.Array on the
  # device when the table has a device cache
  inverse: np.ndarray  # shape=[len(ids)], int64 indices into unique_ids


class DeviceStep(NamedTuple):
  """What a jitted step needs to read and update a batch's rows on the device."""

  rows: DeviceRows  # the device tier's arrays (donate them to the step)
  batch: DeviceBatch  # this step's slots, catch-up plan and scalars, on the device
  unique_ids: np.ndarray  # int64 [U], the batch's rows, sorted


class EmbeddingTable:
  """A row-sparse embedding table on disk with a bounded host cache. Use ``open_table``.

  Examples:
    >>> import tempfile
    >>> from kstep_adam import embedding
    >>> scratch = tempfile.TemporaryDirectory()
    >>> table = embedding.open_table(scratch.name + '/t', num_rows=2**20, dim=8,
    ...                              host_cache_rows=4096)
    >>> future = table.prefetch([10, 11])      # next batch, in the background
    >>> ws = table.working_set([5, 7, 5])      # this batch, deduplicated
    >>> grads_UxD = np.ones_like(ws.rows)      # the model's gradient w.r.t. ws.rows
    >>> table.push(ws.unique_ids, grads_UxD)   # one optimizer step on rows 5 and 7
    >>> future.result(), table.step, table.stats()['misses']
    (2, 1, 2)
    >>> table.close()                          # flushes
    >>> scratch.cleanup()
  """

  def __init__(
    self,
    path: str,
    config: TableConfig,
    optimizer: SparseAdam | RowwiseAdagrad,
    *,
    host_cache_rows: int,
    ts_cache_bytes: int,
    device_cache: DeviceCache | None = None,
    version: TableVersion | None = None,
  ):
    self._lock_file = open(os.path.join(path, "LOCK"), "w")
    try:  # one writer per table: the kernel drops this lock if the process dies
      fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._lock_file.close()
      raise TableLockedError(path) from None
    self.path = path
    self.num_rows = config.num_rows
    self.dim = config.dim
    self.optimizer = optimizer
    self._config = config
    self._ts_cache_bytes = ts_cache_bytes
    self._pending = None
    # Which chunks the zarr table may hold, where known: a table at step 0 holds none (a
    # push makes the step 1 before a flush can write a row), and each flush's copy adds
    # the chunks it writes. A miss in a chunk never written is a fresh row, with no read.
    # None (a table reopened later) reads every miss, as a table always did.
    self._written_chunks: np.ndarray | None = None
    self._merge: _store.SegmentMerge | None = None  # the background merge, if one runs
    self._merge_counts = dict(
      background_merges=0,
      background_merge_seconds=0.0,
      flush_merge_waits=0,  # flushes that waited for a background merge (over the limit)
      flush_merge_wait_seconds=0.0,
      inline_merges=0,  # flushes that merged the segments themselves
    )
    try:  # a failed open (a damaged database, an I/O error in the redo) releases the lock
      _store.remove_stale_dbs(path)
      self._store = _store.TableStore(path, config, ts_cache_bytes=ts_cache_bytes)
      dense_ids = dense_id_maps(config.num_rows, config.row_bytes, host_cache_rows)
      self._pending = PendingLog(path, config.width, dense_ids)
      redo = self._pending.recover()
      if redo is not None:  # a flush was committed but not fully copied: finish it
        self._apply_pending(redo)
      self._step = self._store.committed_step()
      if version is not None:
        self._revert(version)
      self._committed = self._store.version()
      if self._step == 0:
        self._written_chunks = np.zeros(-(-config.num_rows // config.chunk_rows), bool)
    except BaseException:
      if self._pending is not None:
        self._pending.close()
      self._lock_file.close()
      raise
    self._cache = HostCache(host_cache_rows, config.width, dense_ids)
    self._kept_row_push: RowPush | None = None  # see _row_push
    self._device_cache = device_cache
    self._open_device_step: np.ndarray | None = None  # slots of a begun, unended device step
    self._device_fns: dict = {}
    self._op_lock = threading.Lock()  # serializes pull/push/flush; prefetch skips it
    self._lock = threading.Lock()  # guards the host cache, the pending log, counters
    self._cond = threading.Condition(self._lock)
    self._num_loading = 0
    self._executor = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix="embedding-prefetch"
    )
    self._closed = False
    self._failure: tuple[str, BaseException] | None = None  # (operation, cause) once failed
    self._failed_prefetches: list[_PrefetchFuture] = []  # errors the next call may raise
    self._counts = dict(hits=0, misses=0, prefetched_rows=0, pulls=0, pushes=0)
    # The last two prefetches' (ids, unique ids, inverse): a trainer prefetches the next
    # batch before it pulls this one, which need not be sorted again (_unique_inverse).
    self._prefetched_batches: collections.deque = collections.deque(maxlen=2)

  # ----------------------------------------------------------------- public API
  @property
  def step(self) -> int:
    """The table step t, the number of pushes applied (restored from the last flush)."""
    return self._step

  @property
  def committed(self) -> TableVersion:
    """The version of the last flush (or of the state the table was opened at)."""
    return self._committed

  @property
  def failed(self) -> bool:
    """Whether an I/O error put the table in the failed state (see the module docstring):
    every call then raises ``TableFailedError`` until it is closed and reopened."""
    return self._failure is not None

  @property
  def config(self) -> TableConfig:
    """The table's static configuration, as stored in ``table.json``."""
    return self._config

  @property
  def host_cache_rows(self) -> int:
    """The host tier's capacity in rows."""
    return self._cache.capacity

  def pull(self, ids) -> np.ndarray:
    """Returns the rows of ``ids`` at the current step, float32 ``[len(ids), dim]``."""
    ids_N = _batch.check_ids(ids, self.num_rows)
    unique_U, inverse_N = self._unique_inverse(ids_N)
    with self._op_lock, self._lock:
      self._check_rows_usable()
      rows_UxD = self._read_locked(unique_U)
    return rows_UxD if unique_U is ids_N else rows_UxD[inverse_N]

  def working_set(self, ids, *, pad_to: int | None = None) -> WorkingSet:
    """Deduplicates ``ids`` and returns their unique rows with the inverse index.

    Args:
      ids: int row ids ``[N]``, may repeat.
      pad_to: if set (>= the number U of unique ids), ``rows`` has ``pad_to`` rows, the
        ones past U zero, so a jitted model sees one shape every step. ``unique_ids``
        and ``inverse`` are not padded; push ``grads[:U]`` back.

    Returns:
      ``WorkingSet(unique_ids [U], rows [U or pad_to, dim], inverse [N])`` with
      ``rows[inverse] == pull(ids)``, a NumPy array. (A training step whose optimizer runs
      on the device uses ``begin_device_step`` instead.)
    """
    unique_U, inverse_N, num_rows = self._working_ids(ids, pad_to)
    with self._op_lock, self._lock:
      self._check_rows_usable()
      rows_UxD = self._read_locked(unique_U)
    if num_rows > len(unique_U):
      rows_UxD = _batch.padded(rows_UxD, num_rows, 0.0)
    return WorkingSet(unique_U, rows_UxD, inverse_N.astype(np.int64))

  def _working_ids(self, ids, pad_to: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """A working set's sorted unique ids (never the caller's array), the inverse index of
    ``ids`` into them, and its rows: ``pad_to`` (checked to hold them all) or their number."""
    ids_N = _batch.check_ids(ids, self.num_rows)
    unique_U, inverse_N = self._unique_inverse(ids_N)
    unique_U = unique_U.copy() if unique_U is ids else unique_U
    if pad_to is None:
      return unique_U, inverse_N, len(unique_U)
    num_rows = _validation.check_int(
      pad_to, "pad_to (rows, at least the unique ids)", minimum=len(unique_U)
    )
    return unique_U, inverse_N, num_rows

  def working_set_before_push(
    self, ids, pushing_ids, *, pad_to: int | None = None
  ) -> tuple[WorkingSet, PendingPush]:
    """:meth:`working_set` of ``ids`` read *before* the next push, of ``pushing_ids``.

    A trainer reads the next batch's rows while the current step still computes, then
    pushes the current step. The rows both batches hold are read as they are before that
    push; the returned :class:`~kstep_adam.embedding.PendingPush` lets the next step's
    program apply the push to them (``apply_pending_push``, with the pushed gradient and
    whether it was applied), giving the bits the table will hold after
    ``push(pushing_ids, grads)``. Every other row the push leaves as read. The next table
    call that changes rows must be that push.

    Needs a lazy ``SparseAdam`` and no device tier (exact Adam moves every row each step).

    Args:
      ids: the next batch's row ids, may repeat.
      pushing_ids: the sorted unique ids of the push to come (the order of its gradient).
      pad_to: as for :meth:`working_set`.
    """
    if not self.can_read_before_push:
      raise ValueError(
        "working_set_before_push needs a lazy SparseAdam table without a device tier"
      )
    pushing_G = _batch.check_ids(pushing_ids, self.num_rows)
    if not _batch.is_sorted_unique(pushing_G):
      raise ValueError("pushing_ids must be sorted and unique (the push's own order)")
    unique_U, inverse_N, num_rows = self._working_ids(ids, pad_to)
    with self._op_lock, self._lock:
      self._check_rows_usable()
      rows_UxW = self._pull_rows_locked(unique_U)
      # the push to come performs step t + 1
      scalars_4x2 = _device_adam.step_scalar_bits(self.optimizer, self._step + 1)
    at_G = np.minimum(np.searchsorted(pushing_G, unique_U), max(len(pushing_G) - 1, 0))
    shared_U = pushing_G[at_G] == unique_U if len(pushing_G) else np.zeros(len(unique_U), bool)
    rows_Q = np.flatnonzero(shared_U)
    size = max(1024, _batch.pow2_at_least(max(len(rows_Q), 1)))  # few shapes to compile
    pending = PendingPush(
      rows_Q=_batch.padded(rows_Q, size, num_rows, np.int32),
      pushed_Q=_batch.padded(at_G[rows_Q], size, 0, np.int32),
      state_QxS=_batch.padded(rows_UxW[rows_Q, 1 + self.dim :], size, 0.0),
      scalars_4x2=scalars_4x2,
      zero=np.float32(0.0),
    )
    rows_PxD = _batch.padded(rows_UxW[:, 1 : 1 + self.dim], num_rows, 0.0)
    return WorkingSet(unique_U, rows_PxD, inverse_N.astype(np.int64)), pending

  @property
  def can_read_before_push(self) -> bool:
    """Whether :meth:`working_set_before_push` applies: a lazy ``SparseAdam`` table without a
    device tier."""
    opt = self.optimizer
    return isinstance(opt, SparseAdam) and opt.mode == "lazy" and self._device_cache is None

  def push(self, ids, grads) -> None:
    """Applies one optimizer step (step ``t + 1``) to the rows of ``ids``.

    Args:
      ids: int row ids ``[N]``, may repeat (their gradients are summed).
      grads: floating ``[N, dim]`` gradients (a NumPy or JAX array; cast to float32).
    """
    ids_N = _batch.check_ids(ids, self.num_rows)
    grads_NxD = _batch.check_grads(grads, len(ids_N), self.dim)
    unique_U, grads_UxD = _batch.sum_duplicates(ids_N, grads_NxD)
    dim = self.dim
    with self._op_lock, self._lock:
      self._check_rows_usable()
      device = self._device_cache
      if device is not None and len(unique_U) <= device.capacity:
        self._device_push_locked(unique_U, grads_UxD)
        return
      if device is not None:  # more rows than the device holds: the host updates them all
        with self._failure_is_fatal("push"):
          device.evict(unique_U, self._install_locked)
      step = self._step + 1
      changed = False  # whether any row is at step t + 1 yet: then a failure is fatal
      # sparse_adam.cc's push: the same bits as the NumPy form below, in one pass
      row_push = self._row_push()
      try:
        for lo in range(0, len(unique_U), self._cache.capacity):
          hi = min(lo + self._cache.capacity, len(unique_U))
          # Once rows changed, a failed prefetch must not abort the push half done.
          slots = self._acquire(unique_U[lo:hi], prefetch_errors=not changed)
          try:
            if row_push is not None:
              stepped = row_push(slots, grads_UxD[lo:hi], step)
              if stepped is None:  # stored
                changed = True
                continue
              if len(stepped):  # nothing stored: some rows are not finite
                bad = ~np.isfinite(stepped[:, 1:]).all(axis=1)
                raise NonFiniteRowsError(unique_U[lo:hi][bad])
            block = np.take(self._cache.rows_CxW, slots, axis=0)  # a copy; take: twice as fast
            params, opt_slots = block[:, 1 : 1 + dim], block[:, 1 + dim :]
            with self._cache_unlocked():  # the slots are pinned: a prefetch may run meanwhile
              self.optimizer.catch_up(params, opt_slots, _store.decode_last_step(block), step - 1)
              self.optimizer.apply(params, opt_slots, grads_UxD[lo:hi], step)
            values = block[:, 1:]  # stored as float32: no overflow to check
            if not np.isfinite(values).all():  # one pass; rows are named only on failure
              raise NonFiniteRowsError(unique_U[lo:hi][~np.isfinite(values).all(axis=1)])
            block[:, 0] = _store.encode_last_step(np.full(hi - lo, step))
            changed = True
            self._cache.rows_CxW[slots] = block
            self._cache.dirty_C[slots] = True
          finally:
            self._release(slots)
      except BaseException as error:
        if changed:
          self._raise_failed("push", error)
        raise
      self._step = step
      self._counts["pushes"] += 1

  def _row_push(self) -> RowPush | None:
    """The C++ push of this table's host cache (kept: it holds its scratch rows), or None
    where it does not apply; the kernels' switch is read at every push."""
    current = row_push_for(self.optimizer, self._cache.rows_CxW, self._cache.dirty_C)
    if current is None:
      return None
    if self._kept_row_push is None:
      self._kept_row_push = current
    return self._kept_row_push

  def prefetch(self, ids) -> concurrent.futures.Future[int]:
    """Starts loading ``ids``' rows into the host cache on a background thread.

    Returns a Future whose result is the number of rows read from disk. It overlaps with
    compute and with pull/push on other rows. If it fails, the table is unchanged; the
    Future holds the error, and if its result is never read, the table's next
    pull/working_set/push/prefetch raises it.
    """
    ids_N = _batch.check_ids(ids, self.num_rows).copy()  # ours: kept for _unique_inverse
    unique_U, inverse_N = _batch.unique_inverse(ids_N)
    if len(unique_U) > self._cache.capacity:
      raise ValueError(
        f"prefetch of {len(unique_U)} unique ids exceeds host_cache_rows="
        f"{self._cache.capacity}; prefetch at most that many"
      )
    with self._lock:
      self._check_usable()
    future = _PrefetchFuture()
    self._executor.submit(self._prefetch_task, future, unique_U)
    self._prefetched_batches.append((ids_N, unique_U, inverse_N))
    return future

  @property
  def device_optimizer(self):
    """The optimizer the device tier runs (None without a device cache), for a step that
    calls ``_device_adam.gather_rows`` / ``apply_grads`` itself."""
    return None if self._device_cache is None else self._device_cache.optimizer

  @property
  def device_sharding(self):
    """Where the device tier's rows live (None without a device cache)."""
    return None if self._device_cache is None else self._device_cache.sharding

  def begin_device_step(self, ids, *, pad_to: int) -> DeviceStep:
    """Make a batch's rows resident on the device and return a jitted step's inputs.

    The step reads the rows with ``_device_adam.gather_rows(optimizer, rows, batch)``,
    computes their gradient (zero past the ``U`` rows) and updates them with
    ``apply_grads``, which performs table step ``t + 1``; it hands the new rows to
    :meth:`end_device_step`. Until then the table refuses other calls (the step owns the
    donated device arrays). Rows that were not resident are read in from the host tier,
    caught up to step ``t`` as ``pull`` would; rows evicted to make room are written to it.

    Args:
      ids: the batch's row ids (sorted and unique is cheapest).
      pad_to: rows of the step's slot list (>= the unique ids), for a fixed shape.
    """
    ids_N = _batch.check_ids(ids, self.num_rows)
    unique_U, _ = _batch.unique_inverse(ids_N)
    pad_to = _validation.check_int(
      pad_to, "pad_to (rows, at least the unique ids)", minimum=len(unique_U)
    )
    device = self._device_cache
    if device is None:
      raise ValueError(
        "begin_device_step needs a device tier: open the table with device_cache_rows > 0"
      )
    device.check_fits(len(unique_U))  # before anything changes
    with self._op_lock, self._lock:
      self._check_rows_usable()
      slots_U = self._admit_locked(unique_U)
      with self._failure_is_fatal("begin_device_step"):
        batch = device.put_batch(device.batch(slots_U, self._step, pad_to))
      self._open_device_step = slots_U
      return DeviceStep(device.rows, batch, unique_U)

  def end_device_step(self, rows: DeviceRows, *, pushed: bool = True) -> None:
    """Install the rows a step returned; the table is then at step ``t + 1``.

    ``pushed=False``: the step read the rows but applied no update (e.g. skipped for a
    non-finite gradient); the table stays at step ``t``, as after a ``pull``.
    """
    with self._op_lock, self._lock:
      slots_U = self._open_device_step
      if slots_U is None:
        raise ValueError("end_device_step without begin_device_step")
      self._open_device_step = None
      self._check_usable()
      if pushed:
        self._finish_device_push_locked(slots_U, rows)
      else:
        device = self._device_cache
        device.rows = rows
        device.after_read(slots_U, self._step)
        device.release(slots_U)

  def _device_fn(self, name: str):
    """The table's own jitted device programs (reads and pushes outside a training step)."""
    fn = self._device_fns.get(name)
    if fn is None:
      opt = self._device_cache.optimizer
      if name == "read":
        fn = jax.jit(
          lambda rows, batch: _device_adam.gather_rows(opt, rows, batch), donate_argnums=0
        )
      else:

        def push(rows, batch, grads_PxD):
          rows, _ = _device_adam.gather_rows(opt, rows, batch)
          return _device_adam.apply_grads(opt, rows, batch, grads_PxD)

        fn = jax.jit(push, donate_argnums=0)
      self._device_fns[name] = fn
    return fn

  def _admit_locked(self, unique_U: np.ndarray) -> np.ndarray:
    """Make sorted unique rows resident on the device (pinned); returns their slots."""
    device = self._device_cache
    with self._failure_is_fatal("device tier admission"):  # device and host must agree
      if device.optimizer.mode == "exact":  # too stale for the device: the host catches up
        slots = device.peek(unique_U)
        resident = slots >= 0
        stale = np.zeros(len(unique_U), bool)
        stale[resident] = device.stale(slots[resident], self._step)
        device.evict(unique_U[stale], self._install_locked)
      slots_U, new = device.admit(unique_U, self._install_locked)
      try:
        device.upload(slots_U[new], self._pull_rows_locked(unique_U[new]))
      except BaseException:
        device.release(slots_U)
        raise
    return slots_U

  def _device_push_locked(self, unique_U: np.ndarray, grads_UxD: np.ndarray) -> None:
    """``push`` of rows that fit in the device tier: admitted, then updated there."""
    device = self._device_cache
    slots_U = self._admit_locked(unique_U)
    with self._failure_is_fatal("push"):
      pad_to = _batch.pow2_at_least(len(unique_U))
      grads_PxD = np.zeros((pad_to, self.dim), np.float32)
      grads_PxD[: len(unique_U)] = grads_UxD
      batch = device.put_batch(device.batch(slots_U, self._step, pad_to))
      grads = device.meter.put(grads_PxD, device.sharding, "grads")
      rows = self._device_fn("push")(device.rows, batch, grads)
      self._finish_device_push_locked(slots_U, rows)

  def _finish_device_push_locked(self, slots_U: np.ndarray, rows: DeviceRows) -> None:
    device = self._device_cache
    device.rows = rows
    device.after_push(slots_U, self._step + 1)
    device.release(slots_U)
    self._step += 1
    self._counts["pushes"] += 1

  def _read_locked(self, unique_U: np.ndarray) -> np.ndarray:
    """Sorted unique rows at the current step: resident ones from the device tier (caught up
    there), the others from the host tier."""
    device = self._device_cache
    if device is None:
      return self._pull_unique_locked(unique_U)
    slots_U = device.peek(unique_U)
    resident = slots_U >= 0
    out_UxD = np.empty((len(unique_U), self.dim), np.float32)
    if not resident.all():
      out_UxD[~resident] = self._pull_unique_locked(unique_U[~resident])
    if resident.any():
      with self._failure_is_fatal("device tier read"):
        slots = slots_U[resident]
        # At least 1024 rows: reads of any size share a few compiled programs.
        batch = device.batch(slots, self._step, max(1024, _batch.pow2_at_least(len(slots))))
        batch = device.put_batch(batch, kind="read")
        device.rows, rows_PxD = self._device_fn("read")(device.rows, batch)
        device.after_read(slots, self._step)
        out_UxD[resident] = device.meter.get(rows_PxD, "read")[: len(slots)]
    return out_UxD

  def _sync_device_locked(self) -> None:
    """Copy every resident device row into the host tier (they stay resident)."""
    device = self._device_cache
    if device is None or len(device) == 0:
      return
    with self._failure_is_fatal("device tier sync"):
      ids, slots = device.resident_ids()
      order = np.argsort(ids)
      ids, slots = ids[order], slots[order]
      for lo in range(0, len(ids), self._cache.capacity):
        hi = min(lo + self._cache.capacity, len(ids))
        self._install_locked(ids[lo:hi], device.download(slots[lo:hi]))

  def _install_locked(self, ids_V: np.ndarray, rows_VxW: np.ndarray) -> None:
    """Write whole rows (host layout) into the host cache as dirty: a device eviction or
    sync. Callers hold both locks; ``ids_V`` are unique."""
    order = np.argsort(ids_V)
    ids_V, rows_VxW = ids_V[order], rows_VxW[order]
    for lo in range(0, len(ids_V), self._cache.capacity):
      hi = min(lo + self._cache.capacity, len(ids_V))
      slots = self._acquire(ids_V[lo:hi], count=False)
      try:
        self._cache.rows_CxW[slots] = rows_VxW[lo:hi]
        self._cache.dirty_C[slots] = True
      finally:
        self._release(slots)

  def flush(self) -> None:
    """Commits every dirty row and the step atomically; a reopen then sees exactly this.

    If it fails before its commit point with the log unchanged on disk (a full disk while
    appending), the table is as before and ``flush`` may be retried; a failure after that
    puts the table in the failed state (``TableFailedError``). Afterwards ``committed`` is
    the version it committed: ``open_table(path, version=...)`` reverts the table to it
    later, even after more flushes.
    """
    with self._op_lock, self._lock:
      self._check_rows_usable(prefetch_errors=False)
      self._flush_locked()

  def compact(self) -> dict:
    """Flushes, then copies the stored chunks into a fresh database and deletes the old one.

    OCDBT keeps every old version of a rewritten chunk, so the database grows with each
    flush. Compaction reclaims that space; it reads and writes every stored chunk once.
    The switch to the new database is one atomic rename, and ``open`` deletes whichever
    database is not live, so a crash during ``compact`` loses nothing.

    Returns:
      ``{"bytes_before": ..., "bytes_after": ...}``, the database's size on disk.
    """
    with self._op_lock, self._lock:
      self._check_rows_usable(prefetch_errors=False)
      self._flush_locked(start_merge=False)
      self._finish_merge()  # its work counts: the merge below does the rest
      old = self._store
      _store.remove_stale_dbs(self.path)  # what an earlier failed compact left behind
      number = int(old.db_name.split(".")[1]) + 1 if "." in old.db_name else 1
      new_name = f"db.{number}"
      new = None
      try:  # everything is flushed and the old database stays live: a failure changes nothing
        new = _store.TableStore(
          self.path,
          self._config,
          ts_cache_bytes=self._ts_cache_bytes,
          create=True,
          db_name=new_name,
        )
        chunk_rows, per_batch = self._config.chunk_rows, self._chunks_per_batch()
        old.merge_segments(chunk_rows, per_batch)  # reads as before; the copy takes chunks
        chunks = old.stored_chunks()
        for lo in range(0, len(chunks), per_batch):
          starts = chunks[lo : lo + per_batch] * chunk_rows
          ids = (starts[:, None] + np.arange(chunk_rows)[None, :]).reshape(-1)
          ids = ids[ids < self.num_rows]
          new.write_rows(ids, old.read_rows(ids))
        new.write_step(self._step)
        before = _store.du_bytes(old.db_path)
      except BaseException:
        del new
        shutil.rmtree(os.path.join(self.path, new_name), ignore_errors=True)
        raise
      with self._failure_is_fatal("compact"):  # CURRENT and self._store must agree
        _store.set_current_db(self.path, new.db_name)  # the switch
        new.bytes_read, new.bytes_written = old.bytes_read, old.bytes_written
        self._store = new
        self._committed = new.version()
      del old
      _store.remove_stale_dbs(self.path)
      _malloc.release_free_memory()
      return {"bytes_before": before, "bytes_after": _store.du_bytes(new.db_path)}

  def _flush_locked(self, start_merge: bool = True) -> None:
    """Flush with both locks held (see ``flush``); then, with ``start_merge``, a background
    merge of the segments if they are past ``_BACKGROUND_MERGE_FRACTION``. A running merge
    is paused meanwhile: their memory peaks and CPU would add up."""
    merge = self._merge
    if merge is not None:
      merge.pause()
    try:
      self._flush_paused(start_merge)
    finally:
      if merge is not None:
        merge.resume()

  def _flush_paused(self, start_merge: bool) -> None:
    """``_flush_locked``'s work, with any background merge paused."""
    self._sync_device_locked()
    while self._num_loading:
      self._cond.wait()
      self._check_usable(prefetch_errors=False)
    cache = self._cache
    dirty_slots = np.flatnonzero(cache.dirty_C)
    if (
      not len(dirty_slots) and not self._pending.num_records and self._step == self._committed.step
    ):
      # Nothing changed since the last commit: no new version (a checkpoint that names the
      # last one stays exact without a revert, see ``_revert``).
      if start_merge:
        self._start_merge()
      return
    # A cached pending row is either dirty (appended now) or equal to its newest
    # record, so afterwards the newest record of every id is its state at this step. If
    # an append fails, the rows stay dirty, and a record already appended equals its
    # dirty row: the table is as before.
    batch = max(1, _FLUSH_BATCH_BYTES // cache.rows_CxW.shape[1] // 4)
    for lo in range(0, len(dirty_slots), batch):
      slots = dirty_slots[lo : lo + batch]
      # Unindexed: these rows stay cached, and the copy below finds them from the log.
      self._pending.append_unindexed(cache.ids_C[slots], cache.rows_CxW[slots])
    _faults.reached("flush.appended")
    with self._failure_is_fatal("flush"):
      commit = Commit(self._step, self._store.next_part(self._step))
      self._pending.commit(*commit)  # the commit point
      _faults.reached("flush.committed")
      self._apply_pending(commit)
      cache.dirty_C[dirty_slots] = False
      self._committed = self._store.version()
    _malloc.release_free_memory()  # the copy's transients, before training resumes
    if start_merge:
      self._start_merge()

  def close(self, flush: bool = True) -> None:
    """Flushes (unless ``flush=False``) and releases the table; idempotent.

    The table is released even if the flush fails. Closing a failed table releases it
    too; with ``flush=True`` it then raises ``TableFailedError``, since the steps since the
    last committed flush are lost.
    """
    if self._closed:
      return
    try:
      self._executor.shutdown(wait=True)
      if flush:
        with self._op_lock, self._lock:
          self._check_rows_usable(prefetch_errors=False)
          self._flush_locked(start_merge=False)
    finally:
      self._closed = True
      try:  # its segments stay and are merged after a later open
        self._finish_merge(stop=True)
      finally:
        self._pending.close()
        self._lock_file.close()  # releases the flock

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback):
    # A failed table with an exception already on its way out: that exception tells
    # the story, so release the table without raising TableFailedError over it.
    self.close(flush=exc_type is None or self._failure is None)

  def stats(self) -> dict:
    """Counters since open: cache hits/misses (per unique row), hit rate, evictions, I/O,
    and the pending log's live rows (``pending_rows``) and size (``pending_bytes``)."""
    with self._lock:
      c = dict(self._counts)
      lookups = c["hits"] + c["misses"]
      c.update(
        hit_rate=c["hits"] / lookups if lookups else 0.0,
        evictions=self._cache.evictions,
        dirty_evictions=self._cache.dirty_evictions,
        resident_rows=len(self._cache),
        dirty_rows=int(np.count_nonzero(self._cache.dirty_C)),
        pending_rows=len(self._pending),
        pending_bytes=self._pending.num_bytes,
        bytes_read=self._store.bytes_read + self._pending.bytes_read,
        bytes_written=self._store.bytes_written + self._pending.bytes_written,
        step=self._step,
        segment_rows=self._store.segment_records(),
        segment_index_bytes=self._store.segment_index_bytes(),
        background_merge_running=self._merge is not None and self._merge.is_alive(),
        **self._merge_counts,
      )
      if self._merge is not None:  # the passes of the running merge done so far
        c["background_merges"] += self._merge.passes
        c["background_merge_seconds"] += self._merge.seconds
      if self._device_cache is not None:
        c.update(self._device_cache.stats())
      return c

  # ------------------------------------------------------------- internals
  def _unique_inverse(self, ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_batch.unique_inverse(ids_N)``, from one of the last two prefetches if it had the
    same ids (an O(N) comparison instead of a sort); the unique ids are then a copy, the
    caller's own."""
    for ids, unique_U, inverse_N in reversed(list(self._prefetched_batches)):
      if len(ids) == len(ids_N) and np.array_equal(ids, ids_N):
        return unique_U.copy(), inverse_N
    return _batch.unique_inverse(ids_N)

  def _pull_unique_locked(self, unique_U: np.ndarray) -> np.ndarray:
    return self._pull_rows_locked(unique_U)[:, 1 : 1 + self.dim]

  def _pull_rows_locked(self, unique_U: np.ndarray) -> np.ndarray:
    """Whole host rows (last step, params, slots) of sorted unique ids, caught up to the
    current step (and kept so in the cache): ``pull``'s work on the host tier."""
    dim = self.dim
    blocks = []  # one per cache-sized chunk; usually one, returned as it is
    for lo in range(0, len(unique_U), self._cache.capacity):
      hi = min(lo + self._cache.capacity, len(unique_U))
      slots = self._acquire(unique_U[lo:hi])
      try:
        block = np.take(self._cache.rows_CxW, slots, axis=0)
        with self._cache_unlocked():  # the slots are pinned: a prefetch may run meanwhile
          changed = self.optimizer.catch_up(
            block[:, 1 : 1 + dim], block[:, 1 + dim :], _store.decode_last_step(block), self._step
          )
        if changed.any():
          block[changed, 0] = _store.encode_last_step(np.full(int(changed.sum()), self._step))
          self._cache.rows_CxW[slots[changed]] = block[changed]
          self._cache.dirty_C[slots[changed]] = True
        blocks.append(block)
      finally:
        self._release(slots)
    self._counts["pulls"] += 1
    if len(blocks) == 1:
      return blocks[0]
    return (
      np.concatenate(blocks) if blocks else np.empty((0, self._cache.rows_CxW.shape[1]), np.float32)
    )

  def _prefetch_task(self, future: "_PrefetchFuture", unique_U: np.ndarray) -> None:
    if not future.set_running_or_notify_cancel():
      return
    try:
      with self._lock:
        self._check_usable(prefetch_errors=False)
        before = self._counts["prefetched_rows"]
        self._release(self._acquire(unique_U, prefetch=True, prefetch_errors=False))
        num_read = self._counts["prefetched_rows"] - before
    except BaseException as error:
      with self._lock:  # recorded before the Future completes, so a reader marks it seen
        self._failed_prefetches.append(future)
      future.set_exception(error)
    else:
      future.set_result(num_read)

  @contextlib.contextmanager
  def _cache_unlocked(self):
    """Releases the cache lock for arithmetic on rows that the caller holds pinned (and,
    under the operation lock, no other pull/push/flush can touch): only a prefetch runs
    meanwhile, and it never writes a pinned slot."""
    self._lock.release()
    try:
      yield
    finally:
      self._lock.acquire()

  def _release(self, slots: np.ndarray) -> None:
    self._cache.unpin(slots)
    self._cond.notify_all()

  def _acquire(
    self,
    unique_U: np.ndarray,
    *,
    prefetch: bool = False,
    prefetch_errors: bool = True,
    count: bool = True,
  ) -> np.ndarray:
    """Makes sorted unique rows resident and pinned; returns their slots. Holds the lock,
    but releases it while reading from disk. If it raises, the cache is as it was.

    A wait for rows that another thread is loading ends in an error if the table fails
    meanwhile, or (``prefetch_errors``) if that thread was a prefetch whose read failed.
    """
    cache = self._cache
    while True:
      self._check_usable(prefetch_errors=prefetch_errors)  # never wait on a failed table
      slots_U = cache.peek(unique_U)
      present = slots_U >= 0
      present_slots = slots_U[present]
      # Wait while another thread reads some of these rows, or holds so many pins that
      # the missing rows do not fit beside ours; then look up again, the cache may have
      # changed.
      evictable = cache.num_evictable() - np.count_nonzero(cache.pins_C[present_slots] == 0)
      if not cache.loading_C[present_slots].any() and evictable >= len(unique_U) - len(
        present_slots
      ):
        break
      self._cond.wait()
    missing = unique_U[~present]
    if len(missing) and self._num_loading == 0 and self._pending.wants_compaction():
      self._compact_pending_log()  # here no read is in flight to race with the rewrite
    cache.ref_C[present_slots] = True
    cache.pin(present_slots)
    if len(missing):
      try:  # evicted dirty rows go to the pending log before the cache lets go of them
        new_slots = cache.reserve(missing, write_back=self._pending.append)
      except BaseException:
        self._release(present_slots)
        raise
      slots_U[~present] = new_slots
    if count:
      self._counts["prefetched_rows" if prefetch else "misses"] += len(missing)
      if not prefetch:
        self._counts["hits"] += len(present_slots)
    if len(missing) == 0:
      return slots_U
    log_pos = self._pending.positions(missing)
    in_pending = log_pos >= 0
    self._num_loading += 1
    self._lock.release()
    try:
      rows_MxW = np.empty((len(missing), cache.rows_CxW.shape[1]), np.float32)
      on_disk = ~in_pending
      if self._written_chunks is not None:
        never_written = ~self._written_chunks[missing // self._config.chunk_rows]
        rows_MxW[never_written & on_disk, 0] = _store.encode_last_step(np.array([-1]))
        on_disk &= ~never_written
      rows_MxW[on_disk] = self._store.read_rows(missing[on_disk])
      rows_MxW[in_pending] = self._pending.read(log_pos[in_pending])
      fresh = _store.decode_last_step(rows_MxW) < 0
      if fresh.any():
        rows_MxW[fresh] = self._fresh_rows(missing[fresh])
    except BaseException:
      self._lock.acquire()
      cache.abort(new_slots)
      self._num_loading -= 1
      self._release(present_slots)
      raise
    self._lock.acquire()
    cache.fill(new_slots, rows_MxW)
    self._num_loading -= 1
    self._cond.notify_all()
    return slots_U

  def _compact_pending_log(self) -> None:
    """Rewrites the pending log with the newest record of each row (see ``_pending``)."""
    staged = self._pending.stage_compaction()  # if this raises, the log is as it was
    with self._failure_is_fatal("pending-log compaction"):
      self._pending.install_compaction(staged)

  def _apply_pending(self, commit: Commit) -> None:
    """Writes the committed pending log into the database as segments, or, once the
    segments would hold more than ``_segment_max_records`` rows, merges the segments and the
    log into the zarr chunks in one pass; then records the commit's step. Redone from the
    start at the next open if interrupted: the choice depends only on the segments and the
    log, which stay until the flush is done, and a segment's key names its step and part
    (numbered from the commit's ``first_part``, after the segments of an earlier flush at the
    same step), so a redo overwrites what the interrupted copy wrote and nothing else."""
    step = commit.step
    chunk_rows = self._config.chunk_rows
    pieces = self._pending.newest_records(chunk_rows, _FLUSH_PIECE_RECORDS)
    # Records, superseded ones included, as segment_records counts. A redo may count more
    # (segments the interrupted flush wrote, or a background merge's not yet deleted) or
    # fewer (a merge finished since): either choice reads the same rows afterwards.
    too_many = lambda: (
      self._store.segment_records() + self._pending.num_records > self._segment_max_records()
    )
    if too_many() and self._merge is not None:
      start = time.perf_counter()
      self._finish_merge()  # it may bring them under the limit; no other chunk writer runs
      self._merge_counts["flush_merge_waits"] += 1
      self._merge_counts["flush_merge_wait_seconds"] += time.perf_counter() - start
    if too_many():
      self._merge_counts["inline_merges"] += 1
      self._store.merge_segments(
        chunk_rows,
        self._chunks_per_batch(),
        lambda: _faults.reached("flush.copied_batch"),
        newer=(
          (ids, lambda part, positions=positions: self._pending.read(positions[part]))
          for ids, positions in self._marked(pieces)
        ),
      )
      _faults.reached("flush.segments_merged")
    else:
      per_part = max(1, _FLUSH_BATCH_BYTES // self._config.row_bytes)
      part = commit.first_part
      for ids, positions in self._marked(pieces):
        for lo in range(0, len(ids), per_part):
          hi = lo + per_part
          rows = self._pending.read(positions[lo:hi])
          first = part == commit.first_part
          self._store.write_segment(step, part, ids[lo:hi], rows, first=first)
          part += 1
          _faults.reached("flush.segment_written")
      self._store.seal_segments()
    self._store.write_step(step)
    _faults.reached("flush.step_written")
    self._pending.clear()
    _faults.reached("flush.cleared")

  def _marked(self, pieces):
    """``pieces`` of the pending log, each recorded in ``_written_chunks`` (exact mode) before
    it is written: a failed write may have begun."""
    for ids, positions in pieces:
      if self._written_chunks is not None:
        self._written_chunks[ids // self._config.chunk_rows] = True
      yield ids, positions

  def _start_merge(self) -> None:
    """After a flush: starts merging the segments into the chunks in the background once
    they hold more than 1/``_BACKGROUND_MERGE_FRACTION`` of the table's rows, unless a
    merge still runs (see ``_store.SegmentMerge``)."""
    if self._merge is not None:
      if self._merge.is_alive():
        return
      self._finish_merge()
    if not self._merge_wanted():
      return

    def on_deleted():
      _malloc.release_free_memory()  # the merge's transients, as after a flush
      _faults.reached("merge.segments_deleted")

    self._merge = self._store.merge_in_background(
      self._config.chunk_rows,
      self._chunks_per_batch(),
      on_batch=lambda: _faults.reached("merge.copied_batch"),
      on_deleted=on_deleted,
      more=self._merge_wanted,
    )

  def _merge_wanted(self) -> bool:
    """Whether the segments hold more than 1/``_BACKGROUND_MERGE_FRACTION`` of the rows."""
    fraction = _BACKGROUND_MERGE_FRACTION
    return bool(fraction) and self._store.segment_records() * fraction > self.num_rows

  def _finish_merge(self, *, stop: bool = False) -> None:
    """Waits for the background merge, if one runs (asking it to stop between batches, with
    ``stop``). An I/O error in it is reported as a warning: its segments are still the
    newest record of their rows, so nothing reads differently, and a later merge (or
    ``compact``) merges them again. Any other error is raised."""
    merge, self._merge = self._merge, None
    if merge is None:
      return
    error = merge.finish(stop=stop)
    self._merge_counts["background_merges"] += merge.passes
    self._merge_counts["background_merge_seconds"] += merge.seconds
    if isinstance(error, OSError):
      warnings.warn(
        f"the background merge of {merge.records} segment rows of the table at "
        f"{self.path!r} into its chunks failed, and its segments stay for a later merge: "
        f"{error}",
        RuntimeWarning,
        stacklevel=3,
      )
    elif error is not None:
      raise error

  def _segment_max_records(self) -> int:
    """Segment rows beyond which a flush merges them into the chunks (``_SEGMENT_FRACTION``)."""
    return max(1, self.num_rows // _SEGMENT_FRACTION)

  def _revert(self, version: TableVersion) -> None:
    """Brings the just-opened table back to an earlier flush's ``version`` (see ``open``)."""
    if self._store.version() == version or self._store.only_merged_since(version):
      return  # nothing was committed since, or only background merges: the same rows
    if self._step < version.step:
      raise ValueError(
        f"cannot restore the table at {self.path!r} to step {version.step}: it is at step "
        f"{self._step}, older than the version asked for (was it replaced?)"
      )
    self._store.revert(version)
    self._step = self._store.committed_step()

  def _chunks_per_batch(self) -> int:
    """Whole chunks per disk write batch (flush copy, compact): ``_FLUSH_BATCH_BYTES``."""
    chunk_bytes = self._config.chunk_rows * self._config.row_bytes
    return max(1, _FLUSH_BATCH_BYTES // chunk_bytes)

  def _fresh_rows(self, ids_M: np.ndarray) -> np.ndarray:
    """Rows never written: deterministic init, initial optimizer slots, last_step = -1."""
    config = self._config
    rows = np.empty((len(ids_M), config.width), np.float32)
    rows[:, 0] = _store.encode_last_step(np.full(len(ids_M), -1))
    rows[:, 1 : 1 + self.dim] = _init.init_rows(
      config.logical_rows(ids_M),  # a shard's rows start as the same rows of the whole table
      self.dim,
      seed=config.seed,
      scale=config.init_scale,
      distribution=config.init_distribution,
    )
    rows[:, 1 + self.dim :] = self.optimizer.init_slots(len(ids_M), self.dim)
    return rows

  def _check_usable(self, prefetch_errors: bool = True) -> None:
    """Raises if the table is closed or failed, or (``prefetch_errors``) the error of a
    failed prefetch whose Future nobody read. Call with the cache lock held."""
    if self._closed:
      raise ValueError(f"embedding table {self.path!r} is closed")
    if self._failure is not None:
      operation, cause = self._failure
      raise TableFailedError(self.path, operation, cause) from cause
    if prefetch_errors and self._failed_prefetches:
      unread = [f for f in self._failed_prefetches if not f.observed]
      self._failed_prefetches = []
      if unread:
        error = unread[0].exception()
        error.add_note(f"(raised by a background prefetch of the table at {self.path!r})")
        raise error

  def _check_rows_usable(self, prefetch_errors: bool = True) -> None:
    """``_check_usable`` for a call that reads or writes rows: also fails the table if a
    device step is open (it holds the donated device rows, so they cannot be read)."""
    self._check_usable(prefetch_errors)
    if self._open_device_step is not None:
      self._raise_failed(
        "device step", RuntimeError("a call came between begin_device_step and end_device_step")
      )

  def _raise_failed(self, operation: str, cause: BaseException) -> NoReturn:
    """Puts the table in the failed state, wakes every waiting thread (to raise), and
    raises ``TableFailedError`` from ``cause``; an interrupt (``KeyboardInterrupt``)
    propagates as itself. Call with the cache lock held."""
    if self._failure is None:
      self._failure = (operation, cause)
    self._cond.notify_all()
    if isinstance(cause, Exception):
      raise TableFailedError(self.path, operation, cause) from cause
    raise cause

  @contextlib.contextmanager
  def _failure_is_fatal(self, operation: str):
    """Any exception inside puts the table in the failed state (``_raise_failed``)."""
    try:
      yield
    except BaseException as cause:
      self._raise_failed(operation, cause)


class _PrefetchFuture(concurrent.futures.Future):
  """A prefetch's Future that remembers whether its outcome was read, so that a failure
  is raised by the table's next call only if nobody has seen it here."""

  observed = False

  def result(self, timeout=None):
    try:
      return super().result(timeout)
    finally:
      self.observed = self.observed or self.done()

  def exception(self, timeout=None):
    try:
      return super().exception(timeout)
    finally:
      self.observed = self.observed or self.done()
