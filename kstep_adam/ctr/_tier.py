"""The trainer's seam to the embedding tier: keys to rows, working sets, pushes, stats.

All tier calls of a run go through :class:`SparseTier`, on the trainer's thread. The tier is
:func:`kstep_adam.embedding.open_table`; this class only adapts its arrays to the step's
shapes (keys hashed and deduplicated once per batch into ``unique_rows`` and an ``[G, F]``
inverse, rows padded to a shape bucket).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from kstep_adam import embedding
from kstep_adam.ctr._config import TrainConfig
from kstep_adam.ctr._pipeline import bucket_size


class WorkingSet(NamedTuple):
  """The deduplicated rows of one global batch, padded to a shape bucket."""

  unique_rows: np.ndarray  # int64 [U], table rows, each once
  rows_PxD: np.ndarray | jax.Array  # float32 [P >= U, D]; rows past U are zero (on the
  # device when the tier has a device cache)
  inverse_BxF: np.ndarray  # int32 [G, F], index into unique_rows of every key

  @property
  def num_unique(self) -> int:
    return int(self.unique_rows.shape[0])


class SparseTier:
  """One embedding table for all fields (keys are field-aware), synchronous per step.

  Args:
    config: the run's configuration (rows, caches, sparse learning rate, seed).
    table_dir: directory of the table's on-disk tier.
    temporary: the directory is scratch space and ``close`` skips the final flush;
      otherwise ``close`` flushes, so the directory holds the trained table.
  """

  def __init__(self, config: TrainConfig, table_dir: str, *, temporary: bool = False):
    self.num_rows, self.dim, self._salt = config.table_rows, config.embed_dim, config.seed
    self.table = embedding.open_table(
      table_dir,
      num_rows=config.table_rows,
      dim=config.embed_dim,
      optimizer=embedding.SparseAdam(
        learning_rate=config.sparse_learning_rate, mode=config.sparse_mode, eps=config.sparse_eps
      ),
      host_cache_rows=config.host_cache_rows,
      device_cache_rows=config.device_cache_rows,
      seed=config.seed,
      init_scale=config.init_scale,
    )
    self._temporary = temporary
    self._pad_to = {"train": 0, "eval": 0}  # shape bucket per kind of batch

  def index(self, keys_GxF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash feature keys into table rows and deduplicate them, once per batch (pure NumPy;
    safe on the reader thread): ``(unique_rows [U] sorted, inverse_GxF int32)``."""
    rows_GxF = embedding.hash_keys_to_rows(keys_GxF, self.num_rows, salt=self._salt)
    unique_rows, inverse = np.unique(rows_GxF, return_inverse=True)
    return unique_rows, inverse.astype(np.int32).reshape(rows_GxF.shape)

  def prefetch(self, unique_rows: np.ndarray) -> None:
    """Start staging these rows into the host tier (asynchronous)."""
    self.table.prefetch(unique_rows)

  def working_set(
    self, unique_rows: np.ndarray, inverse_GxF: np.ndarray, *, kind: str = "train"
  ) -> WorkingSet:
    """Pull the unique rows of a batch (from :meth:`index`) once, the step's working set,
    padded to a power of two at least ``U`` so the jitted step sees few shapes."""
    # A bucket never shrinks, so the step compiles once per new high-water mark only. Train
    # and eval batches keep separate buckets: the larger eval batches would otherwise pad
    # (and recompile) every training step after the first evaluation.
    pad_to = self._pad_to[kind] = max(self._pad_to[kind], bucket_size(len(unique_rows)))
    # The rows are unique already, so the table's own deduplication returns them unchanged.
    ws = self.table.working_set(unique_rows, pad_to=pad_to)
    return WorkingSet(unique_rows, ws.rows, inverse_GxF)

  def lookup(self, keys_BxF: np.ndarray) -> WorkingSet:
    """Rows for evaluation: hash and pull, never push."""
    return self.working_set(*self.index(keys_BxF), kind="eval")

  def push(self, unique_rows: np.ndarray, grads_UxD: np.ndarray) -> None:
    """One sparse optimizer step on these rows with their (worker-averaged) gradients."""
    self.table.push(unique_rows, grads_UxD)

  def stats(self) -> dict:
    """The table's counters (hits, misses, hit rate, evictions, bytes read/written)."""
    return self.table.stats()

  def hit_rate(self) -> float:
    return float(self.table.stats()["hit_rate"])

  def close(self) -> None:
    self.table.close(flush=not self._temporary)
