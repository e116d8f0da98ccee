"""Validation and reduction of the (ids, grads) a caller hands to a table.

Every check runs before the table changes anything, so a bad input leaves it intact.
"""

import threading
from typing import NoReturn

import numpy as np

from kstep_adam.embedding import _row_kernels


def check_ids(ids, num_rows: int) -> np.ndarray:
  """Returns ``ids`` as a 1-D int64 array, or raises ValueError naming the problem."""
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape}")
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
  ids = ids.astype(np.int64, copy=False)
  if ids.size and (ids.min() < 0 or ids.max() >= num_rows):
    bad = ids[(ids < 0) | (ids >= num_rows)]
    raise ValueError(
      f"ids must be in [0, num_rows={num_rows}), got {bad.size} out of range, e.g. {int(bad[0])}"
    )
  return ids


def check_grads(grads, n: int, dim: int) -> np.ndarray:
  """Returns finite float32 ``[n, dim]`` gradients, or raises ValueError naming the problem."""
  grads = np.asarray(grads)
  if grads.shape != (n, dim):
    raise ValueError(
      f"grads must have shape [len(ids), dim] = [{n}, {dim}], got {list(grads.shape)}"
    )
  if not (np.issubdtype(grads.dtype, np.floating) or grads.dtype.name == "bfloat16"):
    raise ValueError(
      f"grads must be a floating array (float16/32/64, bfloat16), got dtype {grads.dtype}"
    )
  grads = grads.astype(np.float32, copy=False)
  finite = np.isfinite(grads)
  if not finite.all():
    raise ValueError(
      f"grads must be finite, got {finite.size - np.count_nonzero(finite)} NaN/inf entries"
    )
  return grads


def is_sorted_unique(ids_N: np.ndarray) -> bool:
  """Whether ``ids_N`` is strictly increasing (sorted and unique): one O(N) pass."""
  return bool(np.all(ids_N[1:] > ids_N[:-1]))


def unique_inverse(ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``np.unique(ids_N, return_inverse=True)``, without the sort when ``ids_N`` is sorted
  and unique already (what the CTR trainer passes): then ``(ids_N, arange(N))``."""
  if is_sorted_unique(ids_N):
    return ids_N, np.arange(len(ids_N))
  return np.unique(ids_N, return_inverse=True)


# Tables up to this many rows deduplicate a batch through a scratch array of one int32 per
# row (64 MiB at most; its pages are only made resident where rows are hit), larger ones sort.
DIRECT_DEDUP_MAX_ROWS = 1 << 24


class RowDeduplicator:
  """``np.unique(rows, return_inverse=True)`` for many batches of rows in ``[0, num_rows)``.

  A CTR batch of 4096 examples has about 10^5 keys and 2 * 10^4 distinct rows; sorting all
  its keys (``np.unique``) took 10 ms here, while marking each key's row in a scratch array
  of ``num_rows`` slots and sorting only the distinct rows takes 1.5 ms. A table of more than
  ``DIRECT_DEDUP_MAX_ROWS`` rows falls back to ``np.unique``. Safe to share between
  threads (the scratch array is used under a lock).

  Args:
    num_rows: the rows' bound; every row passed must lie in ``[0, num_rows)``.

  Examples:
    >>> dedup = RowDeduplicator(10)
    >>> unique, inverse = dedup(np.array([[7, 2], [7, 5]]))
    >>> unique.tolist(), inverse.tolist()
    ([2, 5, 7], [[2, 0], [2, 1]])
  """

  def __init__(self, num_rows: int):
    self.num_rows = int(num_rows)
    self._slot = None  # int32 [num_rows], allocated on first use
    self._marks = None  # int32 [num_rows] zeros between calls: row_index.cc's scratch
    self._lock = threading.Lock()

  def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(unique_U sorted int64, inverse int32 shaped like rows)``."""
    rows = np.asarray(rows)
    flat_N = rows.reshape(-1).astype(np.int64, copy=False)
    if self.num_rows > DIRECT_DEDUP_MAX_ROWS or flat_N.size >= 1 << 31:
      unique_U, inverse_N = np.unique(flat_N, return_inverse=True)
      return unique_U, inverse_N.astype(np.int32).reshape(rows.shape)
    if _row_kernels.available():  # row_index.cc: the same result in two passes
      flat_N = np.ascontiguousarray(flat_N)
      with self._lock:
        if self._marks is None:
          self._marks = np.zeros(self.num_rows, np.int32)
        found = _row_kernels.deduplicate(flat_N, self._marks)
      if isinstance(found, int):
        self._out_of_range(flat_N[found])
      return found[0], found[1].reshape(rows.shape)
    if flat_N.size and (flat_N.min() < 0 or flat_N.max() >= self.num_rows):
      self._out_of_range(flat_N[(flat_N < 0) | (flat_N >= self.num_rows)][0])
    position_N = np.arange(flat_N.size, dtype=np.int32)
    with self._lock:
      if self._slot is None:
        self._slot = np.zeros(self.num_rows, np.int32)
      slot = self._slot
      # Of the positions holding the same row, one is left in its slot (whichever numpy's
      # assignment writes last): exactly one position a row finds itself there.
      slot[flat_N] = position_N
      unique_U = np.sort(flat_N[slot[flat_N] == position_N])
      slot[unique_U] = np.arange(unique_U.size, dtype=np.int32)
      inverse_N = slot[flat_N]
    return unique_U, inverse_N.reshape(rows.shape)

  def _out_of_range(self, row) -> NoReturn:
    raise ValueError(f"rows must be in [0, num_rows={self.num_rows}), got {int(row)}")


def sum_duplicates(ids_N: np.ndarray, grads_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted unique ids and the sum of each one's gradient rows, with one sort at most.

  Returns:
    ``(unique_U, grads_UxD)``; ``ids_N``, ``grads_NxD`` themselves when ``ids_N`` is sorted
    and unique. Duplicates are summed in their order in ``ids_N`` (a stable sort).
  """
  if is_sorted_unique(ids_N):
    return ids_N, grads_NxD
  order_N = np.argsort(ids_N, kind="stable")
  sorted_N = ids_N[order_N]
  starts_U = np.flatnonzero(np.r_[True, sorted_N[1:] != sorted_N[:-1]])
  return sorted_N[starts_U], np.add.reduceat(grads_NxD[order_N], starts_U, axis=0)


def pow2_at_least(n: int) -> int:
  """The smallest power of two ``>= n`` (1 for ``n <= 1``): the tier's padding rule.

  Examples:
    >>> pow2_at_least(1000), pow2_at_least(1024), pow2_at_least(0)
    (1024, 1024, 1)
  """
  return 1 << max(0, int(n) - 1).bit_length()


def padded(values, size: int, fill, dtype=None) -> np.ndarray:
  """``values`` along axis 0, then rows of ``fill`` up to ``size`` (of ``dtype``, else
  ``values``' own): the fixed shapes the tier hands to compiled programs.

  Examples:
    >>> padded(np.array([3, 1]), 4, -1, np.int32)
    array([ 3,  1, -1, -1], dtype=int32)
  """
  values = np.asarray(values)
  out = np.empty((size, *values.shape[1:]), dtype or values.dtype)  # each entry written once
  out[: len(values)] = values
  out[len(values) :] = fill
  return out
