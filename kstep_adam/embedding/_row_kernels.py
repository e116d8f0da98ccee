"""``row_index.cc``: a batch's keys hashed to rows and the rows deduplicated, in C++.

:func:`kstep_adam.embedding.hash_keys_to_rows` and :class:`~kstep_adam.embedding.RowDeduplicator`
call these where the kernels build (see :mod:`kstep_adam._native` for the switch), and keep
their NumPy forms otherwise; the results are the same integers either way.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import numpy as np

from kstep_adam import _native

_SOURCE = pathlib.Path(__file__).with_name("row_index.cc")
_HASH, _DEDUP = "KstepHashKeysToRows", "KstepDeduplicateRows"
_POINTER, _INT64, _UINT64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64


def _library():
  """The loaded library with its functions typed, or None (off, or it did not build)."""
  library = _native.library(_SOURCE, (_HASH, _DEDUP))
  return None if library is None else _typed(library)


@functools.cache
def _typed(library):
  hash_fn, dedup_fn = getattr(library, _HASH), getattr(library, _DEDUP)
  hash_fn.argtypes, hash_fn.restype = [_POINTER, _INT64, _UINT64, _UINT64, _POINTER], None
  dedup_fn.argtypes = [_POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER]
  dedup_fn.restype = _INT64
  return library


def available() -> bool:
  """Whether the kernels are in use (building them on the first call of the process)."""
  return _library() is not None


def hash_rows(keys_i64: np.ndarray, salt_mix: int, num_rows: int) -> np.ndarray | None:
  """``splitmix64(key ^ salt_mix) % num_rows`` of contiguous int64 keys, as int64 rows shaped
  like them; None where the kernel is not in use."""
  library = _library()
  if library is None:
    return None
  rows = np.empty(keys_i64.shape, np.int64)
  getattr(library, _HASH)(keys_i64.ctypes.data, keys_i64.size, salt_mix, num_rows, rows.ctypes.data)
  return rows


def deduplicate(flat_N: np.ndarray, marks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | int:
  """``(sorted unique int64, inverse int32)`` of contiguous int64 rows, with ``marks`` int32
  zeros (left zero), one per row of the table; if a row is outside ``[0, len(marks))``,
  the position of the first such one instead. Only where :func:`available`."""
  unique = np.empty(flat_N.size, np.int64)
  inverse = np.empty(flat_N.size, np.int32)
  count = getattr(_library(), _DEDUP)(
    flat_N.ctypes.data,
    flat_N.size,
    marks.size,
    marks.ctypes.data,
    unique.ctypes.data,
    inverse.ctypes.data,
  )
  if count < 0:
    return -1 - count
  return unique[:count].copy(), inverse
