"""The pending area: an append-only log of dirty rows evicted between flushes.

Evicting a dirty row must not touch the committed table (that would mix steps after a
crash), and must be cheap: scattering single rows into zarr chunks rewrites whole chunks
(about 30x slower than a gather on this machine). So evicted rows are appended to a flat
file, ``path/pending.log`` (float32 rows of the table's row layout), and an in-memory
``IdSlotMap`` maps each id to its newest position in the log. A later miss reads the row
back from the log; ``flush`` moves every pending row into the committed table and
empties the log. The log is never part of a committed state, so ``open`` truncates it and
a crash loses exactly the rows written since the last flush. A row evicted several times
between flushes takes one log record each time (the log grows with evictions, not rows).
"""

import os

import numpy as np

from kstep_adam.embedding._id_map import IdSlotMap


class PendingLog:
  """Append-only row log with an id -> newest position index. Not thread-safe."""

  def __init__(self, path: str, width: int):
    self._path = path
    self._width = width
    self._file = open(path, "w+b")  # truncates: the log never outlives a session
    self._index = IdSlotMap(1024)
    self._num_records = 0
    self.bytes_written = 0
    self.bytes_read = 0

  def __len__(self) -> int:
    return len(self._index)

  def append(self, ids_N: np.ndarray, rows_NxW: np.ndarray) -> None:
    """Appends rows (unique ids); they supersede earlier records of the same ids."""
    if len(ids_N) == 0:
      return
    data = np.ascontiguousarray(rows_NxW, dtype=np.float32)
    self._file.seek(self._num_records * self._width * 4)
    self._file.write(data.tobytes())
    self._file.flush()
    known = self._index.lookup(ids_N) >= 0
    if known.any():
      self._index.delete(ids_N[known])
    self._index.insert(ids_N, np.arange(self._num_records, self._num_records + len(ids_N)))
    self._num_records += len(ids_N)
    self.bytes_written += data.nbytes

  def positions(self, ids_N: np.ndarray) -> np.ndarray:
    """Log positions of ``ids_N``, -1 where an id has no pending record."""
    return self._index.lookup(ids_N)

  def read(self, positions_M: np.ndarray) -> np.ndarray:
    """Reads records by position (safe while other threads append)."""
    if len(positions_M) == 0:
      return np.zeros((0, self._width), np.float32)
    log = np.memmap(self._path, dtype=np.float32, mode="r",
                    shape=(self._num_records, self._width))
    rows = np.array(log[positions_M])
    del log
    self.bytes_read += rows.nbytes
    return rows

  def items(self):
    """All pending ``(ids, positions)``."""
    return self._index.items()

  def clear(self) -> None:
    self._file.truncate(0)
    self._index = IdSlotMap(1024)
    self._num_records = 0

  def close(self) -> None:
    self._file.close()
    os.remove(self._path)
