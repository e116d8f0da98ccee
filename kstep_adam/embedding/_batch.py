"""Validation and reduction of the (ids, grads) a caller hands to a table.

Every check runs before the table changes anything, so a bad input leaves it intact.
"""

import numpy as np


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


def segment_sum(values_NxD: np.ndarray, segment_N: np.ndarray, num: int) -> np.ndarray:
  """Sums rows of ``values_NxD`` that share a segment id (vectorized, no Python loop)."""
  order = np.argsort(segment_N, kind="stable")
  sorted_seg = segment_N[order]
  starts = np.flatnonzero(np.r_[True, sorted_seg[1:] != sorted_seg[:-1]])
  out = np.zeros((num, values_NxD.shape[1]), np.float32)
  out[sorted_seg[starts]] = np.add.reduceat(values_NxD[order], starts, axis=0)
  return out
