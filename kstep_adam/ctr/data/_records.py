"""The seam between CTR data and the trainer: a batch of NumPy arrays and feature keys.

Every data source (the synthetic generator, the Criteo/CSV readers) yields :class:`CTRBatch`
chunks. Categorical values become 64-bit *feature keys* here, once: the key mixes the field
index with the raw value, so equal values in different fields never share an embedding row.
Hashing keys into table rows is the embedding tier's job, not this module's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# One SplitMix64 for the project: the embedding tier's.
from kstep_adam.embedding import splitmix64

MAX_KEY_BITS = 63  # keys stay non-negative when viewed as int64


class CTRBatch(NamedTuple):
  """One chunk of CTR examples, host-side NumPy arrays."""

  dense_BxI: np.ndarray  # float32 [B, num_dense], already log-transformed / scaled
  keys_BxF: np.ndarray  # int64 [B, num_categorical], feature keys in [0, 2**key_bits)
  label_B: np.ndarray  # float32 [B], 0.0 or 1.0

  @property
  def size(self) -> int:
    return int(self.label_B.shape[0])


def feature_keys(values_BxF: np.ndarray, *, key_bits: int = 40) -> np.ndarray:
  """Turn raw per-field categorical values into field-aware 64-bit feature keys.

  .. math::
    \\mathrm{key}_{b,f} = \\mathrm{splitmix64}(v_{b,f} \\oplus \\mathrm{splitmix64}(f)) \\bmod 2^{\\mathrm{key\\_bits}}

  Args:
    values_BxF: raw values (any integers; strings must be hashed to integers first), one
      column per field.
    key_bits: size of the key space as a power of two, in ``[1, 63]``.

  Returns:
    int64 array ``[B, F]`` of keys in ``[0, 2**key_bits)``.

  Examples:
    >>> keys = feature_keys(np.array([[7, 7]]))  # one value in two fields: two keys
    >>> bool(keys[0, 0] != keys[0, 1])
    True
  """
  if not isinstance(key_bits, int) or not 1 <= key_bits <= MAX_KEY_BITS:
    raise ValueError(f"key_bits must be an int in [1, {MAX_KEY_BITS}], got {key_bits!r}")
  values = np.asarray(values_BxF)
  if values.ndim != 2:
    raise ValueError(f"values_BxF must be 2-D [batch, fields], got shape {values.shape}")
  salt_F = splitmix64(np.arange(values.shape[1], dtype=np.uint64) + np.uint64(1))
  mixed = np.empty(values.shape, np.uint64)  # C order whatever the input's layout
  np.bitwise_xor(values.astype(np.uint64, copy=False), salt_F[None, :], out=mixed)
  mixed = splitmix64(mixed)
  mixed &= np.uint64((1 << key_bits) - 1)
  return mixed.view(np.int64)  # below 2**63: the same numbers


def concat_batches(batches: list[CTRBatch]) -> CTRBatch:
  """Concatenate batches along the example axis."""
  if not batches:
    raise ValueError("concat_batches needs at least one batch, got an empty list")
  return CTRBatch(*(np.concatenate(parts, axis=0) for parts in zip(*batches)))
