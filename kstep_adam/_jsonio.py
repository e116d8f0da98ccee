"""Strict JSON results, written atomically: what the trainer and every experiment write.

JSON has no NaN or infinity, and Python's ``json`` writes them as bare ``NaN`` / ``Infinity``
that strict readers reject; here they become ``null`` (a NaN loss reads back as None, never as
a parse error). NumPy scalars and arrays become plain numbers and lists. Files are written
through a temporary file and a rename, so a killed run never leaves half a results file.
"""

from __future__ import annotations

import json
import math
import os
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


def write_atomic(path: str, text: str) -> None:
  """Write ``text`` to ``path`` through a temporary file and a rename (never half a file).

  The file gets the permissions of any file the user creates (0o666 less the umask), not the
  owner-only mode of :func:`tempfile.mkstemp`: results are shared.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, record) -> None:
  """Write one strict-JSON document atomically (indented, for people to read)."""
  text = json.dumps(finite_or_none(record), indent=2, default=str, allow_nan=False)
  write_atomic(path, text + "\n")


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  """Write a JSON-lines file atomically."""
  write_atomic(path, "".join(dumps(r) + "\n" for r in records))
