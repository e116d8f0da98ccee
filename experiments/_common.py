"""Small helpers every experiment shares: JAX's CPU devices, JSON-lines and JSON files.

Results are files. They are written atomically (a temporary file renamed into place), so a
killed run never leaves half a results file behind, and read back with the file and line named
when one is malformed.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterable


def use_cpu_devices(count: int, *, cpu_only: bool = False) -> None:
  """Ask for ``count`` simulated CPU devices; call in ``main()``, before the JAX backend starts.

  On a GPU or TPU backend the flag is ignored, so the same entry point runs unchanged there.

  Args:
    count: CPU devices to simulate.
    cpu_only: run on the CPU even where an accelerator is present (unless the user picked a
      platform with ``JAX_PLATFORMS``), for programs that need exactly ``count`` devices.
  """
  import jax

  if cpu_only and not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", max(int(count), 1))


def read_jsonl(path: str) -> list[dict]:
  """All records of a JSON-lines file; a malformed line raises ValueError naming file:line."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not a JSON record ({e.msg})") from None
  return records


def _finite_or_none(x):
  """JSON has no NaN or inf: write them as null (the reader sees None, never a bare NaN)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_or_none(v) for v in x]
  return x


def dumps(record) -> str:
  """Strict JSON (non-finite floats become null)."""
  return json.dumps(_finite_or_none(record), default=str, allow_nan=False)


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
  text = json.dumps(_finite_or_none(record), indent=2, default=str, allow_nan=False)
  write_atomic(path, text + "\n")


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  """Write a JSON-lines file atomically."""
  write_atomic(path, "".join(dumps(r) + "\n" for r in records))
