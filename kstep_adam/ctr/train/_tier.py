"""The sparse tier behind one interface: what the loop, evaluation and checkpoints call.

Two strategies implement it: :class:`~._local_tier.SparseTier` (one process, the whole table)
and :class:`~._sharded_tier.ShardedSparseTier` (one shard per process, rows exchanged over the
mesh). Both subclass :class:`TableTier`, which owns the table and writes what they share once:
counters, flush and close. A new sparse-tier strategy is a :class:`TableTier` here in ``train/``
with its own step builder.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import Protocol

import numpy as np

from kstep_adam import embedding
from kstep_adam.embedding import pow2_at_least  # the tier's padding rule, one for the project


class Tier(Protocol):
  """What every sparse tier offers (each adds its own ``push`` for its step's output)."""

  table: embedding.EmbeddingTable
  meter: embedding.TransferMeter

  def index(self, keys_GxF: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
  def prefetch(self, row_ids_U: np.ndarray) -> None: ...
  def pull(self, row_ids_U: np.ndarray, inverse_GxF: np.ndarray, *, kind: str = "train"): ...
  def eval_rows(self, row_ids_U: np.ndarray, inverse_GxF: np.ndarray) -> tuple[Any, np.ndarray]: ...
  def transfer_bytes(self) -> dict: ...
  def stats(self) -> dict: ...
  def hit_rate(self) -> float: ...
  def run_stats(self) -> dict: ...
  def flush(self) -> embedding.TableVersion: ...
  def keep_committed(self) -> None: ...
  def close(self) -> None: ...


class TableTier:
  """The part of a tier that is its table: counters, flush, close (written once).

  A subclass sets ``self.table``, ``self.num_rows`` (the whole table's rows), ``self._salt``
  and ``self._flush_on_close`` in its constructor.
  """

  table: embedding.EmbeddingTable
  num_rows: int
  _salt: int
  _flush_on_close: bool

  def index(self, keys_GxF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash feature keys into table rows and deduplicate them, once per batch (pure NumPy;
    safe on the reader thread): ``(row_ids_U sorted, inverse_GxF int32)``."""
    rows_GxF = embedding.hash_keys_to_rows(keys_GxF, self.num_rows, salt=self._salt)
    return self._deduplicate(rows_GxF)

  @functools.cached_property
  def _deduplicate(self) -> embedding.RowDeduplicator:
    return embedding.RowDeduplicator(self.num_rows)

  def stats(self) -> dict:
    """This process's table counters (hits, misses, hit rate, evictions, bytes read/written):
    in a multi-process run, those of its shard."""
    return self.table.stats()

  def hit_rate(self) -> float:
    """Share of this process's row reads its host tier served from memory so far."""
    return float(self.table.stats()["hit_rate"])

  def run_stats(self) -> dict:
    """The run's table counters: :meth:`stats` for one process (collective in a multi-process
    run, where the shards' are summed)."""
    return self.stats()

  def flush(self) -> embedding.TableVersion:
    """Commit the table (this process's shard) at its current step; return the version."""
    self.table.flush()
    return self.table.committed

  def keep_committed(self) -> None:
    """Close without flushing: the run diverged, and its table's last commit (a checkpoint's,
    or its start) is the last good state."""
    self._flush_on_close = False

  def close(self) -> None:
    self.table.close(flush=self._flush_on_close)


def bucket_size(num_unique: int, *, minimum: int = 1024) -> int:
  """Round a batch's unique-row count up to a power of two (at least ``minimum``), so the
  jitted step sees few shapes; the device cache pads its uploads the same way.

  Examples:
    >>> bucket_size(1000), bucket_size(1025), bucket_size(4096)
    (1024, 2048, 4096)
  """
  return max(minimum, pow2_at_least(num_unique))
