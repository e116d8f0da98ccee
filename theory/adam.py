r"""Centralized Adam with explicit constants: Défossez, Bottou, Bach & Usunier.

"A Simple Convergence Proof of Adam and Adagrad", TMLR 2022,
https://arxiv.org/abs/2003.02395. One worker, ``k = 1``.

The algorithm the theorems analyse (their notation, coordinate ``i``, step ``n``):

.. math::
    m_n = \beta_1 m_{n-1} + g_n,\quad v_n = \beta_2 v_{n-1} + g_n^2,\quad
    x_n = x_{n-1} - \alpha_n \frac{m_n}{\sqrt{\epsilon + v_n}},
    \qquad \alpha_n = \alpha (1-\beta_1)\sqrt{\textstyle\sum_{j=0}^{n-1}\beta_2^j}.

So ``v`` is an *unnormalised* EMA (no ``1 - beta2`` factor), ``epsilon`` sits
**inside** the root, the momentum is not bias-corrected, and ``alpha_n`` plays
the role of the second-moment bias correction.

Assumptions: ``F >= F*``; stochastic gradients bounded almost surely,
``||g||_inf <= R - sqrt(epsilon)``; ``grad F`` is ``L``-Lipschitz in the 2-norm;
``d`` is the dimension. The bound is on ``E||grad F(x_tau)||^2`` for a random
iterate ``tau`` (uniform for ``beta1 = 0``), which is what the average of
``||grad F(x_n)||^2`` over ``n = 0 .. N-1`` estimates.

Provenance: the abstract confirms explicit constants and the
``O(d ln N / sqrt N)`` rate at ``alpha = 1/sqrt N, beta2 = 1 - 1/N``; the
search tool did not return the theorem text, so the constants below are
transcribed from the paper as remembered and are **not verified here**. The
``beta2 -> 1`` scaling test in ``tests/test_theory.py`` checks the stated rate,
which is the part that could be checked.
"""

from __future__ import annotations

import math

from theory._checks import check_count
from theory._checks import check_positive

__all__ = [
  "defossez_adam_bound",
  "defossez_adam_momentum_bound",
  "defossez_from_no_bias_correction",
]


def _common(
  N: int, alpha: float, beta2: float, eps: float, d: int, R: float, L: float, delta: float
) -> None:
  check_count("N", N)
  check_count("d", d)
  if not 0.0 < beta2 < 1.0:
    raise ValueError(f"beta2 must be in (0, 1), got {beta2!r}")
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

  With ``alpha = 1/sqrt(N)`` and ``1 - beta2 = 1/N`` every term is
  ``O(d ln N / sqrt N)``.

  Args:
    N: number of steps.
    alpha: base step size.
    beta2: second-moment decay, in ``(0, 1)``.
    eps: ``epsilon`` inside the root (paper's parametrisation).
    d: dimension.
    R: almost-sure bound: ``||g||_inf <= R - sqrt(eps)``.
    L: smoothness constant.
    delta: ``F(x_0) - F*``.

  Returns:
    The right-hand side.

  References:
    Défossez et al., TMLR 2022, https://arxiv.org/abs/2003.02395, Theorem 2
    (numbering of the TMLR version; constants not verified here).
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
  r"""Return Défossez et al.'s bound for Adam with heavy-ball momentum.

  .. math::
      \mathbb E\|\nabla F(x_\tau)\|^2 \le \frac{2R\Delta}{\alpha\tilde N}
      + \frac{E}{\tilde N}\Big(\ln\Big(1 + \frac{R^2}{(1-\beta_2)\epsilon}\Big)
      - N\ln\beta_2\Big),\qquad \tilde N = N - \frac{\beta_1}{1-\beta_1},

  .. math::
      E = \frac{\alpha d R L (1-\beta_1)}{(1-\beta_1/\beta_2)(1-\beta_2)}
      + \frac{12 d R^2 \sqrt{1-\beta_1}}{(1-\beta_1/\beta_2)^{3/2}\sqrt{1-\beta_2}}
      + \frac{2\alpha^2 d L^2 \beta_1}{(1-\beta_1/\beta_2)(1-\beta_2)^{3/2}},

  for ``0 <= beta1 < beta2 < 1`` and ``tau`` drawn with
  ``P[tau = j] ∝ 1 - beta1^{N-j}``. At ``beta1 = 0`` it equals
  :func:`defossez_adam_bound` except for the ``12`` vs ``4`` in the ``R^2``
  term (the momentum proof is cruder).

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

  References:
    Défossez et al., TMLR 2022, https://arxiv.org/abs/2003.02395 (the
    Adam-with-momentum theorem; constants not verified here).
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


def defossez_from_no_bias_correction(
  *, eta: float, beta2: float, lam: float
) -> tuple[float, float]:
  r"""Map the Cheng & Glasgow Adam form to Défossez's ``(alpha, eps)``.

  The update ``x -= eta g / sqrt(v + lam^2)`` with the normalised EMA
  ``v = beta2 v + (1-beta2) g^2`` (``beta1 = 0``) equals
  ``x -= alpha_n g / sqrt(eps + v')`` with the unnormalised ``v' = v/(1-beta2)``,
  ``alpha_n = eta / sqrt(1-beta2)`` and ``eps = lam^2/(1-beta2)``
  (derivations.md, section 2). The paper's ``alpha_n`` is
  ``alpha sqrt((1-beta2^n)/(1-beta2))``, which tends to this constant as
  ``n`` grows but is smaller for early ``n``: the theorem covers the
  no-bias-correction form only approximately, and callers must say so.

  Args:
    eta: step size of the no-bias-correction form.
    beta2: second-moment decay.
    lam: damping inside the root.

  Returns:
    ``(alpha, eps)`` in Défossez's parametrisation.
  """
  check_positive("eta", eta)
  check_positive("lam", lam)
  if not 0.0 < beta2 < 1.0:
    raise ValueError(f"beta2 must be in (0, 1), got {beta2!r}")
  return eta, lam**2 / (1 - beta2)
