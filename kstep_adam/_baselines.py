"""Baselines in the k-step family: synchronous Adam (DDP), local SGD and DiLoCo.

They share the merge schedule, the collectives and the harness with :func:`kstep_adam`, so
their communication is counted the same way. Each takes the :class:`MergeSchedule` it runs
(``sync_schedule(...)`` for DDP, ``merge_schedule(...)`` for the others): build it once, pass
it to the optimizer and to :func:`kstep_adam.comm_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep_adam._merge import merge_params
from kstep_adam._merge import switch_merge
from kstep_adam._merge import tree_mean
from kstep_adam._schedule import MergeSchedule
from kstep_adam._schedule import merge_schedule
from kstep_adam._validation import check_float_dtype
from kstep_adam._validation import check_hyperparameter


def _baseline_schedule(period, state: str, axis_name, route: str, period_name: str = "k"):
  """The schedule of a baseline that averages only ``state``: every ``period`` steps, or
  ``period`` itself when it is a :class:`MergeSchedule` (its own period for ``state`` holds)."""
  kwargs = dict(axis_name=axis_name, route=route, allowed_states=(state,), period_name=period_name)
  if isinstance(period, MergeSchedule):
    return merge_schedule(period, **kwargs)
  return merge_schedule(period, sync={state: 1}, **kwargs)


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
  schedule = _baseline_schedule(
    1 if schedule is None else schedule, "grads", axis_name, route, period_name="schedule"
  )
  if any(period != 1 for period in schedule.axis_periods):
    raise ValueError(
      f"sync_adam averages gradients every step: its schedule needs period 1 on every axis, "
      f"got axis_periods={schedule.axis_periods!r}; build it with kstep_adam.sync_schedule"
    )

  def mean_grads(updates, params=None):
    del params
    if not schedule.merges("grads"):
      return updates
    return tree_mean(updates, schedule.axis_names, schedule.route)

  return optax.chain(
    optax.stateless(mean_grads),
    optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
  )


def local_sgd(
  learning_rate: optax.ScalarOrSchedule,
  k: int | Mapping[str, int] | MergeSchedule,
  *,
  momentum: float | None = None,
  nesterov: bool = False,
  axis_name: str | Sequence[str] | None = None,
  route: str = "hierarchical",
) -> optax.GradientTransformation:
  r"""Local SGD: SGD (optionally with momentum) on each worker, parameters averaged every k.

  .. math:: x^w_t = x^w_{t-1} - \eta_t\, \mathrm{SGD}(g^w_t), \qquad
     x^w_t \leftarrow \tfrac{1}{N}\textstyle\sum_{w'} x^{w'}_t \ \text{ if } k \mid t

  The momentum buffer stays local (it is never averaged).

  Args:
    learning_rate: a float >= 0 or an optax schedule (not checked until called).
    k: merge period, per-axis periods, or a :class:`MergeSchedule` over ``'params'``
      (``merge_schedule(k, axis_name=...)``, built once and passed also to the byte
      accounting; then ``axis_name`` and ``route`` are taken from it).
    momentum: heavy-ball momentum in [0, 1) as in ``optax.sgd``; None disables it.
    nesterov: use Nesterov momentum.
    axis_name: mesh axis or axes to average over; None: plain ``optax.sgd``.
    route: ``'hierarchical'`` or ``'flat'``.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  References:
    Stich, Local SGD Converges Fast and Communicates Little, https://arxiv.org/abs/1805.09767
  """
  check_hyperparameter(learning_rate, "learning_rate", low=0.0, schedule=True)
  check_hyperparameter(momentum, "momentum", low=0.0, high=1.0, high_open=True, allow_none=True)
  schedule = _baseline_schedule(k, "params", axis_name, route)
  return optax.chain(
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    merge_params(schedule),
  )


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
  schedule = _baseline_schedule(inner_steps, "delta", axis_name, route, period_name="inner_steps")
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

  def update_fn(updates, state, params=None):
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
    else:  # One worker: the outer step still runs every H steps, on its own delta.
      updates, anchor, outer_state = jax.lax.cond(
        count % int(inner_steps) == 0, lambda op: merge_fn(op, lambda t: t), local_fn, operand
      )
    return updates, DiLoCoState(
      count=count, anchor=anchor, inner_state=inner_state, outer_state=outer_state
    )

  return optax.GradientTransformation(init_fn, update_fn)
