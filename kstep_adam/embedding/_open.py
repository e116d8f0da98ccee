"""open_table: create a table directory or reopen one, validating before anything changes."""

import dataclasses
import os

from kstep_adam import _validation
from kstep_adam.embedding import _optimizers
from kstep_adam.embedding import _store
from kstep_adam.embedding._config import TableConfig
from kstep_adam.embedding._device_cache import DeviceCache
from kstep_adam.embedding._store import TableVersion
from kstep_adam.embedding._table import EmbeddingTable


def open_table(
  path: str,
  *,
  num_rows: int | None = None,
  dim: int | None = None,
  optimizer: _optimizers.SparseAdam | _optimizers.RowwiseAdagrad | None = None,
  host_cache_rows: int | None = None,
  host_cache_bytes: int | None = None,
  device_cache_rows: int = 0,
  device_sharding=None,
  seed: int | None = None,
  init_scale: float | None = None,
  init_distribution: str | None = None,
  chunk_rows: int | None = None,
  compress: bool | None = None,
  shard_index: int | None = None,
  num_shards: int | None = None,
  ts_cache_bytes: int = 64 << 20,
  version: TableVersion | None = None,
) -> EmbeddingTable:
  """Creates the embedding table at ``path``, or reopens the one there.

  A new table needs ``num_rows`` and ``dim``; it costs nothing on disk until rows are
  written (never-written rows read as their deterministic init). The static arguments
  (``num_rows``, ``dim``, ``optimizer``, ``seed``, ``init_*``, ``chunk_rows``, ``compress``,
  ``shard_index``, ``num_shards``) form the table's :class:`TableConfig`, validated there and
  stored as ``path/table.json``. Reopening needs only ``path``: any static argument you do pass must
  agree with the stored one. Per-session settings (cache sizes) may differ between opens.

  Args:
    path: a directory; new or empty to create, or an existing table.
    num_rows: rows in the table, 1 <= num_rows < 2**62.
    dim: embedding width D >= 1.
    optimizer: ``SparseAdam(...)`` (default ``SparseAdam()``) or ``RowwiseAdagrad(...)``.
      On reopen it defaults to the stored one; one with a learning-rate schedule must be
      passed again (a schedule is not stored).
    host_cache_rows: host tier capacity in rows (default ``min(num_rows, 2**20)``; capped
      at ``num_rows``).
    host_cache_bytes: alternatively, the capacity in bytes of row state (each row takes
      ``4 * (1 + D + slot_width)`` bytes, e.g. ``4 * (1 + 3D)`` for Adam).
    device_cache_rows: rows of the device tier (0: none): hot rows and their optimizer state
      live in device arrays and ``SparseAdam`` updates them there (see ``begin_device_step``).
    device_sharding: where the device tier lives: a ``jax.Device`` or a sharding (e.g.
      replicated over a mesh); default the first device.
    seed: seed of the deterministic row init (default 0).
    init_scale: U(-s, s) half-width or N(0, s) std of the init (default ``1/sqrt(dim)``).
    init_distribution: ``'uniform'`` (default) or ``'normal'``.
    chunk_rows: rows per zarr chunk on disk (default: about 64 KiB per chunk).
    compress: zstd-compress chunks (default True; see ``_store`` for the trade-off).
    shard_index: for one shard of a table split by ``row % num_shards``: which one (default
      0). ``num_rows`` and the ids are then the shard's own (local row ``i`` is logical row
      ``i * num_shards + shard_index`` and starts from that row's init).
    num_shards: the number of such shards (default 1: an unsharded table).
    ts_cache_bytes: TensorStore's own chunk cache for this table.
    version: reopen the table as an earlier flush left it: the table's ``committed``
      ``TableVersion`` after that flush. A table flushed again since is reverted to it (the later versions
      stay in the database's history); one at that step already is opened as it is.

  Returns:
    An ``EmbeddingTable``; use it as a context manager or call ``close()``.

  Raises:
    ValueError: a bad argument, one that conflicts with the stored table, or a path that
      holds something else; nothing on disk changes. Also a ``version`` the table cannot
      return to (it is at an earlier step, or was compacted since).
    TableLockedError: the table is already open, in this process or another.

  Examples:
    >>> import tempfile
    >>> import numpy as np
    >>> from kstep_adam import embedding
    >>> with tempfile.TemporaryDirectory() as d, embedding.open_table(
    ...     d + '/t', num_rows=1000, dim=4, optimizer=embedding.SparseAdam(1e-2)) as table:
    ...   table.push([3, 3, 7], np.ones((3, 4), np.float32))
    ...   table.pull([3]).shape
    (1, 4)
  """
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"path {path!r} is a file, not a table directory")
  # The static configuration: given arguments, then the stored table's or the defaults.
  given = dict(
    num_rows=num_rows,
    dim=dim,
    chunk_rows=chunk_rows,
    seed=seed,
    init_scale=init_scale,
    init_distribution=init_distribution,
    compress=compress,
    shard_index=shard_index,
    num_shards=num_shards,
  )
  given = {name: value for name, value in given.items() if value is not None}
  if optimizer is not None:
    _check_optimizer(optimizer)
  exists = os.path.isdir(path) and bool(os.listdir(path))
  if exists:
    config = _store.read_config(path)  # raises if the path holds something else
    # Validate what was given as a config would, so num_rows=True is refused, not equal to 1.
    checked = dataclasses.replace(config, **given)
    for name in given:
      if getattr(checked, name) != getattr(config, name):
        raise ValueError(
          f"{name}={given[name]!r} conflicts with the table at {path!r}, which "
          f"has {name}={getattr(config, name)!r}; omit it or pass the stored value"
        )
    optimizer = _reconcile_optimizer(path, config, optimizer)
  else:
    if num_rows is None or dim is None:
      raise ValueError(f"no table at {path!r}: creating one needs num_rows and dim")
    optimizer = _optimizers.SparseAdam() if optimizer is None else optimizer
    config = TableConfig(optimizer=optimizer.config(), **given)
  if host_cache_rows is not None and host_cache_bytes is not None:
    raise ValueError("pass host_cache_rows or host_cache_bytes, not both")
  if host_cache_bytes is not None:
    host_cache_bytes = _validation.check_int(
      host_cache_bytes,
      f"host_cache_bytes (at least one row, {config.row_bytes} bytes)",
      minimum=config.row_bytes,
    )
    host_cache_rows = host_cache_bytes // config.row_bytes
  if host_cache_rows is None:
    host_cache_rows = min(config.num_rows, 1 << 20)
  host_cache_rows = _validation.check_int(host_cache_rows, "host_cache_rows")
  host_cache_rows = min(host_cache_rows, config.num_rows)  # more is never used
  device_cache_rows = _validation.check_int(device_cache_rows, "device_cache_rows", minimum=0)
  ts_cache_bytes = _validation.check_int(ts_cache_bytes, "ts_cache_bytes", minimum=0)
  device_cache = None
  if device_cache_rows:  # before anything is created: it refuses an optimizer it cannot run
    device_cache = DeviceCache(device_cache_rows, config.dim, optimizer, sharding=device_sharding)
  if not exists:
    _store.create(path, config)
  return EmbeddingTable(
    path,
    config,
    optimizer,
    host_cache_rows=host_cache_rows,
    ts_cache_bytes=ts_cache_bytes,
    device_cache=device_cache,
    version=version,
  )


def _check_optimizer(optimizer) -> None:
  if not isinstance(optimizer, (_optimizers.SparseAdam, _optimizers.RowwiseAdagrad)):
    raise ValueError(
      "optimizer must be embedding.SparseAdam(...) or "
      f"embedding.RowwiseAdagrad(...), got {type(optimizer).__name__}"
    )


def _reconcile_optimizer(path: str, config: TableConfig, optimizer):
  stored = config.optimizer
  if optimizer is None:
    optimizer = _optimizers.optimizer_from_config(stored)
    if optimizer is None:
      raise ValueError(
        f"the table at {path!r} was created with a learning-rate schedule, "
        "which is not stored: pass optimizer= again"
      )
    return optimizer
  given = optimizer.config()
  for key in ("kind", "mode"):
    if given.get(key) != stored.get(key):
      raise ValueError(
        f"optimizer {key}={given.get(key)!r} conflicts with the table at "
        f"{path!r}, created with {key}={stored.get(key)!r}"
      )
  return optimizer
