"""Deterministic, stateless row initialization: a row's start value is a function of (seed, row).

This is what makes the table lazy: a row that was never written is not stored anywhere,
and reading it regenerates exactly the same values.
"""

import numpy as np

from kstep_adam.embedding import _hashing

INIT_DISTRIBUTIONS = ("uniform", "normal")


def validate_init(distribution: str, scale: float) -> None:
  """Raises ValueError for an unknown distribution or a negative/non-finite scale."""
  if distribution not in INIT_DISTRIBUTIONS:
    raise ValueError(f"init_distribution must be one of {INIT_DISTRIBUTIONS}, got {distribution!r}")
  if not np.isfinite(scale) or scale < 0:
    raise ValueError(f"init_scale must be a finite float >= 0, got {scale!r}")


def init_rows(
  row_ids: np.ndarray, dim: int, *, seed: int, scale: float, distribution: str = "uniform"
) -> np.ndarray:
  """Returns the initial parameters of ``row_ids`` as float32 ``[len(row_ids), dim]``.

  .. math::
     u_{r,j} = \\mathrm{uniform01}(\\mathrm{splitmix64}(c_{r,j})),\\quad
     c_{r,j} = \\mathrm{splitmix64}(\\mathrm{seed}) + 2(r \\cdot D + j)

  ``uniform`` gives ``scale * (2u - 1)``, i.e. U(-scale, scale); ``normal`` gives
  ``scale * N(0, 1)`` by Box-Muller on the two counters ``2(rD+j)`` and ``2(rD+j)+1``.

  Args:
    row_ids: int64 row indices.
    dim: embedding width D.
    seed: table seed.
    scale: half-width (uniform) or standard deviation (normal).
    distribution: ``'uniform'`` or ``'normal'``.

  Returns:
    float32 array ``[len(row_ids), dim]``; row r is the same whatever else is requested.
  """
  row_ids = np.asarray(row_ids, dtype=np.int64)
  base_u64 = _hashing.splitmix64(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))
  with np.errstate(over="ignore"):
    counter_NxD = row_ids.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(
      dim, dtype=np.uint64
    )
    counter_NxD *= np.uint64(2)  # in place: the same wrapping arithmetic, fewer arrays
    counter_NxD += base_u64
    u1_NxD = _hashing.uniform01(_hashing.splitmix64(counter_NxD))
    if distribution == "uniform":  # scale * (2u - 1), in place: the same roundings
      u1_NxD *= 2.0
      u1_NxD -= 1.0
      u1_NxD *= scale
      return u1_NxD.astype(np.float32)
    u2_NxD = _hashing.uniform01(_hashing.splitmix64(counter_NxD + np.uint64(1)))
  normal_NxD = np.sqrt(-2.0 * np.log(u1_NxD)) * np.cos(2.0 * np.pi * u2_NxD)
  return (scale * normal_NxD).astype(np.float32)
