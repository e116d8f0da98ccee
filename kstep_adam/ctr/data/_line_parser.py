"""The line parser: one record at a time, in Python; the reference for what a record is.

It reads any block the columnar parser (:mod:`._columnar`) declines, and names every bad
line (file, line, field). The record it accepts is defined in :mod:`._readers`.
"""

from __future__ import annotations

import csv
import math
import re

import numpy as np

from kstep_adam.ctr.data._schema import ASCII_WHITESPACE
from kstep_adam.ctr.data._schema import CRITEO_NUM_DENSE
from kstep_adam.ctr.data._schema import DENSE_LIMIT
from kstep_adam.ctr.data._schema import MISSING
from kstep_adam.ctr.data._schema import Rows
from kstep_adam.ctr.data._schema import Schema
from kstep_adam.ctr.data._schema import StringValues


def _show(field: bytes | str) -> str:
  """A field for a message: decoded, quoted, and cut short when long."""
  text = field.decode("utf-8", "backslashreplace") if isinstance(field, bytes) else field
  return repr(text if len(text) <= 40 else text[:40] + "...")


class LineParser:
  """The reference parser: one line at a time, every bad line named.

  Each line first takes a quick path (a few list comprehensions, one check for all hex ids);
  a line it does not accept is parsed field by field, which accepts it or says which field
  is bad and why. The quick path accepts a subset of what the slow one does, with the same
  values.
  """

  def __init__(self, schema: Schema, strings: StringValues):
    self.schema, self._strings = schema, strings
    self._num_fields = len(schema.names)
    self._criteo = schema.format == "criteo"

  def parse(self, data: bytes) -> tuple[Rows, list[tuple[int, str]]]:
    """Parse a block of whole lines; return its good rows and ``(line offset, what)`` of
    every bad line (offset 0 is the block's first line)."""
    labels, dense, values, bad = [], [], [], []
    quick = self._quick_criteo if self._criteo else self._quick_csv
    for offset, line in enumerate(data.split(b"\n")):
      line = line.removesuffix(b"\r")
      if not line.strip():
        continue
      record = quick(line)
      if record is None:
        try:
          record = self._record(line)
        except _BadLine as error:
          bad.append((offset, str(error)))
          continue
      labels.append(record[0])
      dense.append(record[1])
      values.append(record[2])
    schema = self.schema
    rows = Rows(
      np.asarray(labels, np.float32).reshape(len(labels)),
      np.asarray(dense, np.float64).reshape(len(labels), len(schema.dense)),
      np.asarray(values, np.uint64).reshape(len(labels), len(schema.categorical)),
    )
    return rows, bad

  # -- the quick path ------------------------------------------------------------------------
  def _quick_criteo(self, line: bytes):
    fields = line.split(b"\t")
    if len(fields) != self._num_fields:
      return None
    fields = [f.strip() for f in fields]
    ids = fields[1 + CRITEO_NUM_DENSE :]
    if any(len(f) > 16 for f in ids) or b"".join(ids).translate(None, _HEX_DIGITS):
      return None
    numbers = _quick_numbers(fields[0], fields[1 : 1 + CRITEO_NUM_DENSE])
    if numbers is None:
      return None
    return numbers[0], numbers[1], [int(f, 16) if f else MISSING for f in ids]

  def _quick_csv(self, line: bytes):
    try:
      fields = next(csv.reader([line.decode("utf-8")], strict=True))
    except (UnicodeDecodeError, csv.Error):
      return None
    if len(fields) != self._num_fields:
      return None
    schema = self.schema
    numbers = _quick_numbers(
      fields[schema.label].strip(ASCII_WHITESPACE),
      [fields[i].strip(ASCII_WHITESPACE) for i in schema.dense],
    )
    if numbers is None:
      return None
    strings = self._strings
    ids = [strings(fields[i].strip(ASCII_WHITESPACE)) for i in schema.categorical]
    return numbers[0], numbers[1], ids

  # -- the slow path: accept, or name the first bad field --------------------------------------
  def _fields(self, line: bytes) -> list:
    if self._criteo:
      return line.split(b"\t")
    # Bytes that are not UTF-8 become lone surrogates; only a field that is used must be clean
    # (an ignored column is never decoded by the columnar parser either).
    fields = self._csv_fields(line.decode("utf-8", "surrogateescape"))
    schema = self.schema
    used = (schema.label, *schema.dense, *schema.categorical)
    for i in sorted(used) if len(fields) == self._num_fields else ():
      if _NOT_UTF8.search(fields[i]):
        shown = _show(fields[i].encode("utf-8", "surrogateescape"))
        raise _BadLine(f"field {i + 1} ({schema.names[i]}) is not valid UTF-8: {shown}")
    return fields

  @staticmethod
  def _csv_fields(text: str) -> list[str]:
    try:
      return next(csv.reader([text], strict=True))
    except csv.Error as error:
      raise _BadLine(f"malformed CSV quoting ({error})") from None

  def _record(self, line: bytes):
    schema = self.schema
    fields = self._fields(line)
    if len(fields) != self._num_fields:
      raise _BadLine(f"expected {self._num_fields} fields, got {len(fields)}")
    strip = _ASCII_WHITESPACE_BYTES if self._criteo else ASCII_WHITESPACE
    fields = [f.strip(strip) for f in fields]
    text = fields[schema.label]
    try:
      label = float(text)
    except ValueError:
      raise _BadLine(f"label is not numeric: {_show(text)}") from None
    if label not in (0.0, 1.0):
      raise _BadLine(f"label must be 0 or 1, got {_show(text)}")
    dense = []
    for i in schema.dense:
      text = fields[i]
      try:
        x = float(text) if text else 0.0
      except ValueError:
        raise _BadLine(f"{schema.field(i, 'dense')} is not a number: {_show(text)}") from None
      if not math.isfinite(x):
        raise _BadLine(f"{schema.field(i, 'dense')} is not finite: {_show(text)}")
      if abs(x) > DENSE_LIMIT:
        raise _BadLine(f"{schema.field(i, 'dense')} is outside [-2**53, 2**53]: {_show(text)}")
      dense.append(x)
    values = []
    for i in schema.categorical:
      text = fields[i]
      if not self._criteo:
        values.append(self._strings(text))
      elif not text:
        values.append(MISSING)
      elif text.translate(None, _HEX_DIGITS):
        raise _BadLine(f"{schema.field(i, 'categorical')} is not hex: {_show(text)}")
      elif len(text) > 16:
        raise _BadLine(
          f"{schema.field(i, 'categorical')} has more than 16 hex digits (64 bits): {_show(text)}"
        )
      else:
        values.append(int(text, 16))
    return 1.0 if label == 1.0 else 0.0, dense, values


_ASCII_WHITESPACE_BYTES = ASCII_WHITESPACE.encode()
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a non-UTF-8 byte
_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _quick_numbers(label_text, dense_texts):
  """``(label, dense values)`` if all are clean, else None (the slow path will say why)."""
  try:
    label = float(label_text)
    dense = [float(t) if t else 0.0 for t in dense_texts]
  except ValueError:
    return None
  if (label != 0.0 and label != 1.0) or not all(-DENSE_LIMIT <= x <= DENSE_LIMIT for x in dense):
    return None
  return (1.0 if label == 1.0 else 0.0), dense


class _BadLine(Exception):
  """A bad record; the message says which field and why."""
