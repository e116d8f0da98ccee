"""Host-side dispatch between a step's local program and its general (merging) program.

An optimizer of this package gates its merges with ``lax.switch`` on its step counter, so one
compiled program serves every step and a local step executes no collective. But XLA copies
the operands of the identity (local) branch, which makes an in-graph local step of a
memory-bound update noticeably slower than ``optax.adam`` (see
``experiments/benchmarks/optimizer_overhead.py``). :class:`DispatchedStep` removes that cost:
it traces the step once to find the merge schedules in use, compiles a second program under
:func:`kstep_adam.assume_local_step` (no branch, no collective) and runs that one on every step
where no schedule merges.

Which steps merge is decided by the optimizer's own step counter (the ``count`` fields of its
state), so that counter owns the step number: the host reads it from the state it is given
(once, and again whenever it is handed a state it did not return itself, e.g. one restored
from a checkpoint) and advances its copy on every call. A host counter that disagreed with
the state would run the local program on a merge step and silently skip that merge.

The programs are compiled ahead of time, one per argument signature (shapes, dtypes,
shardings), so the step knows which call compiled (``last_call_compiled``) and for how long
(``compile_seconds``): a trainer leaves those calls out of its throughput.

Any shard_map step can use it (the generic :func:`kstep_adam.parallel.make_train_step` does)::

    def build(body):
      return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=..., out_specs=...),
                     donate_argnums=(0, 1))

    step = parallel.DispatchedStep(build, per_worker)   # per_worker calls tx.update once
    params_W, opt_state_W, *rest = step(params_W, opt_state_W, *inputs)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from kstep_adam._merge import assume_local_step
from kstep_adam._merge import declared_level
from kstep_adam._merge import record_merge_schedules
from kstep_adam._validation import is_int_at_least

STEP_COUNTER = "count"  # the field name of an optimizer state's step counter
DRIFT_FIELD = "drift"  # the field of an adaptive merge's state that holds the measured drift


def read_drift(opt_state) -> tuple[float, ...]:
  """The drift an adaptive merge left in ``opt_state`` (its ``drift`` field), as this
  process's first worker holds it: an all-reduced value, the same on every worker.

  Raises:
    ValueError: the state has no ``drift`` field (the optimizer does not measure drift).
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    key = path[-1] if path else None
    if getattr(key, "name", getattr(key, "key", None)) == DRIFT_FIELD:
      if isinstance(leaf, jax.Array):
        leaf = leaf.addressable_shards[0].data
      return tuple(float(d) for d in np.asarray(leaf).reshape(-1, np.shape(leaf)[-1])[0])
  raise ValueError(
    "the optimizer state has no `drift` field: an adaptive schedule needs an optimizer whose "
    "parameter merge measures the drift (kstep_adam.kstep_adam, kstep_adam.local_sgd)"
  )


def optimizer_step(opt_state) -> int | None:
  """The step count held by an optimizer state: its integer ``count`` fields, which agree.

  Every state of this package's optimizers (and optax's counting states) keeps the steps
  taken in a field named ``count``; per-worker states hold one copy per worker.

  Returns:
    The common value, or None if the state has no ``count`` field.

  Raises:
    ValueError: the counters disagree (between fields or between workers), so no single
      step number describes the state.

  Examples:
    >>> import kstep_adam, numpy as np
    >>> tx = kstep_adam.kstep_adam(1e-3, k=4)
    >>> optimizer_step(tx.init({'w': np.zeros(3)}))
    0
  """
  flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  values = {
    jax.tree_util.keystr(flat[i][0]): np.unique(_local_values(flat[i][1]))
    for i in counter_positions(opt_state)
  }
  if not values:
    return None
  distinct = {int(v) for vs in values.values() for v in vs}
  if len(distinct) != 1:
    found = {path: [int(v) for v in vs] for path, vs in values.items()}
    raise ValueError(
      f"the optimizer state's step counters disagree, so its step is ambiguous: {found}"
    )
  return distinct.pop()


def _local_values(leaf) -> np.ndarray:
  """A leaf's values held by this process: all of them, except for an array spread over
  several processes, whose other processes' workers it cannot read (they step in lockstep)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return np.concatenate([np.asarray(s.data).reshape(-1) for s in leaf.addressable_shards])
  return np.asarray(jax.device_get(leaf))


def counter_positions(opt_state) -> tuple[int, ...]:
  """Positions, among ``jax.tree.leaves(opt_state)``, of the integer ``count`` fields."""
  positions = []
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(opt_state)[0]):
    key = path[-1] if path else None
    name = getattr(key, "name", getattr(key, "key", None))
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    if name == STEP_COUNTER and np.issubdtype(dtype, np.integer):
      positions.append(i)
  return tuple(positions)


def _signature(x) -> Any:
  """What a compiled program is specialized to, for one argument leaf."""
  aval = getattr(x, "aval", None)
  if aval is None:  # NumPy arrays and Python scalars
    return type(x), np.shape(x), np.asarray(x).dtype
  if aval.sharding.mesh.empty:  # the type does not carry the sharding: add it
    return aval, x.sharding
  return aval


class DispatchedStep:
  """A step compiled as a general program and, when useful, a branch-free local program.

  Called like the jitted step: ``step(params_W, opt_state_W, *inputs)`` returns the body's
  outputs, ``(params_W, opt_state_W, *rest)``.

  Args:
    build: ``body -> jitted function``, e.g. ``lambda body: jax.jit(jax.shard_map(body,
      ...), donate_argnums=(0, 1))``. Called once for the general body and at most once for
      the local body, so both programs get the same sharding and donation.
    body: the per-worker step function; it calls the optimizer's ``update`` exactly once.
    start_step: steps the optimizer state has taken, if the caller wants it checked: a state
      whose ``count`` says otherwise raises ValueError (for a state without ``count`` it is
      the only source). None (default) takes the step from the state.
    enabled: build and dispatch the local program; False always runs the general program.
    place_args: optional ``args -> args`` applied before every call (e.g. input placement and
      validation).
    opt_state_argnum: position of the optimizer state among the arguments and the outputs.
    adaptive: the :class:`kstep_adam.AdaptiveController` of the step's adaptive schedule
      (needed when the optimizer has one): before each step it decides the merge level, the
      step runs that level's program (one compiled per level used), and after a merge over
      every axis it reads the drift from the returned state.

  Attributes:
    jitted: the general program (all merge branches), e.g. for ``.lower(...)``.
    local_jitted: the local program, or None (before the first call, when disabled, or when
      the step has no step-gated merge).
    schedules: the merge schedules found by :meth:`prepare` (None before it ran).
    last_call_compiled: whether the last call compiled a program (a new program or a new
      argument signature) before running it.
    compiles: programs compiled so far.
    compile_seconds: time spent tracing, lowering and compiling them.
    last_level: the merge level of the last call with an adaptive schedule (else None).
  """

  def __init__(
    self,
    build: Callable[[Callable], Callable],
    body: Callable,
    *,
    start_step: int | None = None,
    enabled: bool = True,
    place_args: Callable[..., tuple] | None = None,
    opt_state_argnum: int = 1,
    adaptive=None,
  ):
    if start_step is not None and not is_int_at_least(start_step, 0):
      raise ValueError(f"start_step must be None or a non-negative int, got {start_step!r}")
    self._build, self._body, self._enabled = build, body, enabled
    self._place_args = place_args or (lambda *args: args)
    self._state_argnum = opt_state_argnum
    self.jitted = build(body)
    self.local_jitted = None
    self.schedules = None
    self.last_call_compiled = False
    self.compiles = 0
    self.compile_seconds = 0.0
    self._expected_start = start_step
    self._step = start_step
    self._returned_counters: tuple | None = None  # counter leaves of the last returned state
    self._executables: dict = {}  # (local, argument signature) -> jax.stages.Compiled
    self._traced: dict = {}  # argument signature -> the general program traced by prepare
    self._counter_positions: dict = {}  # state structure -> positions of its `count` leaves
    self.adaptive = adaptive
    self.last_level: int | None = None
    self._level_jitted: dict = {}  # merge level -> program, for an adaptive schedule

  @property
  def executables(self) -> list:
    """The programs compiled so far (``jax.stages.Compiled``), e.g. to read their HLO."""
    return list(self._executables.values())

  @property
  def step(self) -> int | None:
    """The optimizer's step after the last call (None before the first call, unless given)."""
    return self._step

  def prepare(self, *args: Any) -> None:
    """Trace the general program once to find its schedules; build the local program."""
    if self.schedules is not None:
      return
    args = self._place_args(*args)
    start = time.perf_counter()
    with record_merge_schedules() as found:
      traced = self.jitted.trace(*args)
    self.compile_seconds += time.perf_counter() - start
    self.schedules = tuple(found)
    adaptive = [s for s in found if s.adaptive is not None]
    if adaptive:  # its trace above declared no level: never run it
      if len(found) != 1:
        raise ValueError(
          f"an adaptive schedule must be the step's only merge schedule; found {len(found)}"
        )
      if self.adaptive is None or self.adaptive.schedule != adaptive[0]:
        raise ValueError(
          "the step's optimizer has an adaptive schedule: pass adaptive="
          "kstep_adam.AdaptiveController(schedule) built with that same schedule"
        )
      return
    self._traced[self._signature(args)] = traced  # compiled when the general program first runs
    if self._enabled and found:
      body = self._body

      def local_body(*body_args):
        with assume_local_step(*found):
          return body(*body_args)

      self.local_jitted = self._build(local_body)

  def _is_adaptive(self) -> bool:
    """Whether the step's schedule is adaptive (known once :meth:`prepare` ran)."""
    return bool(self.schedules) and self.schedules[0].adaptive is not None

  def _level_program(self, level: int):
    """The program that merges an adaptive schedule at ``level`` (0: local)."""
    program = self._level_jitted.get(level)
    if program is None:
      (schedule,) = self.schedules
      body = self._body

      def level_body(*body_args):
        with declared_level(schedule, level):
          return body(*body_args)

      program = self._level_jitted[level] = self._build(level_body)
    return program

  def is_local(self, step: int) -> bool:
    """Whether 1-based ``step`` runs the local program."""
    if self._is_adaptive():
      return self.adaptive.level_at(step) == 0
    return self.local_jitted is not None and not any(s.merges_at(step) for s in self.schedules)

  def __call__(self, *args: Any):
    self.prepare(*args)
    args = self._place_args(*args)
    step = self._step_of(args[self._state_argnum]) + 1
    level = None
    if self._is_adaptive():
      level = self.adaptive.decide(step)
      local = ("level", level)
    else:
      local = self.is_local(step)
    key = (local, self._signature(args))
    executable = self._executables.get(key)
    self.last_call_compiled = executable is None
    if executable is None:
      start = time.perf_counter()
      traced = None if local else self._traced.pop(key[1], None)
      if level is not None:
        traced = self._level_program(level).trace(*args)
      elif traced is None:
        traced = (self.local_jitted if local else self.jitted).trace(*args)
      executable = self._executables[key] = traced.lower().compile()
      self.compiles += 1
      self.compile_seconds += time.perf_counter() - start
    out = executable(*args)
    if level is not None:
      drift = read_drift(out[self._state_argnum]) if level == 1 else None
      self.adaptive.observe(level, drift)
      self.last_level = level
    self._step = step
    self._returned_counters = self._counters(out[self._state_argnum])
    return out

  @staticmethod
  def _signature(args: tuple) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(map(_signature, leaves))

  def _counters(self, opt_state) -> tuple:
    """The state's ``count`` leaves (their positions found once per state structure)."""
    leaves, treedef = jax.tree.flatten(opt_state)
    positions = self._counter_positions.get(treedef)
    if positions is None:
      positions = self._counter_positions[treedef] = counter_positions(opt_state)
    return tuple(leaves[i] for i in positions)

  def _step_of(self, opt_state) -> int:
    """The host's view of the optimizer's step before this call.

    The state this step returned last time is counted on the host; any other state (the
    first one, a restored one) is asked for its own ``count``.
    """
    returned = self._returned_counters
    if returned is not None:
      counters = self._counters(opt_state)
      if len(counters) == len(returned) and all(a is b for a, b in zip(counters, returned)):
        return self._step
    expected = self._expected_start if returned is None else None
    # No dispatch depends on the step: count calls if the state can't say.
    if self.local_jitted is None and not self._is_adaptive():
      try:
        found = optimizer_step(opt_state)
      except ValueError:
        found = None
      if found is None:
        return self._step if self._step is not None else 0
    else:
      found = optimizer_step(opt_state)
      if found is None:
        if expected is not None:  # the caller's word is all there is
          return expected
        raise ValueError(
          "the optimizer state has no integer `count` field, so the host cannot tell which "
          "steps merge; pass start_step=, or build the step with enabled=False "
          "(dispatch_local_steps=False)"
        )
    if expected is not None and expected != found:
      raise ValueError(
        f"start_step={expected} but the optimizer state has taken {found} steps (its `count`); "
        f"pass start_step=None to take the step from the state"
      )
    return found
