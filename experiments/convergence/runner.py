"""Simulate N workers of one variant and log the gradient norm at the replica average.

One jitted program runs a grid of step sizes ``E`` x seeds ``S`` x workers ``N``:
``vmap`` over step sizes and seeds, ``vmap(..., axis_name='w')`` over workers (so the
optimizers' ``pmean`` merges work with any ``N``), ``lax.scan`` over the ``T`` steps.

Logged at every step ``t = 0 .. T-1``, *before* the step-``t`` update (as in the bounds):

* ``||grad f(xbar_t)||^2`` at the replica average (virtual between merges);
* ``||grad f(zbar_t)||^2`` at Cheng & Glasgow's ``zbar_t = xbar_t + beta1/(1-beta1)
  (xbar_t - xbar_{t-1})`` (``zbar_0 = xbar_0``);
* the replica spread ``(1/N) sum_w ||x_w - xbar||^2``;
* ``||grad f(xbar_t)||_inf`` (for ``G_inf``).

Returned per (step size, seed): the time averages over all ``T`` steps, the average of
``||grad f(xbar_t)||^2`` with Défossez et al.'s ``tau`` weights, and the max of
``||grad f||_inf``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import theory
from experiments.convergence.variants import Variant
from kstep_adam._validation import check_int

__all__ = ["run_grid", "adam_beta2"]


def adam_beta2(T: int, k: int, cap: float) -> float:
  """``1 - min(cap, k^{-3/2} R^{-1/2})``, ``R = T/k``: Cheng & Glasgow's eq. (4.9) with c = 1.

  Examples:
    >>> adam_beta2(1024, 4, cap=1e-2)
    0.9921875
  """
  R = max(T // k, 1)
  return 1.0 - min(cap, k**-1.5 * R**-0.5)


def run_grid(
  problem,
  variant: Variant,
  *,
  T: int,
  N: int,
  k: int,
  etas,
  num_seeds: int,
  beta2: float,
  seed: int = 0,
  curves: bool = False,
) -> dict[str, np.ndarray]:
  """Run ``variant`` for every step size in ``etas`` and every seed; return NumPy results.

  Args:
    problem: a problem from :mod:`experiments.convergence.problems`.
    variant: the algorithm (:mod:`experiments.convergence.variants`).
    T: steps per worker.
    N: number of simulated workers.
    k: merge period (the variants without local steps ignore it).
    etas: step sizes, shape ``[E]``.
    num_seeds: independent noise seeds ``S``.
    beta2: second-moment decay for the Adam variants.
    seed: base PRNG seed.
    curves: also return ``grad_norm2_xbar_ExSxT``, ``||grad f(xbar_t)||^2`` at every step
      (what a sweep plots against the step).

  Returns:
    ``gap_xbar_ExS``, ``gap_zbar_ExS``, ``gap_tau_ExS``, ``spread_ExS`` and ``ginf_ExS``;
    a diverged run has an infinite gap.
  """
  for name, value in (("T", T), ("N", N), ("k", k), ("num_seeds", num_seeds)):
    check_int(value, name)
  etas_E = jnp.asarray(etas, jnp.float32)
  c_z = variant.beta1 / (1.0 - variant.beta1)
  tau_weights_T = jnp.asarray(theory.defossez_tau_weights(T, variant.beta1), jnp.float32)
  workers_N = jnp.arange(N)

  def one_run(eta, key):
    tx = variant.make(lambda count: eta, k, beta2)
    x_NxD = jnp.broadcast_to(problem.x0, (N, problem.d))
    state = jax.vmap(tx.init)(x_NxD)

    def worker_step(x_D, opt_state, key_t, w):
      g_D = problem.stoch_grad(x_D, jax.random.fold_in(key_t, w), w, N)
      updates, opt_state = tx.update(g_D, opt_state, x_D)
      return optax.apply_updates(x_D, updates), opt_state

    def body(carry, t):
      x_NxD, opt_state, xbar_prev = carry
      xbar = jnp.mean(x_NxD, 0)
      zbar = xbar + c_z * (xbar - xbar_prev)
      g_x = problem.grad(xbar)
      g_z = problem.grad(zbar)
      logs = (
        jnp.sum(g_x**2),
        jnp.sum(g_z**2),
        jnp.mean(jnp.sum((x_NxD - xbar) ** 2, -1)),
        jnp.max(jnp.abs(g_x)),
      )
      key_t = jax.random.fold_in(key, t)
      x_NxD, opt_state = jax.vmap(worker_step, axis_name="w", in_axes=(0, 0, None, 0))(
        x_NxD, opt_state, key_t, workers_N
      )
      return (x_NxD, opt_state, xbar), logs

    _, (gx_T, gz_T, spread_T, ginf_T) = jax.lax.scan(
      body, (x_NxD, state, problem.x0), jnp.arange(T)
    )
    out = dict(
      gap_xbar=jnp.mean(gx_T),
      gap_zbar=jnp.mean(gz_T),
      gap_tau=jnp.sum(tau_weights_T * gx_T),
      spread=jnp.mean(spread_T),
      ginf=jnp.max(ginf_T),
    )
    if curves:
      out["grad_norm2_xbar"] = gx_T
    return out

  keys_S = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(seed), s))(
    jnp.arange(num_seeds)
  )
  grid = jax.jit(jax.vmap(jax.vmap(one_run, in_axes=(None, 0)), in_axes=(0, None)))
  out = jax.device_get(grid(etas_E, keys_S))
  result: dict[str, Any] = {f"{name}_ExS": np.array(v, np.float64) for name, v in out.items()}
  if curves:
    result["grad_norm2_xbar_ExSxT"] = result.pop("grad_norm2_xbar_ExS")
  for name in ("gap_xbar_ExS", "gap_zbar_ExS", "gap_tau_ExS"):
    result[name][~np.isfinite(result[name])] = math.inf
  return result
