"""Stopping a run on SIGINT or SIGTERM at the next step boundary, never in the middle of one.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to
be: inside a write, inside a library, or inside a garbage-collection callback of JAX, where it
is printed ("Exception ignored") and lost, so the run went on and exited 0. Instead, while
:func:`stop_at_step_boundaries` is active, the first SIGINT or SIGTERM only records the
signal; the trainer asks :func:`requested` at every step boundary and stops there with
:class:`RunInterrupted`, which says at which step and where its last checkpoint is. A second
signal ends the process at once (exit status ``128 + signal``): a kill never loses more than
the steps since the last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None  # the first signal received while active
_active = False  # a stop_at_step_boundaries is active (the outermost one owns the handlers)


class RunInterrupted(Exception):
  """A run stopped at a step boundary on a signal.

  Attributes:
    signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
    step: the optimizer step the run stopped after.
    checkpoint: the directory of its last complete checkpoint, or None.
    checkpoint_step: that checkpoint's step, or None.
  """

  def __init__(
    self,
    signum: int,
    step: int | None = None,
    checkpoint: str | None = None,
    checkpoint_step: int | None = None,
  ):
    self.signum, self.step = signum, step
    self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
    super().__init__(self.describe())

  @property
  def exit_status(self) -> int:
    """The shell's status for a process ended by the signal (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + self.signum

  def describe(self) -> str:
    where = "" if self.step is None else f" after step {self.step}"
    if self.checkpoint is None:
      saved = "no checkpoint was saved"
    else:
      saved = f"its last checkpoint is {self.checkpoint} (step {self.checkpoint_step})"
    return f"stopped by {signal.Signals(self.signum).name}{where}; {saved}"


def requested() -> int | None:
  """The signal received since the innermost :func:`stop_at_step_boundaries` began, or None."""
  return _requested


def check(**where) -> None:
  """Raise :class:`RunInterrupted` (with ``where``: step, checkpoint) if a signal came."""
  if _requested is not None:
    raise RunInterrupted(_requested, **where)


def _handle(signum, frame) -> None:
  global _requested
  if _requested is not None:  # the second: stop now
    print(f"\n{signal.Signals(signum).name} again: stopping now", file=sys.stderr, flush=True)
    os._exit(128 + signum)
  _requested = signum
  print(
    f"\n{signal.Signals(signum).name}: stopping at the next step boundary (send it again to "
    "stop at once)",
    file=sys.stderr,
    flush=True,
  )


@contextlib.contextmanager
def stop_at_step_boundaries() -> Iterator[None]:
  """While active, SIGINT and SIGTERM are recorded for :func:`requested` instead of raising
  (see the module docstring). Outside the main thread, or nested, it changes nothing; the
  outermost one restores the previous handlers and forgets the signal on exit."""
  global _requested, _active
  if threading.current_thread() is not threading.main_thread() or _active:
    yield  # the outer one (or none, off the main thread) decides
    return
  previous = {s: signal.getsignal(s) for s in SIGNALS}
  _requested, _active = None, True
  for s in SIGNALS:
    signal.signal(s, _handle)
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _requested, _active = None, False
