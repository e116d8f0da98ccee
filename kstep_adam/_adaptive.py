r"""An adaptive merge period: k chosen on the host while training, from measured drift and time.

:func:`adaptive_schedule` builds a :class:`MergeSchedule` whose period is not fixed; an
:class:`AdaptiveController` on the host decides, before each step, the step's merge level (0
local, 1 over every axis, 2 inside the innermost axis only), and the compiled step runs the
program of that level (:class:`kstep_adam.parallel.DispatchedStep` does both, or pass
``merge=level`` to the optimizer's ``update``). A merge over every axis measures the replicas'
drift per axis (:func:`kstep_adam._merge.mean_with_drift`); the controller turns it into the
next periods with the rule below. The decision never happens inside the compiled step.

The rule (``theory/derivations.md``, section 7; the derivation is the project's own, its
form follows AdaComm, Wang & Joshi, SysML 2019). For each mesh axis ``j`` (outermost first),
at every merge over every axis:

.. math::
  \rho_j = \frac{D_j}{s_j}, \qquad
  c_j = \frac{C_j}{Y}, \qquad
  k_j \leftarrow \min\Bigl(k_{\max},\, 2 k_j,\, \max\bigl(k_{\min},\,
    \operatorname{round}\sqrt{\delta\, c_j / \rho_j}\,\bigr)\Bigr)

where ``D_j`` is the relative drift measured along axis ``j`` (mean squared distance of the
replicas from their mean along that axis, over ``||xbar||^2``), ``s_j`` the local steps since
the last merge that covered axis ``j``, ``C_j`` the time of a merge at level ``j+1`` and ``Y``
the time of a local step, and ``delta`` the budget (``rho_j = 0``: ``k_j <- min(k_max, 2
k_j)``). At this ``k`` the drift a round accumulates, ``rho k``, equals ``delta`` times the
communication time per step in local-step units, ``c / k``: the two error terms of the
error-runtime bound balance. Step ``t`` merges at the outermost level ``j + 1`` whose axis has
``s_j + 1 >= k_j``; a merge at level ``i`` resets ``s_j`` of every axis ``j >= i - 1``. An axis
of one replica (a node of one device) never calls a merge of its own.

Everything the rule reads is in :class:`AdaptiveState` (JSON data), which goes into
checkpoints: a resumed run decides bit for bit as the original one. The drift comes from an
all-reduce and the times from the caller (the network model's estimate, or a measurement
every process agrees on), so every process makes the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

from kstep_adam._comm import CommCost
from kstep_adam._comm import NetworkModel
from kstep_adam._comm import checked_axis_sizes
from kstep_adam._comm import merge_bytes
from kstep_adam._schedule import AdaptivePeriod
from kstep_adam._schedule import MergeSchedule
from kstep_adam._schedule import check_route
from kstep_adam._schedule import merge_schedule
from kstep_adam._schedule import normalize_axis_names
from kstep_adam._validation import check_float

MAX_GROWTH = 2  # a period at most doubles per measurement (the rule's fixed constant)


def adaptive_schedule(
  axis_name: str | Sequence[str],
  *,
  budget: float = 1e-2,
  k_init: int = 8,
  k_min: int = 1,
  k_max: int = 256,
  sync: str = "params",
  route: str = "hierarchical",
  allowed_states: Sequence[str] = ("params", "mu", "nu"),
) -> MergeSchedule:
  r"""Build a merge schedule whose period the host chooses while training (see module doc).

  Use it wherever a :class:`MergeSchedule` goes (``kstep_adam.kstep_adam(lr, schedule)``,
  ``kstep_adam.local_sgd``), with an :class:`AdaptiveController` that decides each step's
  merge level on the host.

  Args:
    axis_name: the mesh axis, or two axes outermost first (``('node', 'local')``).
    budget: ``delta``, the relative-drift budget, > 0: larger merges less often.
    k_init: every axis's period until the first measurement.
    k_min: the smallest period the rule may choose, >= 1.
    k_max: the largest period the rule may choose.
    sync: ``'params'``, ``'params+nu'`` or ``'params+moments'``: the states averaged at each
      merge (all at the same steps; multiples of the period are not supported).
    route: ``'hierarchical'`` (needed with two axes: the per-axis drift comes from its shards).
    allowed_states: the states the optimizer can average.

  Returns:
    A frozen ``MergeSchedule`` with ``adaptive`` set.

  Raises:
    ValueError: on knobs out of range, more than two axes, a ``sync`` with a multiple other
      than 1, or ``route='flat'`` with two axes.

  Examples:
    >>> import kstep_adam
    >>> s = kstep_adam.adaptive_schedule(("node", "local"), budget=0.01, k_init=4)
    >>> s.adaptive.k_init, s.axis_periods
    (4, (4, 4))
  """
  knobs = AdaptivePeriod(budget=budget, k_init=k_init, k_min=k_min, k_max=k_max)
  check_route(route)
  axes = normalize_axis_names(axis_name)
  if not 1 <= len(axes) <= 2:
    raise ValueError(f"an adaptive schedule needs one or two mesh axes, got {axis_name!r}")
  if len(axes) == 2 and route != "hierarchical":
    raise ValueError(
      "an adaptive schedule over two axes needs route='hierarchical' (its per-axis drift is "
      f"read off the hierarchical merge's shards), got route={route!r}"
    )
  fixed = merge_schedule(
    k_init, axis_name=axes, sync=sync, route=route, allowed_states=allowed_states
  )
  if any(multiple != 1 for _, multiple in fixed.state_periods):
    raise ValueError(
      f"an adaptive schedule merges every state it averages at the same steps; sync={sync!r} "
      f"has multiples {dict(fixed.state_periods)!r}"
    )
  return MergeSchedule(
    fixed.axis_names, fixed.axis_periods, fixed.state_periods, route, None, None, knobs
  )


class AdaptiveState(NamedTuple):
  """Everything the rule reads (JSON data once :meth:`AdaptiveController.state_dict` writes it)."""

  #: the steps decided and observed so far (the optimizer's step count).
  step: int
  #: the period in force per axis, outermost first.
  periods: tuple[int, ...]
  #: local steps since the last merge that covered each axis.
  since: tuple[int, ...]
  #: the relative drift per axis measured by the last merge over every axis.
  drift: tuple[float, ...]
  #: ``Y``, the time of a local step, or None while it is unknown.
  local_seconds: float | None
  #: ``C``, the time of a merge at each level 1.., or None while it is unknown.
  merge_seconds: tuple[float, ...] | None
  #: merges so far at each level 1.. (each level's merges cost the same bytes).
  merges: tuple[int, ...] = ()


def next_period(k: int, steps: int, drift: float, cost_ratio: float, knobs: AdaptivePeriod) -> int:
  r"""The rule for one axis: the period after a measurement.

  .. math::
    k' = \min\bigl(k_{\max}, 2k, \max(k_{\min}, \operatorname{round}\sqrt{\delta c / \rho})\bigr),
    \quad \rho = D / s

  Args:
    k: the period in force.
    steps: ``s``, local steps since the last merge that covered this axis (>= 1).
    drift: ``D``, the relative drift measured along this axis (>= 0).
    cost_ratio: ``c``, the time of this axis's merge over a local step's (> 0).
    knobs: ``delta``, ``k_min``, ``k_max``.

  Returns:
    The next period (an int in ``[k_min, k_max]``).

  Examples:
    >>> from kstep_adam._schedule import AdaptivePeriod
    >>> next_period(8, 8, 0.0016, 4.0, AdaptivePeriod(budget=0.01))  # sqrt(0.01*4/2e-4)
    14
  """
  upper = min(knobs.k_max, MAX_GROWTH * k)
  rate = drift / max(steps, 1)
  if not rate > 0.0:  # no drift measured (or NaN): grow as fast as allowed
    return max(knobs.k_min, upper)
  target = math.sqrt(knobs.budget * cost_ratio / rate)
  target = knobs.k_max if not math.isfinite(target) else round(target)
  return int(min(upper, max(knobs.k_min, target)))


class AdaptiveController:
  """The host side of an adaptive schedule: decides each step's merge level, learns the period.

  Args:
    schedule: from :func:`adaptive_schedule`.
    local_seconds: ``Y``, the time of a local step, or None (unknown: ``c = 1``).
    merge_seconds: ``C``, the time of a merge at each level (one per axis), or None.
    state: an :class:`AdaptiveState` or a :meth:`state_dict` to continue from (a checkpoint);
      then ``local_seconds`` and ``merge_seconds`` are the state's.
    axis_sizes: the replicas along each axis (a ``jax.sharding.Mesh``, a mapping axis name ->
      size, or one size per axis, outermost first), or None (all taken as more than one). An axis of one
      replica has nothing to merge: its period never calls a merge of its own level, and a
      level whose outer axes all have one replica is taken as the merge over every axis
      (the same replicas, and it measures the drift).

  Use: ``level = controller.decide(step)`` before step ``step`` (1-based, one after the last
  observed), run the step at that level, then ``controller.observe(level, drift)`` with the
  drift the step's state holds when ``level == 1`` (its ``drift`` field, which
  ``kstep_adam._dispatch.read_drift`` reads).
  """

  def __init__(
    self,
    schedule: MergeSchedule,
    *,
    local_seconds: float | None = None,
    merge_seconds: Sequence[float] | None = None,
    state: AdaptiveState | dict | None = None,
    axis_sizes=None,
  ):
    if schedule.adaptive is None:
      raise ValueError("AdaptiveController needs a schedule from kstep_adam.adaptive_schedule")
    self.schedule = schedule
    n = len(schedule.axis_names)
    self.axis_sizes = _axis_sizes(schedule, axis_sizes)
    if state is None:
      state = AdaptiveState(
        step=0,
        periods=(schedule.adaptive.k_init,) * n,
        since=(0,) * n,
        drift=(0.0,) * n,
        local_seconds=None,
        merge_seconds=None,
        merges=(0,) * n,
      )
      self.state = state
      if local_seconds is not None or merge_seconds is not None:
        self.set_times(local_seconds, merge_seconds)
    else:
      self.state = state if isinstance(state, AdaptiveState) else self.from_dict(state, n)
    self.last_record: dict | None = None

  # -- decisions -------------------------------------------------------------------------
  def level_at(self, step: int) -> int:
    """The merge level of 1-based ``step``, which must be the next one (pure: no change)."""
    state = self.state
    if int(step) != state.step + 1:
      raise ValueError(
        f"the adaptive controller has observed {state.step} steps, so it decides step "
        f"{state.step + 1}, not {step}; restore its state with the optimizer's (a checkpoint "
        f"holds both)"
      )
    for j, (k, s) in enumerate(zip(state.periods, state.since)):
      if self.axis_sizes[j] == 1:  # nothing to merge along it
        continue
      if s + 1 >= k:
        return 1 if all(size == 1 for size in self.axis_sizes[:j]) else j + 1
    return 0

  decide = level_at

  def observe(self, level: int, drift: Sequence[float] | None = None) -> AdaptiveState:
    """Advance by the step just run at ``level``; a merge over every axis (level 1) brings
    the drift it measured, which sets the next periods. Returns the new state."""
    state, knobs = self.state, self.schedule.adaptive
    n = len(state.periods)
    step = state.step + 1
    since = tuple(s + 1 for s in state.since)
    periods, measured, merges = state.periods, state.drift, state.merges
    self.last_record = None
    if level:
      merges = tuple(m + (j == level - 1) for j, m in enumerate(merges))
      if level == 1:
        if drift is None or len(drift) != n:
          raise ValueError(f"a merge over every axis needs its drift, {n} values; got {drift!r}")
        measured = tuple(float(d) for d in np.asarray(drift, np.float32).tolist())
        ratios = self.cost_ratios()
        periods = tuple(
          next_period(k, s, d, c, knobs)
          for k, s, d, c in zip(state.periods, since, measured, ratios)
        )
      self.last_record = {
        "step": step,
        "level": int(level),
        "period": list(state.periods),  # in force when this merge was decided
        "since": list(since),
        "drift": list(measured) if level == 1 else None,
        "next_period": list(periods),
      }
      since = tuple(0 if j >= level - 1 else s for j, s in enumerate(since))
    self.state = state._replace(
      step=step, periods=periods, since=since, drift=measured, merges=merges
    )
    return self.state

  def cost_ratios(self) -> tuple[float, ...]:
    """``c_j = C_j / Y`` per axis (1.0 where a time is unknown)."""
    y, c = self.state.local_seconds, self.state.merge_seconds
    n = len(self.state.periods)
    if y is None or c is None or not y > 0:
      return (1.0,) * n
    return tuple(max(cj, 0.0) / y for cj in c)

  def set_times(self, local_seconds: float | None, merge_seconds: Sequence[float] | None) -> None:
    """Set ``Y`` and ``C`` (per level); the same values on every process."""
    n = len(self.schedule.axis_names)
    if local_seconds is not None:
      local_seconds = check_float(local_seconds, "local_seconds", low=0.0, low_open=True)
    if merge_seconds is not None:
      merge_seconds = tuple(check_float(c, "merge_seconds", low=0.0) for c in merge_seconds)
      if len(merge_seconds) != n:
        raise ValueError(f"merge_seconds needs one time per level ({n}), got {merge_seconds!r}")
    self.state = self.state._replace(local_seconds=local_seconds, merge_seconds=merge_seconds)

  def comm_bytes(self, params, axis_sizes) -> CommCost:
    """Bytes and messages per axis of the merges so far (per device), each at its level."""
    total = CommCost({a: 0.0 for a in self.schedule.axis_names}, {})
    for level, count in enumerate(self.state.merges, 1):
      if count:
        cost = merge_bytes(params, self.schedule, axis_sizes, step=1, level=level)
        total = total + cost.scaled(count)
    return total

  # -- state ------------------------------------------------------------------------------
  def state_dict(self) -> dict[str, Any]:
    """The state as JSON data (floats round-trip exactly through ``json``)."""
    s = self.state
    return {
      "step": s.step,
      "periods": list(s.periods),
      "since": list(s.since),
      "drift": list(s.drift),
      "local_seconds": s.local_seconds,
      "merge_seconds": None if s.merge_seconds is None else list(s.merge_seconds),
      "merges": list(s.merges),
    }

  def load_state_dict(self, data: dict) -> None:
    """Continue from :meth:`state_dict`'s data."""
    self.state = self.from_dict(data, len(self.schedule.axis_names))

  @staticmethod
  def from_dict(data: dict, num_axes: int) -> AdaptiveState:
    state = AdaptiveState(
      step=int(data["step"]),
      periods=tuple(int(k) for k in data["periods"]),
      since=tuple(int(s) for s in data["since"]),
      drift=tuple(float(d) for d in data["drift"]),
      local_seconds=None if data["local_seconds"] is None else float(data["local_seconds"]),
      merge_seconds=None
      if data["merge_seconds"] is None
      else tuple(float(c) for c in data["merge_seconds"]),
      merges=tuple(int(m) for m in data["merges"]),
    )
    if {len(state.periods), len(state.since), len(state.merges)} != {num_axes}:
      raise ValueError(f"an adaptive state for {num_axes} axes, got {data!r}")
    return state


def _axis_sizes(schedule: MergeSchedule, sizes) -> tuple[int | None, ...]:
  """One size per axis, outermost first (None: unknown, taken as more than one)."""
  if sizes is None:
    return (None,) * len(schedule.axis_names)
  if isinstance(sizes, (tuple, list)):
    if len(sizes) != len(schedule.axis_names) or any(int(n) < 1 for n in sizes):
      raise ValueError(
        f"axis_sizes needs one size >= 1 per axis {schedule.axis_names!r}, got {sizes!r}"
      )
    return tuple(int(n) for n in sizes)
  named = checked_axis_sizes(schedule, sizes)  # a Mesh or a mapping
  return tuple(named[a] for a in schedule.axis_names)


def estimated_merge_seconds(
  params, schedule: MergeSchedule, axis_sizes, network: NetworkModel
) -> tuple[float, ...]:
  """``C`` per level from a network model: the modelled time of one merge at each level.

  Examples:
    >>> import numpy as np, kstep_adam
    >>> s = kstep_adam.adaptive_schedule("w")
    >>> net = kstep_adam.NetworkModel({"w": 1e9})
    >>> (c,) = estimated_merge_seconds({"p": np.zeros(1000, np.float32)}, s, {"w": 2}, net)
    >>> round(c * 1e6, 3)  # 4000 bytes of parameters and 12 of drift, at 1 GB/s
    4.012
  """
  return tuple(
    network.seconds(merge_bytes(params, schedule, axis_sizes, step=1, level=level))
    for level in range(1, len(schedule.axis_names) + 1)
  )
