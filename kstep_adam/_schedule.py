"""When and what to merge: the one merge schedule shared by optimizers and byte accounting.

A :class:`MergeSchedule` is a small frozen object. The optimizers in this package build their
collectives from it, and :func:`kstep_adam.comm_bytes` counts bytes from it, so the two can never
disagree about what was sent.

Levels. The merge axes are ordered from the outermost (slowest links, e.g. ``'node'``) to the
innermost (fastest links, e.g. ``'local'``). Merging at level ``i`` averages over
``axis_names[i:]``, i.e. over that axis *and every axis inside it*. At step ``t`` (1-based) a state
with per-axis periods ``k_i`` merges at the outermost level ``i`` with ``t % k_i == 0``; if none
divides ``t`` the step is local. With one axis this is plain "merge every k steps".

Compression. A schedule that averages on every step may instead exchange a compressed tensor
(:class:`Compression`, built with :func:`compressed_schedule`): 1-bit signs and scales of the
Adam momentum, or the top-k / random-k entries of each gradient, with error feedback. Its
first ``warmup_steps`` steps all-reduce the full-precision gradients. The accounting counts
the compressed messages at their size, from the same object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from kstep_adam._validation import check_choice
from kstep_adam._validation import check_float
from kstep_adam._validation import check_float_dtype
from kstep_adam._validation import check_int
from kstep_adam._validation import is_int_at_least

# Names of the pytrees a schedule may average. 'params', 'mu' and 'nu' belong to k-step Adam;
# 'grads' is synchronous data parallelism; 'delta' is DiLoCo's outer gradient.
STATE_NAMES = ("params", "mu", "nu", "grads", "delta")

# Presets for `sync`: state name -> period as a multiple of k.
SYNC_PRESETS: dict[str, dict[str, int]] = {
  # Production default (PaddleBox k-step mode): moments stay local.
  "params": {"params": 1},
  # hivemind-style: parameters and the second moment.
  "params+nu": {"params": 1, "nu": 1},
  # Local Adam (Cheng & Glasgow, arXiv 2409.13155): x, u and v every K steps.
  "params+moments": {"params": 1, "mu": 1, "nu": 1},
  # DES-LOC (arXiv 2505.22549) recommended periods K, 3K, 6K.
  "desloc": {"params": 1, "mu": 3, "nu": 6},
  # Synchronous data parallelism (DDP): gradients every step (use with k=1).
  "grads": {"grads": 1},
  # DiLoCo: the outer gradient (mean parameter delta) every H inner steps.
  "delta": {"delta": 1},
}

ROUTES = ("hierarchical", "flat")

# Steps are counted in int32 (as optax counts them), so no period may exceed its range.
MAX_PERIOD = 2**31 - 1


# Compressed exchanges, and the state each one averages: 1-bit Adam's momentum, or gradients.
COMPRESSION_STATES = {"onebit": "mu", "topk": "grads", "randk": "grads"}


def _with_inject_hint(check, value, name: str):
  """Run ``check``; a ValueError about an array value gets the inject_hyperparams hint."""
  try:
    return check()
  except ValueError as e:
    if not hasattr(value, "shape"):
      raise
    hint = f" (under optax.inject_hyperparams pass static_args=('{name}',))"
    raise ValueError(f"{e}{hint}") from None


@dataclasses.dataclass(frozen=True)
class Compression:
  """How a schedule's every-step exchange is compressed; each worker keeps its error feedback.

  The message formats below are what the collectives move and what the accounting counts.
  Leaf by leaf (a leaf of ``d`` elements; ``n`` workers):

  * ``'onebit'`` (1-bit Adam): the momentum plus the worker's error, as signs (1 bit each)
    and one float32 scale ``||x||_2 / sqrt(d)``. The leaf is cut into ``n`` chunks of
    :meth:`chunk_size` elements (padded to a multiple of 8 so that signs pack into bytes);
    an all-to-all gives worker ``j`` chunk ``j`` of every worker, which it averages, adds its
    server error to and compresses again; an all-gather returns every compressed chunk.
  * ``'topk'``: the :meth:`values_per_leaf` largest-magnitude entries of gradient plus
    error, as values in the gradient's dtype and int32 indices, all-gathered.
  * ``'randk'``: as many entries at indices drawn from a seed every worker shares, so only
    the values travel, in one all-reduce along the schedule's route.

  Attributes:
    method: ``'onebit'``, ``'topk'`` or ``'randk'``.
    density: fraction of each leaf's entries that ``'topk'`` and ``'randk'`` send, in (0, 1];
      1.0 for ``'onebit'``.
    warmup_steps: steps ``1..warmup_steps`` all-reduce the full-precision gradients (along
      the schedule's route) instead; >= 0.
  """

  method: str
  density: float = 1.0
  warmup_steps: int = 0

  def __post_init__(self):
    check_choice(self.method, "method", tuple(COMPRESSION_STATES))
    density = _with_inject_hint(
      lambda: check_float(self.density, "density", low=0.0, high=1.0, low_open=True),
      self.density,
      "density",
    )
    if self.method == "onebit" and density != 1.0:
      raise ValueError(
        f"density is for 'topk' and 'randk'; 'onebit' sends every sign, got {self.density!r}"
      )
    warmup_steps = _with_inject_hint(
      lambda: check_int(self.warmup_steps, "warmup_steps", minimum=0, maximum=MAX_PERIOD),
      self.warmup_steps,
      "warmup_steps",
    )
    object.__setattr__(self, "density", density)
    object.__setattr__(self, "warmup_steps", warmup_steps)

  @property
  def state(self) -> str:
    """The state this method exchanges, ``'mu'`` for ``'onebit'``, else ``'grads'``."""
    return COMPRESSION_STATES[self.method]

  def values_per_leaf(self, size: int) -> int:
    """Entries that ``'topk'``/``'randk'`` send of a leaf of ``size`` elements:
    ``max(1, round(density * size))``, at most ``size`` (0 for an empty leaf)."""
    return min(size, max(1, round(self.density * size)))

  @staticmethod
  def chunk_size(size: int, num_workers: int) -> int:
    """Elements in each worker's chunk of a leaf under ``'onebit'``: ``8 ceil(size / 8n)``."""
    return 8 * math.ceil(size / (8 * num_workers))


def check_route(route: str) -> None:
  """Raise ValueError unless ``route`` is one of :data:`ROUTES`."""
  check_choice(route, "route", ROUTES)


@dataclasses.dataclass(frozen=True)
class AdaptivePeriod:
  """The knobs of an adaptive merge period (see :func:`kstep_adam.adaptive_schedule`).

  Attributes:
    budget: ``delta``, the relative-drift budget of the rule, > 0.
    k_init: the period of every axis until the first measurement, in [k_min, k_max].
    k_min: the smallest period the rule may choose, >= 1.
    k_max: the largest period the rule may choose, <= 2**31 - 1.
  """

  budget: float = 1e-2
  k_init: int = 8
  k_min: int = 1
  k_max: int = 256

  def __post_init__(self):
    budget = check_float(self.budget, "budget", low=0.0, low_open=True)
    k_min = check_int(self.k_min, "k_min", minimum=1, maximum=MAX_PERIOD)
    k_max = check_int(self.k_max, "k_max", minimum=k_min, maximum=MAX_PERIOD)
    k_init = check_int(self.k_init, "k_init", minimum=k_min, maximum=k_max)
    object.__setattr__(self, "budget", budget)
    object.__setattr__(self, "k_min", k_min)
    object.__setattr__(self, "k_max", k_max)
    object.__setattr__(self, "k_init", k_init)


@dataclasses.dataclass(frozen=True)
class MergeSchedule:
  """What is averaged, over which mesh axes, and how often.

  Attributes:
    axis_names: mesh axes to average over, outermost first; ``()`` means never merge.
    axis_periods: base period ``k`` per axis, aligned with ``axis_names``.
    state_periods: ``(state, multiple)`` pairs; state ``s`` merges at level ``i`` every
      ``axis_periods[i] * multiple`` steps. States not listed are never averaged.
    route: ``'hierarchical'`` (reduce-scatter inside the innermost axis, reduce the own shard
      across the outer axes, all-gather) or ``'flat'`` (one all-reduce over all merged axes).
    mu_dtype: dtype of the first moment, used only to count its bytes (``None``: params' dtype).
    compression: how the every-step exchange is compressed (:func:`compressed_schedule`), or
      None: full-precision means.
    adaptive: the knobs of a period chosen on the host while training
      (:func:`kstep_adam.adaptive_schedule`), or None: the fixed ``axis_periods``. An adaptive
      schedule's merge steps are not a function of the step number: the host declares each
      step's merge level (``merge=`` of ``update``, or :class:`kstep_adam.parallel.DispatchedStep`),
      and ``axis_periods`` holds only the initial period.
  """

  axis_names: tuple[str, ...] = ()
  axis_periods: tuple[int, ...] = ()
  state_periods: tuple[tuple[str, int], ...] = (("params", 1),)
  route: str = "hierarchical"
  mu_dtype: str | None = None
  compression: Compression | None = None
  adaptive: AdaptivePeriod | None = None

  def states(self) -> tuple[str, ...]:
    """Names of the states this schedule averages."""
    return tuple(name for name, _ in self.state_periods)

  def periods(self, state: str) -> tuple[int, ...] | None:
    """Per-axis periods of ``state`` (aligned with ``axis_names``), or None if never merged."""
    for name, multiple in self.state_periods:
      if name == state:
        return tuple(k * multiple for k in self.axis_periods)
    return None

  def merges(self, state: str) -> bool:
    """Whether ``state`` is ever averaged (there is an axis and the state is listed)."""
    return bool(self.axis_names) and self.periods(state) is not None

  def live_levels(self, state: str) -> tuple[int, ...]:
    """Merge levels (1-based, outermost = 1) that some step can select for ``state``.

    Level ``i`` is dead when an outer level's period divides its period: every step it
    divides is then taken by that outer level. An int ``k`` over several axes leaves only
    level 1 (one global merge).
    """
    periods = self.periods(state)
    if not self.axis_names or periods is None:
      return ()
    if self.adaptive is not None:  # the host may choose any level
      return tuple(range(1, len(self.axis_names) + 1))
    return tuple(i + 1 for i, p in enumerate(periods) if not any(p % q == 0 for q in periods[:i]))

  def merges_every_step(self) -> bool:
    """Whether some state merges on every step (a period of 1 at some level)."""
    if self.adaptive is not None:
      return False
    return bool(self.axis_names) and any(1 in self.periods(s) for s in self.states())

  def merges_at(self, step: int) -> bool:
    """Whether any state merges at 1-based Python int ``step`` (host-side dispatch)."""
    self._check_fixed("merges_at")
    return any(self.level_at(state, int(step)) for state in self.states())

  def level_at(self, state: str, step):
    """Merge level of ``state`` at 1-based ``step``: 0 = local step, ``i+1`` = merge at level i.

    Works on Python ints (for byte accounting) and on traced int32 scalars (inside ``jit``):
    the outermost level whose period divides ``step`` wins.
    """
    periods = self.periods(state)
    if not self.axis_names or periods is None:
      return 0
    traced = not isinstance(step, (int, np.integer))
    if self.adaptive is not None:
      if traced:  # the host declares the level (see kstep_adam._merge.switch_merge)
        return jnp.zeros((), jnp.int32)
      self._check_fixed("level_at")
    level = jnp.zeros((), jnp.int32) if traced else 0
    for i in reversed(range(len(periods))):  # innermost first; outer levels overwrite.
      if traced:
        level = jnp.where(step % periods[i] == 0, i + 1, level)
      elif step % periods[i] == 0:
        level = i + 1
    return level

  def _check_fixed(self, what: str) -> None:
    if self.adaptive is not None:
      raise ValueError(
        f"{what}: this schedule's period is adaptive, so its merge steps are decided on the host "
        f"by an AdaptiveController (kstep_adam.AdaptiveController.decide), not by the step number"
      )


def normalize_axis_names(axis_name, name: str = "axis_name") -> tuple[str, ...]:
  """``None`` -> ``()``, one name -> ``(name,)``, a sequence of distinct names -> a tuple."""
  if axis_name is None:
    return ()
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  if not names or not all(isinstance(a, str) and a for a in names):
    raise ValueError(
      f"{name} must be None, a mesh axis name or a non-empty tuple of names, got {axis_name!r}"
    )
  if len(set(names)) != len(names):
    raise ValueError(f"{name} has repeated axes: {axis_name!r}")
  return names


def _normalize_k(k, axis_names: tuple[str, ...], name: str) -> tuple[int, ...]:
  if isinstance(k, Mapping):
    if not axis_names or set(k) != set(axis_names):
      raise ValueError(
        f"{name} as a mapping needs exactly one period per axis of axis_name={axis_names!r}, got "
        f"keys {sorted(k)!r}"
      )
    values = [k[a] for a in axis_names]
  else:
    values = [k] * max(len(axis_names), 1)
  for v in values:
    if not is_int_at_least(v, 1) or v > MAX_PERIOD:
      hint = ""
      if hasattr(v, "shape"):
        hint = f" (under optax.inject_hyperparams pass static_args=('{name}',) or a MergeSchedule)"
      raise ValueError(
        f"{name} must be a positive int (at most 2**31 - 1: steps are counted in int32) or a "
        f"mapping axis -> such an int, got {k!r}{hint}"
      )
  return tuple(int(v) for v in values) if axis_names else ()


def _normalize_sync(sync, allowed_states: Sequence[str]) -> tuple[tuple[str, int], ...]:
  if isinstance(sync, str):
    if sync not in SYNC_PRESETS:
      raise ValueError(
        f"sync must be one of {sorted(SYNC_PRESETS)!r} or a mapping state -> period "
        f"multiple, got {sync!r}"
      )
    sync = SYNC_PRESETS[sync]
  if not isinstance(sync, Mapping) or not sync:
    raise ValueError(
      f"sync must be a preset name or a non-empty mapping state -> multiple of k, got {sync!r}"
    )
  for name, multiple in sync.items():
    if name not in allowed_states:
      raise ValueError(f"sync state {name!r} is unknown here; allowed: {tuple(allowed_states)!r}")
    if not is_int_at_least(multiple, 1):
      raise ValueError(
        f"sync period for {name!r} must be a positive int multiple of k, got {multiple!r}"
      )
  return tuple((name, int(sync[name])) for name in allowed_states if name in sync)


def merge_schedule(
  k: int | Mapping[str, int] | MergeSchedule,
  *,
  axis_name: str | Sequence[str] | None = None,
  sync: str | Mapping[str, int] = "params",
  route: str = "hierarchical",
  mu_dtype: Any = None,
  allowed_states: Sequence[str] = STATE_NAMES,
  period_name: str = "k",
) -> MergeSchedule:
  """Build and validate a :class:`MergeSchedule` (or pass one through unchanged).

  Args:
    k: merge period in steps; an int for every axis, or a mapping ``{axis: period}`` such as
      ``{'node': 8, 'local': 1}``; or an existing ``MergeSchedule``, returned as is (it carries
      its axes, sync and route: ``axis_name``, and a ``sync`` or ``route`` other than the
      default that disagrees with the schedule's, are refused rather than ignored).
    axis_name: mesh axis (str) or axes (tuple, outermost first) to average over; None: never.
    sync: preset (``'params'``, ``'params+nu'``, ``'params+moments'``, ``'desloc'``; ``'grads'``
      for :func:`sync_adam`, ``'delta'`` for :func:`diloco`) or a mapping state -> period as a
      multiple of ``k`` (e.g. ``{'params': 1, 'mu': 3, 'nu': 6}``).
    route: ``'hierarchical'`` or ``'flat'``; matters only when a merge spans several axes.
    mu_dtype: first-moment dtype, recorded for byte accounting.
    allowed_states: states the calling optimizer can average (default: all known states).
    period_name: how error messages call ``k`` (e.g. ``'inner_steps'`` for DiLoCo).

  Returns:
    A frozen, hashable ``MergeSchedule``.

  Raises:
    ValueError: on a period that is not an int in [1, 2**31 - 1] (also after multiplying by a
      sync multiple: steps are counted in int32), an unknown sync option or route, a
      ``mu_dtype`` that is not a floating dtype, or a ``MergeSchedule`` that averages ``'mu'``
      with another ``mu_dtype`` than the one given or conflicts with ``sync`` or ``route``.
  """
  check_route(route)
  mu_dtype = check_float_dtype(mu_dtype, "mu_dtype")
  mu_name = None if mu_dtype is None else mu_dtype.name
  if isinstance(k, MergeSchedule):
    if k.compression is not None:
      raise ValueError(
        f"the schedule compresses its exchange ({k.compression.method!r}); pass it to "
        f"{_COMPRESSED_OPTIMIZERS[k.compression.method]}, which runs that exchange"
      )
    if axis_name is not None:
      raise ValueError(
        f"pass either a MergeSchedule as {period_name} or axis_name, not both "
        f"(got axis_name={axis_name!r}); the schedule already names its axes"
      )
    for name, _ in k.state_periods:
      if name not in allowed_states:
        raise ValueError(
          f"schedule averages {name!r}, which this optimizer does not have; "
          f"allowed: {tuple(allowed_states)!r}"
        )
    if sync != "params" and _normalize_sync(sync, allowed_states) != k.state_periods:
      raise ValueError(
        f"sync={sync!r} conflicts with the MergeSchedule given as {period_name}, which "
        f"averages {dict(k.state_periods)!r}; leave sync out or build the schedule with it"
      )
    if route != "hierarchical" and route != k.route:
      raise ValueError(
        f"route={route!r} conflicts with the MergeSchedule given as {period_name}, which "
        f"routes {k.route!r}; leave route out or build the schedule with it"
      )
    if k.periods("mu") is not None and k.mu_dtype != mu_name:
      raise ValueError(
        f"the schedule averages 'mu' counted as mu_dtype={k.mu_dtype!r} but the "
        f"optimizer has mu_dtype={mu_name!r}; build the schedule with "
        f"merge_schedule(..., mu_dtype=...) equal to the optimizer's"
      )
    return k
  axis_names = normalize_axis_names(axis_name)
  axis_periods = _normalize_k(k, axis_names, period_name)
  state_periods = _normalize_sync(sync, allowed_states)
  for state, multiple in state_periods:
    if any(k_axis * multiple > MAX_PERIOD for k_axis in axis_periods):
      raise ValueError(
        f"sync period for {state!r} is {multiple} x {period_name}={k!r}, beyond 2**31 - 1 "
        f"steps (steps are counted in int32); use a smaller {period_name} or multiple"
      )
  return MergeSchedule(axis_names, axis_periods, state_periods, route, mu_name)


def sync_schedule(
  axis_name: str | Sequence[str] | None = None, *, route: str = "hierarchical"
) -> MergeSchedule:
  """Build the schedule of synchronous data parallelism: gradients over all axes, every step.

  Build it once and pass it to :func:`kstep_adam.sync_adam` and to the byte accounting, as
  with :func:`merge_schedule` for the k-step optimizers, so the two cannot disagree.

  Args:
    axis_name: mesh axis or axes (outermost first) to average gradients over; None: never.
    route: ``'hierarchical'`` or ``'flat'`` routing of a multi-axis mean.

  Returns:
    ``merge_schedule(1, axis_name=axis_name, sync='grads', route=route)``.

  Examples:
    >>> import kstep_adam
    >>> schedule = kstep_adam.sync_schedule(("node", "local"))
    >>> tx = kstep_adam.sync_adam(1e-3, schedule)
    >>> schedule.states(), schedule.axis_periods
    (('grads',), (1, 1))
  """
  return merge_schedule(
    1, axis_name=axis_name, sync="grads", route=route, allowed_states=("grads",)
  )


_COMPRESSED_OPTIMIZERS = {"onebit": "onebit_adam", "topk": "topk_ef", "randk": "topk_ef"}


def compressed_schedule(
  axis_name: str | Sequence[str] | None,
  method: str,
  *,
  density: float = 1.0,
  warmup_steps: int = 0,
  route: str = "hierarchical",
) -> MergeSchedule:
  """Build the schedule of a compressed every-step exchange (see :class:`Compression`).

  Build it once and pass it to the optimizer (:func:`kstep_adam.onebit_adam` for
  ``'onebit'``, :func:`kstep_adam.topk_ef` for ``'topk'`` and ``'randk'``) and to the byte
  accounting, which then counts the warm-up all-reduces at full precision and every later
  step at the compressed size.

  Args:
    axis_name: mesh axis or axes (outermost first) to exchange over; None: one worker.
    method: ``'onebit'`` (exchanges the Adam momentum), ``'topk'`` or ``'randk'``
      (exchange gradients).
    density: fraction of each leaf's entries sent by ``'topk'`` and ``'randk'``, in (0, 1].
    warmup_steps: steps that all-reduce full-precision gradients first; >= 0.
    route: ``'hierarchical'`` or ``'flat'`` routing of the warm-up and ``'randk'``
      all-reduces; the ``'onebit'`` and ``'topk'`` collectives span all axes as one group.

  Returns:
    A frozen ``MergeSchedule`` averaging its state every step, with ``compression`` set.

  Raises:
    ValueError: on an unknown method or route, a density outside (0, 1] (or other than 1.0
      for ``'onebit'``), or a negative ``warmup_steps``.

  Examples:
    >>> import kstep_adam
    >>> s = kstep_adam.compressed_schedule(("node", "local"), "topk", density=0.01)
    >>> s.states(), s.compression.values_per_leaf(1000)
    (('grads',), 10)
  """
  check_route(route)
  compression = Compression(method, density, warmup_steps)
  axis_names = normalize_axis_names(axis_name)
  return MergeSchedule(
    axis_names, (1,) * len(axis_names), ((compression.state, 1),), route, None, compression
  )
