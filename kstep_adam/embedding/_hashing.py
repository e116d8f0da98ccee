"""Counter-based 64-bit hashing: the one source of randomness in the embedding tier.

Both the deterministic row initializer and the public feature-key mapping use
SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014), a bijective mixer of a 64-bit counter. It is stateless, so any row can be
regenerated on its own, in any order, on any machine.
"""

import numpy as np

from kstep_adam.embedding import _row_kernels

_GOLDEN_U64 = np.uint64(0x9E3779B97F4A7C15)
_MIX1_U64 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2_U64 = np.uint64(0x94D049BB133111EB)


def splitmix64(x_u64: np.ndarray) -> np.ndarray:
  """Mixes each uint64 counter into a pseudorandom uint64 (a bijection on 64 bits)."""
  x_u64 = np.asarray(x_u64, dtype=np.uint64)
  with np.errstate(over="ignore"):
    if x_u64.ndim == 0:
      z = x_u64 + _GOLDEN_U64
      z = (z ^ (z >> np.uint64(30))) * _MIX1_U64
      z = (z ^ (z >> np.uint64(27))) * _MIX2_U64
      return z ^ (z >> np.uint64(31))
    # The same operations in place: two arrays instead of nine (a fresh row's init, and so
    # a table's first touch of a row, is mostly this function).
    z = x_u64 + _GOLDEN_U64
    shifted = z >> np.uint64(30)
    z ^= shifted
    z *= _MIX1_U64
    np.right_shift(z, np.uint64(27), out=shifted)
    z ^= shifted
    z *= _MIX2_U64
    np.right_shift(z, np.uint64(31), out=shifted)
    z ^= shifted
    return z


def hash_keys_to_rows(keys, num_rows: int, salt: int = 0) -> np.ndarray:
  """Maps 64-bit feature keys to table rows: ``splitmix64(key XOR splitmix64(salt)) mod num_rows``.

  .. math::
     \\mathrm{row}(k) = \\mathrm{splitmix64}(k \\oplus \\mathrm{splitmix64}(\\mathrm{salt}))
     \\bmod N

  The mapping is many-to-one: distinct keys collide with probability about 1/N per pair,
  and colliding keys share a row (the usual "hashing trick"; this is not a collision-free
  table such as Monolith's). Use a different ``salt`` per table so that two tables do not
  collide on the same key pairs.

  Args:
    keys: integer array of feature keys (any integer dtype; negative int64 keys are
      taken by their two's-complement bits).
    num_rows: the table's row count, a positive int.
    salt: a per-table integer mixed into every key.

  Returns:
    An int64 array of rows in ``[0, num_rows)``, the shape of ``keys``.

  Examples:
    >>> rows = hash_keys_to_rows(np.array([7, 2**40 + 3]), num_rows=1000, salt=1)
    >>> bool(((rows >= 0) & (rows < 1000)).all())
    True
  """
  if not isinstance(num_rows, (int, np.integer)) or num_rows <= 0:
    raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
  keys = np.asarray(keys)
  if not np.issubdtype(keys.dtype, np.integer):
    raise ValueError(f"keys must be an integer array, got dtype {keys.dtype}")
  salt_u64 = splitmix64(np.uint64(int(salt) & 0xFFFFFFFFFFFFFFFF))
  keys_i64 = np.ascontiguousarray(keys.astype(np.int64, copy=False))
  rows = _row_kernels.hash_rows(keys_i64, int(salt_u64), int(num_rows))
  if rows is not None:  # row_index.cc: the same integers in one pass
    return rows
  mixed_u64 = splitmix64(keys_i64.view(np.uint64) ^ salt_u64)
  return (mixed_u64 % np.uint64(num_rows)).astype(np.int64)


def uniform01(bits_u64: np.ndarray) -> np.ndarray:
  """Turns random 64-bit words into float64 uniforms in (0, 1) from their top 53 bits."""
  u = (bits_u64 >> np.uint64(11)).astype(np.float64)
  if u.ndim == 0:
    return (u + 0.5) * (1.0 / (1 << 53))
  u += 0.5  # in place: the same roundings as (u + 0.5) * 2^-53
  u *= 1.0 / (1 << 53)
  return u
