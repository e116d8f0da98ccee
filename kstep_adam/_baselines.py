"""Baselines: synchronous Adam (DDP), local SGD, DiLoCo, and two compressed exchanges.

They share the merge schedule, the collectives and the harness with :func:`kstep_adam`, so
their communication is counted the same way. Each takes the :class:`MergeSchedule` it runs
(``sync_schedule(...)`` for DDP, ``compressed_schedule(...)`` for 1-bit Adam and top-k /
random-k with error feedback, ``merge_schedule(...)`` for the others): build it once, pass it
to the optimizer and to :func:`kstep_adam.comm_bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep_adam._compression import onebit_mean
from kstep_adam._compression import onebit_server_errors
from kstep_adam._compression import sparse_mean
from kstep_adam._merge import check_axes_bound
from kstep_adam._merge import check_merge_flag
from kstep_adam._merge import declared_merge
from kstep_adam._merge import merge_params
from kstep_adam._merge import switch_merge
from kstep_adam._merge import tree_mean
from kstep_adam._schedule import MergeSchedule
from kstep_adam._schedule import check_route
from kstep_adam._schedule import compressed_schedule
from kstep_adam._schedule import merge_schedule
from kstep_adam._validation import check_float_dtype
from kstep_adam._validation import check_hyperparameter
from kstep_adam._validation import check_int


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


def _compressed_schedule_of(
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


class ScaleByOneBitAdamState(NamedTuple):
  """State of :func:`scale_by_onebit_adam`; every field is per worker."""

  count: jax.Array  # shape=(), int32; steps taken so far.
  mu: optax.Updates  # momentum, like params; after the warm-up the compressed mean.
  nu: optax.Updates  # second moment, like params; frozen after the warm-up.
  worker_error: optax.Updates  # float32, like params: what this worker's messages missed.
  server_error: optax.Updates  # float32, one (chunk,) array per leaf: errors as a server.


def scale_by_onebit_adam(
  schedule: MergeSchedule | None = None,
  *,
  warmup_steps: int | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  axis_name: str | Sequence[str] | None = None,
  route: str = "hierarchical",
) -> optax.GradientTransformationExtraArgs:
  r"""Scale updates by 1-bit Adam: Adam, then a frozen variance and a 1-bit momentum exchange.

  For :math:`t \le T_w` (``warmup_steps``) this is ``optax.scale_by_adam`` on the gradients
  averaged over the axes (full precision; as :func:`kstep_adam.sync_adam`). Afterwards the
  second moment stays :math:`v_{T_w}` and each worker updates the shared momentum with its
  own gradient, and the workers average it at one bit per element with worker and server
  error feedback (the ``'onebit'`` exchange of :class:`kstep_adam.Compression`):

  .. math::
    m_t = \operatorname{mean}_{1\text{-bit}}\big(\beta_1 m_{t-1} + (1-\beta_1) g^w_t\big),
    \qquad d_t = \frac{m_t / (1-\beta_1^t)}
    {\sqrt{v_{T_w} / (1-\beta_2^{T_w}) + \epsilon_{root}} + \epsilon}.

  Every worker gets the same :math:`m_t`, so replicas that start equal stay equal. Unlike
  DeepSpeed's ``OnebitAdam``, the moments are bias-corrected as in ``optax.adam`` (so the
  warm-up is exactly :func:`kstep_adam.sync_adam`; after a warm-up of a few hundred steps
  both corrections are 1 to float precision), and the scales and errors ignore the padding
  that packs a leaf into whole bytes.

  Without an axis the worker is alone: after the warm-up it still compresses its momentum
  twice (worker and server side, one chunk per leaf) with both error feedbacks.

  ``init`` must run where ``update`` runs, inside ``shard_map`` over the axes (as
  :func:`kstep_adam.parallel.init_replicas` does): the server error holds one chunk per leaf,
  whose size depends on the number of workers.

  Args:
    schedule: a ``compressed_schedule(axes, 'onebit', warmup_steps=...)``, also passed to
      the byte accounting; None builds it from ``axis_name``, ``warmup_steps``, ``route``.
    warmup_steps: :math:`T_w` >= 1, full-precision Adam steps before the variance freezes.
    b1: decay rate of the momentum, in [0, 1).
    b2: decay rate of the second moment, in [0, 1).
    eps: denominator term, >= 0.
    eps_root: term inside the root, >= 0.
    axis_name: mesh axis or axes (outermost first) to exchange over; None: one worker.
    route: ``'hierarchical'`` or ``'flat'`` routing of the warm-up all-reduce.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByOneBitAdamState`.

  Raises:
    ValueError: on an argument out of range, a schedule that is not a ``'onebit'`` one, or
      arguments that contradict the schedule given.

  References:
    Tang et al., 1-bit Adam: Communication Efficient Large-Scale Training with Adam's
    Convergence Speed, https://arxiv.org/abs/2102.02888
  """
  check_hyperparameter(b1, "b1", low=0.0, high=1.0, high_open=True)
  check_hyperparameter(b2, "b2", low=0.0, high=1.0, high_open=True)
  check_hyperparameter(eps, "eps", low=0.0)
  check_hyperparameter(eps_root, "eps_root", low=0.0)
  if schedule is None and warmup_steps is None:
    raise ValueError("onebit_adam needs warmup_steps (or a schedule built with them)")
  schedule = _compressed_schedule_of(
    schedule, ("onebit",), axis_name, route, warmup_steps=warmup_steps
  )
  warmup = check_int(schedule.compression.warmup_steps, "warmup_steps")  # v must be estimated
  axes = schedule.axis_names

  def init_fn(params):
    if axes:
      check_axes_bound(axes)
    num_workers = math.prod(jax.lax.axis_size(a) for a in axes)
    return ScaleByOneBitAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
      worker_error=optax.tree.zeros_like(params, dtype=jnp.float32),
      server_error=onebit_server_errors(params, num_workers),
    )

  def warmup_step(operand):
    grads, mu, nu, worker_error, server_error = operand
    if axes:
      grads = tree_mean(grads, axes, schedule.route)
    mu = optax.tree.update_moment(grads, mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(grads, nu, b2, 2)
    return mu, nu, worker_error, server_error

  def compressed_step(operand):
    grads, mu, nu, worker_error, server_error = operand
    mu = optax.tree.update_moment(grads, mu, b1, 1)
    mu, worker_error, server_error = onebit_mean(mu, worker_error, server_error, axes)
    return mu, nu, worker_error, server_error

  def update_fn(updates, state, params=None, *, merge=None, **extra_args):
    del params, extra_args
    declared_merge(schedule, merge)  # checks `merge`; a declared local step is refused
    count = optax.safe_increment(state.count)
    operand = (updates, state.mu, state.nu, state.worker_error, state.server_error)
    mu, nu, worker_error, server_error = jax.lax.cond(
      count <= warmup, warmup_step, compressed_step, operand
    )
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, jnp.minimum(count, warmup))
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    return updates, ScaleByOneBitAdamState(count, mu, nu, worker_error, server_error)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def onebit_adam(
  learning_rate: optax.ScalarOrSchedule,
  schedule: MergeSchedule | None = None,
  *,
  warmup_steps: int | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  axis_name: str | Sequence[str] | None = None,
  route: str = "hierarchical",
) -> optax.GradientTransformationExtraArgs:
  r"""1-bit Adam: full-precision Adam for a warm-up, then a 1-bit momentum exchange.

  :func:`scale_by_onebit_adam` followed by the learning rate. During the warm-up it equals
  :func:`kstep_adam.sync_adam`; afterwards every step exchanges 1 bit per parameter plus a
  float32 scale per leaf, twice (an all-to-all to the chunks' servers and an all-gather back),
  instead of DDP's all-reduce of 32 bits per parameter. It is not k-step Adam: it
  communicates every step, compressed, where k-step Adam communicates every k steps at full
  precision.

  Args:
    learning_rate: a float >= 0 or an optax schedule (not checked until called).
    schedule: a ``kstep_adam.compressed_schedule(axes, 'onebit', warmup_steps=...)``; pass
      the same object to the byte accounting. None builds it from ``axis_name``,
      ``warmup_steps`` and ``route``.
    warmup_steps: full-precision Adam steps before the variance freezes, >= 1.
    b1: decay rate of the momentum, in [0, 1).
    b2: decay rate of the second moment, in [0, 1).
    eps: denominator term, >= 0.
    eps_root: term inside the root, >= 0.
    axis_name: mesh axis or axes (outermost first) to exchange over; None: one worker.
    route: ``'hierarchical'`` or ``'flat'`` routing of the warm-up all-reduce.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import kstep_adam
    >>> schedule = kstep_adam.compressed_schedule(("node", "local"), "onebit", warmup_steps=100)
    >>> tx = kstep_adam.onebit_adam(1e-3, schedule)  # and comm_bytes(params, schedule, ...)

  References:
    Tang et al., https://arxiv.org/abs/2102.02888
  """
  check_hyperparameter(learning_rate, "learning_rate", low=0.0, schedule=True)
  return optax.chain(
    scale_by_onebit_adam(
      schedule,
      warmup_steps=warmup_steps,
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      axis_name=axis_name,
      route=route,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )


class SparsifiedMeanState(NamedTuple):
  """State of :func:`sparsified_mean`; every field is per worker."""

  count: jax.Array  # shape=(), int32; steps taken so far.
  error: optax.Updates  # float32, like params: what this worker's messages missed.


def sparsified_mean(
  schedule: MergeSchedule, *, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
  r"""Average updates over the schedule's axes through top-k or random-k with error feedback.

  .. math::
    p^w_t = g^w_t + e^w_{t-1}, \qquad e^w_t = p^w_t - C(p^w_t), \qquad
    g_t \leftarrow \tfrac{1}{N}\textstyle\sum_w C(p^w_t),

  where :math:`C` keeps ``density`` of each leaf's entries (the ``'topk'`` or ``'randk'``
  exchange of :class:`kstep_adam.Compression`; ``'randk'`` draws leaf ``i``'s indices, the
  same on every worker, as ``jax.random.choice(jax.random.fold_in(key_t, i), size, (k,),
  replace=False)`` with ``i`` the leaf's position in ``jax.tree.leaves``). The first ``warmup_steps`` steps average the
  full-precision updates and leave the errors alone. Without an axis the worker is alone and
  still sparsifies its own updates with error feedback (Stich et al.'s single-worker
  setting). Chain an optimizer after it (:func:`topk_ef` chains ``optax.adam``).

  Args:
    schedule: a ``kstep_adam.compressed_schedule(axes, 'topk' or 'randk', density=...)``.
    seed: seed of the indices ``'randk'`` draws (the same on every worker); step ``t`` uses
      ``key_t = jax.random.fold_in(jax.random.key(seed), t)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SparsifiedMeanState`.
  """
  if schedule is None:
    raise ValueError("sparsified_mean needs a kstep_adam.compressed_schedule(...), got None")
  schedule = _compressed_schedule_of(schedule, ("topk", "randk"), None, "hierarchical")
  if not (
    isinstance(seed, jax.Array) and seed.ndim == 0 and jnp.issubdtype(seed.dtype, jnp.integer)
  ):
    seed = check_int(seed, "seed", minimum=0)  # an int array passes: inject_hyperparams's
  compression, axes = schedule.compression, schedule.axis_names

  def init_fn(params):
    return SparsifiedMeanState(
      count=jnp.zeros([], jnp.int32), error=optax.tree.zeros_like(params, dtype=jnp.float32)
    )

  def warmup_step(operand):
    updates, error = operand
    return (tree_mean(updates, axes, schedule.route) if axes else updates), error

  def update_fn(updates, state, params=None, *, merge=None, **extra_args):
    del params, extra_args
    declared_merge(schedule, merge)  # checks `merge`; a declared local step is refused
    count = optax.safe_increment(state.count)
    key = jax.random.fold_in(jax.random.key(seed), count)

    def compressed_step(operand):
      return sparse_mean(*operand, compression, axes, route=schedule.route, key=key)

    operand = (updates, state.error)
    if compression.warmup_steps:
      updates, error = jax.lax.cond(
        count <= compression.warmup_steps, warmup_step, compressed_step, operand
      )
    else:
      updates, error = compressed_step(operand)
    return updates, SparsifiedMeanState(count=count, error=error)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def topk_ef(
  learning_rate: optax.ScalarOrSchedule,
  schedule: MergeSchedule | None = None,
  *,
  density: float | None = None,
  method: str | None = None,
  warmup_steps: int | None = None,
  seed: int = 0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any = None,
  axis_name: str | Sequence[str] | None = None,
  route: str = "hierarchical",
) -> optax.GradientTransformationExtraArgs:
  r"""Adam on gradients averaged through top-k (or random-k) sparsification with error feedback.

  :func:`sparsified_mean` followed by ``optax.adam``. Each step every worker sends ``density``
  of its gradient entries (plus what earlier messages missed): ``'topk'`` the largest ones
  with their int32 indices (an all-gather), ``'randk'`` the entries at indices every worker
  draws from a shared seed (only values, one all-reduce). With ``density=1.0`` it equals
  :func:`kstep_adam.sync_adam` up to summation order. It is not k-step Adam: it communicates
  every step, sparsified, and its error memories hold a full gradient per worker.

  Args:
    learning_rate: a float >= 0 or an optax schedule (not checked until called).
    schedule: a ``kstep_adam.compressed_schedule(axes, 'topk' or 'randk', density=...)``;
      pass the same object to the byte accounting. None builds it from ``axis_name``,
      ``density``, ``method``, ``warmup_steps`` and ``route``.
    density: fraction of each leaf's entries sent, in (0, 1]; required without a schedule.
    method: ``'topk'`` (default) or ``'randk'``.
    warmup_steps: steps that average full-precision gradients first (default 0).
    seed: seed of the ``'randk'`` indices.
    b1: decay rate of the first moment, in [0, 1).
    b2: decay rate of the second moment, in [0, 1).
    eps: denominator term, >= 0.
    eps_root: term inside the root, >= 0.
    mu_dtype: dtype of the first moment.
    axis_name: mesh axis or axes (outermost first) to exchange over; None: one worker.
    route: ``'hierarchical'`` or ``'flat'`` routing of the warm-up and ``'randk'``
      all-reduces.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import kstep_adam
    >>> schedule = kstep_adam.compressed_schedule(("node", "local"), "topk", density=0.01)
    >>> tx = kstep_adam.topk_ef(1e-3, schedule)  # and comm_bytes(params, schedule, ...)

  References:
    Stich, Cordonnier & Jaggi, Sparsified SGD with Memory, https://arxiv.org/abs/1809.07599;
    Karimireddy et al., Error Feedback Fixes SignSGD and other Gradient Compression Schemes,
    https://arxiv.org/abs/1901.09847
  """
  check_hyperparameter(learning_rate, "learning_rate", low=0.0, schedule=True)
  check_hyperparameter(b1, "b1", low=0.0, high=1.0, high_open=True)
  check_hyperparameter(b2, "b2", low=0.0, high=1.0, high_open=True)
  check_hyperparameter(eps, "eps", low=0.0)
  check_hyperparameter(eps_root, "eps_root", low=0.0)
  check_float_dtype(mu_dtype, "mu_dtype")
  if schedule is None and density is None:
    raise ValueError("topk_ef needs density (or a schedule built with it)")
  schedule = _compressed_schedule_of(
    schedule,
    ("topk", "randk"),
    axis_name,
    route,
    method=method,
    density=density,
    warmup_steps=warmup_steps,
  )
  return optax.chain(
    sparsified_mean(schedule, seed=seed),
    optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
  )
