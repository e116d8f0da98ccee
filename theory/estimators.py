"""Estimators for the constants that the bounds take: L, sigma^2, sigma_inf, G_inf, Delta.

Each estimator says what it measures. None of them certifies a supremum over
all ``x``: sampled points give a lower estimate of ``sup_x``. When a problem
has a known constant, pass the known value instead (the experiment does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory._checks import check_count

__all__ = [
  "NoiseStats",
  "smoothness_power_iteration",
  "smoothness_at_points",
  "gradient_noise_stats",
  "max_grad_inf_norm",
  "initial_gap",
]


def smoothness_power_iteration(
  f: Callable[[jax.Array], jax.Array], x_D: jax.Array, key: jax.Array, *, num_iters: int = 50
) -> jax.Array:
  r"""Estimate ``||Hess f(x)||_2`` by power iteration on Hessian-vector products.

  .. math::
      v_{j+1} = \frac{H v_j}{\|H v_j\|},\qquad \hat L = \|H v_J\|,
      \qquad H v = \nabla(\nabla f(x)^\top v).

  Power iteration converges to the eigenvalue of largest magnitude, which is
  the local smoothness constant (spectral norm) also for indefinite Hessians.

  Args:
    f: scalar function of a flat parameter vector.
    x_D: the point, shape ``[D]``.
    key: PRNG key for the start vector.
    num_iters: number of iterations.

  Returns:
    A scalar, the estimate of ``||Hess f(x_D)||_2`` (a lower bound on ``L``).
  """
  check_count("num_iters", num_iters)
  grad_f = jax.grad(f)

  def hvp(v_D):
    return jax.jvp(grad_f, (x_D,), (v_D,))[1]

  v_D = jax.random.normal(key, x_D.shape, x_D.dtype)
  v_D = v_D / jnp.linalg.norm(v_D)

  def body(_, v_D):
    hv_D = hvp(v_D)
    return hv_D / jnp.maximum(jnp.linalg.norm(hv_D), 1e-30)

  v_D = jax.lax.fori_loop(0, num_iters, body, v_D)
  return jnp.linalg.norm(hvp(v_D))


def smoothness_at_points(
  f: Callable[[jax.Array], jax.Array], xs_PxD: jax.Array, key: jax.Array, *, num_iters: int = 50
) -> jax.Array:
  """Return the largest power-iteration estimate over ``P`` points (a lower bound on L).

  Args:
    f: scalar function of a flat parameter vector.
    xs_PxD: points, shape ``[P, D]``.
    key: PRNG key.
    num_iters: power iterations per point.

  Returns:
    Scalar ``max_p ||Hess f(x_p)||_2``.
  """
  keys = jax.random.split(key, xs_PxD.shape[0])
  per_point = jax.vmap(lambda x, k: smoothness_power_iteration(f, x, k, num_iters=num_iters))(
    xs_PxD, keys
  )
  return jnp.max(per_point)


class NoiseStats(NamedTuple):
  """Gradient-noise constants measured at sampled points."""

  sigma2: jax.Array  # shape=(), max over points of E||g - grad f||^2
  sigma_inf: jax.Array  # shape=(), max over points and samples of ||g - grad f||_inf
  mean_sigma2: jax.Array  # shape=(), mean over points of E||g - grad f||^2


def gradient_noise_stats(
  per_sample_grads: Callable[[jax.Array], jax.Array],
  full_grad: Callable[[jax.Array], jax.Array],
  xs_PxD: jax.Array,
  *,
  batch_size: int = 1,
) -> NoiseStats:
  r"""Measure ``sigma^2`` and ``sigma_inf`` from per-sample gradients.

  At each point ``x_p`` the per-sample gradients ``g_j(x_p)`` (``j = 1..S``)
  give ``s^2(x_p) = (1/S) sum_j ||g_j - grad f(x_p)||^2``. A minibatch of
  ``b`` samples drawn with replacement has variance ``s^2 / b``, which is the
  per-worker ``sigma^2`` that the bounds take. For a finite sum with all
  ``S = n`` samples this is exact at ``x_p``; otherwise it is a Monte-Carlo
  estimate. ``sigma_inf`` is the largest observed coordinate deviation of a
  single sample's gradient (a minibatch deviates by no more).

  Args:
    per_sample_grads: maps ``x_D`` to per-sample gradients, shape ``[S, D]``.
    full_grad: maps ``x_D`` to the exact gradient, shape ``[D]``.
    xs_PxD: points at which to measure, shape ``[P, D]``.
    batch_size: minibatch size ``b`` of one worker's stochastic gradient.

  Returns:
    :class:`NoiseStats` (the max over points is the estimate of the sup).
  """
  check_count("batch_size", batch_size)

  def at_point(x_D):
    dev_SxD = per_sample_grads(x_D) - full_grad(x_D)[None, :]
    return (jnp.mean(jnp.sum(dev_SxD**2, axis=-1)) / batch_size, jnp.max(jnp.abs(dev_SxD)))

  s2_P, sinf_P = jax.lax.map(at_point, xs_PxD)
  return NoiseStats(sigma2=jnp.max(s2_P), sigma_inf=jnp.max(sinf_P), mean_sigma2=jnp.mean(s2_P))


def max_grad_inf_norm(
  full_grad: Callable[[jax.Array], jax.Array], trajectory_TxD: jax.Array
) -> jax.Array:
  """Return ``G_inf``: the largest ``||grad f(x_t)||_inf`` along a trajectory.

  Args:
    full_grad: maps ``x_D`` to the exact gradient.
    trajectory_TxD: iterates, shape ``[T, D]``.

  Returns:
    Scalar ``max_t ||grad f(x_t)||_inf`` (valid only along this trajectory).
  """
  return jnp.max(jax.lax.map(lambda x: jnp.max(jnp.abs(full_grad(x))), trajectory_TxD))


def initial_gap(
  f: Callable[[jax.Array], jax.Array],
  x0_D: jax.Array,
  *,
  f_star: float | None = None,
  f_lower: float | None = None,
) -> float:
  """Return ``Delta = f(x_0) - f*`` from a known ``f*`` or a lower bound on it.

  With a lower bound ``f_lower <= f*`` the result is an *upper* bound on
  ``Delta``, which keeps an upper bound on the gradient norm valid.

  Args:
    f: the objective.
    x0_D: the starting point.
    f_star: the known minimum value.
    f_lower: a certified lower bound on the minimum (used when ``f_star`` is None).

  Returns:
    ``f(x0) - f_star`` (or ``f(x0) - f_lower``), a float.
  """
  if (f_star is None) == (f_lower is None):
    raise ValueError(
      "pass exactly one of f_star (known minimum) or f_lower "
      f"(a lower bound); got f_star={f_star!r}, f_lower={f_lower!r}"
    )
  ref = f_star if f_star is not None else f_lower
  gap = float(f(x0_D)) - float(ref)
  if gap <= 0:
    raise ValueError(
      f"f(x0) - f* must be positive, got {gap!r}; is f_star={ref!r} really the minimum?"
    )
  return gap
