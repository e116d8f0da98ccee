"""Small helpers every experiment shares: JAX's CPU devices, JSON-lines and JSON files.

Results are files. They are written atomically (a temporary file renamed into place), so a
killed run never leaves half a results file behind, and read back with the file and line named
when one is malformed.
"""

from __future__ import annotations

import json

# The strict, atomic writers live in the package (the CTR trainer writes its results with
# them too); experiments import them from here.
from kstep_adam._jsonio import dumps  # noqa: F401
from kstep_adam._jsonio import write_atomic  # noqa: F401
from kstep_adam._jsonio import write_json  # noqa: F401
from kstep_adam._jsonio import write_jsonl  # noqa: F401


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
