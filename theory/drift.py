r"""Derived here: an almost-sure bound on the replica spread of k-step Adam.

This is the project's own result (``theory/derivations.md``, section 3), not a published
theorem. It is *not* a convergence bound: no published result bounds the gradient norm of
parameter-only averaging (the production default), and none is derived here. What can be
proved with explicit constants is that Adam's step is bounded coordinate-wise whatever the
gradients are, so ``j`` local steps after a merge every replica is within

.. math::
    |x^w_t - x_{\mathrm{merge}}|_i \le j\, \eta B, \qquad
    B = \frac{(1-\beta_1)\, c_T}{\sqrt{1-\beta_2}\,(1 - \beta_1/\sqrt{\beta_2})},

of the point all replicas left from, where ``c_T = 1`` without bias correction and
``c_T = max_{t<=T} sqrt(1-beta2^t)/(1-beta1^t)`` with it. The spread about the mean is at most
the mean squared distance to any fixed point, so the logged spread
``(1/N) sum_w ||x^w - xbar||^2`` is at most ``d (j eta B)^2``, and averaged over a round at most
``d (eta B)^2 (k-1)(2k-1)/6``. It holds for parameter-only averaging and for averaging
parameters and both moments on the same steps; it needs ``beta1 < sqrt(beta2)``. Two replicas
stepping ``+eta B`` and ``-eta B`` on every coordinate attain it, so given ``B`` it cannot be
lowered; ``B`` itself is a worst case that real gradients rarely approach.
"""

from __future__ import annotations

import math

from theory._checks import check_count
from theory._checks import check_positive
from theory._checks import check_unit_interval

__all__ = ["adam_step_bound", "replica_spread_bound"]


def adam_step_bound(*, beta1: float, beta2: float, T: int, bias_correction: bool) -> float:
  """Return ``B``: ``|update_i| <= eta * B`` for every coordinate and step ``<= T``.

  Args:
    beta1: first-moment decay, ``0 <= beta1 < sqrt(beta2)``.
    beta2: second-moment decay, in ``(0, 1)``.
    T: the number of steps (only used with bias correction).
    bias_correction: True for optax-style Adam, False for the Cheng & Glasgow form.

  Returns:
    The constant ``B`` of the module docstring.

  Examples:
    >>> round(adam_step_bound(beta1=0.0, beta2=0.75, T=1, bias_correction=False), 6)
    2.0
  """
  check_unit_interval("beta2", beta2, closed_low=False, closed_high=False)
  if not 0.0 <= beta1 < math.sqrt(beta2):
    raise ValueError(
      f"beta1 must satisfy 0 <= beta1 < sqrt(beta2)={math.sqrt(beta2)!r}, got {beta1!r}"
    )
  check_count("T", T)
  base = (1 - beta1) / (math.sqrt(1 - beta2) * (1 - beta1 / math.sqrt(beta2)))
  if not bias_correction:
    return base
  c_T = max(math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in range(1, T + 1))
  return base * c_T


def replica_spread_bound(
  *, eta: float, beta1: float, beta2: float, k: int, d: int, T: int, bias_correction: bool
) -> float:
  r"""Return the bound on the time-averaged replica spread of k-step Adam.

  .. math::
      \frac1T \sum_t \frac1N \sum_w \|x^w_t - \bar x_t\|^2
      \le d\, (\eta B)^2 \frac{(k-1)(2k-1)}{6}

  (exact average over a round of ``j^2``, ``j = 0..k-1``; a partial last round only
  lowers it). Zero at ``k = 1``.

  Args:
    eta: constant step size.
    beta1: first-moment decay.
    beta2: second-moment decay.
    k: merge period.
    d: dimension.
    T: steps per worker.
    bias_correction: True for optax-style Adam, False for the Cheng & Glasgow form.

  Returns:
    The bound (derived here; see ``theory/derivations.md``, section 3).

  Examples:
    >>> replica_spread_bound(eta=0.5, beta1=0.0, beta2=0.75, k=2, d=3, T=8,
    ...                      bias_correction=False)
    1.5
  """
  check_count("k", k)
  check_count("d", d)
  check_positive("eta", eta)
  B = adam_step_bound(beta1=beta1, beta2=beta2, T=T, bias_correction=bias_correction)
  return d * (eta * B) ** 2 * (k - 1) * (2 * k - 1) / 6
