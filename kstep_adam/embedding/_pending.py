"""The pending log: dirty rows since the last flush, and the redo log that makes flush atomic.

Two jobs, one append-only log in the table directory:

* **Spill.** A dirty row evicted from the host cache is appended here, never written
  into the committed table (that would mix steps after a crash) and never scattered into
  zarr chunks (a random scatter rewrites whole chunks, far slower than an append).
  An in-memory ``IdSlotMap`` maps each id to its newest record; a later miss reads the
  row back from the log.
* **Redo log.** ``flush`` appends every still-dirty cached row too, so the newest record
  of each id is that row's state at the flush step. It then makes the log durable
  (fsync) and atomically writes ``pending.commit`` (``{"step", "records"}``, via rename):
  that rename is the commit point. Only then are the rows copied into the zarr table,
  in batches of bounded memory, and the log is emptied.

The newest record of an id is its last one: every append holds the row's state at that
moment, so a later record is never older. The copy into zarr finds the newest records
from the ids file alone (``newest_records``), a range of ids at a time, so its memory is
bounded however many rows a flush commits; the in-memory index is not used for it, and
the flush's own append (``append_unindexed``) does not grow it: a flush of a full host
cache would otherwise add an entry per cached row, on top of the cache itself.

On open: if ``pending.commit`` exists, the copy was interrupted and is redone from the
log (it is idempotent); otherwise the log holds only uncommitted rows and is discarded.

Files: ``pending.rows`` (float32 records of the row layout), ``pending.ids`` (int64 ids
of the same records), ``pending.commit``.

Size between flushes. A row evicted several times between flushes takes one record each
time, so appends alone would grow the log with evictions, without bound for a run that
never flushes. Instead, once superseded records outnumber live ones in a log of at least
``COMPACT_MIN_BYTES``, the table rewrites the log with only the newest record of each id
(``stage_compaction``, then ``install_compaction``): no flush, nothing committed, and the
log stays within ``max(2 x live records, COMPACT_MIN_BYTES)`` plus one append, where the
live records are the distinct rows changed and evicted since the last flush (at most
``num_rows``). Each compaction copies fewer records than were appended since the last
one, so it costs at most one extra read and write per appended record. (A flush-free
policy, rather than an automatic flush, because a flush commits a step: when that
happens stays the caller's choice.) The rewrite goes to temporary files renamed over the
log, and the log is uncommitted until the next flush, so a crash at any point leaves a
log that open discards, as always.
"""

import json
import os
from typing import NamedTuple

import numpy as np

from kstep_adam.embedding import _store
from kstep_adam.embedding._id_map import DenseIdMap
from kstep_adam.embedding._id_map import IdSlotMap

_ROWS, _IDS, _COMMIT = "pending.rows", "pending.ids", "pending.commit"
_COMPACTING = ".compacting"  # suffix of a compaction's files before they replace the log
COMPACT_MIN_BYTES = 64 << 20  # below this a log is never compacted: not worth the I/O
_COMPACT_BATCH_BYTES = 64 << 20  # records copied per read/write while compacting
_SCAN_IDS = 1 << 22  # ids read per block while scanning the ids file (32 MiB)
_READ_WINDOW_BYTES = 32 << 20  # the part of the log one memory map of ``read`` covers
_ID_BUCKETS = 1 << 16  # id ranges counted to cut newest_records into pieces


class Commit(NamedTuple):
  """A committed log: the table step it holds, and the part number its first segment takes
  (after the segments an earlier flush at the same step wrote, which must stay)."""

  step: int
  first_part: int


class StagedCompaction(NamedTuple):
  """A compacted copy of the log in temporary files, ready to replace it."""

  rows_fd: int  # open on pending.rows.compacting
  ids_fd: int  # open on pending.ids.compacting
  index: IdSlotMap | DenseIdMap  # id -> record position in the copy
  num_records: int  # records in the copy, one per live id


class PendingLog:
  """Append-only row log with an id -> newest record index. Not thread-safe."""

  def __init__(self, directory: str, width: int, dense_ids: int | None = None):
    self._dir = directory
    self._width = width
    self._dense_ids = dense_ids  # ids below it index through a direct array (DenseIdMap)
    # Unbuffered descriptors written with pwrite at explicit offsets: a failed write
    # leaves no buffered bytes behind for a later write to flush, and no file position.
    self._rows_fd = os.open(os.path.join(directory, _ROWS), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      self._ids_fd = os.open(os.path.join(directory, _IDS), os.O_RDWR | os.O_CREAT, 0o644)
    except BaseException:
      os.close(self._rows_fd)
      raise
    self._index = self._new_index(1024)
    self._num_records = 0
    self.bytes_written = 0
    self.bytes_read = 0

  def __len__(self) -> int:
    return len(self._index)

  def recover(self) -> Commit | None:
    """Returns the ``Commit`` of a committed-but-unapplied log, whose records then stand
    ready for ``newest_records`` and ``read`` (the index stays empty: the log is only copied
    and cleared); without a commit, empties the log and returns None."""
    commit_path = os.path.join(self._dir, _COMMIT)
    if not os.path.exists(commit_path):
      self.clear()
      return None
    with open(commit_path) as f:
      commit = json.load(f)
    self._num_records = int(commit["records"])
    return Commit(int(commit["step"]), int(commit.get("first_part", 0)))

  def append(self, ids_N: np.ndarray, rows_NxW: np.ndarray) -> None:
    """Appends rows (unique ids); they supersede earlier records of the same ids.

    All or nothing: if a write fails (a full disk), the log is unchanged (the bytes past
    its end are overwritten by the next append) and the error propagates.
    """
    first = self._num_records
    self.append_unindexed(ids_N, rows_NxW)
    known = self._index.lookup(ids_N) >= 0
    if known.any():
      self._index.delete(ids_N[known])
    self._index.insert(ids_N, np.arange(first, self._num_records))

  def append_unindexed(self, ids_N: np.ndarray, rows_NxW: np.ndarray) -> None:
    """Appends rows like ``append`` without adding them to the index: for rows that are
    never read back through it, as a flush's, which stay in the host cache (dirty until
    the flush succeeds, so a later eviction appends them again, indexed) and reach zarr
    through ``newest_records``. ``positions`` may then name an older record of such an id;
    the table reads the log only for rows it does not hold."""
    if len(ids_N) == 0:
      return
    data = np.ascontiguousarray(rows_NxW, dtype=np.float32)
    _pwrite_all(self._rows_fd, data, self._num_records * self._width * 4)
    _pwrite_all(self._ids_fd, np.ascontiguousarray(ids_N, dtype=np.int64), self._num_records * 8)
    self._num_records += len(ids_N)
    self.bytes_written += data.nbytes

  def positions(self, ids_N: np.ndarray) -> np.ndarray:
    """Record positions of ``ids_N``, -1 where an id has no pending record."""
    return self._index.lookup(ids_N)

  def read(self, positions_M: np.ndarray) -> np.ndarray:
    """Reads records by position (safe while other threads append).

    Through a memory map of one ``_READ_WINDOW_BYTES`` window of the log at a time, in the
    order of the positions: the pages a map touches (and the kernel's fault-around maps
    beside each) count in the process's RSS until it is unmapped, and a flush reading 16 MiB
    of records scattered over a 1.45 GB log through one map of all of it peaked 0.3 GiB
    higher (the 2^28-row benchmark, where that passed 4 GiB)."""
    positions_M = np.asarray(positions_M, np.int64)
    rows = np.empty((len(positions_M), self._width), np.float32)
    if len(positions_M) == 0:
      return rows
    order = np.argsort(positions_M, kind="stable")
    window = max(1, _READ_WINDOW_BYTES // (self._width * 4))
    first_window = positions_M[order] // window
    cuts = np.flatnonzero(np.diff(first_window)) + 1
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(order)]):
      start = int(first_window[lo]) * window
      stop = min(start + window, self._num_records)
      log = np.memmap(
        os.path.join(self._dir, _ROWS),
        dtype=np.float32,
        mode="r",
        offset=start * self._width * 4,
        shape=(stop - start, self._width),
      )
      mine = order[lo:hi]
      rows[mine] = log[positions_M[mine] - start]
      del log
    self.bytes_read += rows.nbytes
    return rows

  def newest_records(self, unit: int, max_records: int):
    """Yields ``(ids, positions)``: the newest record of every id in the log.

    The ids come ascending and unique, in pieces that each cover a range of whole
    ``unit``-aligned blocks of ids (the table passes its chunk rows, so no chunk is split
    between pieces) and hold about ``max_records`` records, more only when that many fall
    into one of ``_ID_BUCKETS`` equal slices of the ids. Only the ids file is read: once
    to count records per slice, then once per piece, a block at a time, so memory stays
    O(max_records) however many records the log holds.
    """
    n = self._num_records
    blocks = range(0, n, _SCAN_IDS)
    if n == 0:
      return
    num_units = max(int(self._read_ids(lo).max()) for lo in blocks) // unit + 1
    bucket_units = -(-num_units // _ID_BUCKETS)  # a slice: this many unit blocks of ids
    counts = np.zeros(-(-num_units // bucket_units), np.int64)
    for lo in blocks:
      counts += np.bincount(self._read_ids(lo) // (unit * bucket_units), minlength=len(counts))
    # A piece ends before the slice that would take it past max_records.
    starts, total = [0], 0
    for bucket, count in enumerate(counts.tolist()):
      if total and total + count > max_records:
        starts.append(bucket)
        total = 0
      total += count
    for first, end in zip(starts, starts[1:] + [len(counts)]):
      lo_id, hi_id = first * bucket_units * unit, end * bucket_units * unit
      ids_parts, positions_parts = [], []
      for lo in blocks:
        block = self._read_ids(lo)
        where = np.flatnonzero((block >= lo_id) & (block < hi_id))
        ids_parts.append(block[where])
        positions_parts.append(where + lo)
      ids, positions = np.concatenate(ids_parts), np.concatenate(positions_parts)
      # The newest record of an id is its last one: the first in reverse order.
      unique, first_in_reverse = np.unique(ids[::-1], return_index=True)
      yield unique, positions[::-1][first_in_reverse]

  def _read_ids(self, first: int) -> np.ndarray:
    """Ids of records ``first`` to ``first + _SCAN_IDS`` (fewer at the end of the log);
    pread, so an I/O error is an OSError, and appends from other threads do not interfere."""
    count = min(_SCAN_IDS, self._num_records - first)
    ids = np.empty(count, np.int64)
    view, offset = memoryview(ids).cast("B"), first * 8
    while len(view):
      read = os.preadv(self._ids_fd, [view], offset)
      if read == 0:
        raise OSError(f"pending log {self._dir!r}: ids file ends before record {self._num_records}")
      view, offset = view[read:], offset + read
    return ids

  def commit(self, step: int, first_part: int = 0) -> None:
    """Makes the log durable, then atomically marks it as the state at ``step``, to be
    written as segments numbered from ``first_part`` (a redo must write the same ones)."""
    os.fsync(self._rows_fd)
    os.fsync(self._ids_fd)
    record = {"step": int(step), "records": self._num_records, "first_part": int(first_part)}
    _store.replace_file_durably(self._dir, _COMMIT, json.dumps(record))

  def clear(self) -> None:
    """Empties the log; after ``commit``, call only once its rows are in the table."""
    commit_path = os.path.join(self._dir, _COMMIT)
    if os.path.exists(commit_path):
      os.remove(commit_path)
      _store.fsync_dir(self._dir)
    os.ftruncate(self._rows_fd, 0)
    os.ftruncate(self._ids_fd, 0)
    self._index = self._new_index(1024)
    self._num_records = 0
    for name in (_ROWS, _IDS):  # what a compaction interrupted by a crash left behind
      if os.path.exists(os.path.join(self._dir, name + _COMPACTING)):
        os.remove(os.path.join(self._dir, name + _COMPACTING))

  @property
  def num_records(self) -> int:
    """Row records in the log (superseded ones included)."""
    return self._num_records

  @property
  def num_bytes(self) -> int:
    """Bytes of row records in the log (superseded ones included)."""
    return self._num_records * self._width * 4

  def wants_compaction(self) -> bool:
    """Whether superseded records outnumber live ones in a log of ``COMPACT_MIN_BYTES``."""
    return self._num_records > 2 * len(self._index) and self.num_bytes >= COMPACT_MIN_BYTES

  def stage_compaction(self) -> StagedCompaction:
    """Writes the newest record of each id, in log order, to temporary files.

    The log itself is untouched: if this raises (a full disk), nothing has changed.
    Reading the records must not race with another reader of positions (the table calls
    it only when no read is in flight).
    """
    ids, positions = self._index.items()
    order = np.argsort(positions)  # log order: the copy reads the log front to back
    ids, positions = ids[order], positions[order]
    rows_path, ids_path = (os.path.join(self._dir, n + _COMPACTING) for n in (_ROWS, _IDS))
    rows_fd = ids_fd = None
    try:
      rows_fd = os.open(rows_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
      ids_fd = os.open(ids_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
      batch = max(1, _COMPACT_BATCH_BYTES // (self._width * 4))
      for lo in range(0, len(ids), batch):
        rows = self.read(positions[lo : lo + batch])
        _pwrite_all(rows_fd, rows, lo * self._width * 4)
        self.bytes_written += rows.nbytes
      _pwrite_all(ids_fd, np.ascontiguousarray(ids), 0)
    except BaseException:
      for fd in (rows_fd, ids_fd):
        if fd is not None:
          os.close(fd)
      for path in (rows_path, ids_path):
        if os.path.exists(path):
          os.remove(path)
      raise
    index = self._new_index(len(ids))
    index.insert(ids, np.arange(len(ids)))
    return StagedCompaction(rows_fd, ids_fd, index, len(ids))

  def install_compaction(self, staged: StagedCompaction) -> None:
    """Replaces the log with a staged copy (two renames; the log is uncommitted, so a crash
    between them leaves a log that open discards). If this raises, the log's files may
    disagree with its index: the table must not use the log again (it fails)."""
    try:
      for name in (_IDS, _ROWS):
        os.replace(os.path.join(self._dir, name + _COMPACTING), os.path.join(self._dir, name))
    except BaseException:
      os.close(staged.rows_fd)
      os.close(staged.ids_fd)
      raise
    os.close(self._rows_fd)
    os.close(self._ids_fd)
    self._rows_fd, self._ids_fd = staged.rows_fd, staged.ids_fd
    self._index, self._num_records = staged.index, staged.num_records

  def close(self) -> None:
    os.close(self._rows_fd)
    os.close(self._ids_fd)

  def _new_index(self, max_entries: int) -> IdSlotMap | DenseIdMap:
    """id -> record position; int64, since a log may pass 2**31 records. A hash map has
    two slots per entry: the index holds every row evicted since the last flush, so its
    memory counts more than its probe lengths."""
    if self._dense_ids is not None:
      return DenseIdMap(self._dense_ids, value_dtype=np.int64)
    return IdSlotMap(max(1024, max_entries), value_dtype=np.int64, slots_per_entry=2)


def _pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
  """Writes all of ``array``'s bytes at ``offset`` (pwrite may write fewer in one call)."""
  view = memoryview(array).cast("B")
  while len(view):
    written = os.pwrite(fd, view, offset)
    view, offset = view[written:], offset + written
