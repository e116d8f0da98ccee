"""k-step Adam: local Adam on every worker, replicas averaged every k steps.

``scale_by_kstep_adam`` is the direction (and averages the moments when asked);
``kstep_adam`` chains it with the learning rate and the parameter merge.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep_adam._merge import declared_merge
from kstep_adam._merge import merge_params
from kstep_adam._merge import merge_tree
from kstep_adam._schedule import MergeSchedule
from kstep_adam._schedule import merge_schedule
from kstep_adam._validation import check_choice
from kstep_adam._validation import check_float_dtype
from kstep_adam._validation import check_hyperparameter

FORMS = ("adam", "local_adam")
ADAM_STATES = ("params", "mu", "nu")  # what k-step Adam can average.


class ScaleByKStepAdamState(NamedTuple):
  """State of :func:`scale_by_kstep_adam`; every field is per worker."""

  count: jax.Array  # shape=(), int32; steps taken so far.
  mu: optax.Updates  # first moment, like params (dtype mu_dtype if given).
  nu: optax.Updates  # second moment, like params.


def scale_by_kstep_adam(
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any = None,
  form: str = "adam",
  clip: float | None = None,
  k: int | Mapping[str, int] | MergeSchedule = 1,
  axis_name: str | Sequence[str] | None = None,
  sync: str | Mapping[str, int] = "params",
  route: str = "hierarchical",
) -> optax.GradientTransformationExtraArgs:
  r"""Scale updates by local Adam and average the moments on their merge steps.

  With ``form='adam'`` (default) the direction is exactly ``optax.scale_by_adam``:

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
    \quad d_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}.

  With ``form='local_adam'`` it is Cheng & Glasgow's Local Adam: no bias correction and
  ``eps`` (their :math:`\lambda`) inside the root, :math:`d_t = m_t / \sqrt{v_t + \lambda^2}`.
  ``clip=rho`` first clips each gradient coordinate to :math:`[-\rho, \rho]` (either form).

  After the local step, ``mu`` and/or ``nu`` are replaced by their mean over ``axis_name`` on
  their merge steps (``sync``); the direction of that step still uses the local moments, as
  in Cheng & Glasgow's algorithm. Parameters are merged by :func:`kstep_adam`, not here.

  Args:
    b1: decay rate of the first moment, in [0, 1).
    b2: decay rate of the second moment, in [0, 1) (``'adam'`` divides by ``1 - b2^t``) or
      [0, 1] (``'local_adam'``).
    eps: added to the denominator (``'adam'``) or, squared, inside the root (``'local_adam'``);
      >= 0.
    eps_root: added inside the root (``'adam'`` form only, as in optax); >= 0.
    mu_dtype: dtype of the first moment; None keeps the params' dtype.
    form: ``'adam'`` (bias-corrected, as optax) or ``'local_adam'`` (Cheng & Glasgow).
    clip: coordinate-wise gradient clipping threshold ``rho``; None disables it.
    k: merge period, per-axis periods ``{axis: k}``, or a :class:`MergeSchedule`.
    axis_name: mesh axis or axes (outermost first) to average over; None never averages.
    sync: which states merge and how often, see :func:`kstep_adam.merge_schedule`.
    route: ``'hierarchical'`` or ``'flat'`` routing of multi-axis means.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByKStepAdamState`;
    ``update`` takes the extra argument ``merge`` (see :func:`kstep_adam`).

  Raises:
    ValueError: on an argument out of its range, at construction. Values that
      ``optax.inject_hyperparams`` traces under ``jit`` are unknown then and are not checked.

  Examples:
    >>> import jax.numpy as jnp, kstep_adam
    >>> tx = kstep_adam.scale_by_kstep_adam()
    >>> d, _ = tx.update({'w': jnp.ones(2)}, tx.init({'w': jnp.zeros(2)}))

  References:
    Cheng & Glasgow, Convergence of Distributed Adaptive Optimization with Local Updates,
    https://arxiv.org/abs/2409.13155
  """
  check_choice(form, "form", FORMS)
  check_hyperparameter(b1, "b1", low=0.0, high=1.0, high_open=True)
  # 'adam' divides by the bias correction 1 - b2^t, which b2 = 1 makes zero.
  check_hyperparameter(b2, "b2", low=0.0, high=1.0, high_open=form == "adam")
  check_hyperparameter(eps, "eps", low=0.0)
  check_hyperparameter(eps_root, "eps_root", low=0.0)
  check_hyperparameter(clip, "clip", low=0.0, low_open=True, allow_none=True)
  mu_dtype = check_float_dtype(mu_dtype, "mu_dtype")
  schedule = merge_schedule(
    k, axis_name=axis_name, sync=sync, route=route, mu_dtype=mu_dtype, allowed_states=ADAM_STATES
  )

  def init_fn(params):
    return ScaleByKStepAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None, *, merge=None, **extra_args):
    del params, extra_args
    with declared_merge(schedule, merge):
      return _update(updates, state)

  def _update(updates, state):
    if clip is not None:
      updates = jax.tree.map(lambda g: jnp.clip(g, -clip, clip), updates)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    if form == "adam":
      mu_hat = optax.tree.bias_correction(mu, b1, count)
      nu_hat = optax.tree.bias_correction(nu, b2, count)
      updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    else:
      # Cheng & Glasgow (arXiv 2409.13155), Alg. 1: x <- x - eta * u / sqrt(v + lambda^2).
      updates = jax.tree.map(lambda m, v: m / jnp.sqrt(v + eps * eps), mu, nu)
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    mu = merge_tree(schedule.level_at("mu", count), mu, schedule, "mu")
    nu = merge_tree(schedule.level_at("nu", count), nu, schedule, "nu")
    return updates, ScaleByKStepAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kstep_adam(
  learning_rate: optax.ScalarOrSchedule,
  k: int | Mapping[str, int] | MergeSchedule,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any = None,
  form: str = "adam",
  clip: float | None = None,
  axis_name: str | Sequence[str] | None = None,
  sync: str | Mapping[str, int] = "params",
  route: str = "hierarchical",
) -> optax.GradientTransformation:
  r"""k-step Adam: Adam on each worker's own gradients, replicas averaged every k steps.

  .. math::
    x^w_{t} = x^w_{t-1} - \eta_t\, d^w_t, \qquad
    x^w_{t} \leftarrow \tfrac{1}{N}\textstyle\sum_{w'} x^{w'}_{t} \ \text{ if } k \mid t,

  where :math:`d^w_t` is :func:`scale_by_kstep_adam`'s direction on worker ``w``. On a merge
  step the returned updates are ``pmean(params + u) - params``. By default only parameters are
  averaged and each worker keeps its own moments (the PaddleBox production default).

  Hierarchical: with ``axis_name=('node', 'local')`` and ``k={'node': 8, 'local': 1}`` the
  replicas are averaged inside each node every step and across all nodes every 8 steps; a
  cross-node merge is routed reduce-scatter('local') -> all-reduce own shard ('node') ->
  all-gather('local'). An int ``k`` with a tuple ``axis_name`` merges over all axes every k.

  Not equivalent to synchronous Adam (:func:`kstep_adam.sync_adam`) even for k = 1 with
  ``sync='params'``: averaging parameters after local Adam steps differs from one Adam step on
  averaged gradients, because Adam is non-linear in the gradient.

  Without ``axis_name`` it equals ``optax.adam`` (``form='adam'``, ``clip=None``).

  Merges are gated by ``lax.switch`` on the step counter, so a local step executes no
  collective. The switch still makes XLA materialize and copy the parameter-sized updates on
  every step. A caller that knows the step on the host removes that: pass
  ``merge=schedule.merges_at(step)`` to ``update`` as a static argument of its ``jax.jit``
  (two programs are compiled; a local step is then ``optax.adam``'s program plus one
  counter), or let the harness (:func:`kstep_adam.parallel.make_train_step`,
  :class:`kstep_adam.parallel.DispatchedStep`) do it. ``merge=False`` on a step that does
  merge skips that merge: the host's step count must match the optimizer's.

  Args:
    learning_rate: a float >= 0 or an optax schedule (a schedule is not checked: its values
      are known only when it is called).
    k: merge period in steps, per-axis periods ``{axis: k}``, or a :class:`MergeSchedule`
      (then ``axis_name``, ``sync``, ``route`` are taken from it; if it averages ``mu`` it
      must be built with the same ``mu_dtype``, so that byte counts are right). Under
      ``optax.inject_hyperparams`` pass ``static_args=('k',)``. An adaptive schedule
      (:func:`kstep_adam.adaptive_schedule`) merges where the host says: ``update`` then
      needs ``merge=level`` (or :class:`kstep_adam.parallel.DispatchedStep` with its
      controller), and the parameter merge's state keeps the drift it measures.
    b1: decay rate of the first moment, in [0, 1).
    b2: decay rate of the second moment, in [0, 1) (``'local_adam'``: [0, 1]).
    eps: denominator term, see :func:`scale_by_kstep_adam`; >= 0.
    eps_root: term inside the root (``'adam'`` form); >= 0.
    mu_dtype: dtype of the first moment.
    form: ``'adam'`` or ``'local_adam'`` (Cheng & Glasgow).
    clip: coordinate-wise gradient clipping threshold, or None.
    axis_name: mesh axis or axes (outermost first) to average over, or None.
    sync: ``'params'`` (default), ``'params+nu'``, ``'params+moments'``, ``'desloc'``, or a
      mapping state -> period as a multiple of k, e.g. ``{'params': 1, 'mu': 3, 'nu': 6}``.
    route: ``'hierarchical'`` (default) or ``'flat'`` routing of multi-axis merges.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` and takes
    the extra argument ``merge`` (None: decided in the graph; a bool: decided by the caller).

  Raises:
    ValueError: on an argument out of its range, at construction (schedules and values traced
      under ``optax.inject_hyperparams`` excepted: they are unknown then).

  Examples:
    >>> import jax.numpy as jnp, optax, kstep_adam
    >>> tx = kstep_adam.kstep_adam(1e-3, k=4)  # no axis: same as optax.adam(1e-3)
    >>> params = {'w': jnp.zeros(3)}
    >>> u, state = tx.update({'w': jnp.ones(3)}, tx.init(params), params)

    A plain ``jax.jit`` loop that decides merge steps on the host (inside ``shard_map`` over
    the schedule's axes; without axes, as here, no step merges):

    >>> import functools, jax
    >>> schedule = kstep_adam.merge_schedule(2)
    >>> tx = kstep_adam.kstep_adam(1e-3, schedule)
    >>> @functools.partial(jax.jit, static_argnames="merge")
    ... def step(params, state, grads, merge):
    ...   updates, state = tx.update(grads, state, params, merge=merge)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> for t in range(1, 4):
    ...   params, state = step(params, state, {'w': jnp.ones(3)}, merge=schedule.merges_at(t))

  References:
    Zhao et al., Communication-Efficient TeraByte-Scale Model Training Framework for Online
    Advertising, https://arxiv.org/abs/2201.05500;
    Cheng & Glasgow, https://arxiv.org/abs/2409.13155;
    Iacob et al., DES-LOC, https://arxiv.org/abs/2505.22549
  """
  check_hyperparameter(learning_rate, "learning_rate", low=0.0, schedule=True)
  schedule = merge_schedule(
    k, axis_name=axis_name, sync=sync, route=route, mu_dtype=mu_dtype, allowed_states=ADAM_STATES
  )
  return optax.chain(
    scale_by_kstep_adam(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, form=form, clip=clip, k=schedule
    ),
    optax.scale_by_learning_rate(learning_rate),
    merge_params(schedule),
  )
