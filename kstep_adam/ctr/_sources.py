"""Data sources for the trainer: global batches for training, chunks for evaluation.

A :class:`DataSource` hides where examples come from. Training sees *global* batches of
exactly ``num_workers * batch_size`` examples; rows ``[w*B, (w+1)*B)`` are worker ``w``'s
shard. For synthetic data each worker's rows come from its own stream (IID or non-IID); for a
file, consecutive lines are split across workers and a short last batch is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Iterator

from kstep_adam.ctr._batch import CTRBatch
from kstep_adam.ctr._readers import CTRFileReader
from kstep_adam.ctr._readers import ReadStats
from kstep_adam.ctr._readers import count_lines
from kstep_adam.ctr._synthetic import SyntheticCTR


@dataclasses.dataclass
class DataSource:
  """What the trainer needs to know about a data set.

  Attributes:
    name: a short description for logs.
    num_dense: number of dense features.
    num_categorical: number of categorical fields.
    train_epoch: ``(epoch, global_batch) -> iterator`` of full global batches for one pass.
    test_batches: ``() -> iterator`` over the held-out set.
    steps_per_epoch: global batches in one pass, or None for an endless stream.
    teacher_auc: the Bayes-optimal AUC on the test set (synthetic data only).
    read_stats: reader counts (file data only).
  """

  name: str
  num_dense: int
  num_categorical: int
  train_epoch: Callable[[int, int], Iterator[CTRBatch]]
  test_batches: Callable[[], Iterator[CTRBatch]]
  steps_per_epoch: Callable[[int], int | None]
  teacher_auc: float | None = None
  read_stats: list[ReadStats] = dataclasses.field(default_factory=list)
  info: dict = dataclasses.field(default_factory=dict)


def synthetic_source(
  data: SyntheticCTR, *, batch_size: int, test_examples: int = 50_000
) -> DataSource:
  """Wrap a :class:`SyntheticCTR`; every worker reads its own ``batch_size`` shard per step.

  Epoch ``e`` is simply the stream continued: steps are numbered globally, so the data never
  repeats. ``teacher_auc`` is computed on the same ``test_examples`` used for evaluation.
  """

  def train_epoch(epoch: int, global_batch: int) -> Iterator[CTRBatch]:
    del epoch, global_batch
    step = 0
    while True:
      yield data.global_batch(step, batch_size)
      step += 1

  def test_batches() -> Iterator[CTRBatch]:
    return (b for b, _ in data.test_batches(test_examples))

  return DataSource(
    name="synthetic",
    num_dense=data.num_dense,
    num_categorical=data.num_categorical,
    train_epoch=train_epoch,
    test_batches=test_batches,
    steps_per_epoch=lambda _: None,
    teacher_auc=data.teacher_auc(test_examples),
    info=dict(data.config, test_examples=test_examples),
  )


def _rebatch(chunks: Iterator[CTRBatch], size: int) -> Iterator[CTRBatch]:
  for chunk in chunks:
    if chunk.size == size:  # the reader already cuts at `size`; a short tail is dropped
      yield chunk


def file_source(
  path: str,
  *,
  format: str = "criteo",
  test_path: str | None = None,
  test_fraction: float = 0.1,
  skip_bad_lines: bool = False,
  **reader_kwargs,
) -> DataSource:
  """A Criteo TSV or CSV file; without ``test_path`` its last ``test_fraction`` of lines is
  the test set (a time split for time-ordered logs such as Criteo's).

  Args:
    path: training file (plain or gzip).
    format: ``'criteo'`` or ``'csv'``.
    test_path: a held-out file in the same format, or None to split ``path``.
    test_fraction: share of the lines of ``path`` held out when ``test_path`` is None.
    skip_bad_lines: count and skip malformed lines instead of raising.
    **reader_kwargs: passed to :class:`CTRFileReader` (``label_column=``, ...).
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  make = lambda p, **kw: CTRFileReader(
    p, format=format, skip_bad_lines=skip_bad_lines, **reader_kwargs, **kw
  )
  header = format == "csv"
  if test_path is None:
    num_lines = count_lines(path, header=header)
    num_train = num_lines - round(num_lines * test_fraction)
    if num_train < 1 or num_train == num_lines:
      raise ValueError(
        f"{path} has {num_lines} data lines, too few to hold out "
        f"{test_fraction:.0%} as a test set; pass a test file"
      )
    train_reader, test_reader = make(path, stop_line=num_train), make(path, start_line=num_train)
  else:
    num_train = count_lines(path, header=header)
    train_reader, test_reader = make(path), make(test_path)

  def train_epoch(epoch: int, global_batch: int) -> Iterator[CTRBatch]:
    del epoch
    return _rebatch(train_reader.batches(global_batch), global_batch)

  return DataSource(
    name=f"{format}:{path}",
    num_dense=train_reader.num_dense,
    num_categorical=train_reader.num_categorical,
    train_epoch=train_epoch,
    test_batches=lambda: test_reader.batches(8192),
    steps_per_epoch=lambda global_batch: num_train // global_batch,
    read_stats=[train_reader.stats, test_reader.stats],
    info=dict(path=path, format=format, test_path=test_path, train_lines=num_train),
  )
