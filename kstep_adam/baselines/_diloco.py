"""DiLoCo: local inner steps, then an outer Nesterov step on the averaged delta."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep_adam._merge import check_merge_flag
from kstep_adam._merge import declared_merge
from kstep_adam._merge import switch_merge
from kstep_adam._schedule import MergeSchedule
from kstep_adam._validation import check_hyperparameter
from kstep_adam.baselines._schedules import baseline_schedule


class DiLoCoState(NamedTuple):
  """State of :func:`diloco`; every field is per worker (outer fields agree across workers)."""

  count: jax.Array  # shape=(), int32; inner steps taken so far.
  anchor: optax.Params  # global parameters after the last outer step.
  inner_state: optax.OptState  # local inner-optimizer state, never averaged.
  outer_state: optax.OptState  # outer-optimizer state (Nesterov momentum).


def diloco(
  inner_steps: int | Mapping[str, int] | MergeSchedule,
  *,
  inner: optax.GradientTransformation | None = None,
  inner_learning_rate: optax.ScalarOrSchedule = 1e-3,
  outer_learning_rate: optax.ScalarOrSchedule = 0.7,
  outer_momentum: float | None = 0.9,
  nesterov: bool = True,
  axis_name: str | Sequence[str] | None = None,
  route: str = "hierarchical",
) -> optax.GradientTransformation:
  r"""DiLoCo: local inner steps, then an outer Nesterov SGD step on the averaged delta.

  Every ``H = inner_steps`` steps:

  .. math::
    \Delta = \tfrac{1}{N}\textstyle\sum_w (x_{anchor} - x^w), \qquad
    x_{anchor} \leftarrow x_{anchor} + \mathrm{OuterSGD}(\Delta), \qquad x^w \leftarrow x_{anchor}.

  The inner optimizer (Adam by default) keeps its state local across rounds.

  Args:
    inner_steps: H, per-axis periods, or a :class:`MergeSchedule` over ``'delta'``
      (``merge_schedule(H, axis_name=..., sync='delta')``, built once and passed also to the
      byte accounting; then ``axis_name`` and ``route`` are taken from it).
    inner: inner optimizer; None uses ``optax.adam(inner_learning_rate)``.
    inner_learning_rate: learning rate (>= 0, or a schedule) of the default inner Adam.
    outer_learning_rate: outer SGD learning rate (>= 0, or a schedule; 0.7 in the paper).
    outer_momentum: outer momentum in [0, 1) (0.9 in the paper); None disables it.
    nesterov: Nesterov outer momentum (True in the paper).
    axis_name: mesh axis or axes to average the delta over; None: one worker.
    route: ``'hierarchical'`` or ``'flat'``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`DiLoCoState`; ``update`` needs
    ``params``.

  Examples:
    >>> import kstep_adam
    >>> tx = kstep_adam.diloco(500, inner_learning_rate=1e-3)

  References:
    Douillard et al., DiLoCo: Distributed Low-Communication Training of Language Models,
    https://arxiv.org/abs/2311.08105
  """
  if inner is not None and not isinstance(inner, optax.GradientTransformation):
    raise ValueError(f"inner must be None or an optax.GradientTransformation, got {inner!r}")
  check_hyperparameter(inner_learning_rate, "inner_learning_rate", low=0.0, schedule=True)
  check_hyperparameter(outer_learning_rate, "outer_learning_rate", low=0.0, schedule=True)
  check_hyperparameter(
    outer_momentum, "outer_momentum", low=0.0, high=1.0, high_open=True, allow_none=True
  )
  schedule = baseline_schedule(inner_steps, "delta", axis_name, route, period_name="inner_steps")
  if not schedule.axis_names and isinstance(inner_steps, MergeSchedule):
    # Without axes a schedule keeps no period; the one-worker outer step needs an int H.
    raise ValueError(f"without axis_name, inner_steps must be a positive int, got {inner_steps!r}")
  inner = optax.adam(inner_learning_rate) if inner is None else inner
  outer = optax.sgd(outer_learning_rate, momentum=outer_momentum, nesterov=nesterov)

  def init_fn(params):
    return DiLoCoState(
      count=jnp.zeros([], jnp.int32),
      anchor=jax.tree.map(jnp.array, params),
      inner_state=inner.init(params),
      outer_state=outer.init(params),
    )

  def update_fn(updates, state, params=None, *, merge=None, **extra_args):
    del extra_args
    with declared_merge(schedule, merge):
      return _update(updates, state, params, declared_local=check_merge_flag(merge) is False)

  def _update(updates, state, params, declared_local):
    if params is None:
      raise ValueError("diloco needs `params` in update(updates, state, params)")
    inner_updates, inner_state = inner.update(updates, state.inner_state, params)
    count = optax.safe_increment(state.count)

    def local_fn(operand):
      inner_updates, anchor, outer_state = operand
      return inner_updates, anchor, outer_state

    def merge_fn(operand, mean):
      inner_updates, anchor, outer_state = operand
      delta = mean(jax.tree.map(lambda a, p, u: a - (p + u), anchor, params, inner_updates))
      outer_updates, outer_state = outer.update(delta, outer_state, anchor)
      anchor = optax.apply_updates(anchor, outer_updates)
      updates = jax.tree.map(lambda a, p, u: (a - p).astype(u.dtype), anchor, params, inner_updates)
      return updates, anchor, outer_state

    operand = (inner_updates, state.anchor, state.outer_state)
    if schedule.axis_names:
      updates, anchor, outer_state = switch_merge(
        schedule.level_at("delta", count), schedule, "delta", local_fn, merge_fn, operand
      )
    elif declared_local:
      updates, anchor, outer_state = local_fn(operand)
    else:  # One worker: the outer step still runs every H steps, on its own delta.
      updates, anchor, outer_state = jax.lax.cond(
        count % int(inner_steps) == 0, lambda op: merge_fn(op, lambda t: t), local_fn, operand
      )
    return updates, DiLoCoState(
      count=count, anchor=anchor, inner_state=inner_state, outer_state=outer_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
