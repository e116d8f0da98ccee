r"""Centralized Adam with explicit constants: Défossez, Bottou, Bach & Usunier.

"A Simple Convergence Proof of Adam and Adagrad", TMLR 2022,
https://arxiv.org/abs/2003.02395. One worker, ``k = 1``.

The algorithm the theorems analyse (their Section 2.2, coordinate ``i``, step ``n``):

.. math::
    m_n = \beta_1 m_{n-1} + g_n,\quad v_n = \beta_2 v_{n-1} + g_n^2,\quad
    x_n = x_{n-1} - \alpha_n \frac{m_n}{\sqrt{\epsilon + v_n}},
    \qquad \alpha_n = \alpha (1-\beta_1)\sqrt{\textstyle\sum_{j=0}^{n-1}\beta_2^j}.

So ``m`` and ``v`` are *unnormalised* sums (no ``1 - beta`` factors), ``epsilon`` sits
**inside** the root, the momentum is not bias-corrected, and ``alpha_n`` plays the role of
the second-moment bias correction (their "Adam and its corrective terms").

Assumptions (their Section 2.3): ``F >= F*``; stochastic gradients bounded almost surely,
``||g||_inf <= R - sqrt(epsilon)``; ``grad F`` is ``L``-Lipschitz in the 2-norm; ``d`` is the
dimension. The bounds are on ``E||grad F(x_tau)||^2`` for a random index ``tau`` in
``{0..N-1}`` with ``P[tau = j] ∝ 1 - beta1^(N-j)`` (uniform for ``beta1 = 0``);
:func:`defossez_tau_weights` returns these weights, so a measured run is compared with the
same weighted average of its ``||grad F(x_j)||^2``.

Provenance (what was checked against which text): a copy of the TMLR text reachable through
the project's search tool (a Markdown rendering in a public repository, display equations
stripped) confirms the algorithm, the assumptions (``R >= sqrt(eps)``), the step sizes
``alpha_n`` of Theorems 2 and 4, the hypotheses ``0 < beta2 < 1``, ``0 <= beta1 < beta2``,
``N > beta1/(1-beta1)``, ``N~ = N - beta1/(1-beta1)``, the distribution of ``tau``, the
statement that Theorem 4 at ``beta1 = 0`` is Theorem 2 "up to a factor 3 in the terms of the
form ``dR^2``" (so 12 against 4), and, from the finite-horizon analysis,
``E = 4dR^2/sqrt(1-beta2) + alpha dRL/(1-beta2)`` of Theorem 2. The remaining displayed
constants (the third term of Theorem 4's ``E`` and the exact log term) could not be read in
that copy: they are transcribed from the published statement and are **not verified here**.
"""

from __future__ import annotations

import math

import numpy as np

from theory._checks import check_count
from theory._checks import check_positive
from theory._checks import check_unit_interval

__all__ = [
  "defossez_adam_bound",
  "defossez_adam_momentum_bound",
  "defossez_from_no_bias_correction",
  "defossez_tau_weights",
]


def _common(
  N: int, alpha: float, beta2: float, eps: float, d: int, R: float, L: float, delta: float
) -> None:
  check_count("N", N)
  check_count("d", d)
  check_unit_interval("beta2", beta2, closed_low=False, closed_high=False)
  for name, value in (("alpha", alpha), ("eps", eps), ("R", R), ("L", L), ("delta", delta)):
    check_positive(name, value)
  if math.sqrt(eps) >= R:
    raise ValueError(
      f"R must exceed sqrt(eps) (the gradient bound is R - sqrt(eps)), got R={R!r}, eps={eps!r}"
    )


def defossez_adam_bound(
  *, N: int, alpha: float, beta2: float, eps: float, d: int, R: float, L: float, delta: float
) -> float:
  r"""Return Défossez et al.'s Theorem 2 bound (Adam, ``beta1 = 0``).

  .. math::
      \mathbb E\|\nabla F(x_\tau)\|^2 \le \frac{2R\Delta}{\alpha N}
      + E\Big(\frac1N \ln\Big(1 + \frac{R^2}{(1-\beta_2)\epsilon}\Big)
      - \ln \beta_2\Big),\quad
      E = \frac{4 d R^2}{\sqrt{1-\beta_2}} + \frac{\alpha d R L}{1-\beta_2}.

  With ``alpha = c/sqrt(N)`` and ``1 - beta2 = 1/N`` (the paper's finite-horizon choice)
  every term is ``O(d ln N / sqrt N)``.

  Args:
    N: number of steps.
    alpha: base step size.
    beta2: second-moment decay, in ``(0, 1)``.
    eps: ``epsilon`` inside the root (paper's parametrisation).
    d: dimension.
    R: almost-sure bound: ``||g||_inf <= R - sqrt(eps)``.
    L: smoothness constant.
    delta: ``F(x_0) - F*`` (an upper bound keeps the bound valid).

  Returns:
    The right-hand side.

  Examples:
    >>> b = defossez_adam_bound(N=100, alpha=0.1, beta2=0.99, eps=1e-8, d=2, R=1.0, L=1.0,
    ...                         delta=1.0)
    >>> round(b, 3)
    24.231

  References:
    Défossez et al., TMLR 2022, https://arxiv.org/abs/2003.02395, Theorem 2 (eq. 11);
    see the module docstring for what was verified.
  """
  _common(N, alpha, beta2, eps, d, R, L, delta)
  E = 4 * d * R**2 / math.sqrt(1 - beta2) + alpha * d * R * L / (1 - beta2)
  log_term = math.log(1 + R**2 / ((1 - beta2) * eps)) / N - math.log(beta2)
  return 2 * R * delta / (alpha * N) + E * log_term


def defossez_adam_momentum_bound(
  *,
  N: int,
  alpha: float,
  beta1: float,
  beta2: float,
  eps: float,
  d: int,
  R: float,
  L: float,
  delta: float,
) -> float:
  r"""Return Défossez et al.'s Theorem 4 bound (Adam with heavy-ball momentum).

  .. math::
      \mathbb E\|\nabla F(x_\tau)\|^2 \le \frac{2R\Delta}{\alpha\tilde N}
      + \frac{E}{\tilde N}\Big(\ln\Big(1 + \frac{R^2}{(1-\beta_2)\epsilon}\Big)
      - N\ln\beta_2\Big),\qquad \tilde N = N - \frac{\beta_1}{1-\beta_1},

  .. math::
      E = \frac{\alpha d R L (1-\beta_1)}{(1-\beta_1/\beta_2)(1-\beta_2)}
      + \frac{12 d R^2 \sqrt{1-\beta_1}}{(1-\beta_1/\beta_2)^{3/2}\sqrt{1-\beta_2}}
      + \frac{2\alpha^2 d L^2 \beta_1}{(1-\beta_1/\beta_2)(1-\beta_2)^{3/2}},

  for ``0 <= beta1 < beta2 < 1``, ``N > beta1/(1-beta1)`` and ``tau`` drawn with
  ``P[tau = j] ∝ 1 - beta1^(N-j)`` (:func:`defossez_tau_weights`). At ``beta1 = 0`` it equals
  :func:`defossez_adam_bound` except for the ``12`` against ``4`` in the ``R^2`` term (the
  momentum proof is cruder, as the paper says).

  Args:
    N: number of steps.
    alpha: base step size.
    beta1: momentum decay, ``0 <= beta1 < beta2``.
    beta2: second-moment decay.
    eps: ``epsilon`` inside the root.
    d: dimension.
    R: almost-sure bound ``||g||_inf <= R - sqrt(eps)``.
    L: smoothness constant.
    delta: ``F(x_0) - F*``.

  Returns:
    The right-hand side.

  Examples:
    >>> kw = dict(N=100, alpha=0.1, beta2=0.99, eps=1e-8, d=2, R=1.0, L=1.0, delta=1.0)
    >>> defossez_adam_momentum_bound(beta1=0.0, **kw) > defossez_adam_bound(**kw)
    True

  References:
    Défossez et al., TMLR 2022, https://arxiv.org/abs/2003.02395, Theorem 4 (eq. 13);
    see the module docstring for what was verified.
  """
  _common(N, alpha, beta2, eps, d, R, L, delta)
  if not 0.0 <= beta1 < beta2:
    raise ValueError(f"beta1 must satisfy 0 <= beta1 < beta2={beta2!r}, got {beta1!r}")
  n_tilde = N - beta1 / (1 - beta1)
  if n_tilde <= 0:
    raise ValueError(f"N={N} must exceed beta1/(1-beta1)={beta1 / (1 - beta1)!r}")
  r = 1 - beta1 / beta2
  E = (
    alpha * d * R * L * (1 - beta1) / (r * (1 - beta2))
    + 12 * d * R**2 * math.sqrt(1 - beta1) / (r**1.5 * math.sqrt(1 - beta2))
    + 2 * alpha**2 * d * L**2 * beta1 / (r * (1 - beta2) ** 1.5)
  )
  log_term = math.log(1 + R**2 / ((1 - beta2) * eps)) - N * math.log(beta2)
  return 2 * R * delta / (alpha * n_tilde) + E / n_tilde * log_term


def defossez_tau_weights(N: int, beta1: float) -> np.ndarray:
  r"""Return the weights of Défossez et al.'s random index: ``P[tau = j] ∝ 1 - beta1^(N-j)``.

  The bound is on ``sum_j w_j E||grad F(x_j)||^2`` with these normalised weights,
  ``j = 0..N-1``; at ``beta1 = 0`` they are uniform.

  Args:
    N: number of steps.
    beta1: momentum decay, in ``[0, 1)``.

  Returns:
    Weights of shape ``[N]`` that sum to one.

  Examples:
    >>> defossez_tau_weights(3, 0.5).round(3).tolist()
    [0.412, 0.353, 0.235]
  """
  check_count("N", N)
  check_unit_interval("beta1", beta1, closed_low=True, closed_high=False)
  w_N = 1.0 - beta1 ** (N - np.arange(N, dtype=np.float64))
  return w_N / w_N.sum()


def defossez_from_no_bias_correction(
  *, eta: float, beta2: float, lam: float
) -> tuple[float, float]:
  r"""Map the Cheng & Glasgow Adam form to Défossez's ``(alpha, eps)``.

  The update ``x -= eta_n u / sqrt(v + lam^2)`` with the normalised EMAs
  ``u = beta1 u + (1-beta1) g`` and ``v = beta2 v + (1-beta2) g^2`` equals Défossez's
  ``x -= alpha_n m / sqrt(eps + v')`` with the unnormalised ``m = u/(1-beta1)``,
  ``v' = v/(1-beta2)``, ``eps = lam^2/(1-beta2)`` and
  ``alpha_n = alpha (1-beta1) sqrt((1-beta2^n)/(1-beta2))`` exactly when
  ``eta_n = alpha sqrt(1-beta2^n)``, for any ``beta1`` (derivations.md, section 2). A constant
  ``eta`` (no bias correction at all) is the ``n -> infinity`` limit and is covered only
  approximately.

  Args:
    eta: base step size ``alpha`` of the schedule ``eta_n = alpha sqrt(1-beta2^n)``.
    beta2: second-moment decay.
    lam: damping inside the root.

  Returns:
    ``(alpha, eps)`` in Défossez's parametrisation.

  Examples:
    >>> defossez_from_no_bias_correction(eta=0.1, beta2=0.75, lam=0.5)
    (0.1, 1.0)
  """
  check_positive("eta", eta)
  check_positive("lam", lam)
  check_unit_interval("beta2", beta2, closed_low=False, closed_high=False)
  return eta, lam**2 / (1 - beta2)
