"""A run's host state: what a checkpoint keeps besides the dense state and the table.

:class:`RunState` holds the run's own fields; the stateful parts of the trainer (meter,
divergence monitor, timer, adaptive period...) are passed as a dict, so a new part is one entry
there. ``host.json`` keeps today's keys and nesting, so checkpoints written before stay
resumable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from typing import Protocol

from kstep_adam._jsonio import dumps
from kstep_adam._jsonio import write_atomic


class Stateful(Protocol):
  """A part of a run that a checkpoint keeps: JSON data out, and back in on resume."""

  def state(self) -> Any: ...
  def restore(self, state: Any) -> None: ...


# host.json's keys, in the order they are written: the run's own and its parts' (by name).
HOST_KEYS = (
  "step",
  "table_step",
  "data",
  "metrics_bytes",
  "evals",
  "meter",
  "monitor",
  "hooks",
  "timer",
  "train_seconds",
  "compile_steps",
  "compile_step_seconds",
  "adaptive",
)

_OWN_KEYS = (
  "data",
  "metrics_bytes",
  "evals",
  "hooks",
  "train_seconds",
  "compile_steps",
  "compile_step_seconds",
)


@dataclasses.dataclass
class RunState:
  """The run's host state besides its parts'.

  Attributes:
    data_position: where the data continues after the last step taken (JSON data), or None.
    data_counts: the source's read counters (file data), or None.
    evals: the evaluation records so far.
    hook_states: each hook's :meth:`~kstep_adam.ctr.Hook.state`, by its key.
    train_seconds: training time so far, without evaluations.
    compile_steps: steps whose program compiled first; compile_step_seconds: their time.
    metrics_bytes: the size of ``metrics.jsonl`` the state counts (a resumed run cuts it
      back to that).
  """

  data_position: dict | None = None
  data_counts: Any = None
  evals: list = dataclasses.field(default_factory=list)
  hook_states: dict = dataclasses.field(default_factory=dict)
  train_seconds: float = 0.0
  compile_steps: int = 0
  compile_step_seconds: float = 0.0
  metrics_bytes: int = 0

  def to_json(self, step: int, table_step: int, parts: dict[str, Stateful | None]) -> dict:
    """``host.json``'s content at ``step`` (a part that is None is written as None)."""
    out = {
      "step": step,
      "table_step": table_step,
      "data": {"position": self.data_position, "counts": self.data_counts},
      "metrics_bytes": self.metrics_bytes,
      "evals": self.evals,
      "hooks": self.hook_states,
      "train_seconds": self.train_seconds,
      "compile_steps": self.compile_steps,
      "compile_step_seconds": self.compile_step_seconds,
      **{name: None if part is None else part.state() for name, part in parts.items()},
    }
    return {key: out[key] for key in (*HOST_KEYS, *sorted(set(out) - set(HOST_KEYS)))}

  @classmethod
  def from_json(cls, host: dict, parts: dict[str, Stateful | None], *, where: str) -> RunState:
    """Restore every part that is not None from ``host`` and return the run's own fields.

    Raises ValueError naming ``where`` (the file) if a key is missing.
    """
    needed = (*_OWN_KEYS, *(name for name, part in parts.items() if part is not None))
    missing = [key for key in needed if key not in host]
    if missing:
      raise ValueError(f"{where} has no {', '.join(map(repr, missing))}: not a run's host state")
    for name, part in parts.items():
      if part is not None:
        part.restore(host[name])
    return cls(
      data_position=host["data"]["position"],
      data_counts=host["data"]["counts"],
      evals=list(host["evals"]),
      hook_states=dict(host["hooks"]),
      train_seconds=host["train_seconds"],
      compile_steps=host["compile_steps"],
      compile_step_seconds=host["compile_step_seconds"],
      metrics_bytes=host["metrics_bytes"],
    )


def truncate_metrics(path: str, size: int) -> None:
  """Cut a metrics file back to its first ``size`` bytes (what a checkpoint counted),
  atomically: the records after the checkpoint are written again by the resumed run."""
  kept = b""
  if os.path.exists(path):
    with open(path, "rb") as f:
      kept = f.read(size + 1)
  if len(kept) < size:
    raise ValueError(
      f"{path} has {len(kept)} bytes, fewer than the {size} its checkpoint counted: it was "
      "changed after the checkpoint was taken"
    )
  if len(kept) > size:
    write_atomic(path, kept[:size].decode("utf-8"))


class MetricsFile:
  """A run's ``metrics.jsonl``, open for appending: one strict-JSON record a line.

  Attributes:
    path: the file.
    closed: whether it was closed (the run that opened it closes it).
  """

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "a", encoding="utf-8")

  def log(self, record: dict) -> None:
    """Append ``record`` (flushed: a reader sees every record so far)."""
    self._file.write(dumps(record) + "\n")
    self._file.flush()

  def sync(self) -> int:
    """Put every record on disk (before a checkpoint counts them) and return the size."""
    self._file.flush()
    os.fsync(self._file.fileno())
    return self.size()

  def size(self) -> int:
    """The file's size in bytes."""
    return os.fstat(self._file.fileno()).st_size

  @property
  def closed(self) -> bool:
    return self._file.closed

  def close(self) -> None:
    self._file.close()
