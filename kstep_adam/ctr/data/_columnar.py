"""The vectorized block parser: pyarrow's CSV reader, then NumPy end to end.

pyarrow (a C++ CSV tokenizer with explicit column types, parsing an in-memory block of whole
lines) splits fields and converts labels and dense values to float64; NumPy checks the
values, decodes Criteo's hex ids eight ASCII digits at a time as one uint64 (SWAR: SIMD
within a register), and maps CSV strings to values through each column's dictionary, so the
Python-level work is once per distinct string.

The parser accepts only what it can prove the line parser (:class:`._line_parser.LineParser`)
reads the same way; for anything else (a bad line, a quoted CSV field, a lone carriage
return, whitespace around a hex id, a hex id that is not 8 digits...) it returns None and the
caller hands the block to the line parser, which names the bad line.

pyarrow rather than polars: it is the reference the speed is measured against, it parses an
in-memory block into typed columns with no copy, and its string arrays expose their offset
and data buffers, which the hex decoder reads directly.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from kstep_adam.ctr.data._schema import DENSE_LIMIT
from kstep_adam.ctr.data._schema import MISSING
from kstep_adam.ctr.data._schema import Rows
from kstep_adam.ctr.data._schema import Schema
from kstep_adam.ctr.data._schema import StringValues


def _bytes8(byte: int) -> np.uint64:
  """``byte`` repeated in all eight bytes of a uint64."""
  return np.uint64(int.from_bytes(bytes([byte]) * 8, "little"))


_HIGH, _LOW_NIBBLE, _ONE = _bytes8(0x80), _bytes8(0x0F), _bytes8(0x01)
_PAIR, _QUAD = np.uint64(0x00FF00FF00FF00FF), np.uint64(0x0000FFFF0000FFFF)
_WORD = np.uint64(0xFFFFFFFF)
_SHIFT = {k: np.uint64(k) for k in (4, 6, 8, 16, 32)}
_CACHE_WORDS = 1 << 14  # hex8 runs on pieces this long: its temporaries stay in cache
_HEX_NIBBLE = np.full(256, 0xFF, np.uint8)  # ASCII byte -> hex digit value, 0xFF if none
for _i, _c in enumerate(b"0123456789abcdef"):
  _HEX_NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
  _HEX_NIBBLE[_c] = 10 + _i


def hex8(x_N: np.ndarray) -> np.ndarray | None:
  """Decode uint64s that each hold 8 ASCII hex digits (first digit in the lowest byte).

  Returns the values, or None if any byte is not a hex digit.

  Examples:
    >>> hex8(np.frombuffer(b"0000001aFFFFFFFF", "<u8")).tolist()
    [26, 4294967295]
    >>> hex8(np.frombuffer(b"0000001g", "<u8")) is None
    True
  """
  # Per byte b < 0x80: b + (0x80 - lo) sets the high bit iff b >= lo, with no carry out.
  digit = x_N + _bytes8(0x80 - 0x30)
  above = x_N + _bytes8(0x80 - 0x3A)
  np.invert(above, out=above)
  digit &= above  # '0'..'9'
  folded = x_N | _bytes8(0x20)  # 'A'..'F' -> 'a'..'f'
  letter = folded + _bytes8(0x80 - 0x61)
  folded += _bytes8(0x80 - 0x67)
  np.invert(folded, out=folded)
  letter &= folded  # 'a'..'f'
  digit |= letter
  digit &= _HIGH
  digit ^= _HIGH  # now the high bit of a byte that is no hex digit
  digit |= x_N & _HIGH  # non-ASCII
  if digit.any():
    return None
  nibble = x_N & _LOW_NIBBLE  # '0'..'9' -> 0..9, letters -> 1..6
  letters = x_N >> _SHIFT[6]
  letters &= _ONE
  letters *= np.uint64(9)
  nibble += letters
  # Gather the nibbles, most significant first: pairs into bytes, bytes into 16, into 32 bits.
  packed = nibble << _SHIFT[4]
  nibble >>= _SHIFT[8]
  packed |= nibble
  packed &= _PAIR
  nibble = packed << _SHIFT[8]
  packed >>= _SHIFT[16]
  nibble |= packed
  nibble &= _QUAD
  packed = nibble << _SHIFT[16]
  nibble >>= _SHIFT[32]
  packed |= nibble
  packed &= _WORD
  return packed


def _hex_any(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
  """Decode hex strings of any length 1..16, grouped by length (the uncommon case)."""
  out = np.empty(starts.shape[0], np.uint64)
  for length in np.unique(lengths).tolist():
    rows = np.flatnonzero(lengths == length)
    digits = _HEX_NIBBLE[data[starts[rows, None] + np.arange(length)]]
    if (digits == 0xFF).any():
      return None
    value = np.zeros(rows.shape[0], np.uint64)
    for j in range(length):
      value <<= _SHIFT[4]
      value |= digits[:, j]
    out[rows] = value
  return out


def _buffers(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """The offsets and data bytes of a binary or string array, as NumPy views."""
  offsets = np.frombuffer(column.buffers()[1], np.int32, len(column) + 1, column.offset * 4)
  data = column.buffers()[2]
  return offsets, (np.zeros(0, np.uint8) if data is None else np.frombuffer(data, np.uint8))


def hex_values(columns: list[pa.Array], out_FxN: np.ndarray) -> bool:
  """Write the raw values of binary columns of hex ids (empty: MISSING) into ``out_FxN``,
  one row per column; return False if any is not 1..16 hex digits.

  When every id is 8 digits (Criteo's), all columns are decoded together in one pass.
  """
  buffers = [_buffers(column) for column in columns]
  lengths_FxN = np.empty(out_FxN.shape, np.int32)
  for j, (offsets, _) in enumerate(buffers):
    np.subtract(offsets[1:], offsets[:-1], out=lengths_FxN[j])
  present_FxN = lengths_FxN != 0
  out_FxN.fill(MISSING)
  if ((lengths_FxN == 8) | ~present_FxN).all():
    # The ids of a column are contiguous in its data buffer; in C order, so is present_FxN.
    x = np.concatenate([data[offsets[0] : offsets[-1]] for offsets, data in buffers]).view("<u8")
    values = np.empty_like(x)
    for start in range(0, x.shape[0], _CACHE_WORDS):
      decoded = hex8(x[start : start + _CACHE_WORDS])
      if decoded is None:
        return False
      values[start : start + _CACHE_WORDS] = decoded
    out_FxN[present_FxN] = values
    return True
  if not (lengths_FxN <= 16).all():
    return False
  for j, (offsets, data) in enumerate(buffers):
    present = present_FxN[j]
    values = _hex_any(data, offsets[:-1][present], lengths_FxN[j][present])
    if values is None:
      return False
    out_FxN[j, present] = values
  return True


class ColumnarParser:
  """Parse a block of whole lines into :class:`Rows`, or None where the line parser must.

  Args:
    schema: the file's fields.
    strings: the raw values of CSV strings (shared with the line parser).
  """

  def __init__(self, schema: Schema, strings: StringValues):
    self.schema, self._strings = schema, strings
    criteo = schema.format == "criteo"
    names = [f"f{i}" for i in range(len(schema.names))]  # a header may have any names
    types = {names[schema.label]: pa.float64()}
    types.update({names[i]: pa.float64() for i in schema.dense})
    types.update({names[i]: pa.binary() if criteo else pa.string() for i in schema.categorical})
    self._label = names[schema.label]
    self._dense = [names[i] for i in schema.dense]
    self._categorical = [names[i] for i in schema.categorical]
    # One chunk per column: the caller's blocks are small, and parsed on its worker threads.
    self._read = pacsv.ReadOptions(column_names=names, use_threads=False, block_size=1 << 30)
    self._parse = pacsv.ParseOptions(
      delimiter="\t" if criteo else ",",
      quote_char=False,  # a quoted CSV field goes to the line parser
      double_quote=False,
      escape_char=False,
      newlines_in_values=False,
      ignore_empty_lines=True,
    )
    self._convert = pacsv.ConvertOptions(
      column_types=types,
      include_columns=[self._label, *self._dense, *self._categorical],
      null_values=[""],
      strings_can_be_null=False,
      quoted_strings_can_be_null=False,
      check_utf8=not criteo,
    )

  def parse(self, data: bytes) -> Rows | None:
    criteo = self.schema.format == "criteo"
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
      return None  # a lone CR is a line break to pyarrow, part of a field to the line parser
    if not criteo and b'"' in data:
      return None
    try:
      table = pacsv.read_csv(
        pa.py_buffer(data),
        read_options=self._read,
        parse_options=self._parse,
        convert_options=self._convert,
      )
    except pa.ArrowInvalid:
      return None
    label = table.column(self._label)
    if label.null_count:
      return None
    label_N = label.to_numpy()
    is_one = label_N == 1.0
    if not (is_one | (label_N == 0.0)).all():
      return None
    n = table.num_rows
    dense_NxI = np.empty((n, len(self._dense)), np.float64)
    for j, name in enumerate(self._dense):
      column = table.column(name)
      if column.null_count:
        column = column.fill_null(0.0)
      dense_NxI[:, j] = column.to_numpy()
    if self._dense and not (np.abs(dense_NxI) <= DENSE_LIMIT).all():  # also false for NaN
      return None
    values_FxN = np.empty((len(self._categorical), n), np.uint64)
    columns = [table.column(name).combine_chunks() for name in self._categorical]
    if criteo:
      if not hex_values(columns, values_FxN):
        return None
    else:
      trim = any(c in data for c in (b" ", b"\t", b"\x0b", b"\x0c"))
      for j, column in enumerate(columns):
        values_FxN[j] = self._string_values(column, trim)
    return Rows(is_one.astype(np.float32), dense_NxI, values_FxN.T)

  def _string_values(self, chunk: pa.Array, trim: bool) -> np.ndarray:
    if trim:
      chunk = pc.ascii_trim_whitespace(chunk)
    encoded = chunk.dictionary_encode()
    strings = encoded.dictionary.to_pylist()
    values = np.fromiter(map(self._strings, strings), np.uint64, len(strings))
    return values[encoded.indices.to_numpy()]
