r"""Cheng & Glasgow's Local Adam and Minibatch Adam rates, with one explicit constant ``C``.

"Convergence of Distributed Adaptive Optimization with Local Updates", ICLR 2025,
https://arxiv.org/abs/2409.13155. The published bounds are high-probability ``O~(.)``
statements with **unspecified absolute constants and log factors**, so this module implements
their *shape* times a single constant ``C`` that an experiment must calibrate on some runs and
test on others. Nothing here is a certified upper bound, and the shape predicts no finite-range
slope in ``T`` (see :mod:`theory.asymptotics`).

Algorithm covered (their Algorithm 1, and only this one): per worker,
``g <- clip(g, rho)`` coordinate-wise; ``u <- beta1 u + (1-beta1) g``;
``v <- beta2 v + (1-beta2) g^2``; ``x <- x - eta u / sqrt(v + lambda^2)``; no bias correction,
``lambda`` inside the root; every ``K`` steps the ``M`` workers average **x, u and v**. It does
not cover parameter-only averaging, bias-corrected Adam, or ``eps`` outside the root
(``theory/derivations.md``, section 3). Minibatch Adam is the same update applied once per
round to a gradient averaged over ``K M`` samples.

Their Theorem 3 (eq. 4.10), for ``tau``-weakly convex, ``L``-smooth ``f`` with
``Delta = f(x_0) - f*``, noise with bounded coordinate-wise ``alpha``-th moments
``sigma_i`` (``alpha >= 4``; ``sigma = ||(sigma_i)||_2``, ``sigma_inf = max_i sigma_i``),
``T = K R`` steps per worker and ``H_r = diag(sqrt(v_r + lambda^2))``:

.. math::
    \frac{\lambda}{KR}\sum_{r,k} \|\nabla f(\bar z_{r,k})\|^2_{H_r^{-1}} = \tilde O\Big(
    \frac{\tau \Delta}{R} + \frac{L\Delta}{KR} + \sqrt{\frac{L\Delta\sigma^2}{MKR}}
    + \frac{(L\Delta\sigma)^{2/3}}{K^{1/3}R^{2/3}} + \text{clipping term}\Big),

at the auxiliary average ``zbar_{r,k+1} = xbar_{r,k+1} + beta1/(1-beta1)(xbar_{r,k+1} -
xbar_{r,k})`` (eq. 4.8), and Minibatch Adam's (eq. 4.11) is
``O~(L Delta / R + sqrt(L Delta sigma^2 / (M K R)))`` on the same left-hand side. Conditions:
``1 - beta1 = Omega(1)``, ``K >~ log(MKR/delta)``, ``1 - beta2 = O~(K^{-3/2} R^{-1/2})``
(eq. 4.9) and, from the lemmas (eq. C.20), ``eta/lambda <~ min(1/(K tau), (1-beta1)^2/L)``.
The logs the ``O~`` hides are written out in their eq. (C.27): ``log^{1/4}`` on the
statistical term, ``log^{1/3}`` on the local-step term.

The left-hand side is a ``lambda H^{-1}``-weighted norm. Since ``||g||^2 <= max_i (H_r)_ii
||g||^2_{H_r^{-1}}`` and ``(H_r)_ii = sqrt(v_{r,i} + lambda^2) <= lambda + max|g_i|``, the plain
``(1/T) sum ||grad f(zbar)||^2`` that the experiment measures is at most
``(1 + (G_inf + sigma_inf)/lambda)`` times it when every stochastic coordinate satisfies
``|g_i| <= G_inf + sigma_inf`` (or ``1 + rho/lambda`` with clipping at ``rho``); derived here,
``theory/derivations.md`` section 4. Both rates below carry that factor, so their ratio is the
comparison the paper makes.

Provenance: checked against the paper's text (arXiv 2409.13155v2 as rendered in a public
repository that the project's search tool indexes): Algorithm 1, eqs. (4.8)-(4.11), and
Appendix C, Theorem 1 (C.13-C.23), Theorem 2 (C.25-C.27) and Theorem 3. ``tau = L`` is always
allowed (``L``-smoothness implies ``L``-weak convexity, their remark after Assumption 5).
"""

from __future__ import annotations

import math

from theory._checks import check_count
from theory._checks import check_positive
from theory._checks import check_unit_interval

__all__ = [
  "local_adam_condition_ratios",
  "local_adam_conditions",
  "local_adam_rate",
  "minibatch_adam_rate",
]


def _prefactor(lam: float, G_inf: float, sigma_inf: float) -> float:
  """``1 + (G_inf + sigma_inf)/lam``: from the ``lambda H^{-1}`` norm to the plain one."""
  return 1.0 + (G_inf + sigma_inf) / lam


def local_adam_condition_ratios(
  *,
  beta1: float,
  beta2: float,
  eta: float,
  K: int,
  R: int,
  lam: float,
  L: float,
  tau: float | None = None,
  beta1_max: float = 0.9,
) -> dict[str, float]:
  r"""Return, per condition of the theorem, the ratio of the value to its allowed maximum.

  The hidden constants are unknown, so each condition is written with constant 1; a ratio
  ``<= 1`` means the condition holds with that constant, and the ratio says by how much a run
  misses it otherwise:

  .. math::
      \frac{\beta_1}{\beta_{1,\max}},\qquad
      \frac{1 - \beta_2}{K^{-3/2} R^{-1/2}},\qquad
      \frac{\eta/\lambda}{\min(1/(K\tau),\ (1-\beta_1)^2/L)}.

  Minibatch Adam is the case ``K = 1`` with ``R`` steps.

  Args:
    beta1: first-moment decay, in ``[0, 1)``.
    beta2: second-moment decay, in ``(0, 1)``.
    eta: step size.
    K: local steps per round.
    R: number of rounds.
    lam: ``lambda``, the damping inside the root.
    L: smoothness constant.
    tau: weak-convexity constant; None means ``tau = L``.
    beta1_max: the constant standing in for ``1 - beta1 = Omega(1)``.

  Returns:
    ``{'beta1': ..., 'beta2': ..., 'eta': ...}``.

  Examples:
    >>> r = local_adam_condition_ratios(beta1=0.0, beta2=0.99, eta=1e-3, K=1, R=100, lam=1.0,
    ...                                 L=1.0)
    >>> [round(v, 6) for v in r.values()]
    [0.0, 0.1, 0.001]
  """
  check_unit_interval("beta1", beta1, closed_low=True, closed_high=False)
  check_unit_interval("beta2", beta2, closed_low=False, closed_high=False)
  check_positive("eta", eta)
  check_count("K", K)
  check_count("R", R)
  check_positive("lam", lam)
  check_positive("L", L)
  check_positive("beta1_max", beta1_max)
  tau = L if tau is None else check_positive("tau", tau, allow_zero=True)
  eta_max_over_lam = min((1 - beta1) ** 2 / L, math.inf if tau == 0 else 1 / (K * tau))
  return dict(
    beta1=beta1 / beta1_max,
    beta2=(1 - beta2) * K**1.5 * R**0.5,
    eta=eta / lam / eta_max_over_lam,
  )


def local_adam_conditions(
  *,
  beta1: float,
  beta2: float,
  eta: float,
  K: int,
  R: int,
  lam: float,
  L: float,
  tau: float | None = None,
  beta1_max: float = 0.9,
  c_beta2: float = 1.0,
  c_eta: float = 1.0,
) -> None:
  r"""Raise ``ValueError`` unless the hyperparameters meet the theorem's conditions.

  Checks :func:`local_adam_condition_ratios` against explicit, user-visible constants:
  ``beta1 <= beta1_max``, ``1 - beta2 <= c_beta2 K^{-3/2} R^{-1/2}`` and
  ``eta/lambda <= c_eta min(1/(K tau), (1-beta1)^2/L)``.

  Args:
    beta1: first-moment decay, in ``[0, 1)``.
    beta2: second-moment decay, in ``(0, 1)``.
    eta: step size.
    K: local steps per round.
    R: number of rounds.
    lam: ``lambda``.
    L: smoothness constant.
    tau: weak-convexity constant; None means ``tau = L``.
    beta1_max: the constant standing in for ``1 - beta1 = Omega(1)``.
    c_beta2: the constant in the ``beta2`` condition.
    c_eta: the constant in the ``eta`` condition.

  Raises:
    ValueError: naming the violated condition and the allowed range.
  """
  ratios = local_adam_condition_ratios(
    beta1=beta1, beta2=beta2, eta=eta, K=K, R=R, lam=lam, L=L, tau=tau, beta1_max=beta1_max
  )
  check_positive("c_beta2", c_beta2)
  check_positive("c_eta", c_eta)
  if ratios["beta1"] > 1:
    raise ValueError(
      f"beta1={beta1!r} violates 1 - beta1 = Omega(1); allowed: beta1 <= beta1_max={beta1_max!r}"
    )
  if ratios["beta2"] > c_beta2:
    beta2_min = 1.0 - c_beta2 * K**-1.5 * R**-0.5
    raise ValueError(
      f"beta2={beta2!r} violates 1 - beta2 <= c_beta2 K^-3/2 R^-1/2; allowed: "
      f"beta2 >= {beta2_min!r} for K={K}, R={R}, c_beta2={c_beta2!r}"
    )
  if ratios["eta"] > c_eta:
    eta_max = eta * c_eta / ratios["eta"]
    raise ValueError(
      f"eta={eta!r} violates eta/lambda <= c_eta min(1/(K tau), (1-beta1)^2/L); allowed: "
      f"eta <= {eta_max!r} for lambda={lam!r}, K={K}, L={L!r}, c_eta={c_eta!r}"
    )


def _clip_term(rho: float | None, G_inf: float, sigma_inf: float, clip_term: float | None) -> float:
  if clip_term is not None:
    return check_positive("clip_term", clip_term, allow_zero=True)
  if rho is not None and rho < G_inf + sigma_inf:
    raise ValueError(
      f"rho={rho!r} < G_inf + sigma_inf = {G_inf + sigma_inf!r}: clipping can act, "
      "so the clipping term is not zero; pass clip_term explicitly (allowed without "
      "it: rho=None or rho >= G_inf + sigma_inf)"
    )
  return 0.0


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
  r"""Return ``C`` times the shape of Cheng & Glasgow's Local Adam rate, in the plain norm.

  .. math::
      C \Big(1 + \frac{G_\infty + \sigma_\infty}{\lambda}\Big)
      \Big[\frac{\tau \Delta K}{T} + \frac{L\Delta}{T} + \sqrt{\frac{L\Delta\sigma^2}{NT}}
      + \frac{(L\Delta\sigma)^{2/3} K^{1/3}}{T^{2/3}}\Big] + \text{clipping term}

  (their eq. 4.10 with ``R = T/K`` and ``M = N``, converted to ``(1/T) sum ||grad f(zbar)||^2``
  as in the module docstring). At ``K = 1`` the ``K`` terms are lower order than the
  statistical term, so the rate reduces to the minibatch rate with ``N``-sample gradients.

  Args:
    T: steps per worker (``K R``).
    N: number of workers (``M`` in the paper).
    K: local steps per round.
    L: smoothness constant.
    delta: ``f(x_0) - f*``.
    sigma: noise bound ``||(sigma_i)||_2``; the paper's is an ``alpha``-th moment bound
      (``alpha >= 4``), so passing the standard deviation only changes ``C``.
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

  Examples:
    >>> round(local_adam_rate(T=100, N=1, K=1, L=1.0, delta=1.0, sigma=0.0, lam=1.0), 6)
    0.02

  References:
    Cheng & Glasgow, https://arxiv.org/abs/2409.13155, Theorem 3 (eq. 4.10); checked
    against the text (module docstring).
  """
  check_count("T", T)
  check_count("N", N)
  check_count("K", K)
  for name, value in (("L", L), ("delta", delta), ("lam", lam), ("C", C)):
    check_positive(name, value)
  for name, value in (("sigma", sigma), ("G_inf", G_inf), ("sigma_inf", sigma_inf)):
    check_positive(name, value, allow_zero=True)
  if rho is not None:
    check_positive("rho", rho)
  tau = L if tau is None else check_positive("tau", tau, allow_zero=True)
  clip = _clip_term(rho, G_inf, sigma_inf, clip_term)
  bracket = (
    tau * delta * K / T
    + L * delta / T
    + math.sqrt(L * delta * sigma**2 / (N * T))
    + (L * delta * sigma) ** (2 / 3) * K ** (1 / 3) / T ** (2 / 3)
  )
  return C * _prefactor(lam, G_inf, sigma_inf) * bracket + clip


def minibatch_adam_rate(
  *,
  R: int,
  N: int,
  K: int,
  L: float,
  delta: float,
  sigma: float,
  lam: float,
  G_inf: float = 0.0,
  sigma_inf: float = 0.0,
  C: float = 1.0,
) -> float:
  r"""Return ``C`` times the shape of Cheng & Glasgow's Minibatch Adam rate, in the plain norm.

  Minibatch Adam takes ``R`` steps of Algorithm 1's update, each on a gradient averaged over
  ``K N`` samples (the same sample budget as ``R`` rounds of Local Adam):

  .. math:: C \Big(1 + \frac{G_\infty + \sigma_\infty}{\lambda}\Big)
     \Big[\frac{L\Delta}{R} + \sqrt{\frac{L \Delta \sigma^2}{N K R}}\Big]

  (their eq. 4.11, with the same conversion factor as :func:`local_adam_rate`, so the ratio
  of the two is the paper's comparison).

  Args:
    R: number of (communication) steps.
    N: number of workers.
    K: samples per worker per step.
    L: smoothness constant.
    delta: ``f(x_0) - f*``.
    sigma: noise bound (as in :func:`local_adam_rate`).
    lam: ``lambda``, the damping inside the square root.
    G_inf: coordinate-wise gradient bound along the run.
    sigma_inf: coordinate-wise noise bound.
    C: the absolute constant (unknown in the paper).

  Returns:
    The rate's value.

  Examples:
    >>> round(minibatch_adam_rate(R=100, N=1, K=1, L=1.0, delta=1.0, sigma=0.0, lam=1.0), 6)
    0.01

  References:
    Cheng & Glasgow, https://arxiv.org/abs/2409.13155, eq. (4.11); checked against the text.
  """
  check_count("R", R)
  check_count("N", N)
  check_count("K", K)
  for name, value in (("L", L), ("delta", delta), ("lam", lam), ("C", C)):
    check_positive(name, value)
  for name, value in (("sigma", sigma), ("G_inf", G_inf), ("sigma_inf", sigma_inf)):
    check_positive(name, value, allow_zero=True)
  bracket = L * delta / R + math.sqrt(L * delta * sigma**2 / (N * K * R))
  return C * _prefactor(lam, G_inf, sigma_inf) * bracket
