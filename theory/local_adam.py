r"""Cheng & Glasgow's Local Adam rate, with one explicit constant ``C``.

The published bound (arXiv 2409.13155, ICLR'25) is a high-probability
``O~(.)`` statement with **unspecified absolute constants and log factors**, so
this module implements its *shape* times a single constant ``C`` that an
experiment must calibrate on some runs and test on others. Nothing here is a
certified upper bound. The statement, as summarized in ``docs/design.md`` §3
(the search tool returned the abstract only, so the exact theorem and equation
numbers could not be re-checked here):

.. math::
    \frac1T\sum_t \|\nabla f(\bar z_t)\|^2 \lesssim
    \Big(1 + \frac{G_\infty + \sigma_\infty}{\lambda}\Big)
    \Big[\frac{\tau \Delta K}{T} + \frac{L\Delta}{T}
    + \sqrt{\frac{L\Delta\sigma^2}{NT}}
    + \frac{(L\Delta\sigma)^{2/3} K^{1/3}}{T^{2/3}}\Big] + \text{clipping term},

at the auxiliary average ``zbar_{t+1} = xbar_{t+1} + beta1/(1-beta1) (xbar_{t+1} - xbar_t)``,
with ``T = K R`` steps per worker. ``tau`` is the weak-convexity constant;
``tau = L`` gives the general non-convex case.

Algorithm covered (and only this one): per worker, ``g <- clip(g, rho)``
coordinate-wise; ``u <- beta1 u + (1-beta1) g``; ``v <- beta2 v + (1-beta2) g^2``;
``x <- x - eta u / sqrt(v + lambda^2)``; no bias correction, ``lambda`` inside
the root; every ``K`` steps the workers average **x, u and v**. It does not
cover parameter-only averaging, bias-corrected Adam, or ``eps`` outside the
root (see ``theory/derivations.md``, section 3).

Conditions (checked by :func:`local_adam_conditions` with explicit stand-in
constants): ``1 - beta1 = Omega(1)``, ``1 - beta2 = O~(K^{-3/2} R^{-1/2})``,
``eta = O~(1/sqrt T)``. Clipping: :func:`local_adam_rate` takes the clipping
term as 0 only when clipping cannot act (``rho >= G_inf + sigma_inf``, or no
clipping); otherwise the caller must supply it, because the paper's clipping
term (a heavy-tail bias depending on ``rho`` and the noise moments) is not
reproduced here.
"""

from __future__ import annotations

import math

from theory._checks import check_count
from theory._checks import check_positive

__all__ = [
  "local_adam_conditions",
  "local_adam_rate",
  "minibatch_adam_rate",
]


def local_adam_conditions(
  *,
  beta1: float,
  beta2: float,
  eta: float,
  K: int,
  R: int,
  beta1_max: float = 0.9,
  c_beta2: float = 1.0,
  c_eta: float = 1.0,
) -> None:
  r"""Raise ``ValueError`` unless the hyperparameters meet the theorem's conditions.

  The theorem asks for ``1 - beta1 = Omega(1)``,
  ``1 - beta2 = O~(K^{-3/2} R^{-1/2})`` and ``eta = O~(1/sqrt(T))``. The hidden
  constants are unknown, so each condition is checked against an explicit,
  user-visible constant:

  .. math::
      \beta_1 \le \beta_{1,\max},\quad
      1 - \beta_2 \le c_{\beta_2} K^{-3/2} R^{-1/2},\quad
      \eta \le c_\eta / \sqrt{KR}.

  Args:
    beta1: first-moment decay, in ``[0, 1)``.
    beta2: second-moment decay, in ``(0, 1)``.
    eta: step size.
    K: local steps per round.
    R: number of rounds.
    beta1_max: the constant standing in for ``1 - beta1 = Omega(1)``.
    c_beta2: the constant in the ``beta2`` condition.
    c_eta: the constant in the ``eta`` condition.

  Raises:
    ValueError: naming the violated condition and the allowed range.
  """
  check_count("K", K)
  check_count("R", R)
  check_positive("eta", eta)
  if not 0.0 <= beta1 < 1.0:
    raise ValueError(f"beta1 must be in [0, 1), got {beta1!r}")
  if not 0.0 < beta2 < 1.0:
    raise ValueError(f"beta2 must be in (0, 1), got {beta2!r}")
  if beta1 > beta1_max:
    raise ValueError(
      f"beta1={beta1!r} violates 1 - beta1 = Omega(1); allowed: beta1 <= beta1_max={beta1_max!r}"
    )
  beta2_min = 1.0 - c_beta2 * K**-1.5 * R**-0.5
  if beta2 < beta2_min:
    raise ValueError(
      f"beta2={beta2!r} violates 1 - beta2 <= c_beta2 K^-3/2 R^-1/2;"
      f" allowed: beta2 >= {beta2_min!r} for K={K}, R={R}, "
      f"c_beta2={c_beta2!r}"
    )
  eta_max = c_eta / math.sqrt(K * R)
  if eta > eta_max:
    raise ValueError(
      f"eta={eta!r} violates eta <= c_eta/sqrt(T); allowed: "
      f"eta <= {eta_max!r} for T={K * R}, c_eta={c_eta!r}"
    )


def local_adam_rate(
  *,
  T: int,
  N: int,
  K: int,
  L: float,
  delta: float,
  sigma: float,
  lam: float,
  G_inf: float = 0.0,
  sigma_inf: float = 0.0,
  tau: float | None = None,
  C: float = 1.0,
  rho: float | None = None,
  clip_term: float | None = None,
) -> float:
  r"""Return ``C`` times the shape of Cheng & Glasgow's Local Adam rate.

  See the module docstring for the formula and the algorithm it covers. At
  ``K = 1`` the ``K`` terms become ``tau Delta / T`` and
  ``(L Delta sigma)^{2/3} / T^{2/3}``, both lower order than
  ``sqrt(L Delta sigma^2 / (N T))``, so the rate reduces to the minibatch
  rate with ``N``-sample gradients.

  Args:
    T: steps per worker (``K R``).
    N: number of workers.
    K: local steps per round.
    L: smoothness constant.
    delta: ``f(x_0) - f*``.
    sigma: noise standard-deviation bound (``sigma^2`` bounds the variance).
    lam: ``lambda``, the damping inside the square root.
    G_inf: coordinate-wise gradient bound along the run.
    sigma_inf: coordinate-wise noise bound.
    tau: weak-convexity constant; ``None`` means ``tau = L`` (general non-convex).
    C: the single absolute constant standing in for the ``O~``.
    rho: the coordinate-wise clipping threshold; None means no clipping.
    clip_term: the clipping-bias term. When None it is 0, which is exact only if
      clipping never acts: ``rho`` is None or ``rho >= G_inf + sigma_inf`` (then
      every stochastic coordinate satisfies ``|g_i| <= rho`` and ``clip(g) = g``).
      With an active threshold the paper's clipping term is not reproduced here, so
      the caller must supply it.

  Returns:
    ``C * (1 + (G_inf + sigma_inf)/lam) * [...] + clip_term``.

  References:
    Cheng & Glasgow, "Convergence of Distributed Adaptive Optimization with
    Local Updates", https://arxiv.org/abs/2409.13155 (main Local Adam theorem;
    the constants are unspecified there).
  """
  check_count("T", T)
  check_count("N", N)
  check_count("K", K)
  for name, value in (("L", L), ("delta", delta), ("lam", lam), ("C", C)):
    check_positive(name, value)
  for name, value in (("sigma", sigma), ("G_inf", G_inf), ("sigma_inf", sigma_inf)):
    check_positive(name, value, allow_zero=True)
  if clip_term is not None:
    check_positive("clip_term", clip_term, allow_zero=True)
  if rho is not None:
    check_positive("rho", rho)
  tau = L if tau is None else tau
  check_positive("tau", tau, allow_zero=True)
  if clip_term is None:
    if rho is not None and rho < G_inf + sigma_inf:
      raise ValueError(
        f"rho={rho!r} < G_inf + sigma_inf = {G_inf + sigma_inf!r}: clipping can act, "
        "so the clipping term is not zero; pass clip_term explicitly (allowed without "
        "it: rho=None or rho >= G_inf + sigma_inf)"
      )
    clip_term = 0.0
  bracket = (
    tau * delta * K / T
    + L * delta / T
    + math.sqrt(L * delta * sigma**2 / (N * T))
    + (L * delta * sigma) ** (2 / 3) * K ** (1 / 3) / T ** (2 / 3)
  )
  return C * (1.0 + (G_inf + sigma_inf) / lam) * bracket + clip_term


def minibatch_adam_rate(
  *, R: int, N: int, K: int, L: float, delta: float, sigma: float, C: float = 1.0
) -> float:
  r"""Return ``C`` times the Minibatch Adam baseline rate of Cheng & Glasgow.

  Minibatch Adam takes ``R`` steps, each on a gradient averaged over ``K N``
  samples (the same sample budget as ``R`` rounds of Local Adam):

  .. math:: C \Big[\frac{L\Delta}{R} + \sqrt{\frac{L \Delta \sigma^2}{N K R}}\Big].

  Args:
    R: number of (communication) steps.
    N: number of workers.
    K: samples per worker per step.
    L: smoothness constant.
    delta: ``f(x_0) - f*``.
    sigma: noise standard-deviation bound.
    C: the absolute constant (unknown in the paper).

  Returns:
    The rate's value.
  """
  check_count("R", R)
  check_count("N", N)
  check_count("K", K)
  for name, value in (("L", L), ("delta", delta), ("C", C)):
    check_positive(name, value)
  check_positive("sigma", sigma, allow_zero=True)
  return C * (L * delta / R + math.sqrt(L * delta * sigma**2 / (N * K * R)))
