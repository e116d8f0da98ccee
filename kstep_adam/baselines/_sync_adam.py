"""Synchronous data-parallel Adam (DDP): the k = 1 reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax

from kstep_adam._merge import declared_merge
from kstep_adam._merge import tree_mean
from kstep_adam._schedule import MergeSchedule
from kstep_adam._validation import check_float_dtype
from kstep_adam._validation import check_hyperparameter
from kstep_adam.baselines._schedules import baseline_schedule


def sync_adam(
  learning_rate: optax.ScalarOrSchedule,
  schedule: MergeSchedule | None = None,
  *,
  axis_name: str | Sequence[str] | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any = None,
  route: str = "hierarchical",
) -> optax.GradientTransformation:
  r"""Synchronous data-parallel Adam (DDP): average gradients every step, then ``optax.adam``.

  .. math:: g_t \leftarrow \tfrac{1}{N}\textstyle\sum_w g^w_t, \qquad
     x_t = x_{t-1} - \eta_t\,\mathrm{Adam}(g_t)

  Replicas that start equal stay equal. This is the k = 1 reference that users know as DDP;
  it is *not* ``kstep_adam(k=1)``, which averages parameters after local Adam steps.

  Args:
    learning_rate: a float >= 0 or an optax schedule (not checked until called).
    schedule: the :class:`MergeSchedule` to run, from :func:`kstep_adam.sync_schedule`
      (then ``axis_name`` and ``route`` are taken from it); pass the same object to the byte
      accounting. None builds ``sync_schedule(axis_name, route=route)``.
    axis_name: mesh axis or axes to average gradients over; None: plain ``optax.adam``.
    b1: decay rate of the first moment, in [0, 1).
    b2: decay rate of the second moment, in [0, 1).
    eps: denominator term, >= 0.
    eps_root: term inside the root, >= 0.
    mu_dtype: dtype of the first moment.
    route: ``'hierarchical'`` or ``'flat'`` routing of a multi-axis mean.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import kstep_adam
    >>> tx = kstep_adam.sync_adam(1e-3)  # without an axis this is optax.adam(1e-3)
    >>> schedule = kstep_adam.sync_schedule(("node", "local"))  # built once: optimizer
    >>> tx = kstep_adam.sync_adam(1e-3, schedule)  # and byte accounting share it
  """
  check_hyperparameter(learning_rate, "learning_rate", low=0.0, schedule=True)
  check_hyperparameter(b1, "b1", low=0.0, high=1.0, high_open=True)
  check_hyperparameter(b2, "b2", low=0.0, high=1.0, high_open=True)
  check_hyperparameter(eps, "eps", low=0.0)
  check_hyperparameter(eps_root, "eps_root", low=0.0)
  check_float_dtype(mu_dtype, "mu_dtype")
  if schedule is not None and not isinstance(schedule, MergeSchedule):
    raise ValueError(
      f"schedule must be None or a MergeSchedule from kstep_adam.sync_schedule(...), "
      f"got {schedule!r}"
    )
  schedule = baseline_schedule(
    1 if schedule is None else schedule, "grads", axis_name, route, period_name="schedule"
  )
  if any(period != 1 for period in schedule.axis_periods):
    raise ValueError(
      f"sync_adam averages gradients every step: its schedule needs period 1 on every axis, "
      f"got axis_periods={schedule.axis_periods!r}; build it with kstep_adam.sync_schedule"
    )

  return optax.chain(
    _mean_every_step(schedule, "grads"),
    optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
  )


def _mean_every_step(schedule: MergeSchedule, state: str) -> optax.GradientTransformationExtraArgs:
  """Stateless: average the updates over the schedule's axes on every step (if it has any)."""

  def update_fn(updates, state_, params=None, *, merge=None, **extra_args):
    del params, extra_args
    with declared_merge(schedule, merge):  # validates `merge`; a local step is refused
      if schedule.merges(state):
        updates = tree_mean(updates, schedule.axis_names, schedule.route)
    return updates, state_

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)
