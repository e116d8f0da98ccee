"""Top-k / random-k sparsified gradient exchange with error feedback, then Adam."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep_adam._compression import sparse_mean
from kstep_adam._merge import declared_merge
from kstep_adam._merge import tree_mean
from kstep_adam._schedule import MergeSchedule
from kstep_adam._validation import check_float_dtype
from kstep_adam._validation import check_hyperparameter
from kstep_adam._validation import check_int
from kstep_adam.baselines._schedules import compressed_schedule_of


class SparsifiedMeanState(NamedTuple):
  """State of :func:`sparsified_mean`; every field is per worker."""

  count: jax.Array  # shape=(), int32; steps taken so far.
  error: optax.Updates  # float32, like params: what this worker's messages missed.


def sparsified_mean(
  schedule: MergeSchedule, *, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
  r"""Average updates over the schedule's axes through top-k or random-k with error feedback.

  .. math::
    p^w_t = g^w_t + e^w_{t-1}, \qquad e^w_t = p^w_t - C(p^w_t), \qquad
    g_t \leftarrow \tfrac{1}{N}\textstyle\sum_w C(p^w_t),

  where :math:`C` keeps ``density`` of each leaf's entries (the ``'topk'`` or ``'randk'``
  exchange of :class:`kstep_adam.Compression`; ``'randk'`` draws leaf ``i``'s indices, the
  same on every worker, as ``jax.random.choice(jax.random.fold_in(key_t, i), size, (k,),
  replace=False)`` with ``i`` the leaf's position in ``jax.tree.leaves``). The first ``warmup_steps`` steps average the
  full-precision updates and leave the errors alone. Without an axis the worker is alone and
  still sparsifies its own updates with error feedback (Stich et al.'s single-worker
  setting). Chain an optimizer after it (:func:`topk_ef` chains ``optax.adam``).

  Args:
    schedule: a ``kstep_adam.compressed_schedule(axes, 'topk' or 'randk', density=...)``.
    seed: seed of the indices ``'randk'`` draws (the same on every worker); step ``t`` uses
      ``key_t = jax.random.fold_in(jax.random.key(seed), t)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SparsifiedMeanState`.
  """
  if schedule is None:
    raise ValueError("sparsified_mean needs a kstep_adam.compressed_schedule(...), got None")
  schedule = compressed_schedule_of(schedule, ("topk", "randk"), None, "hierarchical")
  if not (
    isinstance(seed, jax.Array) and seed.ndim == 0 and jnp.issubdtype(seed.dtype, jnp.integer)
  ):
    seed = check_int(seed, "seed", minimum=0)  # an int array passes: inject_hyperparams's
  compression, axes = schedule.compression, schedule.axis_names

  def init_fn(params):
    return SparsifiedMeanState(
      count=jnp.zeros([], jnp.int32), error=optax.tree.zeros_like(params, dtype=jnp.float32)
    )

  def warmup_step(operand):
    updates, error = operand
    return (tree_mean(updates, axes, schedule.route) if axes else updates), error

  def update_fn(updates, state, params=None, *, merge=None, **extra_args):
    del params, extra_args
    declared_merge(schedule, merge)  # checks `merge`; a declared local step is refused
    count = optax.safe_increment(state.count)
    key = jax.random.fold_in(jax.random.key(seed), count)

    def compressed_step(operand):
      return sparse_mean(*operand, compression, axes, route=schedule.route, key=key)

    operand = (updates, state.error)
    if compression.warmup_steps:
      updates, error = jax.lax.cond(
        count <= compression.warmup_steps, warmup_step, compressed_step, operand
      )
    else:
      updates, error = compressed_step(operand)
    return updates, SparsifiedMeanState(count=count, error=error)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def topk_ef(
  learning_rate: optax.ScalarOrSchedule,
  schedule: MergeSchedule | None = None,
  *,
  density: float | None = None,
  method: str | None = None,
  warmup_steps: int | None = None,
  seed: int = 0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any = None,
  axis_name: str | Sequence[str] | None = None,
  route: str = "hierarchical",
) -> optax.GradientTransformationExtraArgs:
  r"""Adam on gradients averaged through top-k (or random-k) sparsification with error feedback.

  :func:`sparsified_mean` followed by ``optax.adam``. Each step every worker sends ``density``
  of its gradient entries (plus what earlier messages missed): ``'topk'`` the largest ones
  with their int32 indices (an all-gather), ``'randk'`` the entries at indices every worker
  draws from a shared seed (only values, one all-reduce). With ``density=1.0`` it equals
  :func:`kstep_adam.sync_adam` up to summation order. It is not k-step Adam: it communicates
  every step, sparsified, and its error memories hold a full gradient per worker.

  Args:
    learning_rate: a float >= 0 or an optax schedule (not checked until called).
    schedule: a ``kstep_adam.compressed_schedule(axes, 'topk' or 'randk', density=...)``;
      pass the same object to the byte accounting. None builds it from ``axis_name``,
      ``density``, ``method``, ``warmup_steps`` and ``route``.
    density: fraction of each leaf's entries sent, in (0, 1]; required without a schedule.
    method: ``'topk'`` (default) or ``'randk'``.
    warmup_steps: steps that average full-precision gradients first (default 0).
    seed: seed of the ``'randk'`` indices.
    b1: decay rate of the first moment, in [0, 1).
    b2: decay rate of the second moment, in [0, 1).
    eps: denominator term, >= 0.
    eps_root: term inside the root, >= 0.
    mu_dtype: dtype of the first moment.
    axis_name: mesh axis or axes (outermost first) to exchange over; None: one worker.
    route: ``'hierarchical'`` or ``'flat'`` routing of the warm-up and ``'randk'``
      all-reduces.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import kstep_adam
    >>> schedule = kstep_adam.compressed_schedule(("node", "local"), "topk", density=0.01)
    >>> tx = kstep_adam.topk_ef(1e-3, schedule)  # and comm_bytes(params, schedule, ...)

  References:
    Stich, Cordonnier & Jaggi, Sparsified SGD with Memory, https://arxiv.org/abs/1809.07599;
    Karimireddy et al., Error Feedback Fixes SignSGD and other Gradient Compression Schemes,
    https://arxiv.org/abs/1901.09847
  """
  check_hyperparameter(learning_rate, "learning_rate", low=0.0, schedule=True)
  check_hyperparameter(b1, "b1", low=0.0, high=1.0, high_open=True)
  check_hyperparameter(b2, "b2", low=0.0, high=1.0, high_open=True)
  check_hyperparameter(eps, "eps", low=0.0)
  check_hyperparameter(eps_root, "eps_root", low=0.0)
  check_float_dtype(mu_dtype, "mu_dtype")
  if schedule is None and density is None:
    raise ValueError("topk_ef needs density (or a schedule built with it)")
  schedule = compressed_schedule_of(
    schedule,
    ("topk", "randk"),
    axis_name,
    route,
    method=method,
    density=density,
    warmup_steps=warmup_steps,
  )
  return optax.chain(
    sparsified_mean(schedule, seed=seed),
    optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
  )
