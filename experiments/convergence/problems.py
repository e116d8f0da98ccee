"""Test problems with exact full gradients, so ||grad f(xbar)||^2 is measured, not estimated.

Each problem gives ``f``, its exact gradient, a per-worker stochastic gradient and the
constants the bounds take (``L``, ``tau``, ``sigma2``, ``sigma_inf``, ``delta``, and where one
exists a bound on the gradients everywhere), saying for each whether it is *certified* (exact,
or a proven upper bound) or *estimated*. A bound checked with estimated constants is labelled
so in the checks table.

* :class:`SeparableCosine`: ``f(x) = sum_i x_i^2/2 + a cos x_i`` with additive gradient
  noise; ``L = 1 + a`` and ``tau = a - 1`` exactly. ``hetero > 0`` gives worker ``w`` the
  local objective ``f(x) - b_w^T x`` with ``sum_w b_w = 0`` (same global ``f``).
* :class:`NonconvexLogistic`: logistic regression on synthetic data plus the non-convex
  regularizer ``lam * sum_i x_i^2/(1+x_i^2)``; minibatch gradients drawn with replacement.
  Every constant is certified (``theory/derivations.md``, section 5): the per-sample loss
  gradient is ``s_i a_i`` with ``|s_i| < 1``, so ``sigma^2 <= mean_i ||a_i||^2 / b``, every
  coordinate of a stochastic gradient is within ``max_i |a_ij| + (3 sqrt 3/8) lam`` of zero and
  within ``2 max_i |a_ij|`` of the full gradient's. ``hetero=True`` gives each worker its own
  shard, sorted by the first feature, so workers see different distributions.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kstep_adam._validation import check_choice
from kstep_adam._validation import check_float
from kstep_adam._validation import check_int
from theory import estimators

__all__ = ["SeparableCosine", "NonconvexLogistic"]


def _min_h(a: float) -> float:
  """Return min over x of x^2/2 + a cos x (Newton from the global-minimum basin)."""
  if a <= 1.0:
    return a  # convex per coordinate; the minimum is at x = 0.
  x = 2.0 * math.sqrt(a)  # right of the positive root of x = a sin x
  x = min(x, math.pi)
  for _ in range(100):
    x -= (x - a * math.sin(x)) / (1.0 - a * math.cos(x))
  return min(0.5 * x * x + a * math.cos(x), a)


class SeparableCosine:
  """``f(x) = sum_i (x_i^2/2 + a cos x_i)`` with controllable gradient noise."""

  def __init__(
    self,
    *,
    d: int = 32,
    a: float = 2.0,
    noise_std: float = 1.0,
    noise: str = "gaussian",
    hetero: float = 0.0,
    x0_scale: float = 3.0,
  ):
    check_int(d, "d")
    check_choice(noise, "noise", ("gaussian", "uniform"))
    for name, value in (("a", a), ("noise_std", noise_std), ("hetero", hetero)):
      check_float(value, name, low=0.0)
    self.d, self.a, self.noise_std, self.noise, self.hetero = d, a, noise_std, noise, hetero
    # Coordinates spread over several basins, none exactly at a stationary point.
    self.x0 = jnp.asarray(np.linspace(-x0_scale, x0_scale, d) + 0.05, jnp.float32)
    self.L = 1.0 + a  # exact: |1 - a cos x| <= 1 + a
    self.tau = max(a - 1.0, 0.0)  # exact weak-convexity constant
    self.f_star = d * _min_h(a)  # exact (separable 1-D minimum)
    self.sigma2 = d * noise_std**2  # exact per-worker variance
    # Uniform on [-sqrt(3) s, sqrt(3) s] is bounded. A Gaussian is not: 4 s is only a
    # quantile (about 6 in 10^5 coordinate draws exceed it), so it is an estimate.
    self.sigma_inf = math.sqrt(3) * noise_std if noise == "uniform" else 4 * noise_std
    self.sigma_inf_exact = noise == "uniform"
    self.delta = float(self.f(self.x0)) - self.f_star

  def f(self, x_D: jax.Array) -> jax.Array:
    return jnp.sum(0.5 * x_D**2 + self.a * jnp.cos(x_D))

  def grad(self, x_D: jax.Array) -> jax.Array:
    return x_D - self.a * jnp.sin(x_D)

  def shift(self, w: jax.Array, num_workers: int) -> jax.Array:
    """Worker ``w``'s gradient shift ``b_w``; ``sum_w b_w = 0`` for ``N >= 2``."""
    if num_workers == 1 or self.hetero == 0:
      return jnp.zeros(self.d)
    i = jnp.arange(self.d)
    return self.hetero * jnp.cos(2 * jnp.pi * (w / num_workers + i / self.d))

  def stoch_grad(self, x_D, key, w, num_workers: int) -> jax.Array:
    if self.noise == "gaussian":
      xi = jax.random.normal(key, (self.d,))
    else:
      xi = jax.random.uniform(key, (self.d,), minval=-math.sqrt(3), maxval=math.sqrt(3))
    return self.grad(x_D) + self.noise_std * xi - self.shift(w, num_workers)

  def describe(self) -> dict[str, Any]:
    return dict(
      kind="separable",
      d=self.d,
      a=self.a,
      noise_std=self.noise_std,
      noise=self.noise,
      hetero=self.hetero,
      L=self.L,
      L_source="exact",
      tau=self.tau,
      sigma2=self.sigma2,
      sigma2_source="exact",
      sigma_inf=self.sigma_inf,
      sigma_inf_source="exact" if self.sigma_inf_exact else "4 std: a Gaussian quantile",
      delta=self.delta,
      delta_source="exact f*",
      certified=dict(L=True, sigma2=True, delta=True, sigma_inf=self.sigma_inf_exact),
      # grad f = x - a sin x is unbounded, so no bound holds everywhere.
      grad_inf_bound=None,
      grad_norm_bound=None,
      stoch_grad_inf_bound=None,
      heterogeneity=0.5 * self.d * self.hetero**2,
    )


class NonconvexLogistic:
  """Logistic regression + ``lam sum x^2/(1+x^2)`` on a fixed synthetic data set."""

  def __init__(
    self,
    *,
    n: int = 512,
    d: int = 16,
    lam: float = 0.1,
    batch_size: int = 8,
    hetero: bool = False,
    seed: int = 0,
  ):
    for name, value in (("n", n), ("d", d), ("batch_size", batch_size)):
      check_int(value, name)
    check_float(lam, "lam", low=0.0)
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d)) / math.sqrt(d) * 2.0
    w_true = rng.normal(size=d)
    y = np.sign(A @ w_true + 0.5 * rng.normal(size=n))
    if hetero:  # shards by the first feature: workers see different distributions
      order = np.argsort(A[:, 0])
      A, y = A[order], y[order]
    self.n, self.d, self.lam, self.batch_size, self.hetero = n, d, lam, batch_size, hetero
    self.A_nxD = jnp.asarray(A, jnp.float32)
    self.y_n = jnp.asarray(y, jnp.float32)
    self.x0 = jnp.asarray(rng.normal(size=d) * 2.0, jnp.float32)
    # Upper bound: logistic Hessian <= A^T A/(4n); |d2/dx2 x^2/(1+x^2)| <= 2.
    self.L = float(np.linalg.norm(A, 2) ** 2 / (4 * n) + 2 * lam)
    self.tau = 0.5 * lam  # min of d2/dx2 x^2/(1+x^2) = (2-6x^2)/(1+x^2)^3 is -1/2
    self.f_lower = 0.0
    self.delta = float(self.f(self.x0))  # upper bound on f(x0) - f* (f* >= 0)
    # Certified (derivations.md, section 5): per-sample loss gradients are s_i a_i, |s_i| < 1.
    reg_grad_max = 3 * math.sqrt(3) / 8 * lam  # max |d/dx lam x^2/(1+x^2)|, at x = 1/sqrt(3)
    self.sigma2 = float(np.mean(np.sum(A**2, axis=1)) / batch_size)
    self.sigma_inf = float(2 * np.max(np.abs(A)))
    self.grad_inf_bound = float(np.max(np.mean(np.abs(A), axis=0)) + reg_grad_max)
    self.grad_norm_bound = float(np.mean(np.linalg.norm(A, axis=1)) + reg_grad_max * math.sqrt(d))
    self.stoch_grad_inf_bound = float(np.max(np.abs(A)) + reg_grad_max)
    # The estimate the certified sigma2 replaces, kept to show how loose it is.
    pts = jnp.stack([self.x0, 0.5 * self.x0, jnp.zeros(d)])
    stats = estimators.gradient_noise_stats(
      self.per_sample_grads, self.grad, pts, batch_size=batch_size
    )
    self.sigma2_estimate = float(stats.sigma2)

  def _loss_i(self, x_D, a_D, y):
    return jax.nn.softplus(-y * jnp.dot(a_D, x_D))

  def _reg(self, x_D):
    return self.lam * jnp.sum(x_D**2 / (1 + x_D**2))

  def f(self, x_D):
    return jnp.mean(jax.vmap(self._loss_i, (None, 0, 0))(x_D, self.A_nxD, self.y_n)) + self._reg(
      x_D
    )

  def grad(self, x_D):
    return jax.grad(self.f)(x_D)

  def per_sample_grads(self, x_D):
    g_loss = jax.vmap(jax.grad(self._loss_i), (None, 0, 0))(x_D, self.A_nxD, self.y_n)
    return g_loss + jax.grad(self._reg)(x_D)[None, :]

  def stoch_grad(self, x_D, key, w, num_workers: int):
    if self.hetero and num_workers > 1:
      shard = self.n // num_workers
      idx = w * shard + jax.random.randint(key, (self.batch_size,), 0, shard)
    else:
      idx = jax.random.randint(key, (self.batch_size,), 0, self.n)
    batch = jax.vmap(jax.grad(self._loss_i), (None, 0, 0))(x_D, self.A_nxD[idx], self.y_n[idx])
    return jnp.mean(batch, 0) + jax.grad(self._reg)(x_D)

  def describe(self) -> dict[str, Any]:
    return dict(
      kind="logistic",
      n=self.n,
      d=self.d,
      lam=self.lam,
      batch_size=self.batch_size,
      hetero=self.hetero,
      L=self.L,
      L_source="upper bound ||A||^2/(4n) + 2 lam",
      tau=self.tau,
      sigma2=self.sigma2,
      sigma2_source="upper bound mean_i ||a_i||^2 / b",
      sigma2_estimate=self.sigma2_estimate,
      sigma_inf=self.sigma_inf,
      sigma_inf_source="upper bound 2 max |a_ij|",
      delta=self.delta,
      delta_source="f(x0) - 0 (upper bound, f >= 0)",
      certified=dict(L=True, sigma2=True, delta=True, sigma_inf=True),
      grad_inf_bound=self.grad_inf_bound,
      grad_norm_bound=self.grad_norm_bound,
      stoch_grad_inf_bound=self.stoch_grad_inf_bound,
    )
