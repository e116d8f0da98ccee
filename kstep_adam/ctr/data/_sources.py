"""Data sources for the trainer: global batches for training, chunks for evaluation.

A :class:`DataSource` hides where examples come from. Training sees *global* batches of
exactly ``num_workers * batch_size`` examples; rows ``[w*B, (w+1)*B)`` are worker ``w``'s
shard. For synthetic data each worker's rows come from its own stream (IID or non-IID); for a
file, consecutive lines are split across workers and a short last batch is dropped.

In a run of ``P`` processes, process ``p`` reads only its *part*: rows
``[p*G/P, (p+1)*G/P)`` of every global batch (its workers' shards) and the same share of
every test batch (:func:`process_part`). A synthetic source makes only its workers' streams;
a file is read by every process, each keeping its lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

from kstep_adam._validation import check_float
from kstep_adam._validation import check_int
from kstep_adam.ctr.data._readers import CTRFileReader
from kstep_adam.ctr.data._records import CTRBatch
from kstep_adam.ctr.data._records import concat_batches
from kstep_adam.ctr.data._schema import ReadPosition
from kstep_adam.ctr.data._schema import ReadStats
from kstep_adam.ctr.data._synthetic import SyntheticCTR


@dataclasses.dataclass
class DataSource:
  """What the trainer needs to know about a data set.

  Attributes:
    name: a short description for logs.
    num_dense: number of dense features.
    num_categorical: number of categorical fields.
    train_epoch: ``(epoch, global_batch) -> iterator`` of full global batches for one pass.
    test_batches: ``() -> iterator`` over the held-out set.
    val_batches: ``() -> iterator`` over a validation set disjoint from both the training
      and the test set (for choosing hyperparameters), or None when there is none.
    steps_per_epoch: global batches in one pass, or None for an endless stream. For file
      data an estimate until one pass is complete: a pass (``train_epoch``) ends when the
      file part does.
    teacher_auc: the Bayes-optimal AUC on the test set (synthetic data only).
    read_stats: reader counts (file data only).
    info: what describes the data in ``summary.json`` (and identifies it in a run's
      ``run.json``: a resumed run must read the same data).
    train_from: ``(epoch, global_batch, start) -> iterator of (batch, position)``: one pass
      from ``start`` (None: its beginning), each batch with the position after it (JSON
      data), so that a resumed run continues exactly where its checkpoint was taken. None:
      :func:`positioned_epoch` counts the batches of ``train_epoch`` instead (exact too, but
      it reads the skipped batches again).
    counts: ``() -> dict`` of the readers' counts (JSON), for a checkpoint; None if none.
    restore_counts: continue the counts from :attr:`counts` (what a resumed run does).
    part: ``(index, count)``: the source yields process ``index``'s share of ``count``
      (``(0, 1)``: whole batches). ``train_epoch`` and ``train_from`` still take the
      *global* batch size.
  """

  name: str
  num_dense: int
  num_categorical: int
  train_epoch: Callable[[int, int], Iterator[CTRBatch]]
  test_batches: Callable[[], Iterator[CTRBatch]]
  steps_per_epoch: Callable[[int], int | None]
  val_batches: Callable[[], Iterator[CTRBatch]] | None = None
  teacher_auc: float | None = None
  read_stats: list[ReadStats] = dataclasses.field(default_factory=list)
  info: dict = dataclasses.field(default_factory=dict)
  train_from: Callable[[int, int, Any], Iterator[tuple[CTRBatch, Any]]] | None = None
  counts: Callable[[], dict] | None = None
  restore_counts: Callable[[dict], None] | None = None
  part: tuple[int, int] = (0, 1)


def positioned_epoch(
  source: DataSource, epoch: int, global_batch: int, start: Any = None
) -> Iterator[tuple[CTRBatch, Any]]:
  """One pass of ``source`` from ``start``, each batch with the position after it: the
  source's own ``train_from``, else the index of the batch in ``train_epoch``'s pass."""
  if source.train_from is not None:
    return source.train_from(epoch, global_batch, start)
  batches = source.train_epoch(epoch, global_batch)
  first = start or 0
  return zip(itertools.islice(batches, first, None), itertools.count(first + 1))


def file_fingerprint(path: str, *, sample_bytes: int = 1 << 20) -> dict:
  """Size and a hash of the first and last ``sample_bytes`` of a file: enough to tell that a
  resumed run reads the bytes its checkpoint's positions point into (without reading a
  whole click log)."""
  size = os.path.getsize(path)
  digest = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    digest.update(f.read(sample_bytes))
    f.seek(max(size - sample_bytes, 0))
    digest.update(f.read(sample_bytes))
  return {"bytes": size, "blake2b_head_tail": digest.hexdigest()}


def share(size: int, index: int, count: int) -> slice:
  """Part ``index`` of ``count`` of ``size`` rows: ``[index*size//count, (index+1)*size//count)``.

  Examples:
    >>> share(10, 0, 2), share(5, 1, 2)
    (slice(0, 5, None), slice(2, 5, None))
  """
  return slice(index * size // count, (index + 1) * size // count)


def _cut(batch: CTRBatch, index: int, count: int) -> CTRBatch:
  part = share(batch.size, index, count)
  return CTRBatch(*(x[part] for x in batch))


def process_part(source: DataSource, index: int, count: int) -> DataSource:
  """The share of ``source`` that process ``index`` of ``count`` reads.

  A source already cut for this process is returned as is; one that yields whole batches
  is cut here (every process then reads all of it and keeps its rows).

  Raises:
    ValueError: ``source`` was cut for another process or number of processes.
  """
  if source.part == (index, count):
    return source
  if source.part != (0, 1):
    raise ValueError(
      f"the data source {source.name!r} yields part {source.part[0]} of {source.part[1]}, "
      f"but this is process {index} of {count}"
    )
  whole = source

  def train_epoch(epoch: int, global_batch: int) -> Iterator[CTRBatch]:
    return (_cut(b, index, count) for b in whole.train_epoch(epoch, global_batch))

  def test_batches() -> Iterator[CTRBatch]:
    return (_cut(b, index, count) for b in whole.test_batches())

  val_batches = None
  if whole.val_batches is not None:

    def val_batches() -> Iterator[CTRBatch]:
      return (_cut(b, index, count) for b in whole.val_batches())

  train_from = None
  if whole.train_from is not None:

    def train_from(epoch: int, global_batch: int, start: Any) -> Iterator[tuple[CTRBatch, Any]]:
      return ((_cut(b, index, count), at) for b, at in whole.train_from(epoch, global_batch, start))

  return dataclasses.replace(
    source,
    train_epoch=train_epoch,
    test_batches=test_batches,
    val_batches=val_batches,
    train_from=train_from,
    part=(index, count),
  )


def batches_source(name: str, train: Sequence[CTRBatch], test: Sequence[CTRBatch]) -> DataSource:
  """A source over batches already in memory: every pass yields ``train`` in order.

  For tests and benchmarks that fix their data up front. The batches are the global ones:
  ``train_epoch``'s batch size is not used to cut them.
  """
  first = train[0]
  return DataSource(
    name=name,
    num_dense=first.dense_BxI.shape[1],
    num_categorical=first.keys_BxF.shape[1],
    train_epoch=lambda epoch, global_batch: iter(train),
    test_batches=lambda: iter(test),
    steps_per_epoch=lambda epoch: len(train),
  )


def synthetic_source(
  data: SyntheticCTR,
  *,
  batch_size: int,
  test_examples: int = 50_000,
  val_examples: int = 0,
  part: tuple[int, int] = (0, 1),
) -> DataSource:
  """Wrap a :class:`SyntheticCTR`; every worker reads its own ``batch_size`` shard per step.

  Epoch ``e`` is simply the stream continued: steps are numbered globally, so the data never
  repeats. ``teacher_auc`` is computed on the same ``test_examples`` used for evaluation.
  ``val_examples > 0`` adds a validation set drawn from its own stream
  (:meth:`SyntheticCTR.val_batches`). With ``part=(index, count)`` only that process's
  workers' streams are made (``count`` must divide the workers).
  """
  check_int(val_examples, "val_examples", minimum=0)
  index, count = part
  if count < 1 or not 0 <= index < count or data.num_workers % count:
    raise ValueError(
      f"part must be (index, count) with 0 <= index < count and count dividing the "
      f"{data.num_workers} workers, got {part!r}"
    )
  per_part = data.num_workers // count
  workers = range(index * per_part, (index + 1) * per_part)

  def train_from(epoch: int, global_batch: int, start: int | None) -> Iterator[tuple]:
    del epoch, global_batch
    step = start or 0
    while True:
      if count == 1:
        yield data.global_batch(step, batch_size), step + 1
      else:
        yield concat_batches([data.batch(step, w, batch_size)[0] for w in workers]), step + 1
      step += 1

  def train_epoch(epoch: int, global_batch: int) -> Iterator[CTRBatch]:
    return (batch for batch, _ in train_from(epoch, global_batch, None))

  def test_batches() -> Iterator[CTRBatch]:
    return (_cut(b, index, count) for b, _ in data.test_batches(test_examples))

  def val_batches() -> Iterator[CTRBatch]:
    return (_cut(b, index, count) for b, _ in data.val_batches(val_examples))

  return DataSource(
    name="synthetic",
    num_dense=data.num_dense,
    num_categorical=data.num_categorical,
    train_epoch=train_epoch,
    test_batches=test_batches,
    val_batches=val_batches if val_examples else None,
    steps_per_epoch=lambda _: None,
    teacher_auc=data.teacher_auc(test_examples),
    info=dict(data.config, test_examples=test_examples, val_examples=val_examples),
    train_from=train_from,
    part=part,
  )


def _rebatch(chunks: Iterator[tuple[CTRBatch, Any]], size: int) -> Iterator[tuple]:
  for chunk, position in chunks:
    if chunk.size == size:  # the reader already cuts at `size`; a short tail is dropped
      yield chunk, list(position)


def file_source(
  path: str,
  *,
  format: str = "criteo",
  test_path: str | None = None,
  test_fraction: float = 0.1,
  val_fraction: float = 0.0,
  skip_bad_lines: bool = False,
  **reader_kwargs,
) -> DataSource:
  """A Criteo TSV or CSV file; without ``test_path`` the lines that start in the last
  ``test_fraction`` of its bytes are the test set (a time split for time-ordered logs such
  as Criteo's). ``val_fraction > 0`` carves a validation set out of the training part: the
  ``val_fraction`` of the bytes just before the test part (just before the end of the file
  with ``test_path``), so the order is train, validation, test, as in time.

  Every input is opened and its first block parsed here, before any training: a missing
  file, a bad header, columns that differ between the training and the test file, or a bad
  line near the start fail in seconds, not after the last step.

  The split is placed by bytes, not by a line count, so nothing reads the whole file before
  training: the training part is the lines that start before ``(1 - test_fraction) * size``
  stored bytes (compressed bytes for gzip), the test part the lines from there on. The two
  parts are disjoint, complete and in file order; for lines of similar length the test part
  holds about ``test_fraction`` of the lines.

  Args:
    path: training file (plain or gzip).
    format: ``'criteo'`` or ``'csv'``.
    test_path: a held-out file in the same format, or None to split ``path``. A CSV test
      file's columns are matched to the training file's by name, in any order; a missing or
      extra column is an error.
    test_fraction: share of the bytes of ``path`` held out when ``test_path`` is None.
    val_fraction: share of the bytes of ``path`` held out for validation; 0 makes none.
    skip_bad_lines: count and skip malformed lines instead of raising.
    **reader_kwargs: passed to :class:`CTRFileReader` (``label_column=``, ``engine=``, ...).

  Returns:
    A :class:`DataSource`. One ``train_epoch`` is one pass over the training part;
    ``steps_per_epoch`` is estimated from the first block (exact once a pass is complete,
    or when the part fits in one block); ``read_stats`` count every line once.
  """
  check_float(test_fraction, "test_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
  check_float(val_fraction, "val_fraction", low=0.0, high=1.0, high_open=True)
  held_out = val_fraction + (test_fraction if test_path is None else 0.0)
  if held_out >= 1.0:
    raise ValueError(
      f"val_fraction + test_fraction must leave bytes to train on, got {val_fraction!r} + "
      f"{test_fraction!r}"
    )
  make = lambda p, **kw: CTRFileReader(
    p, format=format, skip_bad_lines=skip_bad_lines, **{**reader_kwargs, **kw}
  )
  train_end = 1.0 - held_out
  val_end = train_end + val_fraction
  val_reader = make(path, span=(train_end, val_end)) if val_fraction else None
  if test_path is None:
    train_reader, test_reader = make(path, span=(0.0, train_end)), make(path, span=(val_end, 1.0))
  else:
    train_reader = make(path, span=(0.0, train_end))
    columns = {}
    if format == "csv":
      columns = dict(
        label_column=train_reader.label_column,
        dense_columns=train_reader.dense_columns,
        categorical_columns=train_reader.categorical_columns,
      )
    test_reader = make(test_path, **columns)
  for reader in (train_reader, test_reader, val_reader):
    if reader is not None:
      reader.check()

  def train_from(epoch: int, global_batch: int, start: list | None) -> Iterator[tuple]:
    del epoch  # every pass reads the part in file order
    position = None if start is None else ReadPosition(*start)
    return _rebatch(train_reader.positioned_batches(global_batch, start=position), global_batch)

  def train_epoch(epoch: int, global_batch: int) -> Iterator[CTRBatch]:
    return (batch for batch, _ in train_from(epoch, global_batch, None))

  held_out = (
    {"test": test_reader} if val_reader is None else {"test": test_reader, "val": val_reader}
  )

  def counts() -> dict:
    return {
      "train": train_reader.count_state(),
      **{k: r.count_state() for k, r in held_out.items()},
    }

  def restore_counts(state: dict) -> None:
    train_reader.restore_counts(state["train"])
    for name, reader in held_out.items():
      reader.restore_counts(state[name])

  def steps_per_epoch(global_batch: int) -> int:
    return train_reader.estimated_lines() // global_batch

  return DataSource(
    name=f"{format}:{path}",
    num_dense=train_reader.num_dense,
    num_categorical=train_reader.num_categorical,
    train_epoch=train_epoch,
    test_batches=lambda: test_reader.batches(8192),
    val_batches=None if val_reader is None else lambda: val_reader.batches(8192),
    steps_per_epoch=steps_per_epoch,
    read_stats=[r.stats for r in (train_reader, test_reader, val_reader) if r is not None],
    info=dict(
      path=path,
      format=format,
      test_path=test_path,
      test_fraction=None if test_path else test_fraction,
      val_fraction=val_fraction,
      skip_bad_lines=skip_bad_lines,
      reader=reader_kwargs,
      files={p: file_fingerprint(p) for p in (path, test_path) if p is not None},
      train_lines_estimate=train_reader.estimated_lines(),
    ),
    train_from=train_from,
    counts=counts,
    restore_counts=restore_counts,
  )
