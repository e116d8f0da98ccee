"""How the baselines build the :class:`MergeSchedule` they run from their arguments.

Internal helpers, shared by the baselines: :func:`baseline_schedule` (sync_adam, local_sgd,
diloco) and :func:`compressed_schedule_of` (onebit_adam, scale_by_onebit_adam, topk_ef).
"""

from __future__ import annotations

from kstep_adam._schedule import MergeSchedule
from kstep_adam._schedule import check_route
from kstep_adam._schedule import compressed_schedule
from kstep_adam._schedule import merge_schedule


def baseline_schedule(period, state: str, axis_name, route: str, period_name: str = "k"):
  """The schedule of a baseline that averages only ``state``: every ``period`` steps, or
  ``period`` itself when it is a :class:`MergeSchedule` (its own period for ``state`` holds)."""
  kwargs = dict(axis_name=axis_name, route=route, allowed_states=(state,), period_name=period_name)
  if isinstance(period, MergeSchedule):
    return merge_schedule(period, **kwargs)
  return merge_schedule(period, sync={state: 1}, **kwargs)


def compressed_schedule_of(
  schedule, methods: tuple[str, ...], axis_name, route: str, **compression
) -> MergeSchedule:
  """The compressed schedule an optimizer runs: ``schedule`` itself (checked against the
  arguments given beside it) or one built from ``axis_name``, ``route`` and ``compression``
  (a None value there means "not given")."""
  check_route(route)
  if schedule is None:
    method = compression.pop("method", None) or methods[0]
    given = {name: value for name, value in compression.items() if value is not None}
    return compressed_schedule(axis_name, method, route=route, **given)
  if (
    not isinstance(schedule, MergeSchedule)
    or schedule.compression is None
    or schedule.compression.method not in methods
  ):
    raise ValueError(
      f"schedule must be None or a MergeSchedule from kstep_adam.compressed_schedule(axes, "
      f"{' or '.join(map(repr, methods))}, ...), got {schedule!r}"
    )
  if axis_name is not None:
    raise ValueError(
      f"pass either a MergeSchedule as schedule or axis_name, not both (got axis_name="
      f"{axis_name!r}); the schedule already names its axes"
    )
  if route != "hierarchical" and route != schedule.route:
    raise ValueError(
      f"route={route!r} conflicts with the MergeSchedule given as schedule, which routes "
      f"{schedule.route!r}; leave route out or build the schedule with it"
    )
  for name, value in compression.items():
    if value is not None and value != getattr(schedule.compression, name):
      raise ValueError(
        f"{name}={value!r} conflicts with the MergeSchedule given as schedule, whose "
        f"compression has {name}={getattr(schedule.compression, name)!r}; leave {name} out "
        f"or build the schedule with it"
      )
  return schedule
