"""The trainer's seam to the embedding tier: keys to rows, working sets, pushes, stats.

All tier calls of a run go through :class:`SparseTier`, on the trainer's thread. The tier is
:func:`kstep_adam.embedding.open_table`; this class only adapts its arrays to the step's
shapes (flat ``inverse`` to ``[G, F]``, rows padded to a shape bucket).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kstep_adam import embedding
from kstep_adam.ctr._config import TrainConfig


@dataclasses.dataclass
class WorkingSet:
  """The deduplicated rows of one global batch."""

  unique_rows: np.ndarray  # int64 [U], table rows, each once
  rows_UxD: np.ndarray  # float32 [U, D], their current values
  inverse_BxF: np.ndarray  # int32 [G, F], index into unique_rows of every key

  @property
  def num_unique(self) -> int:
    return int(self.unique_rows.shape[0])

  def padded_rows(self, size: int) -> np.ndarray:
    """``rows_UxD`` padded with zero rows to ``size`` (padding is never indexed)."""
    out = np.zeros((size, self.rows_UxD.shape[1]), np.float32)
    out[:self.num_unique] = self.rows_UxD
    return out


class SparseTier:
  """One embedding table for all fields (keys are field-aware), synchronous per step.

  Args:
    config: the run's configuration (rows, caches, sparse learning rate, seed).
    table_dir: directory of the table's on-disk tier.
  """

  def __init__(self, config: TrainConfig, table_dir: str):
    self.num_rows, self.dim, self._salt = config.table_rows, config.embed_dim, config.seed
    self.table = embedding.open_table(
        table_dir, num_rows=config.table_rows, dim=config.embed_dim,
        optimizer=embedding.SparseAdam(learning_rate=config.sparse_learning_rate),
        host_cache_rows=config.host_cache_rows, device_cache_rows=config.device_cache_rows,
        seed=config.seed)

  def rows_of(self, keys_GxF: np.ndarray) -> np.ndarray:
    """Hash feature keys into table rows (pure NumPy; safe on the reader thread)."""
    return embedding.hash_keys_to_rows(keys_GxF, self.num_rows, salt=self._salt)

  def prefetch(self, rows_GxF: np.ndarray) -> None:
    """Start staging these rows toward the fastest tier (asynchronous)."""
    self.table.prefetch(np.unique(rows_GxF))

  def working_set(self, rows_GxF: np.ndarray) -> WorkingSet:
    """Pull the unique rows of a batch once (the step's working set)."""
    ws = self.table.working_set(rows_GxF.reshape(-1))
    return WorkingSet(np.asarray(ws.unique_ids), np.asarray(ws.rows, np.float32),
                      np.asarray(ws.inverse, np.int32).reshape(rows_GxF.shape))

  def lookup(self, keys_BxF: np.ndarray) -> WorkingSet:
    """Rows for evaluation: hash and pull, never push."""
    return self.working_set(self.rows_of(keys_BxF))

  def push(self, unique_rows: np.ndarray, grads_UxD: np.ndarray) -> None:
    """One sparse optimizer step on these rows with their (worker-averaged) gradients."""
    self.table.push(unique_rows, grads_UxD)

  def stats(self) -> dict:
    stats = self.table.stats()
    return dict(stats._asdict() if hasattr(stats, '_asdict') else
                dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else stats)

  def hit_rate(self) -> float:
    stats = self.stats()
    for name in ('hit_rate', 'host_hit_rate', 'cache_hit_rate'):
      if name in stats:
        return float(stats[name])
    return float('nan')

  def close(self) -> None:
    close = getattr(self.table, 'close', None)
    if close is not None:
      close()
