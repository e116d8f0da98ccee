"""Non-convex convergence bounds for Local SGD (periodic parameter averaging).

Two published bounds with explicit constants, in the papers' notation:

* Wang & Joshi, periodic-averaging SGD (PASGD), the fully-synchronous-averaging
  special case of Cooperative SGD. It needs only a variance bound, no gradient
  bound, and reduces exactly to the synchronous minibatch-SGD bound at ``k = 1``.
* Yu, Yang & Zhu, Parallel Restarted SGD (PR-SGD), Theorem 1. It additionally
  needs a bound ``G**2`` on the second moment of the stochastic gradient.

Both cover the same algorithm: every worker runs plain SGD (no momentum) with a
constant step ``eta`` on i.i.d. samples of the same objective, and every ``k``
steps all workers replace their parameters by the average. Both bound the
average over ``t = 0 .. T-1`` of ``E||grad f(xbar_t)||^2`` at the *virtual*
average ``xbar_t`` of the replicas (before the step-``t`` update).

Provenance of the constants (read this before trusting a number): the project's search tool
reaches the abstracts and introductions of both papers (arXiv 1808.07576, JMLR 22(213); arXiv
1807.06629, AAAI'19) but not their theorem statements, so the constants below are transcribed
from the statements as they are commonly cited (Wang & Joshi's bound is restated as Theorem 1
of their AdaComm paper, arXiv 1810.08313) and could **not** be checked against the papers' text
here. They agree with the usual form ``O(D/(eta T) + eta L s2/N + eta^2 L^2 k s2)``.
"""

from __future__ import annotations

import math

from theory._checks import check_count
from theory._checks import check_positive

__all__ = [
  "local_sgd_bound",
  "local_sgd_max_eta",
  "local_sgd_optimal_eta",
  "local_sgd_speedup_max_k",
  "local_sgd_bound_yu",
]


def _check_run(T: int, N: int, k: int, eta: float, L: float, sigma2: float, delta: float) -> None:
  """The arguments every Local SGD bound takes: counts, positive constants, sigma2 >= 0."""
  check_count("T", T)
  check_count("N", N)
  check_count("k", k)
  for name, value in (("eta", eta), ("L", L), ("delta", delta)):
    check_positive(name, value)
  check_positive("sigma2", sigma2, allow_zero=True)


def local_sgd_max_eta(L: float, k: int) -> float:
  r"""Return the largest step size allowed by Wang & Joshi's condition.

  .. math::
      \eta L + \eta^2 L^2 k (k - 1) \le 1

  Solving the quadratic in ``eta L`` gives
  ``eta_max = 2 / (L (1 + sqrt(1 + 4 k (k - 1))))``; at ``k = 1`` this is
  ``1/L``, the usual SGD condition.

  Args:
    L: smoothness constant of ``f`` (Lipschitz constant of the gradient).
    k: averaging period (local steps between merges).

  Returns:
    The largest ``eta`` that satisfies the condition.
  """
  check_positive("L", L)
  check_count("k", k)
  return 2.0 / (L * (1.0 + math.sqrt(1.0 + 4.0 * k * (k - 1))))


def local_sgd_bound(
  T: int, N: int, k: int, eta: float, L: float, sigma2: float, delta: float, *, check: bool = True
) -> float:
  r"""Return Wang & Joshi's bound on the averaged squared gradient norm.

  .. math::
      \frac1T \sum_{t=0}^{T-1} \mathbb E \|\nabla f(\bar x_t)\|^2 \le
      \frac{2\Delta}{\eta T} + \frac{\eta L \sigma^2}{N}
      + \eta^2 L^2 \sigma^2 (k - 1),
      \qquad \eta L + \eta^2 L^2 k (k - 1) \le 1 .

  Assumptions: ``f`` is ``L``-smooth and bounded below by ``f*``; each worker's
  stochastic gradient is unbiased with ``E||g - grad f||^2 <= sigma2``
  (Wang & Joshi allow ``beta ||grad f||^2 / b + sigma2 / b``; this is the
  ``beta = 0, b = 1`` case); data are i.i.d. across workers; all replicas start
  at the same point. Algorithm: plain local SGD, parameters averaged every
  ``k`` steps, constant ``eta``. At ``k = 1`` it is exactly the synchronous
  minibatch-SGD bound ``2 Delta/(eta T) + eta L sigma2 / N``.

  Args:
    T: number of steps per worker.
    N: number of workers (``m`` in the paper).
    k: averaging period (``tau`` in the paper).
    eta: constant step size.
    L: smoothness constant.
    sigma2: per-worker gradient-noise variance bound.
    delta: ``f(x_0) - f*`` (an upper bound on it keeps the bound valid).
    check: when True, raise if ``eta`` violates the step-size condition.

  Returns:
    The right-hand side of the bound.

  Raises:
    ValueError: on non-positive inputs or, with ``check``, when ``eta`` exceeds
      :func:`local_sgd_max_eta`.

  Examples:
    >>> round(local_sgd_bound(100, 4, 1, 0.1, 1.0, 1.0, 1.0), 6)
    0.225

  References:
    Wang & Joshi, "Cooperative SGD: A Unified Framework for the Design and
    Analysis of Communication-Efficient SGD Algorithms",
    https://arxiv.org/abs/1808.07576 (JMLR 22(213), 2021); restated as Thm 1 of
    https://arxiv.org/abs/1810.08313. Not checked against the text (module docstring).
  """
  _check_run(T, N, k, eta, L, sigma2, delta)
  if check and eta > local_sgd_max_eta(L, k) * (1 + 1e-12):
    raise ValueError(
      f"eta={eta!r} violates Wang & Joshi's condition eta*L + eta^2*L^2*k*(k-1)"
      f" <= 1; allowed: eta <= {local_sgd_max_eta(L, k)!r} for L={L!r}, k={k!r}"
    )
  return 2.0 * delta / (eta * T) + eta * L * sigma2 / N + eta**2 * L**2 * sigma2 * (k - 1)


def local_sgd_optimal_eta(T: int, N: int, k: int, L: float, sigma2: float, delta: float) -> float:
  r"""Return the step size that minimises :func:`local_sgd_bound`.

  Setting the derivative to zero gives the cubic (derived in
  ``theory/derivations.md``, section 1)

  .. math::
      2 L^2 \sigma^2 (k-1)\, \eta^3 + \frac{L\sigma^2}{N} \eta^2
      - \frac{2\Delta}{T} = 0,

  whose unique positive root is found by bisection and then clipped to the
  step-size condition. Without the ``k`` term the root is
  ``sqrt(2 Delta N / (L sigma2 T))`` and the bound becomes
  ``2 sqrt(2 Delta L sigma2 / (N T))``: the ``1/sqrt(NT)`` rate.

  Args:
    T: steps per worker.
    N: number of workers.
    k: averaging period.
    L: smoothness constant.
    sigma2: per-worker noise variance bound.
    delta: ``f(x_0) - f*``.

  Returns:
    The minimising ``eta`` within the allowed range.
  """
  check_count("T", T)
  check_count("N", N)
  check_count("k", k)
  check_positive("L", L)
  check_positive("delta", delta)
  check_positive("sigma2", sigma2, allow_zero=True)
  eta_max = local_sgd_max_eta(L, k)
  if sigma2 == 0:
    return eta_max

  def slope(eta: float) -> float:
    return 2 * L**2 * sigma2 * (k - 1) * eta**3 + L * sigma2 / N * eta**2 - 2 * delta / T

  if slope(eta_max) <= 0:
    return eta_max
  lo, hi = 0.0, eta_max
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
  return 0.5 * (lo + hi)


def local_sgd_speedup_max_k(T: int, N: int, *, bound: str = "wang_joshi") -> float:
  r"""Return the largest period ``k`` that keeps linear speedup under a bound.

  With ``eta = sqrt(N/T)`` (units ``L = sigma = Delta = 1``) the leading terms are
  ``1/sqrt(NT)``. Wang & Joshi's ``k`` term ``eta^2 (k-1) = N (k-1)/T`` stays below them
  while ``k <= sqrt(T) / N^{3/2}``; Yu et al.'s ``4 eta^2 k^2 G^2`` term needs
  ``k <= T^{1/4} / N^{3/4}`` (the range usually quoted). Derived in
  ``theory/derivations.md``, section 1.3.

  Args:
    T: steps per worker.
    N: number of workers.
    bound: ``'wang_joshi'`` or ``'yu'``.

  Returns:
    The threshold on ``k`` (up to constants).
  """
  check_count("T", T)
  check_count("N", N)
  if bound == "wang_joshi":
    return T**0.5 / N**1.5
  if bound == "yu":
    return T**0.25 / N**0.75
  raise ValueError(f"bound must be 'wang_joshi' or 'yu', got {bound!r}")


def local_sgd_bound_yu(
  T: int,
  N: int,
  k: int,
  eta: float,
  L: float,
  sigma2: float,
  G2: float,
  delta: float,
  *,
  check: bool = True,
) -> float:
  r"""Return Yu, Yang & Zhu's Theorem 1 bound for Parallel Restarted SGD.

  .. math::
      \frac1T \sum_{t=1}^{T} \mathbb E\|\nabla f(\bar x_{t-1})\|^2 \le
      \frac{2\Delta}{\gamma T} + 4 \gamma^2 I^2 G^2 L^2 + \frac{L \gamma \sigma^2}{N},
      \qquad 0 < \gamma \le 1/L .

  Assumptions: ``L``-smooth, unbiased gradients with variance ``<= sigma2``
  and second moment ``E||g||^2 <= G2`` everywhere (a bounded-gradient
  assumption; on the test problems here ``G2`` can only be estimated along the
  trajectory); i.i.d. data; ``I = k`` local steps. Note the ``I^2 G^2`` term
  does not vanish at ``k = 1`` (it comes from a cruder deviation bound), so
  this bound does *not* reduce to the synchronous rate; use
  :func:`local_sgd_bound` for that.

  Args:
    T: steps per worker.
    N: number of workers.
    k: averaging interval ``I``.
    eta: step size ``gamma``.
    L: smoothness constant.
    sigma2: noise variance bound.
    G2: bound on the stochastic gradient's second moment.
    delta: ``f(x_0) - f*``.
    check: when True, raise if ``eta > 1/L``.

  Returns:
    The right-hand side of Theorem 1.

  References:
    Yu, Yang & Zhu, "Parallel Restarted SGD with Faster Convergence and Less
    Communication", AAAI 2019, https://arxiv.org/abs/1807.06629, Theorem 1. Not checked
    against the text (module docstring).
  """
  _check_run(T, N, k, eta, L, sigma2, delta)
  check_positive("G2", G2, allow_zero=True)
  if check and eta > 1.0 / L * (1 + 1e-12):
    raise ValueError(f"eta={eta!r} violates Yu et al.'s condition 0 < eta <= 1/L = {1.0 / L!r}")
  return 2.0 * delta / (eta * T) + 4.0 * eta**2 * k**2 * G2 * L**2 + L * eta * sigma2 / N
