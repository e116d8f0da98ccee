"""TableConfig: what a table is, fixed at creation, validated here once, stored as table.json."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from kstep_adam import _validation
from kstep_adam.embedding import _init
from kstep_adam.embedding import _optimizers

FORMAT = "kstep_adam.embedding/1"
MAX_ROWS = 2**62 - 1  # row ids stay far from int64 overflow in every index computation
_TARGET_CHUNK_BYTES = 64 << 10
_SEED_RANGE = (-(2**63), 2**64 - 1)  # the init hashes the seed's 64-bit pattern
# Keys of table.json besides the fields: the format tag, and the row width (derived, but
# written so a reader of the file sees the row layout without knowing the optimizers).
_DERIVED_KEYS = ("format", "width")
# Fields added after format 1 was first written; a table.json without them has the defaults.
_OPTIONAL_KEYS = ("compress", "shard_index", "num_shards")


@dataclasses.dataclass(frozen=True)
class TableConfig:
  """The static configuration of an embedding table: everything its stored bytes depend on.

  Per-session settings (cache sizes, TensorStore's cache) are not part of it; they are
  ``open_table`` arguments and may change between opens. Every field is validated on
  construction, so a ``TableConfig`` that exists is a valid one, whether it was built from
  ``open_table``'s arguments or read back from ``table.json``. Rows are always float32 (the
  row layout bit-casts the last step into column 0), so there is no dtype field.

  Attributes:
    num_rows: rows in the table, in ``[1, 2**62)``.
    dim: embedding width D >= 1.
    optimizer: the optimizer's stored description, ``SparseAdam(...).config()`` or
      ``RowwiseAdagrad(...).config()`` (kind, mode, hyperparameters; the learning rate is
      ``"schedule"`` when it is a schedule, which is not stored). Read-only.
    chunk_rows: rows per zarr chunk on disk, in ``[1, num_rows]`` (default: about 64 KiB of
      row state per chunk; a larger value is capped at ``num_rows``). A flush
      read-modify-writes every chunk that holds a dirty row, at a fixed cost per chunk plus
      a cost per byte, so the best size depends on how many rows a flush dirties per
      chunk. The default suits flushes of a host cache that has filled (a few percent of
      the table, with hashed ids about one dirty row per chunk or more); tables flushed
      after far fewer rows than they have chunks flush faster with smaller chunks (the
      flush benchmark in docs/embedding.md measures both).
    seed: seed of the deterministic row init, a 64-bit int.
    init_scale: U(-s, s) half-width or N(0, s) std of the init, >= 0 (default
      ``1/sqrt(dim)``).
    init_distribution: ``'uniform'`` or ``'normal'``.
    compress: zstd-compress chunks on disk.
    shard_index: which shard of a larger logical table this table holds (0 unsharded).
    num_shards: shards the logical table is split into, by ``row % num_shards`` (1:
      unsharded). Local row ``i`` of shard ``s`` is logical row ``i * num_shards + s``, and it
      starts from that row's deterministic init, so the shards of a table together start
      exactly as the unsharded table would. ``num_rows`` counts this shard's rows; ids given
      to the table are local.

  Examples:
    >>> from kstep_adam import embedding
    >>> config = embedding.TableConfig(
    ...     num_rows=1000, dim=4, optimizer=embedding.SparseAdam(1e-2).config())
    >>> config.width, config.chunk_rows, config.init_scale
    (13, 1000, 0.5)
    >>> TableConfig.from_json(config.to_json()) == config
    True
    >>> embedding.TableConfig(num_rows=True, dim=4, optimizer=config.optimizer)
    Traceback (most recent call last):
    ...
    ValueError: num_rows must be an int in [1, 4611686018427387903], got True
  """

  num_rows: int
  dim: int
  optimizer: Mapping[str, Any]
  chunk_rows: int | None = None
  seed: int = 0
  init_scale: float | None = None
  init_distribution: str = "uniform"
  compress: bool = True
  shard_index: int = 0
  num_shards: int = 1

  def __post_init__(self):
    num_rows = _validation.check_int(self.num_rows, "num_rows", maximum=MAX_ROWS)
    dim = _validation.check_int(self.dim, "dim")
    if not isinstance(self.optimizer, Mapping):
      raise ValueError(
        "optimizer must be an optimizer description (SparseAdam(...).config()), got "
        f"{type(self.optimizer).__name__}"
      )
    optimizer = types.MappingProxyType(dict(self.optimizer))
    _optimizers.check_description(optimizer)
    width = _row_width(dim, optimizer)
    chunk_rows = self.chunk_rows
    if chunk_rows is None:  # the largest power of two at most the target bytes
      chunk_rows = 1 << max(0, (_TARGET_CHUNK_BYTES // (4 * width)).bit_length() - 1)
    chunk_rows = min(_validation.check_int(chunk_rows, "chunk_rows"), num_rows)
    init_scale = 1.0 / math.sqrt(dim) if self.init_scale is None else self.init_scale
    init_scale = _validation.check_float(init_scale, "init_scale", low=0.0)
    if not isinstance(self.compress, bool):
      raise ValueError(f"compress must be a bool, got {self.compress!r}")
    num_shards = _validation.check_int(self.num_shards, "num_shards", maximum=MAX_ROWS)
    shard_index = _validation.check_int(
      self.shard_index, "shard_index", minimum=0, maximum=num_shards - 1
    )
    if (num_rows - 1) * num_shards + shard_index > MAX_ROWS:
      raise ValueError(
        f"num_rows={num_rows} rows in shard {shard_index} of {num_shards} reach logical rows "
        f"past {MAX_ROWS}"
      )
    values = dict(
      num_rows=num_rows,
      shard_index=shard_index,
      num_shards=num_shards,
      dim=dim,
      optimizer=optimizer,
      chunk_rows=chunk_rows,
      seed=_validation.check_int(self.seed, "seed", minimum=_SEED_RANGE[0], maximum=_SEED_RANGE[1]),
      init_scale=init_scale,
      init_distribution=_validation.check_choice(
        self.init_distribution, "init_distribution", _init.INIT_DISTRIBUTIONS
      ),
    )
    for name, value in values.items():  # normalized: plain ints/floats, a read-only mapping
      object.__setattr__(self, name, value)

  @property
  def width(self) -> int:
    """The number of floats per stored row, ``1 + dim + slot_width`` (last step, parameters, slots)."""
    return _row_width(self.dim, self.optimizer)

  @property
  def row_bytes(self) -> int:
    """Bytes of one row's state (float32)."""
    return 4 * self.width

  def logical_rows(self, row_ids: np.ndarray) -> np.ndarray:
    """The logical table's rows of these local rows: ``row_ids * num_shards + shard_index``.

    Examples:
      >>> from kstep_adam import embedding
      >>> adam = embedding.SparseAdam().config()
      >>> shard = embedding.TableConfig(num_rows=5, dim=2, optimizer=adam, shard_index=1, num_shards=2)
      >>> shard.logical_rows(np.arange(3)).tolist()
      [1, 3, 5]
    """
    row_ids = np.asarray(row_ids, np.int64)
    if self.num_shards == 1:
      return row_ids
    return row_ids * np.int64(self.num_shards) + np.int64(self.shard_index)

  def to_json(self) -> str:
    """The ``table.json`` text: every field, plus the format tag and the row width."""
    fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
    fields["optimizer"] = dict(self.optimizer)
    return json.dumps(dict(format=FORMAT, **fields, width=self.width), indent=1)

  @classmethod
  def from_json(cls, text: str, *, source: str = "table.json") -> TableConfig:
    """Parses and validates ``table.json`` text; errors name ``source``.

    Reads every table written in format ``kstep_adam.embedding/1``, including ones written
    before ``compress`` existed (they are compressed) or before sharding (they are
    unsharded).
    """
    try:
      stored = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{source!r} is not valid JSON: {e}") from None
    if not isinstance(stored, dict):
      raise ValueError(f"{source!r} must hold a JSON object, got {type(stored).__name__}")
    if stored.get("format") != FORMAT:
      raise ValueError(f"{source!r} has format {stored.get('format')!r}, expected {FORMAT!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(stored) - names - set(_DERIVED_KEYS))
    missing = sorted(names - set(stored) - set(_OPTIONAL_KEYS))
    if unknown or missing:
      raise ValueError(f"{source!r}: unknown fields {unknown}, missing fields {missing}")
    try:
      config = cls(**{name: stored[name] for name in names if name in stored})
    except ValueError as e:
      raise ValueError(f"{source!r}: {e}") from None
    if "width" in stored and stored["width"] != config.width:
      raise ValueError(
        f"{source!r}: width={stored['width']!r} does not match the row layout of its "
        f"dim and optimizer ({config.width})"
      )
    return config


def _row_width(dim: int, optimizer: Mapping[str, Any]) -> int:
  return 1 + dim + _optimizers.OPTIMIZERS[optimizer["kind"]].slot_width(dim)
