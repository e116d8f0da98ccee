"""Sparse optimizers as pure NumPy math on blocks of rows.

Each optimizer sees a block of rows through three arrays: ``params_NxD``, ``slots_NxS``
(its per-row state, ``S = slot_width(D)`` columns) and ``last_step_N`` (the table step each
row reflects; -1 for a row that was never written). The table step ``t`` counts pushes:
``push`` performs step ``t + 1``, with learning rate ``learning_rate(t)`` as
``optax.scale_by_learning_rate`` does. The table owns storage and caching; this module
owns only the math, so the same code drives the tiered table and the in-RAM benchmark
baseline.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import numpy as np

from kstep_adam import _validation

ScalarOrSchedule = float | Callable[[np.ndarray], Any]
ADAM_MODES = ("exact", "lazy")
# The exact catch-up truncates its sum once the remaining tail is below this fraction of
# the largest learning rate (2^-24: float32's half-ulp at 1.0).
CATCH_UP_TAIL_TOL = 2.0**-24
_CATCH_UP_BLOCK_ROWS = 1024


def _learning_rate(learning_rate: ScalarOrSchedule, count_N: np.ndarray) -> np.ndarray:
  """Evaluates a float or a schedule at the 0-based step counts ``count_N`` (float64).

  A schedule is called once, on the distinct counts padded to a power-of-two length, so
  a jitted (optax) schedule compiles for a few shapes only.
  """
  if not callable(learning_rate):
    return np.full(count_N.shape, float(learning_rate))
  unique, inverse = np.unique(count_N, return_inverse=True)
  padded = np.full(1 << max(0, int(len(unique) - 1).bit_length()), unique[-1])
  padded[: len(unique)] = unique
  values = np.asarray(learning_rate(padded), dtype=np.float64)
  values = np.broadcast_to(values, padded.shape)[: len(unique)]
  return values[inverse].reshape(count_N.shape)


def _check_learning_rate(learning_rate: ScalarOrSchedule) -> None:
  if not callable(learning_rate):
    _validation.check_float(learning_rate, "learning_rate (or a schedule)", low=0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class SparseAdam:
  """Adam for embedding rows, either exactly dense-equivalent or lazy.

  .. math::
     m_c = \\beta_1 m_{c-1} + (1-\\beta_1) g_c,\\quad
     v_c = \\beta_2 v_{c-1} + (1-\\beta_2) g_c^2

  ``mode='exact'`` updates the parameters as ``optax.adam`` does,
  :math:`p_c = p_{c-1} - \\eta_{c-1} \\hat m_c / (\\sqrt{\\hat v_c} + \\epsilon)` with
  :math:`\\hat m_c = m_c/(1-\\beta_1^c)`, :math:`\\hat v_c = v_c/(1-\\beta_2^c)`, where a row
  not pushed at step c has :math:`g_c = 0`. A row last written at step s is brought to step
  t lazily, on its next pull or push (the "catch-up"):

  .. math::
     m_t = \\beta_1^{t-s} m_s,\\quad v_t = \\beta_2^{t-s} v_s,\\quad
     p_t = p_s - m_s \\sum_{j=1}^{n} \\frac{\\eta_{s+j-1}\\,\\beta_1^j/(1-\\beta_1^{s+j})}
       {\\sqrt{v_s}\\sqrt{\\beta_2^j/(1-\\beta_2^{s+j})} + \\epsilon}

  with :math:`n = \\min(t-s, K)`. Because :math:`|m_s| \\le B\\sqrt{v_s}`,
  :math:`B = (1-\\beta_1)/\\sqrt{(1-\\beta_2)(1-r^2)}`, :math:`r = \\beta_1/\\sqrt{\\beta_2}`
  (Cauchy-Schwarz on the moment sums), term j is at most :math:`\\eta_{max} B Q r^j`, with
  :math:`Q = \\max_c \\sqrt{1-\\beta_2^c}/(1-\\beta_1^c)`. K is the smallest n whose tail
  bound :math:`\\eta_{max} B Q r^{n+1}/(1-r)` is below :math:`2^{-24}\\eta_{max}`
  (K = 199 for the default betas). This needs :math:`\\beta_1^2 < \\beta_2`.

  ``mode='lazy'`` is TF ``LazyAdam`` / ``torch.optim.SparseAdam``: only pushed rows change,
  and the bias correction uses the global step c = t + 1 with epsilon outside the
  correction, :math:`p \\mathrel{-}= \\eta \\sqrt{1-\\beta_2^c}/(1-\\beta_1^c) \\cdot
  m/(\\sqrt{v}+\\epsilon)` (both libraries' form). It is not equivalent to dense Adam:
  untouched rows neither decay their moments nor move.

  Args:
    learning_rate: a positive float, or a schedule ``f(count) -> lr`` that accepts a NumPy
      int64 array of 0-based step counts.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1); exact mode needs ``b1**2 < b2``.
    eps: added to the denominator, >= 0.
    mode: ``'exact'`` or ``'lazy'``.

  Examples:
    >>> opt = SparseAdam(learning_rate=1e-3, mode='exact')
    >>> opt.slot_width(dim=8)
    16

  References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", https://arxiv.org/abs/1412.6980
  """

  learning_rate: ScalarOrSchedule = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  mode: str = "exact"

  def __post_init__(self):
    _check_learning_rate(self.learning_rate)
    for name in ("b1", "b2"):
      _validation.check_float(getattr(self, name), name, low=0.0, high=1.0, high_open=True)
    _validation.check_float(self.eps, "eps", low=0.0)
    _validation.check_choice(self.mode, "mode", ADAM_MODES)
    if self.mode == "exact" and not self.b1**2 < self.b2:
      raise ValueError(
        f"mode='exact' needs b1**2 < b2 for a bounded catch-up sum, got b1={self.b1}, b2={self.b2}"
      )

  kind = "adam"

  @staticmethod
  def slot_width(dim: int) -> int:
    """Returns the per-row state width: first and second moments, D columns each."""
    return 2 * dim

  def init_slots(self, n: int, dim: int) -> np.ndarray:
    return np.zeros((n, 2 * dim), np.float32)

  @property
  def catch_up_terms(self) -> int:
    """K, the most terms the exact catch-up sums (see the class docstring)."""
    return _catch_up_terms(self.b1, self.b2)

  def catch_up(self, params_NxD, slots_NxS, last_step_N, step: int):
    """Brings rows from ``last_step_N`` to ``step`` under zero gradients, in place.

    Lazy mode does nothing. Rows with ``last_step_N < 0`` (never written) have zero
    moments, so they do not move. Returns the boolean mask of rows that changed.
    """
    changed_N = np.zeros(len(last_step_N), bool)
    if self.mode != "exact" or step == 0:
      return changed_N
    gap_N = np.where(last_step_N >= 0, step - last_step_N, 0)
    changed_N = gap_N > 0
    idx = np.flatnonzero(changed_N)
    if idx.size == 0:
      return changed_N
    dim = params_NxD.shape[1]
    m_UxD = slots_NxS[idx, :dim].astype(np.float64)
    v_UxD = slots_NxS[idx, dim:].astype(np.float64)
    s_U = last_step_N[idx].astype(np.int64)
    gap_U = gap_N[idx]
    n_U = np.minimum(gap_U, self.catch_up_terms)
    # Sort by number of terms (descending): rows still summing at term j are a prefix.
    order = np.argsort(-n_U, kind="stable")
    m_s, v_s = m_UxD[order], v_UxD[order]
    coef_UxD = self._displacement_coefficients(np.sqrt(v_s), s_U[order], n_U[order])
    # A zero moment does not move (with eps = 0 and v = 0, its coefficient is inf).
    displacement_UxD = m_s * np.where(m_s == 0, 0.0, coef_UxD)
    params_NxD[idx[order]] = params_NxD[idx[order]].astype(np.float64) - displacement_UxD
    slots_NxS[idx, :dim] = m_UxD * np.power(self.b1, gap_U)[:, None]
    slots_NxS[idx, dim:] = v_UxD * np.power(self.b2, gap_U)[:, None]
    return changed_N

  def _displacement_coefficients(self, sqrt_v_UxD, s_U, n_U):
    """Per element, sum_j eta_(s+j-1) a_j / (sqrt(v_s) q_j + eps) for j = 1..n (n sorted
    descending), as (a_j/q_j) / (sqrt(v_s) + eps/q_j): three passes per term. Rows are
    processed in blocks that stay in the CPU cache across the K terms, and each block's
    per-row scalars for all terms are computed at once."""
    coef_UxD = np.zeros_like(sqrt_v_UxD)
    for lo in range(0, len(n_U), _CATCH_UP_BLOCK_ROWS):
      sqrt_v = sqrt_v_UxD[lo : lo + _CATCH_UP_BLOCK_ROWS]
      acc = coef_UxD[lo : lo + _CATCH_UP_BLOCK_ROWS]
      s_b, neg_n = s_U[lo : lo + _CATCH_UP_BLOCK_ROWS], -n_U[lo : lo + _CATCH_UP_BLOCK_ROWS]
      j_J = np.arange(1, int(-neg_n[0]) + 1)
      k_J = np.searchsorted(neg_n, -j_J, side="right")  # rows still summing at term j
      c_JxB = s_b[None, :] + j_J[:, None]  # the step number of term j for each row
      a_JxB = (
        _learning_rate(self.learning_rate, c_JxB - 1)
        * np.power(self.b1, j_J.astype(np.float64))[:, None]
        / (1.0 - np.power(self.b1, c_JxB.astype(np.float64)))
      )
      q_JxB = np.sqrt(
        np.power(self.b2, j_J.astype(np.float64))[:, None]
        / (1.0 - np.power(self.b2, c_JxB.astype(np.float64)))
      )
      num_JxB, shift_JxB = a_JxB / q_JxB, self.eps / q_JxB
      tmp = np.empty_like(sqrt_v)
      with np.errstate(divide="ignore"):  # only eps = 0 with v = 0 (then m = 0 too)
        for j, k in enumerate(k_J):
          t = tmp[:k]
          np.add(sqrt_v[:k], shift_JxB[j, :k, None], out=t)
          np.divide(num_JxB[j, :k, None], t, out=t)
          acc[:k] += t
    return coef_UxD

  def apply(self, params_NxD, slots_NxS, grads_NxD, step: int) -> None:
    """Applies step number ``step`` (1-based) with summed gradients, in place."""
    dim = params_NxD.shape[1]
    g = grads_NxD.astype(np.float64)
    m = self.b1 * slots_NxS[:, :dim] + (1.0 - self.b1) * g
    v = self.b2 * slots_NxS[:, dim:] + (1.0 - self.b2) * g * g
    lr = float(_learning_rate(self.learning_rate, np.array([step - 1]))[0])
    bc1 = 1.0 - self.b1**step
    bc2 = 1.0 - self.b2**step
    if self.mode == "exact":
      update = (m / bc1) / (np.sqrt(v / bc2) + self.eps)
    else:
      update = (math.sqrt(bc2) / bc1) * m / (np.sqrt(v) + self.eps)
    params_NxD[:] = params_NxD - lr * update
    slots_NxS[:, :dim] = m
    slots_NxS[:, dim:] = v

  def config(self) -> dict:
    return {
      "kind": self.kind,
      "mode": self.mode,
      "b1": self.b1,
      "b2": self.b2,
      "eps": self.eps,
      "learning_rate": _lr_config(self.learning_rate),
    }


@dataclasses.dataclass(frozen=True)
class RowwiseAdagrad:
  """Row-wise Adagrad: one accumulator per row, the mean of the squared gradient.

  .. math::
     a_r \\leftarrow a_r + \\tfrac{1}{D}\\sum_j g_{r,j}^2,\\quad
     p_r \\leftarrow p_r - \\eta\\, g_r / (\\sqrt{a_r} + \\epsilon)

  This is FBGEMM/TorchRec's ``EXACT_ROWWISE_ADAGRAD``. A zero gradient changes nothing, so
  the sparse update is exactly the dense one; no catch-up is needed.

  Args:
    learning_rate: a positive float or a schedule of the 0-based step count.
    eps: added to the denominator, > 0.
    initial_accumulator_value: start value of every row's accumulator, >= 0.

  Examples:
    >>> RowwiseAdagrad(learning_rate=0.05).slot_width(dim=8)
    1

  References:
    Duchi, Hazan & Singer, "Adaptive Subgradient Methods", JMLR 2011; Gupta et al.,
    "Shampoo" (row-wise/diagonal variants), https://arxiv.org/abs/1802.09568
  """

  learning_rate: ScalarOrSchedule = 0.01
  eps: float = 1e-8
  initial_accumulator_value: float = 0.0

  kind = "rowwise_adagrad"

  def __post_init__(self):
    _check_learning_rate(self.learning_rate)
    _validation.check_float(self.eps, "eps", low=0.0, low_open=True)
    _validation.check_float(self.initial_accumulator_value, "initial_accumulator_value", low=0.0)

  @staticmethod
  def slot_width(dim: int) -> int:
    """Returns the per-row state width: one accumulator."""
    return 1

  def init_slots(self, n: int, dim: int) -> np.ndarray:
    return np.full((n, 1), self.initial_accumulator_value, np.float32)

  def catch_up(self, params_NxD, slots_NxS, last_step_N, step: int):
    return np.zeros(len(last_step_N), bool)

  def apply(self, params_NxD, slots_NxS, grads_NxD, step: int) -> None:
    g = grads_NxD.astype(np.float64)
    acc = slots_NxS[:, 0].astype(np.float64) + np.mean(g * g, axis=1)
    lr = float(_learning_rate(self.learning_rate, np.array([step - 1]))[0])
    params_NxD[:] = params_NxD - lr * g / (np.sqrt(acc)[:, None] + self.eps)
    slots_NxS[:, 0] = acc

  def config(self) -> dict:
    return {
      "kind": self.kind,
      "eps": self.eps,
      "initial_accumulator_value": self.initial_accumulator_value,
      "learning_rate": _lr_config(self.learning_rate),
    }


def _lr_config(learning_rate: ScalarOrSchedule):
  return "schedule" if callable(learning_rate) else float(learning_rate)


OPTIMIZERS = {"adam": SparseAdam, "rowwise_adagrad": RowwiseAdagrad}  # by ``kind``
_HYPERPARAMETERS = {
  "adam": ("b1", "b2", "eps", "mode"),
  "rowwise_adagrad": ("eps", "initial_accumulator_value"),
}


def optimizer_from_config(description: Mapping[str, Any]):
  """Rebuilds an optimizer from ``config()``; a schedule cannot be rebuilt (returns None).

  Raises ValueError naming the problem for an unknown kind, a missing or extra key, or a
  hyperparameter the optimizer refuses.
  """
  learning_rate = description.get("learning_rate")
  if learning_rate == "schedule":
    return None
  return _build(description, learning_rate)


def check_description(description: Mapping[str, Any]) -> None:
  """Raises ValueError unless ``description`` is a valid optimizer ``config()``."""
  learning_rate = description.get("learning_rate")
  _build(description, 1.0 if learning_rate == "schedule" else learning_rate)


def _build(description: Mapping[str, Any], learning_rate):
  kind = description.get("kind")
  if kind not in OPTIMIZERS:
    raise ValueError(f"optimizer kind must be one of {tuple(OPTIMIZERS)}, got {kind!r}")
  names = _HYPERPARAMETERS[kind]
  expected = {"kind", "learning_rate", *names}
  if set(description) != expected:
    raise ValueError(
      f"optimizer description of kind {kind!r} must have keys {sorted(expected)}, "
      f"got {sorted(description)}"
    )
  return OPTIMIZERS[kind](learning_rate=learning_rate, **{n: description[n] for n in names})


@functools.cache
def _catch_up_terms(b1: float, b2: float) -> int:
  r = b1 / math.sqrt(b2)
  if r == 0.0:
    return 1
  bound_b = (1.0 - b1) / math.sqrt((1.0 - b2) * (1.0 - r * r))
  c = np.unique(np.geomspace(1, 1e8, 4000).astype(np.int64)).astype(np.float64)
  bound_q = float(np.max(np.sqrt(1.0 - b2**c) / (1.0 - b1**c))) * 1.01
  # smallest n with B Q r^(n+1) / (1 - r) <= tol
  n = math.log(CATCH_UP_TAIL_TOL * (1.0 - r) / (bound_b * bound_q)) / math.log(r) - 1.0
  return max(1, math.ceil(n))
