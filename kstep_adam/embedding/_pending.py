"""The pending log: dirty rows since the last flush, and the redo log that makes flush atomic.

Two jobs, one append-only log in the table directory:

* **Spill.** A dirty row evicted from the host cache is appended here, never written
  into the committed table (that would mix steps after a crash) and never scattered into
  zarr chunks (a random scatter rewrites whole chunks, ~30x slower than a gather here).
  An in-memory ``IdSlotMap`` maps each id to its newest record; a later miss reads the
  row back from the log.
* **Redo log.** ``flush`` appends every still-dirty cached row too, so the newest record
  of each id is that row's state at the flush step. It then makes the log durable
  (fsync) and atomically writes ``pending.commit`` (``{"step", "records"}``, via rename):
  that rename is the commit point. Only then are the rows copied into the zarr table,
  in batches of bounded memory, and the log is emptied.

On open: if ``pending.commit`` exists, the copy was interrupted and is redone from the
log (it is idempotent); otherwise the log holds only uncommitted rows and is discarded.

Files: ``pending.rows`` (float32 records of the row layout), ``pending.ids`` (int64 ids
of the same records), ``pending.commit``. A row evicted several times between flushes
takes one record each time: the log grows with evictions, not with distinct rows.
"""

import json
import os

import numpy as np

from kstep_adam.embedding import _store
from kstep_adam.embedding._id_map import IdSlotMap

_ROWS, _IDS, _COMMIT = "pending.rows", "pending.ids", "pending.commit"


class PendingLog:
  """Append-only row log with an id -> newest record index. Not thread-safe."""

  def __init__(self, directory: str, width: int):
    self._dir = directory
    self._width = width
    # Unbuffered descriptors written with pwrite at explicit offsets: a failed write
    # leaves no buffered bytes behind for a later write to flush, and no file position.
    self._rows_fd = os.open(os.path.join(directory, _ROWS), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      self._ids_fd = os.open(os.path.join(directory, _IDS), os.O_RDWR | os.O_CREAT, 0o644)
    except BaseException:
      os.close(self._rows_fd)
      raise
    self._index = IdSlotMap(1024)
    self._num_records = 0
    self.bytes_written = 0
    self.bytes_read = 0

  def __len__(self) -> int:
    return len(self._index)

  def recover(self) -> int | None:
    """Loads a committed-but-unapplied log and returns its step; else empties the log."""
    commit_path = os.path.join(self._dir, _COMMIT)
    if not os.path.exists(commit_path):
      self.clear()
      return None
    with open(commit_path) as f:
      commit = json.load(f)
    n = int(commit["records"])
    ids = np.fromfile(os.path.join(self._dir, _IDS), dtype=np.int64, count=n)
    # Newest record wins: the last occurrence of each id.
    unique, last_from_end = np.unique(ids[::-1], return_index=True)
    self._index = IdSlotMap(max(1024, len(unique)))
    self._index.insert(unique, n - 1 - last_from_end)
    self._num_records = n
    return int(commit["step"])

  def append(self, ids_N: np.ndarray, rows_NxW: np.ndarray) -> None:
    """Appends rows (unique ids); they supersede earlier records of the same ids.

    All or nothing: if a write fails (a full disk), the log is unchanged (the bytes past
    its end are overwritten by the next append) and the error propagates.
    """
    if len(ids_N) == 0:
      return
    data = np.ascontiguousarray(rows_NxW, dtype=np.float32)
    _pwrite_all(self._rows_fd, data, self._num_records * self._width * 4)
    _pwrite_all(self._ids_fd, np.ascontiguousarray(ids_N, dtype=np.int64), self._num_records * 8)
    known = self._index.lookup(ids_N) >= 0
    if known.any():
      self._index.delete(ids_N[known])
    self._index.insert(ids_N, np.arange(self._num_records, self._num_records + len(ids_N)))
    self._num_records += len(ids_N)
    self.bytes_written += data.nbytes

  def positions(self, ids_N: np.ndarray) -> np.ndarray:
    """Record positions of ``ids_N``, -1 where an id has no pending record."""
    return self._index.lookup(ids_N)

  def read(self, positions_M: np.ndarray) -> np.ndarray:
    """Reads records by position (safe while other threads append)."""
    if len(positions_M) == 0:
      return np.zeros((0, self._width), np.float32)
    log = np.memmap(
      os.path.join(self._dir, _ROWS),
      dtype=np.float32,
      mode="r",
      shape=(self._num_records, self._width),
    )
    rows = np.array(log[positions_M])
    del log
    self.bytes_read += rows.nbytes
    return rows

  def items(self):
    """All pending ``(ids, positions)``, ids unique."""
    return self._index.items()

  def commit(self, step: int) -> None:
    """Makes the log durable, then atomically marks it as the state at ``step``."""
    os.fsync(self._rows_fd)
    os.fsync(self._ids_fd)
    _store.replace_file_durably(
      self._dir, _COMMIT, json.dumps({"step": int(step), "records": self._num_records})
    )

  def clear(self) -> None:
    """Empties the log; after ``commit``, call only once its rows are in the table."""
    commit_path = os.path.join(self._dir, _COMMIT)
    if os.path.exists(commit_path):
      os.remove(commit_path)
      _store.fsync_dir(self._dir)
    os.ftruncate(self._rows_fd, 0)
    os.ftruncate(self._ids_fd, 0)
    self._index = IdSlotMap(1024)
    self._num_records = 0

  def close(self) -> None:
    os.close(self._rows_fd)
    os.close(self._ids_fd)


def _pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
  """Writes all of ``array``'s bytes at ``offset`` (pwrite may write fewer in one call)."""
  view = memoryview(array).cast("B")
  while len(view):
    written = os.pwrite(fd, view, offset)
    view, offset = view[written:], offset + written
