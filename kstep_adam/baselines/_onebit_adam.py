"""1-bit Adam: an Adam warm-up, then sign-compressed momentum with error feedback."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep_adam._compression import onebit_mean
from kstep_adam._compression import onebit_server_errors
from kstep_adam._merge import check_axes_bound
from kstep_adam._merge import declared_merge
from kstep_adam._merge import tree_mean
from kstep_adam._schedule import MergeSchedule
from kstep_adam._validation import check_hyperparameter
from kstep_adam._validation import check_int
from kstep_adam.baselines._schedules import compressed_schedule_of


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
  schedule = compressed_schedule_of(
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
