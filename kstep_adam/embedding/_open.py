"""open_table: create a table directory or reopen one, validating before anything changes."""

import os

import numpy as np

from kstep_adam.embedding import _init
from kstep_adam.embedding import _optimizers
from kstep_adam.embedding import _store
from kstep_adam.embedding._table import EmbeddingTable

_TARGET_CHUNK_BYTES = 64 << 10


def open_table(
  path: str,
  *,
  num_rows: int | None = None,
  dim: int | None = None,
  optimizer=None,
  host_cache_rows: int | None = None,
  host_cache_bytes: int | None = None,
  device_cache_rows: int = 0,
  seed: int | None = None,
  init_scale: float | None = None,
  init_distribution: str | None = None,
  chunk_rows: int | None = None,
  compress: bool | None = None,
  ts_cache_bytes: int = 64 << 20,
) -> EmbeddingTable:
  """Creates the embedding table at ``path``, or reopens the one there.

  A new table needs ``num_rows`` and ``dim``; it costs nothing on disk until rows are
  written (never-written rows read as their deterministic init). Reopening needs only
  ``path``: the configuration comes from ``path/table.json``, and any argument you do
  pass must agree with it. Per-session settings (cache sizes) may differ between opens.

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
    device_cache_rows: rows of a jax.Array device tier for ``working_set`` (0: none).
    seed: seed of the deterministic row init (default 0).
    init_scale: U(-s, s) half-width or N(0, s) std of the init (default ``1/sqrt(dim)``).
    init_distribution: ``'uniform'`` (default) or ``'normal'``.
    chunk_rows: rows per zarr chunk on disk (default: about 64 KiB per chunk).
    compress: zstd-compress chunks (default True; see ``_store`` for the trade-off).
    ts_cache_bytes: TensorStore's own chunk cache for this table.

  Returns:
    An ``EmbeddingTable``; use it as a context manager or call ``close()``.

  Examples:
    >>> import tempfile
    >>> from kstep_adam import embedding
    >>> with embedding.open_table(tempfile.mkdtemp() + '/t', num_rows=1000, dim=4,
    ...                           optimizer=embedding.SparseAdam(1e-2)) as table:
    ...   table.push([3, 3, 7], np.ones((3, 4), np.float32))
    ...   table.pull([3]).shape
    (1, 4)
  """
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"path {path!r} is a file, not a table directory")
  exists = os.path.isdir(path) and bool(os.listdir(path))
  if exists:
    config = _store.read_config(path)  # raises if the path holds something else
    given = dict(
      num_rows=num_rows,
      dim=dim,
      seed=seed,
      init_scale=init_scale,
      init_distribution=init_distribution,
      chunk_rows=chunk_rows,
      compress=compress,
    )
    for name, value in given.items():
      if value is not None and value != config.get(name, True):
        raise ValueError(
          f"{name}={value!r} conflicts with the table at {path!r}, which "
          f"has {name}={config[name]!r}; omit it or pass the stored value"
        )
    optimizer = _reconcile_optimizer(path, config, optimizer)
  else:
    if num_rows is None or dim is None:
      raise ValueError(f"no table at {path!r}: creating one needs num_rows and dim")
    if not isinstance(num_rows, (int, np.integer)) or not 1 <= num_rows < 2**62:
      raise ValueError(f"num_rows must be an int in [1, 2**62), got {num_rows!r}")
    if not isinstance(dim, (int, np.integer)) or dim < 1:
      raise ValueError(f"dim must be a positive int, got {dim!r}")
    num_rows, dim = int(num_rows), int(dim)
    optimizer = _optimizers.SparseAdam() if optimizer is None else optimizer
    _check_optimizer(optimizer)
    init_scale = 1.0 / dim**0.5 if init_scale is None else float(init_scale)
    init_distribution = init_distribution or "uniform"
    _init.validate_init(init_distribution, init_scale)
    width = _store.row_width(dim, optimizer.slot_width(dim))
    if chunk_rows is None:
      chunk_rows = 1 << max(0, (_TARGET_CHUNK_BYTES // (4 * width)).bit_length() - 1)
    if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
      raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    config = dict(
      format=_store.FORMAT,
      num_rows=num_rows,
      dim=dim,
      width=width,
      chunk_rows=int(min(chunk_rows, num_rows)),
      seed=int(seed or 0),
      init_scale=init_scale,
      init_distribution=init_distribution,
      compress=True if compress is None else bool(compress),
      optimizer=optimizer.config(),
    )
  row_bytes = 4 * config["width"]
  if host_cache_rows is not None and host_cache_bytes is not None:
    raise ValueError("pass host_cache_rows or host_cache_bytes, not both")
  if host_cache_bytes is not None:
    host_cache_rows = int(host_cache_bytes) // row_bytes
  if host_cache_rows is None:
    host_cache_rows = min(config["num_rows"], 1 << 20)
  if not isinstance(host_cache_rows, (int, np.integer)) or host_cache_rows < 1:
    raise ValueError(
      f"host_cache_rows must be a positive int (host_cache_bytes at least "
      f"one row, {row_bytes} bytes), got {host_cache_rows!r}"
    )
  host_cache_rows = min(int(host_cache_rows), config["num_rows"])  # more is never used
  if not isinstance(device_cache_rows, (int, np.integer)) or device_cache_rows < 0:
    raise ValueError(f"device_cache_rows must be an int >= 0, got {device_cache_rows!r}")
  if not exists:
    _store.create(path, config)
  device_cache = None
  if device_cache_rows:
    from kstep_adam.embedding._device_cache import DeviceCache

    device_cache = DeviceCache(int(device_cache_rows), config["dim"])
  return EmbeddingTable(
    path,
    config,
    optimizer,
    host_cache_rows=int(host_cache_rows),
    ts_cache_bytes=ts_cache_bytes,
    device_cache=device_cache,
  )


def _check_optimizer(optimizer) -> None:
  if not isinstance(optimizer, (_optimizers.SparseAdam, _optimizers.RowwiseAdagrad)):
    raise ValueError(
      "optimizer must be embedding.SparseAdam(...) or "
      f"embedding.RowwiseAdagrad(...), got {type(optimizer).__name__}"
    )


def _reconcile_optimizer(path: str, config: dict, optimizer):
  stored = config["optimizer"]
  if optimizer is None:
    optimizer = _optimizers.optimizer_from_config(stored)
    if optimizer is None:
      raise ValueError(
        f"the table at {path!r} was created with a learning-rate schedule, "
        "which is not stored: pass optimizer= again"
      )
    return optimizer
  _check_optimizer(optimizer)
  given = optimizer.config()
  for key in ("kind", "mode"):
    if given.get(key) != stored.get(key):
      raise ValueError(
        f"optimizer {key}={given.get(key)!r} conflicts with the table at "
        f"{path!r}, created with {key}={stored.get(key)!r}"
      )
  return optimizer
