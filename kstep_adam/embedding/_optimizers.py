"""Sparse optimizers as pure NumPy math on blocks of rows.

Each optimizer sees a block of rows through three arrays: ``params_NxD``, ``slots_NxS``
(its per-row state, ``S = slot_width(D)`` columns) and ``last_step_N`` (the table step each
row reflects; -1 for a row that was never written). The table step ``t`` counts pushes:
``push`` performs step ``t + 1``, with learning rate ``learning_rate(t)`` as
``optax.scale_by_learning_rate`` does. The table owns storage and caching; this module
owns only the math, so the same code drives the tiered table and the in-RAM benchmark
baseline.

Adam's arithmetic is written once, for NumPy and for ``jax.numpy`` alike (``adam_moments``,
``adam_params``, ``catch_up_coefficients``, ``catch_up_params``), so the device tier's
optimizer (``_device_adam``) performs the very same float operations in the same order as the
host and gets the same bits. Two details make that hold:

* powers (``b1**c``) come from Python's ``pow``, one scalar at a time (``powers``), never from
  NumPy's vectorized ``power``, which rounds differently at different positions of an array;
* every product that feeds a sum is followed by ``+ zero`` (a zero the device receives at run
  time): XLA's CPU and GPU compilers contract ``a * b + c`` into a fused multiply-add, which
  rounds once instead of twice; ``fma(a, b, 0)`` is the rounded product, so with the extra
  addition both sides round twice. The host adds a literal zero, which changes nothing.

On a host with a C++ compiler, ``SparseAdam.apply`` runs ``sparse_adam.cc`` instead of the
NumPy form (built on first use, see :mod:`kstep_adam._native`): one pass over the rows with
the same operations in the same order, so the same bits (``tests/test_embedding_optimizers.py``
compares them); the NumPy form makes about a dozen passes, each with a float64 temporary.
"""

import ctypes
import dataclasses
import functools
import math
import pathlib
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import numpy as np

from kstep_adam import _native
from kstep_adam import _validation
from kstep_adam.embedding._batch import pow2_at_least

ScalarOrSchedule = float | Callable[[np.ndarray], Any]
_ADAM_SOURCE = pathlib.Path(__file__).with_name("sparse_adam.cc")
_ADAM_SYMBOL = "KstepSparseAdamApply"
_ADAM_FLAGS = (
  "-ffp-contract=off",
  "-fno-fast-math",
  "-fno-math-errno",
)  # the NumPy form's roundings, one by one
_ADAM_ARGS = [
  *(ctypes.c_void_p, ctypes.c_int64) * 2,  # params and slots, each with its row stride
  *(ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64),  # grads, n, dim
  *[ctypes.c_double] * 7,  # b1, b2, lr, bc1, bc2, lazy_scale, eps
  ctypes.c_int32,  # exact
]
_PUSH_SYMBOL = "KstepSparseAdamPush"
_PUSH_ARGS = [
  ctypes.c_void_p,  # table
  ctypes.c_int64,  # width
  *(ctypes.c_void_p, ctypes.c_int64),  # slots, n
  *(ctypes.c_void_p, ctypes.c_int64),  # grads, dim
  *(ctypes.c_void_p, ctypes.c_void_p),  # block, dirty
  ctypes.c_int32,  # step
  *[ctypes.c_double] * 7,  # b1, b2, lr, bc1, bc2, lazy_scale, eps
  ctypes.c_int32,  # exact
]
_ADAM_SYMBOLS = (_ADAM_SYMBOL, _PUSH_SYMBOL)
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


def powers(base: float, exponents) -> np.ndarray:
  """``base ** e`` for int exponents, float64, each from Python's ``pow`` on one scalar.

  The same bits for the same exponent wherever it stands in ``exponents``, which NumPy's
  vectorized ``np.power`` does not guarantee; the device tier's tables come from here too.

  Examples:
    >>> powers(0.5, np.array([3, 0, 3]))
    array([0.125, 1.   , 0.125])
  """
  exponents = np.asarray(exponents, dtype=np.int64)
  if exponents.size == 0:
    return np.zeros(exponents.shape)
  low, high = int(exponents.min()), int(exponents.max())
  if high - low < exponents.size:  # a table over the range: no sort (the catch-up's case)
    table = np.array([float(base) ** e for e in range(low, high + 1)], dtype=np.float64)
    return table[exponents - low]
  unique, inverse = np.unique(exponents, return_inverse=True)
  values = np.array([float(base) ** int(e) for e in unique], dtype=np.float64)
  return values[inverse].reshape(exponents.shape)


def learning_rates(learning_rate: ScalarOrSchedule, counts) -> np.ndarray:
  """The learning rate (float64) at 0-based step counts: a float, or a schedule's values."""
  return _learning_rate(learning_rate, np.asarray(counts, dtype=np.int64))


def adam_moments(xp, m_NxD, v_NxD, g_NxD, *, b1: float, b2: float, zero):
  """Adam's new moments in float64 from float32 moments and float64 gradients (NumPy or jnp).

  ``b1 * m`` rounds in float32 (a Python float is weak, in NumPy 2 as in JAX), the rest in
  float64. ``zero`` is 0.0 (float64); see the module docstring for why it is added.
  """
  zero32 = zero.astype(m_NxD.dtype) if hasattr(zero, "astype") else np.float32(zero)
  m = (b1 * m_NxD + zero32).astype(xp.float64) + ((1.0 - b1) * g_NxD + zero)
  v = (b2 * v_NxD + zero32).astype(xp.float64) + ((1.0 - b2) * g_NxD * g_NxD + zero)
  return m, v


def adam_params(xp, params_NxD, m, v, *, lr, bc1, bc2, lazy_scale, eps: float, exact: bool, zero):
  """Parameters after one Adam step (float64) from the new float64 moments (NumPy or jnp).

  ``bc1``/``bc2`` are the bias corrections ``1 - b^c``; ``lazy_scale`` is
  ``sqrt(bc2) / bc1`` (lazy mode's step size factor).
  """
  if exact:
    update = (m / bc1) / (xp.sqrt(v / bc2) + eps)
  else:
    update = lazy_scale * m / (xp.sqrt(v) + eps)
  return params_NxD.astype(xp.float64) - (lr * update + zero)


def catch_up_coefficients(xp, lr_prev, b1_pow_j, b1_tail_c, b2_pow_j, b2_tail_c, eps: float):
  """One catch-up term's ``(num, shift)``: the term is ``num / (sqrt(v_s) + shift)``.

  ``num = a_j / q_j``, ``shift = eps / q_j``, with ``a_j = lr_(c-1) b1^j / (1 - b1^c)`` and
  ``q_j = sqrt(b2^j / (1 - b2^c))``, ``c = s + j`` (float64, NumPy or jnp).
  """
  a = lr_prev * b1_pow_j / b1_tail_c
  q = xp.sqrt(b2_pow_j / b2_tail_c)
  return a / q, eps / q


def catch_up_params(xp, params_NxD, m_s, coef, zero):
  """Parameters after the catch-up: ``p_s - m_s * coef`` (a zero moment does not move)."""
  displacement = m_s * xp.where(m_s == 0, 0.0, coef) + zero
  return params_NxD.astype(xp.float64) - displacement


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
    params_NxD[idx[order]] = catch_up_params(np, params_NxD[idx[order]], m_s, coef_UxD, 0.0)
    slots_NxS[idx, :dim] = m_UxD * powers(self.b1, gap_U)[:, None]
    slots_NxS[idx, dim:] = v_UxD * powers(self.b2, gap_U)[:, None]
    return changed_N

  def power_tables(self) -> tuple[np.ndarray, np.ndarray]:
    """``(b1**j, b2**j)`` for ``j = 0..K`` (float64, from :func:`powers`)."""
    return _power_tables(self.b1, self.b2, self.catch_up_terms)

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
      b1_pow, b2_pow = self.power_tables()
      num_JxB, shift_JxB = catch_up_coefficients(
        np,
        _learning_rate(self.learning_rate, c_JxB - 1),
        b1_pow[j_J][:, None],
        1.0 - powers(self.b1, c_JxB),
        b2_pow[j_J][:, None],
        1.0 - powers(self.b2, c_JxB),
        self.eps,
      )
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
    kernel = _adam_kernel(params_NxD, slots_NxS, grads_NxD)
    _adam_step(self, params_NxD, slots_NxS, grads_NxD, step, kernel)

  def step_scalars(self, step: int) -> dict:
    """The float64 scalars of step number ``step`` (1-based): ``lr``, ``bc1``, ``bc2``,
    ``lazy_scale`` (see :func:`adam_params`)."""
    bc1 = 1.0 - float(powers(self.b1, step))
    bc2 = 1.0 - float(powers(self.b2, step))
    lr = float(_learning_rate(self.learning_rate, np.array([step - 1]))[0])
    return dict(lr=lr, bc1=bc1, bc2=bc2, lazy_scale=math.sqrt(bc2) / bc1)

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
def _power_tables(b1: float, b2: float, terms: int) -> tuple[np.ndarray, np.ndarray]:
  exponents = np.arange(terms + 1)
  b1_pow, b2_pow = powers(b1, exponents), powers(b2, exponents)
  b1_pow.flags.writeable = b2_pow.flags.writeable = False  # cached: shared by every caller
  return b1_pow, b2_pow


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


def _adam_step(opt: SparseAdam, params_NxD, slots_NxS, grads_NxD, step: int, kernel) -> None:
  """``opt``'s step by ``kernel`` (the C++ function; see :func:`_adam_kernel` for the arrays it
  takes), or by the NumPy form when ``kernel`` is None."""
  dim = params_NxD.shape[1]
  if kernel is not None:
    grads = np.ascontiguousarray(grads_NxD)
    kernel(
      params_NxD.ctypes.data,
      params_NxD.strides[0] // 4,
      slots_NxS.ctypes.data,
      slots_NxS.strides[0] // 4,
      grads.ctypes.data,
      len(params_NxD),
      dim,
      *_kernel_scalars(opt, step),
    )
    return
  m, v = adam_moments(
    np,
    slots_NxS[:, :dim],
    slots_NxS[:, dim:],
    grads_NxD.astype(np.float64),
    b1=opt.b1,
    b2=opt.b2,
    zero=0.0,
  )
  params_NxD[:] = adam_params(
    np, params_NxD, m, v, **opt.step_scalars(step), eps=opt.eps, exact=opt.mode == "exact", zero=0.0
  )
  slots_NxS[:, :dim] = m
  slots_NxS[:, dim:] = v


class RowPush:
  """``sparse_adam.cc``'s push of one step to rows of a table's host cache, all or nothing:
  the bits of the NumPy form (gather the rows, :meth:`SparseAdam.apply`, check them, store
  them with their new last step, mark them dirty) in one pass. Built by :func:`row_push`.

  The table's rows are float32 ``[C, 1 + 3 D]``: column 0 holds the int32 bits of
  ``last_step + 1``, then the parameters, ``m`` and ``v``.
  """

  def __init__(self, function, opt: SparseAdam, rows_CxW: np.ndarray, dirty_C: np.ndarray):
    self._function, self._opt, self._rows, self._dirty = function, opt, rows_CxW, dirty_C
    self._block = np.empty((0, rows_CxW.shape[1]), np.float32)  # scratch, kept between calls

  def __call__(self, slots_N: np.ndarray, grads_NxD: np.ndarray, step: int) -> np.ndarray | None:
    """Steps the rows at ``slots_N`` (distinct, pinned) to ``step`` with float32 ``grads_NxD``.

    Returns None once every row is stored. Otherwise nothing is stored, and the return is
    the stepped rows ``[N, 1 + 3 D]`` when some hold a value that is not finite, or an empty
    array when an exact step must first catch rows up (the caller's NumPy form does that).
    """
    opt, rows = self._opt, self._rows
    slots = np.ascontiguousarray(slots_N, dtype=np.int64)
    grads = np.ascontiguousarray(grads_NxD, dtype=np.float32)
    if len(self._block) < len(slots):  # grown by powers of two: a fresh one faults its pages
      self._block = np.empty((pow2_at_least(len(slots)), rows.shape[1]), np.float32)
    block = self._block[: len(slots)]
    status = self._function(
      rows.ctypes.data,
      rows.shape[1],
      slots.ctypes.data,
      len(slots),
      grads.ctypes.data,
      grads.shape[1],
      block.ctypes.data,
      self._dirty.ctypes.data,
      step,
      *_kernel_scalars(opt, step),
    )
    if status == 0:
      return None
    return block[:0] if status < 0 else block.copy()


def _kernel_scalars(opt: SparseAdam, step: int) -> tuple:
  """The last arguments of ``sparse_adam.cc``'s functions: ``b1, b2, lr, bc1, bc2,
  lazy_scale, eps, exact`` of step number ``step``."""
  scalars = opt.step_scalars(step)
  return (
    *(opt.b1, opt.b2),
    *(scalars[name] for name in ("lr", "bc1", "bc2", "lazy_scale")),
    *(opt.eps, opt.mode == "exact"),
  )


def row_push(opt, rows_CxW: np.ndarray, dirty_C: np.ndarray) -> RowPush | None:
  """A :class:`RowPush` for ``opt`` on a host cache's rows and dirty flags, or None where it
  does not apply (another optimizer, another layout, or the kernels off or not built)."""
  fits = (
    isinstance(opt, SparseAdam)
    and rows_CxW.dtype == np.float32
    and rows_CxW.ndim == 2
    and rows_CxW.shape[1] > 1
    and (rows_CxW.shape[1] - 1) % 3 == 0
    and rows_CxW.flags.c_contiguous
    and rows_CxW.flags.writeable
    and dirty_C.dtype == np.bool_
    and dirty_C.shape == rows_CxW.shape[:1]
    and dirty_C.flags.c_contiguous
  )
  library = _native.library(_ADAM_SOURCE, _ADAM_SYMBOLS, extra_flags=_ADAM_FLAGS)
  if not fits or library is None or _checked_adam_function(library) is None:
    return None
  function = _checked_push_function(library)
  return None if function is None else RowPush(function, opt, rows_CxW, dirty_C)


@functools.cache
def _checked_push_function(library) -> Callable | None:
  """The library's push, once it gave the NumPy form's bits on a sample cache (as
  :func:`_checked_adam_function` checks the step alone); else None, warned, or raised when
  the switch requires the kernels."""
  function = getattr(library, _PUSH_SYMBOL)
  function.argtypes, function.restype = _PUSH_ARGS, ctypes.c_int64
  rng = np.random.default_rng(1)
  dim, capacity = 8, 64
  rows = rng.standard_normal((capacity, 1 + 3 * dim)).astype(np.float32)
  rows[:, 1 + 2 * dim :] **= 2
  rows[:, 0] = np.array([2], np.int32).view(np.float32)  # last step 1: no catch-up at step 2
  slots = rng.permutation(capacity)[:40]
  grads = rng.standard_normal((len(slots), dim)).astype(np.float32)
  for mode in ADAM_MODES:
    opt = SparseAdam(learning_rate=1e-2, mode=mode)
    ours, numpy_form = rows.copy(), rows.copy()
    dirty, numpy_dirty = np.zeros(capacity, bool), np.zeros(capacity, bool)
    outcome = RowPush(function, opt, ours, dirty)(slots, grads, 2)
    block = numpy_form[slots]
    _adam_step(opt, block[:, 1 : 1 + dim], block[:, 1 + dim :], grads, 2, None)
    block[:, 0] = np.array([3], np.int32).view(np.float32)
    numpy_form[slots], numpy_dirty[slots] = block, True
    if (
      outcome is not None or ours.tobytes() != numpy_form.tobytes() or (dirty != numpy_dirty).any()
    ):
      return _bits_differ(f"{_ADAM_SOURCE.name}'s push")
  return function


def _bits_differ(what: str) -> None:
  """What a kernel's failed self-check does: raise where the switch requires the kernels,
  else warn (once per kernel: its check is cached) and return None, the NumPy form."""
  message = f"{what} does not give the NumPy form's bits with this compiler"
  if _native.mode() == "on":
    raise _native.NativeBuildError(message)
  warnings.warn(message + "; using the NumPy form", RuntimeWarning, stacklevel=3)


def _adam_function() -> Callable | None:
  """The kernel's function, or None (off, or the build failed: warned once, or raised when
  the switch requires the kernels); asked anew at each call, the build and load are cached."""
  library = _native.library(_ADAM_SOURCE, _ADAM_SYMBOLS, extra_flags=_ADAM_FLAGS)
  return None if library is None else _checked_adam_function(library)


@functools.cache
def _checked_adam_function(library) -> Callable | None:
  """The library's function, once it gave the NumPy form's bits on a sample block (a
  compiler that reorders float operations despite the flags would not); else None, warned,
  or raised when the switch requires the kernels."""
  function = getattr(library, _ADAM_SYMBOL)
  function.argtypes, function.restype = _ADAM_ARGS, None
  rng = np.random.default_rng(0)
  dim, n = 8, 64
  block = rng.standard_normal((n, 1 + 3 * dim)).astype(np.float32)
  block[:, 1 + 2 * dim :] **= 2
  block[:4] = -0.0
  grads = rng.standard_normal((n, dim)).astype(np.float32)
  for mode in ADAM_MODES:
    opt = SparseAdam(learning_rate=1e-2, mode=mode)
    ours, numpy_form = block.copy(), block.copy()
    for rows, fn in ((ours, function), (numpy_form, None)):
      _adam_step(opt, rows[:, 1 : 1 + dim], rows[:, 1 + dim :], grads, 3, fn)
    if ours.tobytes() != numpy_form.tobytes():
      return _bits_differ(_ADAM_SOURCE.name)
  return function


def _adam_kernel(params_NxD, slots_NxS, grads_NxD) -> Callable | None:
  """``sparse_adam.cc``'s step where it applies: float32 rows of ``D`` parameters and of ``2 D``
  slots (m then v), each row contiguous, and float32 ``[N, D]`` gradients; else None (the
  NumPy form, which also broadcasts and takes float64 gradients). The switch is read at
  each call (:func:`kstep_adam._native.library`), as its other users do."""
  n, dim = params_NxD.shape
  fits = (
    params_NxD.dtype == slots_NxS.dtype == grads_NxD.dtype == np.float32
    and slots_NxS.shape == (n, 2 * dim)
    and grads_NxD.shape == (n, dim)
    and all(
      x.strides[1] == 4 and x.strides[0] > 0 and x.strides[0] % 4 == 0 and x.flags.aligned
      for x in (params_NxD, slots_NxS)
    )
    and params_NxD.flags.writeable
    and slots_NxS.flags.writeable
  )
  return _adam_function() if fits else None
