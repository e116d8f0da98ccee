"""Streaming readers for CTR files: Criteo TSV, Avazu CSV and generic "label + columns" CSV.

A file (plain or gzip, told apart by its first bytes) is read in blocks of whole lines
(:mod:`._textfile`); each block is parsed by pyarrow's CSV reader and NumPy
(:mod:`._columnar`), and a block that does not parse cleanly there goes through the line
parser (:mod:`._line_parser`), which defines what a record is and names every bad line. Both paths give the
same rows and the same keys, so the line parser is the reference the columnar one is tested
against.

A record, in both formats:

- **label**: a number equal to 0 or 1 (``0``, ``1``, ``1.0``).
- **dense** fields: empty (read as 0) or a finite number ``x`` with ``|x| <= 2**53``, the
  range in which a float64 holds every integer (Criteo's dense fields are counts). The
  features are ``log(1 + max(x, 0))``, so they lie in ``[0, 36.8]``. NaN, infinities and
  larger magnitudes are bad lines, never clipped.
- **categorical** fields: empty (a "missing" value of its own per field), or for Criteo 1 to
  16 hex digits (at most 64 bits; no sign, prefix or separator), for CSV any UTF-8 string.
  Surrounding ASCII whitespace is ignored in every field.

Lines end in ``\\n`` or ``\\r\\n``; blank lines are skipped; a UTF-8 byte-order mark at the
start of the file is ignored. A CSV file has a header line; a CSV record is one line (a
quoted field may hold commas and ``""`` but no line break). A bad line raises
:class:`CTRDataError` naming the file, the line and the field, unless ``skip_bad_lines=True``,
which counts and skips it (``reader.stats``). A file that cannot be read, or whose gzip data
is corrupt or truncated, is always an error (it names the file and the last line read):
skipping is for bad lines, not for an unknown amount of lost data.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import zlib
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from kstep_adam._validation import check_choice
from kstep_adam._validation import check_float
from kstep_adam._validation import check_int
from kstep_adam.ctr.data._columnar import ColumnarParser
from kstep_adam.ctr.data._line_parser import LineParser
from kstep_adam.ctr.data._records import CTRBatch
from kstep_adam.ctr.data._records import feature_keys
from kstep_adam.ctr.data._schema import CRITEO_SCHEMA
from kstep_adam.ctr.data._schema import ENGINES
from kstep_adam.ctr.data._schema import FORMATS
from kstep_adam.ctr.data._schema import ReadPosition
from kstep_adam.ctr.data._schema import ReadStats
from kstep_adam.ctr.data._schema import Rows
from kstep_adam.ctr.data._schema import StringValues
from kstep_adam.ctr.data._schema import csv_schema
from kstep_adam.ctr.data._textfile import CTRDataError
from kstep_adam.ctr.data._textfile import TextFile

_MAX_MESSAGES = 10
_PIECE_BYTES = 1 << 16  # a block that fails the columnar parser is retried in pieces this big


class CTRFileReader:
  """Stream a CTR file, or one part of it, as :class:`CTRBatch` chunks.

  Args:
    path: file path; gzip is detected from the content.
    format: ``'criteo'`` (no header; label, 13 integer, 26 hex categorical fields, tab
      separated) or ``'csv'`` (comma separated with a header row; Avazu or your own data).
    label_column: csv only; the label column's name. Default: ``'label'`` or ``'click'``,
      whichever the header has.
    dense_columns: csv only; names of numeric columns to log-transform as dense features.
    ignore_columns: csv only; columns to drop (Avazu's per-row ``id`` by default).
    categorical_columns: csv only; the categorical columns in feature order. Default: every
      other column, in header order. When given, the header must hold exactly the label,
      dense, categorical and (optionally) ignored columns, in any order: a test file read
      with the training file's columns is matched by name.
    skip_bad_lines: skip and count malformed lines instead of raising.
    span: the part of the file to read, as fractions of its size as stored (compressed for
      gzip): the lines that *start* in ``[span[0], span[1])``. ``(0, 0.9)`` and ``(0.9, 1)``
      split a file into disjoint, complete, time-ordered parts.
    key_bits: size of the feature-key space, see :func:`feature_keys`.
    engine: ``'columnar'`` (pyarrow and NumPy, a block at a time; blocks that do not parse
      cleanly go through the line parser) or ``'lines'`` (the line parser only: the
      reference, slow).
    block_bytes: bytes per block read and parsed at once.
    workers: blocks parsed at once, on that many threads besides the one reading (pyarrow
      and NumPy release the GIL); 1 parses on the reading thread.

  Examples:
    >>> reader = CTRFileReader('day_0.gz', format='criteo')  # doctest: +SKIP
    >>> for batch in reader.batches(4096): ...  # doctest: +SKIP
  """

  def __init__(
    self,
    path: str,
    *,
    format: str = "criteo",
    label_column: str | None = None,
    dense_columns: Sequence[str] = (),
    ignore_columns: Sequence[str] = ("id",),
    categorical_columns: Sequence[str] | None = None,
    skip_bad_lines: bool = False,
    span: tuple[float, float] = (0.0, 1.0),
    key_bits: int = 40,
    engine: str = "columnar",
    block_bytes: int = 1 << 20,
    workers: int = 2,
  ):
    check_choice(format, "format", FORMATS)
    check_choice(engine, "engine", ENGINES)
    check_int(block_bytes, "block_bytes", minimum=1)
    self.workers = check_int(workers, "workers", minimum=1)
    check_int(key_bits, "key_bits", minimum=1, maximum=63)
    lo = check_float(span[0], "span[0]", low=0.0, high=1.0)
    hi = check_float(span[1], "span[1]", low=lo, high=1.0)
    if format == "criteo" and (label_column, tuple(dense_columns), categorical_columns) != (
      None,
      (),
      None,
    ):
      raise ValueError(
        "label_column, dense_columns and categorical_columns are for format='csv'; a Criteo "
        "file's fields are fixed (label, 13 dense, 26 categorical)"
      )
    self.path, self.format, self.key_bits, self.engine = path, format, key_bits, engine
    self.skip_bad_lines, self.span = skip_bad_lines, (lo, hi)
    self.stats = ReadStats()
    self._file = TextFile(path, header=format == "csv", block_bytes=block_bytes)
    if format == "criteo":
      self.schema = CRITEO_SCHEMA
    else:
      self.schema = csv_schema(
        path,
        self._file.header_line,
        label_column=label_column,
        dense_columns=dense_columns,
        ignore_columns=ignore_columns,
        categorical_columns=categorical_columns,
      )
    names = self.schema.names
    self.label_column = names[self.schema.label]
    self.dense_columns = [names[i] for i in self.schema.dense]
    self.categorical_columns = [names[i] for i in self.schema.categorical]
    self.num_dense, self.num_categorical = len(self.schema.dense), len(self.schema.categorical)
    strings = StringValues()
    self._lines = LineParser(self.schema, strings)
    self._columnar = None
    if engine == "columnar":
      self._columnar = ColumnarParser(self.schema, strings)
    self._counting = threading.Lock()  # the stats and the counted lines change together
    self._next_uncounted = 0  # part line index from which blocks are not yet counted
    self._estimate: float | None = None  # good lines per stored byte, from the first block
    self._exact_lines: int | None = None  # good lines of the part, once a pass is complete
    self._checksums: dict[int, int] = {}  # CRC-32 of every block read, by its offset

  # -- parsing -----------------------------------------------------------------------------
  def _parse(self, data: bytes) -> tuple[Rows, list[tuple[int, str]]]:
    """A block's good rows and bad lines; columnar where it parses cleanly."""
    if self._columnar is None:
      return self._lines.parse(data)
    rows = self._columnar.parse(data)
    if rows is not None:
      return rows, []
    # Retry in small pieces, so one bad line costs the line parser a piece, not a block.
    parts, bad, offset, start = [], [], 0, 0
    while start < len(data):
      end = data.find(b"\n", start + _PIECE_BYTES - 1)
      end = len(data) if end < 0 else end + 1
      piece = data[start:end]
      rows = self._columnar.parse(piece) if len(piece) < len(data) else None
      if rows is None:
        rows, piece_bad = self._lines.parse(piece)
        bad.extend((offset + i, what) for i, what in piece_bad)
      parts.append(rows)
      offset += piece.count(b"\n")
      start = end
    return Rows(*(np.concatenate(arrays) for arrays in zip(*parts))), bad

  def _finish(self, rows: Rows) -> CTRBatch:
    dense_NxI = np.log1p(np.maximum(rows.dense_NxI, 0.0)).astype(np.float32)
    keys_NxF = feature_keys(rows.values_NxF, key_bits=self.key_bits)
    return CTRBatch(dense_NxI, keys_NxF, rows.label_N)

  def _parse_block(self, data: bytes) -> tuple[CTRBatch, list[tuple[int, str]]]:
    """A block's examples and bad lines (thread-safe: runs on the parse workers)."""
    rows, bad = self._parse(data)
    return self._finish(rows), bad

  def _account(self, block, batch: CTRBatch, bad: list[tuple[int, str]]) -> CTRBatch:
    """Report a block's bad lines (raise, or count them the first time), in file order."""
    if bad and not self.skip_bad_lines:
      offset, what = bad[0]
      line = self._file.first_line(block.part_start) + block.index + offset
      raise CTRDataError(
        f"{self.path}:{line}: {what} (pass skip_bad_lines=True to skip such lines)"
      )
    first = self._file.first_line(block.part_start) + block.index if bad else 0
    checksum = zlib.crc32(block.data)
    with self._counting:
      recorded = self._checksums.setdefault(block.offset, checksum)
      if recorded != checksum:
        raise self._changed(block.offset)
      if block.index >= self._next_uncounted:
        self._next_uncounted = block.index + 1
        self.stats.lines_read += batch.size
        self.stats.lines_skipped += len(bad)
        for offset, what in bad[: max(_MAX_MESSAGES - len(self.stats.messages), 0)]:
          self.stats.messages.append(f"{self.path}:{first + offset}: {what}")
    return batch

  def _changed(self, offset: int) -> CTRDataError:
    return CTRDataError(
      f"{self.path}: the block of lines at byte {offset} changed since the run read it (its "
      "checksum differs): this is not the file the run started with; restore that file, or "
      "start a new run (--overwrite)"
    )

  def count_state(self) -> dict:
    """The counts (``stats``) and which lines they cover, consistent even while a pass runs
    on another thread: with :meth:`restore_counts`, a resumed run counts every line once.
    Also the CRC-32 of every block read so far (``block_crc32``, by the block's offset): a
    resumed run checks each block it reads again against it."""
    with self._counting:
      return {
        **dataclasses.asdict(self.stats),
        "next_uncounted": self._next_uncounted,
        "exact_lines": self._exact_lines,
        "block_crc32": {str(offset): crc for offset, crc in sorted(self._checksums.items())},
      }

  def restore_counts(self, state: dict) -> None:
    """Continue the counts of :meth:`count_state` (lines already counted are not again)."""
    with self._counting:
      self.stats.lines_read = int(state["lines_read"])
      self.stats.lines_skipped = int(state["lines_skipped"])
      self.stats.passes = int(state["passes"])
      self.stats.messages[:] = list(state["messages"])
      self._next_uncounted = int(state["next_uncounted"])
      if state["exact_lines"] is not None:
        self._exact_lines = int(state["exact_lines"])
      # The blocks read before the run resumed, and those read since (the first block, at
      # start-up): each must be the one the checkpointed run read.
      for text, crc in state.get("block_crc32", {}).items():
        offset = int(text)
        if self._checksums.setdefault(offset, int(crc)) != int(crc):
          raise self._changed(offset)

  def _parsed_blocks(
    self, workers: int, start: tuple[int, int] | None = None
  ) -> Iterator[tuple[object, CTRBatch]]:
    """``(block, examples)`` in file order, from the block at ``start`` = ``(offset, line)``
    if given; blocks are parsed ``workers`` at a time."""
    blocks = self._file.blocks(*self.span, start=start)
    if workers == 1:
      for block in blocks:
        yield block, self._account(block, *self._parse_block(block.data))
      return
    in_flight: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers, "ctr-parse") as pool:
      try:
        failure = None
        try:
          for block in blocks:
            in_flight.append((block, pool.submit(self._parse_block, block.data)))
            while len(in_flight) > workers:
              block, parsed = in_flight.popleft()
              yield block, self._account(block, *parsed.result())
        except CTRDataError as error:  # the file failed: the blocks before it come first
          failure = error
        while in_flight:
          block, parsed = in_flight.popleft()
          yield block, self._account(block, *parsed.result())
        if failure is not None:
          raise failure
      finally:
        for _, parsed in in_flight:
          parsed.cancel()

  # -- reading -------------------------------------------------------------------------------
  def check(self) -> None:
    """Open the file and read its first block now, so that a bad input fails in seconds.

    Raises:
      CTRDataError: the first block holds a bad line (without ``skip_bad_lines``), no good
        line at all, or the part is empty.
    """
    blocks = self._parsed_blocks(workers=1)
    first = next(blocks, None)
    blocks.close()
    if first is None:
      raise CTRDataError(
        f"{self.path}: no data lines in {self._describe_span()}; the file is empty or too "
        "short for this split"
      )
    block, batch = first
    if batch.size == 0 and not self.stats.lines_skipped:
      raise CTRDataError(f"{self.path}: no data lines in the first block, only blank lines")
    if batch.size == 0:
      lines = block.data.count(b"\n") + (not block.data.endswith(b"\n"))
      raise CTRDataError(
        f"{self.path}: none of the first {lines} lines of "
        f"{self._describe_span()} is a good {self.format} record, e.g. "
        f"{self.stats.messages[:1]}; is format={self.format!r} right?"
      )
    if block.last:
      self._exact_lines = batch.size
    else:
      start = self._file.stored_offset(self.span[0])
      self._estimate = batch.size / max(block.stored_end - start, 1.0)

  def _describe_span(self) -> str:
    lo, hi = self.span
    return "the file" if (lo, hi) == (0.0, 1.0) else f"the part {lo:g}-{hi:g} of its bytes"

  def estimated_lines(self) -> int | None:
    """Good lines of the part: exact after a whole pass (or when it fits one block), else an
    estimate from the first block's lines per stored byte; None before :meth:`check`."""
    if self._exact_lines is not None:
      return self._exact_lines
    if self._estimate is None:
      return None
    lo, hi = (self._file.stored_offset(f) for f in self.span)
    return round(self._estimate * (hi - lo))

  def batches(self, batch_size: int, *, start: ReadPosition | None = None) -> Iterator[CTRBatch]:
    """Yield one pass over the part, ``batch_size`` examples each (the last chunk may be
    smaller); from ``start`` (see :meth:`positioned_batches`) if given."""
    return (batch for batch, _ in self.positioned_batches(batch_size, start=start))

  def positioned_batches(
    self, batch_size: int, *, start: ReadPosition | None = None
  ) -> Iterator[tuple[CTRBatch, ReadPosition]]:
    """Like :meth:`batches`, each batch with the :class:`ReadPosition` after it.

    Args:
      batch_size: examples per batch.
      start: a position an earlier pass yielded: this pass yields what that one yielded
        after it (the bytes before are skipped, not parsed). None starts at the beginning.
    """
    check_int(batch_size, "batch_size", minimum=1)
    # The blocks whose examples are not all yielded yet: [block, examples left, examples
    # yielded]; `count` examples are left in all.
    pending: collections.deque = collections.deque()
    count = good = 0
    skip = 0 if start is None else start.skip
    block = None
    for block, batch in self._parsed_blocks(self.workers, None if start is None else start[:2]):
      good += batch.size
      pending.append([block, CTRBatch(*(x[skip:] for x in batch)), skip])
      count += batch.size - skip
      skip = 0  # only the first block of a resumed pass was partly yielded before
      while count >= batch_size:
        parts, need = [], batch_size
        while need:
          entry = pending[0]
          take = min(need, entry[1].size)
          parts.append(CTRBatch(*(x[:take] for x in entry[1])))
          entry[1] = CTRBatch(*(x[take:] for x in entry[1]))
          entry[2] += take
          need -= take
          if not entry[1].size:
            pending.popleft()
        while pending and not pending[0][1].size:  # blocks without a good line
          pending.popleft()
        count -= batch_size
        yield _concat(parts), _position(pending, block)
    if count:
      yield _concat([entry[1] for entry in pending]), _position((), block)
    self.stats.passes += 1
    if start is None:  # a whole pass: its count is exact
      self._exact_lines = good


def _position(pending, last_block) -> ReadPosition:
  """Where a pass resumes: in the first block with examples left, or after ``last_block``."""
  if pending:
    block, _, yielded = pending[0]
    return ReadPosition(block.offset, block.index, yielded)
  return ReadPosition(
    last_block.offset + len(last_block.data), last_block.index + last_block.data.count(b"\n"), 0
  )


def _concat(batches: list[CTRBatch]) -> CTRBatch:
  if len(batches) == 1:
    return batches[0]
  return CTRBatch(*(np.concatenate(parts) for parts in zip(*batches)))


def count_lines(path: str, *, header: bool = False) -> int:
  """Return the number of non-blank lines of a (possibly gzip) file, less a header line."""
  total = 0
  for block in TextFile(path, header=header, block_bytes=4 << 20).blocks():
    total += sum(1 for line in block.data.split(b"\n") if line.strip())
  return total
