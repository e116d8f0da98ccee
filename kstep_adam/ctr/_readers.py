"""Streaming readers for CTR files: Criteo TSV, Avazu CSV and generic "label + columns" CSV.

Both formats go through one line parser and yield :class:`CTRBatch` chunks; plain and gzip
files are told apart by their magic bytes. Integer (dense) fields get the standard Criteo log
transform ``log(1 + max(x, 0))``; an empty dense field reads as 0 and an empty categorical
field as its own "missing" value. A bad line raises :class:`CTRDataError` naming the file, the
line number and the field, unless ``skip_bad_lines=True``, which counts and skips it
(``reader.stats`` holds the counts and the first messages).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import math
import os
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from kstep_adam.ctr._batch import CTRBatch
from kstep_adam.ctr._batch import feature_keys

CRITEO_NUM_DENSE = 13
CRITEO_NUM_CATEGORICAL = 26
_MISSING = 1 << 62  # raw value of an empty categorical field; outside 32-bit hex and hashes
_FORMATS = ("criteo", "csv")
_MAX_MESSAGES = 10


class CTRDataError(ValueError):
  """A malformed record in a CTR data file; the message names file, line and field."""


@dataclasses.dataclass
class ReadStats:
  """Counts kept by a reader over all passes since it was made."""

  lines_read: int = 0  # data lines parsed successfully
  lines_skipped: int = 0  # bad lines skipped (skip_bad_lines=True only)
  messages: list[str] = dataclasses.field(default_factory=list)  # first bad-line messages


def _open_text(path: str) -> io.TextIOBase:
  if not os.path.exists(path):
    raise FileNotFoundError(f"CTR data file not found: {path}")
  with open(path, "rb") as f:
    magic = f.read(2)
  if magic == b"\x1f\x8b":
    return gzip.open(path, "rt", encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def count_lines(path: str, *, header: bool = False) -> int:
  """Return the number of data lines in a (possibly gzip) file, excluding a header line."""
  with _open_text(path) as f:
    n = sum(1 for line in f if line.strip())
  return max(n - int(header), 0)


def _string_value(s: str) -> int:
  return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 2


class CTRFileReader:
  """Stream a CTR file as :class:`CTRBatch` chunks.

  Args:
    path: file path; gzip is detected from the content.
    format: ``'criteo'`` (no header; label, 13 integer, 26 hex categorical fields, tab
      separated) or ``'csv'`` (comma separated with a header row; Avazu or your own data).
    label_column: csv only; the label column's name. Default: ``'label'`` or ``'click'``,
      whichever the header has.
    dense_columns: csv only; names of numeric columns to log-transform as dense features.
      Every other column except ``ignore_columns`` is categorical.
    ignore_columns: csv only; columns to drop (Avazu's per-row ``id`` by default).
    skip_bad_lines: skip and count malformed lines instead of raising.
    start_line: first data line to read (0-based, header excluded), for train/test splits.
    stop_line: one past the last data line to read; ``None`` reads to the end.
    key_bits: size of the feature-key space, see :func:`feature_keys`.

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
    skip_bad_lines: bool = False,
    start_line: int = 0,
    stop_line: int | None = None,
    key_bits: int = 40,
  ):
    if format not in _FORMATS:
      raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if start_line < 0 or (stop_line is not None and stop_line < start_line):
      raise ValueError(
        f"need 0 <= start_line <= stop_line, got start_line={start_line!r}, stop_line={stop_line!r}"
      )
    self.path, self.format, self.key_bits = path, format, key_bits
    self.skip_bad_lines, self.start_line, self.stop_line = skip_bad_lines, start_line, stop_line
    self.stats = ReadStats()
    self._cache: dict[str, int] = {}
    if format == "criteo":
      self.num_dense, self.num_categorical = CRITEO_NUM_DENSE, CRITEO_NUM_CATEGORICAL
      self._num_fields = 1 + self.num_dense + self.num_categorical
      self._label_index = 0
      self._dense_index = list(range(1, 1 + self.num_dense))
      self._cat_index = list(range(1 + self.num_dense, self._num_fields))
      return
    with _open_text(path) as f:
      header = next(csv.reader(f), None)
    if not header:
      raise CTRDataError(f"{path}:1: csv format needs a header row, the file is empty")
    header = [h.strip() for h in header]
    if label_column is None:
      label_column = next((c for c in ("label", "click") if c in header), None)
    if label_column not in header:
      raise ValueError(
        f"label_column {label_column!r} is not in the header of {path}: "
        f"{header}; pass label_column= one of them"
      )
    missing = [c for c in dense_columns if c not in header]
    if missing:
      raise ValueError(f"dense_columns {missing} are not in the header of {path}: {header}")
    self._label_index = header.index(label_column)
    self._dense_index = [header.index(c) for c in dense_columns]
    skip = {label_column, *dense_columns, *ignore_columns}
    self._cat_index = [i for i, c in enumerate(header) if c not in skip]
    if len(self._cat_index) < 1:
      raise ValueError(f"{path} has no categorical columns left after label/dense/ignore")
    self.categorical_columns = [header[i] for i in self._cat_index]
    self.num_dense, self.num_categorical = len(self._dense_index), len(self._cat_index)
    self._num_fields = len(header)

  # -- parsing -----------------------------------------------------------------------------
  def _bad(self, line_no: int, what: str) -> None:
    message = f"{self.path}:{line_no}: {what}"
    if not self.skip_bad_lines:
      raise CTRDataError(message + " (pass skip_bad_lines=True to skip such lines)")
    self.stats.lines_skipped += 1
    if len(self.stats.messages) < _MAX_MESSAGES:
      self.stats.messages.append(message)

  def _parse(self, parts: list[str], line_no: int):
    """Return (label, dense list, categorical raw values) or None after reporting a bad line."""
    if len(parts) != self._num_fields:
      return self._bad(line_no, f"expected {self._num_fields} fields, got {len(parts)}")
    label_text = parts[self._label_index]
    try:
      label = float(label_text)
    except ValueError:
      return self._bad(line_no, f"label is not numeric: {label_text!r}")
    if label not in (0.0, 1.0):
      return self._bad(line_no, f"label must be 0 or 1, got {label_text!r}")
    dense = []
    for i in self._dense_index:
      s = parts[i].strip()
      try:
        x = float(s) if s else 0.0
      except ValueError:
        return self._bad(line_no, f"field {i + 1} (dense) is not a number: {s!r}")
      dense.append(math.log1p(max(x, 0.0)))
    values = []
    for i in self._cat_index:
      s = parts[i].strip()
      if not s:
        values.append(_MISSING)
      elif self.format == "criteo":
        try:
          values.append(int(s, 16))
        except ValueError:
          return self._bad(line_no, f"field {i + 1} (categorical) is not hex: {s!r}")
      else:
        v = self._cache.get(s)
        if v is None:
          v = self._cache[s] = _string_value(s)
        values.append(v)
    return label, dense, values

  def _to_batch(self, rows: list) -> CTRBatch:
    labels, dense, values = zip(*rows)
    dense_BxI = np.asarray(dense, np.float32).reshape(len(rows), self.num_dense)
    keys_BxF = feature_keys(np.asarray(values, np.uint64), key_bits=self.key_bits)
    return CTRBatch(dense_BxI, keys_BxF, np.asarray(labels, np.float32))

  def batches(self, batch_size: int) -> Iterator[CTRBatch]:
    """Yield one pass over lines ``[start_line, stop_line)``, ``batch_size`` examples each
    (the last chunk may be smaller)."""
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    header = self.format == "csv"
    delimiter = "\t" if self.format == "criteo" else ","
    rows: list = []
    with _open_text(self.path) as f:
      lines = csv.reader(f) if header else (row.rstrip("\r\n").split(delimiter) for row in f)
      data_index = -1
      for line_no, parts in enumerate(lines, start=1):
        if header:
          line_no = lines.line_num  # a quoted record may span lines
          if line_no == 1:
            continue
        if not parts or (len(parts) == 1 and not parts[0].strip()):  # a blank line
          continue
        data_index += 1
        if data_index < self.start_line:
          continue
        if self.stop_line is not None and data_index >= self.stop_line:
          break
        parsed = self._parse(parts, line_no)
        if parsed is None:
          continue
        self.stats.lines_read += 1
        rows.append(parsed)
        if len(rows) == batch_size:
          yield self._to_batch(rows)
          rows = []
    if rows:
      yield self._to_batch(rows)
