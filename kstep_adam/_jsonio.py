"""Strict JSON results, written atomically: what the trainer and every experiment write.

JSON has no NaN or infinity, and Python's ``json`` writes them as bare ``NaN`` / ``Infinity``
that strict readers reject; here they become ``null`` (a NaN loss reads back as None, never as
a parse error). NumPy scalars and arrays become plain numbers and lists. Files are written
through a temporary file and a rename, so a killed run never leaves half a results file (a
kill inside the write can leave the temporary file, ``.NAME.<12 hex digits>.tmp``, beside it:
:func:`is_temporary` tells it). :func:`read_json` reads a document back, and a file that is
not one is an error naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterable

import numpy as np


def finite_or_none(x):
  """``x`` as plain JSON data: non-finite floats become None, NumPy values Python ones.

  Examples:
    >>> finite_or_none({"loss": float("nan"), "auc": np.float32(0.5), "n": [np.int64(3)]})
    {'loss': None, 'auc': 0.5, 'n': [3]}
  """
  if isinstance(x, np.ndarray):
    x = x.tolist()
  elif isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite_or_none(v) for v in x]
  return x


def dumps(record) -> str:
  """One strict-JSON line (non-finite floats become null; unknown objects their ``str``)."""
  return json.dumps(finite_or_none(record), default=str, allow_nan=False)


class CorruptFileError(ValueError):
  """A file that should hold a JSON document does not; the message names it and what to do."""


def read_json(path: str, *, keys: Iterable[str] = (), what_to_do: str = "") -> dict:
  """The JSON object in ``path``; CorruptFileError naming ``path`` if the file is not one
  (not JSON, not UTF-8, not an object, or missing one of ``keys``).

  Args:
    path: the file.
    keys: keys the object must have.
    what_to_do: appended to the error message (what the user can do about it).

  Raises:
    CorruptFileError: as above.
    OSError: the file cannot be read (FileNotFoundError when it is missing).
  """
  hint = f"; {what_to_do}" if what_to_do else ""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CorruptFileError(f"{path} is corrupt: not a JSON document ({error}){hint}") from None
  if not isinstance(record, dict):
    raise CorruptFileError(f"{path} is corrupt: not a JSON object{hint}")
  missing = [key for key in keys if key not in record]
  if missing:
    raise CorruptFileError(f"{path} is corrupt: it has no {', '.join(missing)}{hint}")
  return record


def temporary_name(path: str) -> str:
  """A fresh temporary file name for an atomic write of ``path``, beside it."""
  return os.path.join(
    os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp"
  )


def is_temporary(entry: str, names: Iterable[str]) -> bool:
  """Whether the directory entry ``entry`` is the temporary file of an atomic write of one of
  ``names`` (what a kill inside :func:`write_atomic` leaves).

  Examples:
    >>> is_temporary(".summary.json.0123456789ab.tmp", ["summary.json"])
    True
    >>> is_temporary(".summary.json.tmp", ["summary.json"]), is_temporary("notes", ["notes"])
    (False, False)
  """
  match = re.fullmatch(r"\.(.+)\.[0-9a-f]{12}\.tmp", entry)
  return match is not None and match.group(1) in set(names)


def write_atomic(path: str, text: str) -> None:
  """Write ``text`` to ``path`` through a temporary file and a rename (never half a file).

  The file gets the permissions of any file the user creates (0o666 less the umask), not the
  owner-only mode of :func:`tempfile.mkstemp`: results are shared.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temporary_name(path)
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as error:
    _unlink_quietly(tmp)
    if error.filename is None:  # a write or fsync (a full disk): name the file
      raise type(error)(error.errno, error.strerror, path) from error
    raise
  except BaseException:
    _unlink_quietly(tmp)
    raise


def _unlink_quietly(path: str) -> None:
  with contextlib.suppress(OSError):
    os.unlink(path)


def write_json(path: str, record) -> None:
  """Write one strict-JSON document atomically (indented, for people to read)."""
  text = json.dumps(finite_or_none(record), indent=2, default=str, allow_nan=False)
  write_atomic(path, text + "\n")


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  """Write a JSON-lines file atomically."""
  write_atomic(path, "".join(dumps(r) + "\n" for r in records))
