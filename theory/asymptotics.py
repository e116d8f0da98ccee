r"""How each bound decays in ``T`` at the step sizes the experiment uses: the only slope a theorem gives.

A bound with hidden constants (``O~``) predicts no slope over a finite range of ``T``: its
terms carry separate constants and logs, so which term dominates at a given ``T`` is unknown.
What it does give is the asymptotic exponent of its slowest-decaying term, and, being an upper
bound, it allows any faster decay. Each :class:`Asymptote` records that exponent and the power
of ``log T`` that multiplies the dominant term, whose local slope ``log_power / ln T`` is how
far above the exponent the bound itself can sit at a finite ``T``.

=============================  ======================================  =========  =========
bound                          step sizes                              exponent   log power
=============================  ======================================  =========  =========
Wang & Joshi (Local SGD)       ``eta = c / sqrt(T)``                   -1/2       0
Yu, Yang & Zhu (Local SGD)     ``eta = c / sqrt(T)``                   -1/2       0
Cheng & Glasgow (Local Adam)   theorem's ``eta``, ``beta2``            -1/2       1/4
Cheng & Glasgow (Minibatch)    theorem's ``eta``, ``beta2``            -1/2       1/4
Défossez et al. Thm 2 / Thm 4  ``alpha = c/sqrt(N)``, ``1-beta2=1/N``  -1/2       1
=============================  ======================================  =========  =========

Wang & Joshi at ``eta = c/sqrt(T)``: ``2 Delta/(c sqrt T) + c L sigma^2/(N sqrt T) +
c^2 L^2 sigma^2 (k-1)/T``. Yu et al. likewise (``4 c^2 k^2 G^2 L^2 / T``). Cheng & Glasgow:
the statistical term ``sqrt(L Delta sigma^2/(M K R)) log^{1/4}(KR/delta)`` of their eq. (C.27)
outlives ``tau Delta/R``, ``L Delta/(KR)`` and ``(L Delta sigma)^{2/3}/(K^{1/3} R^{2/3})`` at
fixed ``K`` (``KR = T``). Défossez et al.: every term is ``O(d ln N / sqrt N)`` at the
paper's finite-horizon choice (their "optimal finite horizon Adam is Adagrad").
"""

from __future__ import annotations

import math
from typing import NamedTuple

from theory._checks import check_count

__all__ = ["Asymptote", "ASYMPTOTES"]


class Asymptote(NamedTuple):
  """``bound ~ T^exponent (ln T)^log_power`` as ``T`` grows, the rest fixed."""

  exponent: float  # of the slowest-decaying term.
  log_power: float  # power of ln T on that term (0: none).

  def slack(self, T: int) -> float:
    """The local slope the log factor adds at ``T``: ``log_power / ln T``.

    Examples:
      >>> round(Asymptote(-0.5, 1.0).slack(1024), 4)
      0.1443
    """
    check_count("T", T)
    return self.log_power / math.log(T) if T > 1 else math.inf


ASYMPTOTES = {
  "wang_joshi": Asymptote(-0.5, 0.0),
  "yu_yang_zhu": Asymptote(-0.5, 0.0),
  "cheng_glasgow_local_adam": Asymptote(-0.5, 0.25),
  "cheng_glasgow_minibatch_adam": Asymptote(-0.5, 0.25),
  "defossez_thm2": Asymptote(-0.5, 1.0),
  "defossez_thm4": Asymptote(-0.5, 1.0),
}
