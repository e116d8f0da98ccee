"""Where a run's examples come from: a frozen description and the one function that opens it.

:class:`DataConfig` names the data (``synthetic``, ``criteo:PATH`` or ``csv:PATH``) and the
options of its source; :func:`make_source` turns it, with the run's layout (a ``TrainConfig``
or any :class:`BatchLayout`: workers, batch size, seed), into the :class:`DataSource` the
trainer reads.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from kstep_adam._validation import check_choices
from kstep_adam._validation import check_float
from kstep_adam._validation import check_int
from kstep_adam._validation import choice_field
from kstep_adam.ctr.data._schema import FORMATS
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.data._sources import file_source
from kstep_adam.ctr.data._sources import process_part
from kstep_adam.ctr.data._sources import synthetic_source
from kstep_adam.ctr.data._synthetic import SHARDINGS
from kstep_adam.ctr.data._synthetic import SyntheticCTR

SYNTHETIC = "synthetic"


class BatchLayout(Protocol):
  """What :func:`make_source` reads of a run's configuration; ``TrainConfig`` has it.

  A protocol, so that the data code does not import the training code.
  """

  @property
  def num_workers(self) -> int: ...  # one synthetic stream per worker

  @property
  def batch_size(self) -> int: ...  # examples per worker per step

  @property
  def seed(self) -> int: ...  # seeds the synthetic data


def _split_spec(spec: str, name: str) -> tuple[str, str]:
  """``'criteo:PATH'`` -> ``('criteo', 'PATH')``; a bare path gives ``('', path)``."""
  for fmt in FORMATS:
    if spec.startswith(fmt + ":"):
      path = spec[len(fmt) + 1 :]
      if not path:
        raise ValueError(f"{name} {spec!r} names no file after '{fmt}:'")
      return fmt, path
  return "", spec


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The data of a run; :func:`make_source` opens it.

  Attributes:
    data: ``synthetic`` (streamed, with a known teacher), ``criteo:PATH`` (Criteo TSV, plain or
      gzip) or ``csv:PATH`` (comma separated with a header row, e.g. Avazu).
    test_data: held-out file, ``criteo:PATH``, ``csv:PATH`` or a bare path in the format of
      ``data``; None holds out the lines that start in the last ``test_fraction`` of the bytes
      of ``data`` (a time split for time-ordered logs such as Criteo's).
    test_fraction: share of the bytes of ``data`` held out as the test set when ``test_data``
      is None.
    val_fraction: file data only; share of the bytes of ``data`` held out as a validation set
      (for choosing hyperparameters without touching the test set): the lines that start in
      the ``val_fraction`` of the bytes just before the test part (before the end of
      ``data`` with ``test_data``). 0: no validation set.
    skip_bad_lines: count and skip malformed lines instead of stopping at the first one.
    label_column: csv only; name of the label column (None: ``label`` or ``click``, whichever
      the header has).
    vocab_size: synthetic only; largest per-field vocabulary.
    sharding: synthetic only; ``iid`` (every worker's shard has the same law) or ``non_iid``
      (each worker has its own popular ids in a quarter of the fields).
    test_examples: synthetic only; size of the held-out set.
    val_examples: synthetic only; size of a validation set drawn from a stream of its own
      (never the test examples). 0: no validation set.
  """

  data: str = SYNTHETIC
  test_data: str | None = None
  test_fraction: float = 0.1
  val_fraction: float = 0.0
  skip_bad_lines: bool = False
  label_column: str | None = None
  vocab_size: int = 5000
  sharding: str = choice_field("iid", SHARDINGS)
  test_examples: int = 50_000
  val_examples: int = 0

  def __post_init__(self):
    check_choices(self)
    check_int(self.vocab_size, "vocab_size", minimum=4)
    check_int(self.test_examples, "test_examples", minimum=1)
    check_int(self.val_examples, "val_examples", minimum=0)
    check_float(
      self.test_fraction, "test_fraction", low=0.0, high=1.0, low_open=True, high_open=True
    )
    check_float(self.val_fraction, "val_fraction", low=0.0, high=1.0, high_open=True)
    if not isinstance(self.skip_bad_lines, bool):
      raise ValueError(f"skip_bad_lines must be a bool, got {self.skip_bad_lines!r}")
    if not isinstance(self.data, str):
      raise ValueError(f"data must be a str, got {self.data!r}")
    if self.format == SYNTHETIC:
      if self.test_data is not None:
        raise ValueError(
          f"test_data needs file data (data='criteo:PATH' or 'csv:PATH'), got "
          f"test_data={self.test_data!r} with synthetic data, which makes its own held-out "
          f"set (test_examples)"
        )
    elif self.format == "":
      raise ValueError(f"data must be 'synthetic', 'criteo:PATH' or 'csv:PATH', got {self.data!r}")
    if self.test_data is not None:
      test_format, _ = _split_spec(self.test_data, "test_data")
      if test_format and test_format != self.format:
        raise ValueError(
          f"test_data format {test_format!r} differs from the data format {self.format!r}"
        )
    if self.format == SYNTHETIC and self.val_fraction:
      raise ValueError(
        f"val_fraction applies to file data only (synthetic data draws val_examples from a "
        f"stream of its own), got val_fraction={self.val_fraction!r}"
      )
    if self.format != SYNTHETIC and self.val_examples:
      raise ValueError(
        f"val_examples applies to synthetic data only (file data holds out val_fraction of "
        f"its bytes), got val_examples={self.val_examples!r} with data={self.data!r}"
      )
    held_out = self.val_fraction + (self.test_fraction if self.test_data is None else 0.0)
    if self.format != SYNTHETIC and held_out >= 1.0:
      raise ValueError(
        f"val_fraction + test_fraction must leave bytes to train on, got "
        f"{self.val_fraction!r} + {self.test_fraction!r}"
      )
    if self.label_column is not None and self.format != "csv":
      raise ValueError(
        f"label_column applies to csv data only, got label_column={self.label_column!r} "
        f"with data={self.data!r}"
      )

  @property
  def format(self) -> str:
    """``'synthetic'``, ``'criteo'`` or ``'csv'`` (``''`` for an unrecognized spec)."""
    if self.data == SYNTHETIC:
      return SYNTHETIC
    return _split_spec(self.data, "data")[0]

  @property
  def path(self) -> str | None:
    """The training file, None for synthetic data."""
    return None if self.format == SYNTHETIC else _split_spec(self.data, "data")[1]

  @property
  def test_path(self) -> str | None:
    """The held-out file, None when it is split off ``data`` (or synthetic)."""
    return None if self.test_data is None else _split_spec(self.test_data, "test_data")[1]


def make_source(
  data: DataConfig, config: BatchLayout, *, part: tuple[int, int] = (0, 1)
) -> DataSource:
  """Open the data of ``data`` for a run of ``config`` (workers, per-worker batch, seed).

  Synthetic data gets one stream per worker (``config.num_workers`` shards) seeded with
  ``config.seed``; file data is read line by line and split across workers per step.
  ``part=(index, count)`` opens process ``index``'s share of a ``count``-process run
  (:func:`~._sources.process_part`); synthetic data then makes only its workers' streams.

  Examples:
    >>> from kstep_adam.ctr import TrainConfig
    >>> source = make_source(DataConfig(test_examples=1000), TrainConfig(nodes=1, devices_per_node=2))
    >>> source.name, source.num_dense, source.num_categorical
    ('synthetic', 13, 26)
  """
  if data.format == SYNTHETIC:
    generator = SyntheticCTR(
      num_workers=config.num_workers,
      vocab_size=data.vocab_size,
      sharding=data.sharding,
      seed=config.seed,
    )
    return synthetic_source(
      generator,
      batch_size=config.batch_size,
      test_examples=data.test_examples,
      val_examples=data.val_examples,
      part=part,
    )
  reader_kwargs = {"label_column": data.label_column} if data.format == "csv" else {}
  source = file_source(
    data.path,
    format=data.format,
    test_path=data.test_path,
    test_fraction=data.test_fraction,
    val_fraction=data.val_fraction,
    skip_bad_lines=data.skip_bad_lines,
    **reader_kwargs,
  )
  return process_part(source, *part)
