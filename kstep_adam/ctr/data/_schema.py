"""What a CTR file's records are: formats, schemas, parsed rows, read statistics and positions.

Shared by both parsers (:mod:`._line_parser`, :mod:`._columnar`) and the reader
(:mod:`._readers`, whose module docstring defines a record); it imports neither of them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kstep_adam.ctr.data._textfile import CTRDataError

CRITEO_NUM_DENSE = 13
CRITEO_NUM_CATEGORICAL = 26


CRITEO_NAMES = (
  "label",
  *(f"I{i}" for i in range(1, CRITEO_NUM_DENSE + 1)),
  *(f"C{i}" for i in range(1, CRITEO_NUM_CATEGORICAL + 1)),
)


# The raw value of an empty categorical field: no CSV string hashes to it (those are < 2**62);
# of the 2**64 Criteo ids, 4000000000000000 (hex) shares it.
MISSING = 1 << 62
DENSE_LIMIT = 2.0**53  # largest accepted |dense value|
FORMATS = ("criteo", "csv")  # the file formats; DataConfig and the CLI take these
ENGINES = ("columnar", "lines")
ASCII_WHITESPACE = " \t\n\r\x0b\x0c"


@dataclasses.dataclass
class ReadStats:
  """Counts kept by a reader; every line is counted once, however many passes read it."""

  lines_read: int = 0  # good data lines
  lines_skipped: int = 0  # bad lines skipped (skip_bad_lines=True only)
  passes: int = 0  # complete passes over the reader's part of the file
  messages: list[str] = dataclasses.field(default_factory=list)  # first bad-line messages


class ReadPosition(NamedTuple):
  """Where a pass over a reader's part resumes: after the examples it has yielded so far.

  The block at ``offset`` is the first one that still holds examples not yet yielded;
  ``skip`` of its good examples were. A reader given this position yields exactly what the
  pass would have yielded next (JSON-able as a list of three ints).
  """

  offset: int  # decompressed byte offset of that block's first line
  line: int  # lines of the part before it
  skip: int  # its good examples already yielded


@dataclasses.dataclass(frozen=True)
class Schema:
  """What each field of a line is: names in file order and the roles by field index."""

  format: str  # 'criteo' or 'csv'
  names: tuple[str, ...]  # every field of a line, in file order
  label: int  # field index of the label
  dense: tuple[int, ...]  # field indices of the dense features, in feature order
  categorical: tuple[int, ...]  # field indices of the categorical fields, in feature order

  def field(self, index: int, kind: str) -> str:
    return f"field {index + 1} ({self.names[index]}, {kind})"


class Rows(NamedTuple):
  """One block's good records, before the dense transform and key hashing."""

  label_N: np.ndarray  # float32 [N], 0.0 or 1.0
  dense_NxI: np.ndarray  # float64 [N, num_dense], the raw values (empty fields are 0)
  values_NxF: np.ndarray  # uint64 [N, num_categorical], raw categorical values


def string_value(text: str) -> int:
  """The raw value of a CSV categorical string (stable across runs and machines)."""
  digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "little") >> 2


class StringValues:
  """Raw values of CSV strings, remembered (a CSV column repeats its values)."""

  def __init__(self):
    self._cache: dict[str, int] = {"": MISSING}

  def __call__(self, text: str) -> int:
    value = self._cache.get(text)
    if value is None:
      value = self._cache[text] = string_value(text)
    return value


def csv_schema(
  path: str,
  header_line: bytes,
  *,
  label_column: str | None,
  dense_columns: Sequence[str],
  ignore_columns: Sequence[str],
  categorical_columns: Sequence[str] | None,
) -> Schema:
  """Roles of a CSV file's columns, matched by name in its header (line 1)."""
  try:
    header = next(csv.reader([header_line.decode("utf-8")], strict=True), [])
  except (UnicodeDecodeError, csv.Error) as error:
    raise CTRDataError(f"{path}:1: the CSV header cannot be read ({error})") from None
  header = [h.strip(ASCII_WHITESPACE) for h in header]
  if not header or header == [""]:
    raise CTRDataError(f"{path}:1: csv format needs a header row, the first line is empty")
  duplicates = sorted({h for h in header if header.count(h) > 1})
  if duplicates:
    raise CTRDataError(f"{path}:1: the header names columns {duplicates} more than once")
  if label_column is None:
    label_column = next((c for c in ("label", "click") if c in header), None)
  if categorical_columns is not None:  # the columns are known: match them by name
    expected = [label_column, *dense_columns, *categorical_columns]
    missing = [c for c in expected if c not in header]
    extra = [c for c in header if c not in expected and c not in ignore_columns]
    if missing or extra:
      raise CTRDataError(
        f"the columns of {path} differ from the expected ones: missing {missing}, "
        f"unexpected {extra} (columns are matched by name; the training file's header sets "
        "them)"
      )
  if label_column not in header:
    raise CTRDataError(
      f"label_column {label_column!r} is not in the header of {path}: {header}; pass "
      "label_column= one of them"
    )
  missing = [c for c in dense_columns if c not in header]
  if missing:
    raise CTRDataError(f"dense_columns {missing} are not in the header of {path}: {header}")
  used = {label_column, *dense_columns}
  if len(used) != 1 + len(dense_columns) or used & set(categorical_columns or ()):
    raise CTRDataError(
      f"a column of {path} has two roles: label {label_column!r}, dense {list(dense_columns)}, "
      f"categorical {categorical_columns}"
    )
  if categorical_columns is None:
    skip = used | set(ignore_columns)
    categorical_columns = [c for c in header if c not in skip]
  if not categorical_columns:
    raise CTRDataError(f"{path} has no categorical columns left after label/dense/ignore")
  return Schema(
    format="csv",
    names=tuple(header),
    label=header.index(label_column),
    dense=tuple(header.index(c) for c in dense_columns),
    categorical=tuple(header.index(c) for c in categorical_columns),
  )


CRITEO_SCHEMA = Schema(
  format="criteo",
  names=CRITEO_NAMES,
  label=0,
  dense=tuple(range(1, 1 + CRITEO_NUM_DENSE)),
  categorical=tuple(range(1 + CRITEO_NUM_DENSE, len(CRITEO_NAMES))),
)
