"""Host-side dispatch between a step's local program and its general (merging) program.

An optimizer of this package gates its merges with ``lax.switch`` on its step counter, so one
compiled program serves every step and a local step executes no collective. But XLA copies
the operands of the identity (local) branch, which makes an in-graph local step of a
memory-bound update noticeably slower than ``optax.adam`` (see
``experiments/benchmarks/optimizer_overhead.py``). :class:`DispatchedStep` removes that cost:
it traces the step once to find the merge schedules in use, compiles a second program under
:func:`kstep_adam.assume_local_step` (no branch, no collective) and, counting steps on the host,
runs that one on every step where no schedule merges.

Any shard_map step can use it (the generic :func:`kstep_adam.parallel.make_train_step` does)::

    def build(body):
      return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=..., out_specs=...),
                     donate_argnums=(0, 1))

    step = parallel.DispatchedStep(build, per_worker)   # per_worker calls tx.update once
    params_W, opt_state_W, *rest = step(params_W, opt_state_W, *inputs)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from kstep_adam._merge import assume_local_step
from kstep_adam._merge import record_merge_schedules
from kstep_adam._validation import is_int_at_least


class DispatchedStep:
  """A step compiled as a general program and, when useful, a branch-free local program.

  Args:
    build: ``body -> jitted function``, e.g. ``lambda body: jax.jit(jax.shard_map(body,
      ...), donate_argnums=(0, 1))``. Called once for the general body and at most once for
      the local body, so both programs get the same sharding and donation.
    body: the per-worker step function; it calls the optimizer's ``update`` exactly once.
    start_step: steps the optimizer state has already taken (the host counter starts here and
      must match the optimizer's own counter, e.g. after restoring a checkpoint).
    enabled: build and dispatch the local program; False always runs the general program.
    place_args: optional ``args -> args`` applied before every call (e.g. input placement and
      validation).

  Attributes:
    jitted: the general program (all merge branches), e.g. for ``.lower(...)``.
    local_jitted: the local program, or None (before the first call, when disabled, or when
      the step has no step-gated merge).
    schedules: the merge schedules found by :meth:`prepare` (None before it ran).
    step: steps taken so far.
  """

  def __init__(
    self,
    build: Callable[[Callable], Callable],
    body: Callable,
    *,
    start_step: int = 0,
    enabled: bool = True,
    place_args: Callable[..., tuple] | None = None,
  ):
    if not is_int_at_least(start_step, 0):
      raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
    self._build, self._body, self._enabled = build, body, enabled
    self._place_args = place_args or (lambda *args: args)
    self.jitted = build(body)
    self.local_jitted = None
    self.schedules = None
    self.step = int(start_step)

  def prepare(self, *args: Any) -> None:
    """Trace the general program once to find its schedules; build the local program."""
    if self.schedules is not None:
      return
    args = self._place_args(*args)
    with record_merge_schedules() as found:
      jax.eval_shape(self.jitted, *args)
    self.schedules = tuple(found)
    if self._enabled and found:
      body = self._body

      def local_body(*body_args):
        with assume_local_step(*found):
          return body(*body_args)

      self.local_jitted = self._build(local_body)

  def is_local(self, step: int) -> bool:
    """Whether 1-based ``step`` runs the local program."""
    return self.local_jitted is not None and not any(s.merges_at(step) for s in self.schedules)

  def __call__(self, *args: Any):
    self.prepare(*args)
    args = self._place_args(*args)
    step = self.step + 1
    out = (self.local_jitted if self.is_local(step) else self.jitted)(*args)
    self.step = step
    return out
