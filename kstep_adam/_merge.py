"""The collectives: averaging a pytree over mesh axes, and step-gated merges.

Everything here runs inside ``shard_map`` (or any context that binds the named axes).

* :func:`tree_mean` averages a pytree over axes, either with one flat all-reduce or with the
  production "k-step node" routing: reduce-scatter inside the innermost axis (fast links), each
  device all-reduces only its own ``1/n`` shard across the outer axes (every device and NIC
  carries inter-node traffic in parallel), then all-gather inside the innermost axis.
* :func:`switch_merge` runs the merge that a :class:`MergeSchedule` prescribes for the
  current step under ``lax.switch``: a local step executes no collective at all.
* :func:`merge_params` is the optax transform that turns updates ``u`` into
  ``mean(params + u) - params`` on merge steps; chain it last, after the learning rate.

Who decides that a step merges. By default the optimizer does, in the graph, from its step
counter. A caller that knows the step on the host can decide instead and trace a local step
without any branch: ``tx.update(..., merge=schedule.merges_at(step))`` with ``merge`` a static
argument of its ``jax.jit`` (:func:`declared_merge`), or the harness's host dispatch
(:func:`assume_local_step`). On XLA:CPU this matters: every parameter-sized value that passes
through a ``lax.switch`` (or ``while_loop``) is materialized and copied, so an in-graph local
step of a memory-bound update costs well above the plain optimizer, whatever the branch
computes; a hoisted local step is the plain optimizer's program plus one counter.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kstep_adam._schedule import MergeSchedule
from kstep_adam._schedule import check_route
from kstep_adam._schedule import normalize_axis_names

# Trace-time registries (see `assume_local_step` and `record_merge_schedules`). Context
# variables, not module lists, so that steps traced concurrently in other threads (a second
# trainer, a data thread that jits) neither see nor disturb them.
_ASSUMED_LOCAL: contextvars.ContextVar[tuple[MergeSchedule, ...]] = contextvars.ContextVar(
  "kstep_adam_assumed_local", default=()
)
_RECORDERS: contextvars.ContextVar[tuple[list[MergeSchedule], ...]] = contextvars.ContextVar(
  "kstep_adam_recorders", default=()
)
# Merge levels the host declared for adaptive schedules: ((schedule, level), ...).
_DECLARED_LEVELS: contextvars.ContextVar[tuple[tuple[MergeSchedule, int], ...]] = (
  contextvars.ContextVar("kstep_adam_declared_levels", default=())
)


@contextlib.contextmanager
def declared_level(schedule: MergeSchedule, level: int) -> Iterator[None]:
  """While tracing inside this context, ``schedule`` (adaptive) merges at ``level`` this step.

  Level 0 is a local step (no collective); level ``i >= 1`` averages over
  ``schedule.axis_names[i-1:]`` (1 = over every axis). The host decides the level
  (:class:`kstep_adam.AdaptiveController`) and traces one program per level.

  Raises:
    ValueError: ``schedule`` is not adaptive, or ``level`` is not in ``0..len(axis_names)``.
  """
  if schedule.adaptive is None:
    raise ValueError("declared_level is for adaptive schedules (kstep_adam.adaptive_schedule)")
  if isinstance(level, bool) or not isinstance(level, int | np.integer):
    raise ValueError(f"level must be an int known when tracing, got {level!r}")
  if not 0 <= level <= len(schedule.axis_names):
    raise ValueError(
      f"level must be in 0..{len(schedule.axis_names)} (axes {schedule.axis_names!r}), "
      f"got {level!r}"
    )
  token = _DECLARED_LEVELS.set(_DECLARED_LEVELS.get() + ((schedule, int(level)),))
  try:
    yield
  finally:
    _DECLARED_LEVELS.reset(token)


def adaptive_level(schedule: MergeSchedule) -> int:
  """The level the host declared for adaptive ``schedule`` at the step being traced.

  Records the schedule for :func:`record_merge_schedules`. While only recording (a harness
  tracing to discover its schedules, no level declared) it is 0: that trace is never run.

  Raises:
    ValueError: no level was declared and nothing records.
  """
  for found in _RECORDERS.get():
    if schedule not in found:
      found.append(schedule)
  for declared, level in reversed(_DECLARED_LEVELS.get()):
    if declared == schedule:
      return level
  if schedule in _ASSUMED_LOCAL.get() or _RECORDERS.get():
    return 0
  raise ValueError(
    "this optimizer's merge period is adaptive: the host decides each step's merge level. "
    "Pass merge=controller.decide(step) (a static int: 0 local, 1 over every axis, 2 inner "
    "axis only) to update, or run the step through kstep_adam.parallel.DispatchedStep with "
    "adaptive=controller"
  )


@contextlib.contextmanager
def assume_local_step(*schedules: MergeSchedule) -> Iterator[None]:
  """While tracing inside this context, steps of these schedules are built as local steps.

  An optimizer whose merge schedule equals one of ``schedules`` then traces only its local
  branch: the program has no conditional and no collective for it, so it runs as fast as the
  non-distributed optimizer (XLA copies the operands of an identity ``lax.switch`` branch, which
  costs a lot on memory-bound updates). The caller must run such a program only on steps where
  none of ``schedules`` merges (``not schedule.merges_at(step)``);
  :func:`kstep_adam.parallel.make_train_step` does this. An optimizer with a different schedule
  is unaffected (it keeps its ``lax.switch``), so a mismatch costs speed, never correctness.

  Examples:
    >>> import kstep_adam
    >>> s = kstep_adam.merge_schedule(8, axis_name=('node', 'local'))
    >>> tx = kstep_adam.kstep_adam(1e-3, s)
    >>> def local_step(grads, state, params):  # trace under jit/shard_map
    ...   with kstep_adam.assume_local_step(s):
    ...     return tx.update(grads, state, params)
  """
  token = _ASSUMED_LOCAL.set(_ASSUMED_LOCAL.get() + tuple(schedules))
  try:
    yield
  finally:
    _ASSUMED_LOCAL.reset(token)


def check_merge_flag(merge) -> bool | None:
  """Return the ``merge`` extra argument as None, True or False, or raise ValueError."""
  if merge is None or isinstance(merge, bool | np.bool_):
    return None if merge is None else bool(merge)
  hint = ""
  if isinstance(merge, jax.Array | jax.core.Tracer):
    hint = " (mark it static: jax.jit(..., static_argnames=('merge',)))"
  raise ValueError(
    f"merge must be None or a bool known when tracing, such as schedule.merges_at(step), "
    f"got {merge!r}{hint}"
  )


def declared_merge(schedule: MergeSchedule, merge) -> contextlib.AbstractContextManager:
  """Context for one ``update`` of an optimizer whose caller declared whether the step merges.

  Args:
    schedule: the optimizer's merge schedule.
    merge: the ``merge`` extra argument of ``update``: None (the default) or True decide in
      the graph from the step counter; False declares that no state of ``schedule`` merges at
      this step, which is then traced without merge branches (see :func:`assume_local_step`).

  For an adaptive schedule (:func:`kstep_adam.adaptive_schedule`) ``merge`` is the merge
  level the host decided (:func:`declared_level`): an int (0 local, ``i`` over
  ``axis_names[i-1:]``), True (1: every axis) or False (0); None leaves it to an enclosing
  harness, and raises when nothing declared it.

  Returns:
    :func:`assume_local_step` for ``schedule`` when ``merge`` is False, else a no-op context.

  Raises:
    ValueError: if ``merge`` is not None or a Python bool known when tracing (a traced value
      cannot choose what is traced), or is False for a schedule that averages every step.
  """
  if schedule.adaptive is not None:
    if merge is None:
      return contextlib.nullcontext()
    level = int(merge) if isinstance(merge, bool | np.bool_) else merge
    return declared_level(schedule, level)
  if check_merge_flag(merge) is not False:
    return contextlib.nullcontext()
  if schedule.merges_every_step():
    raise ValueError(
      f"merge=False declares a local step, but this optimizer averages "
      f"{schedule.states()!r} on every step (axes {schedule.axis_names!r})"
    )
  return assume_local_step(schedule)


@contextlib.contextmanager
def record_merge_schedules() -> Iterator[list[MergeSchedule]]:
  """Collect the merge schedules whose step-gated merges are traced inside this context.

  Yields:
    A list that fills up, during tracing, with every distinct schedule that built a
    ``lax.switch`` merge; a harness can then build a local program for them.
  """
  found: list[MergeSchedule] = []
  token = _RECORDERS.set(_RECORDERS.get() + (found,))
  try:
    yield found
  finally:
    _RECORDERS.reset(token)


def check_axes_bound(axis_names: tuple[str, ...]) -> None:
  """Raise ValueError if an axis is not bound (not a mesh axis of the enclosing shard_map).

  Internal helper, shared with the optimizers that run their own collectives (1-bit Adam):
  call it at ``init`` so that a missing ``shard_map`` fails with a message naming the axes.
  """
  for name in axis_names:
    try:
      jax.lax.axis_size(name)
    except (NameError, KeyError) as e:  # unbound axis (the type differs across jax versions)
      raise ValueError(
        f"axis_name {name!r} is not an axis of the enclosing shard_map/mesh; the optimizer "
        f"(or tree_mean) must run inside shard_map over a mesh that has all of "
        f"{axis_names!r}"
      ) from e


def _varying_axes(x) -> frozenset:
  """Mesh axes over which ``x`` varies (shard_map's VMA type); empty when unchecked."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:  # jax 0.10 keeps it in `mat.varying`.
    mat = getattr(aval, "mat", None)
    vma = getattr(mat, "varying", frozenset())
  return frozenset(vma)


def like_vma(y, x):
  """Cast ``y`` (a mean, invariant over the merged axes) back to ``x``'s varying axes.

  Both branches of a ``lax.switch`` must have the same type under ``check_vma``; the local
  branch returns per-worker values, so the merged branch must be declared varying too.
  Internal helper, shared with the compressed means in ``_compression``.
  """
  missing = tuple(sorted(_varying_axes(x) - _varying_axes(y)))
  return jax.lax.pcast(y, missing, to="varying") if missing else y


def _flat_mean(tree, axes: tuple[str, ...]):
  return jax.tree.map(lambda x: like_vma(jax.lax.pmean(x, axes), x), tree)


def _hierarchical_mean(tree, outer: tuple[str, ...], inner: str, *, with_spread: bool = False):
  """Mean over ``outer + (inner,)`` routed as reduce-scatter / all-reduce shard / all-gather.

  Leaves are fused into one flat buffer per dtype (as production fuses dense parameters),
  padded to a multiple of the ``inner`` axis size. With ``with_spread`` also returns this
  device's ``||shard of (inner-axis mean - global mean)||^2`` (float32; see
  :func:`mean_with_drift`).
  """
  leaves, treedef = jax.tree.flatten(tree)
  n_inner = jax.lax.axis_size(inner)
  n_total = n_inner
  for a in outer:
    n_total *= jax.lax.axis_size(a)
  out = list(leaves)
  spread = jnp.zeros((), jnp.float32)
  for dtype in sorted({leaf.dtype for leaf in leaves}, key=str):
    idx = [i for i, leaf in enumerate(leaves) if leaf.dtype == dtype]
    flat_N = jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])
    size = flat_N.shape[0]
    pad = (-size) % n_inner
    flat_N = jnp.pad(flat_N, (0, pad))
    inner_S = jax.lax.psum_scatter(flat_N, inner, scatter_dimension=0, tiled=True)
    shard_S = jax.lax.psum(inner_S, outer) / n_total
    if with_spread:
      diff = inner_S.astype(jnp.float32) / n_inner - shard_S.astype(jnp.float32)
      spread = spread + jnp.sum(jnp.square(diff))
    mean_N = jax.lax.all_gather(shard_S.astype(dtype), inner, axis=0, tiled=True)[:size]
    offset = 0
    for i in idx:
      n = leaves[i].size
      out[i] = like_vma(mean_N[offset : offset + n].reshape(leaves[i].shape), leaves[i])
      offset += n
  mean = jax.tree.unflatten(treedef, out)
  return (mean, spread) if with_spread else mean


def tree_mean(tree, axes: str | Sequence[str], route: str = "hierarchical"):
  """Average every leaf of ``tree`` over the mesh ``axes`` (outermost first).

  Args:
    tree: pytree of per-device arrays.
    axes: axis name or axes to average over; with one axis, or ``route='flat'``, one
      all-reduce per leaf.
    route: ``'hierarchical'`` routes a multi-axis mean through the innermost axis (see module
      docstring); it equals the flat mean up to floating-point summation order.

  Returns:
    The mean, with the same structure, shapes and dtypes as ``tree``.

  Raises:
    ValueError: on no axes, an unknown route, or an axis that the enclosing ``shard_map``
      does not bind.
  """
  axes = normalize_axis_names(axes, "axes")
  if not axes:
    raise ValueError("tree_mean needs at least one axis, got None")
  check_route(route)
  check_axes_bound(axes)
  if len(axes) == 1 or route == "flat":
    return _flat_mean(tree, axes)
  return _hierarchical_mean(tree, axes[:-1], axes[-1])


def switch_merge(
  level,
  schedule: MergeSchedule,
  state: str,
  local_fn: Callable[[Any], Any],
  merge_fn: Callable[[Any, Callable], Any],
  operand,
):
  """Run the merge that ``schedule`` prescribes for ``state`` at merge ``level`` (0 = local).

  Args:
    level: int32 scalar from ``schedule.level_at(state, step)``.
    schedule: the merge schedule.
    state: which state's periods to use.
    local_fn: ``operand -> out`` on a local step; must contain no collective.
    merge_fn: ``(operand, mean) -> out`` on a merge step, where ``mean(tree)`` averages a
      pytree over the axes of this level (``schedule.axis_names[i:]``).
    operand: pytree passed to the branches.

  Returns:
    The chosen branch's output. Only merge branches contain collectives; they sit inside
    ``lax.switch``, so a local step executes none. If the outermost level merges every
    step, no branch is built at all.
  """
  if not schedule.merges(state):
    return local_fn(operand)
  if schedule.adaptive is not None:  # the host declared the level; no branch
    level = adaptive_level(schedule)
    if level == 0:
      return local_fn(operand)
    return merge_fn(
      operand, lambda t: tree_mean(t, schedule.axis_names[level - 1 :], schedule.route)
    )
  for found in _RECORDERS.get():
    if schedule not in found:
      found.append(schedule)
  if schedule in _ASSUMED_LOCAL.get():
    return local_fn(operand)
  axes, route = schedule.axis_names, schedule.route
  if schedule.periods(state)[0] == 1:  # Merges over all axes every step.
    return merge_fn(operand, lambda t: tree_mean(t, axes, route))
  live = schedule.live_levels(state)
  branches = [local_fn] + [
    (lambda op, i=level_ - 1: merge_fn(op, lambda t: tree_mean(t, axes[i:], route)))
    for level_ in live
  ]
  # Map merge level -> branch index; dead levels (never selected) get no branch.
  branch_of_level = [0] + [live.index(i) + 1 if i in live else 0 for i in range(1, len(axes) + 1)]
  index = jnp.asarray(branch_of_level, jnp.int32)[level]
  return jax.lax.switch(index, branches, operand)


def _sum_squares(tree) -> jax.Array:
  return sum(
    (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
    jnp.zeros((), jnp.float32),
  )


def mean_with_drift(tree, schedule: MergeSchedule):
  r"""Average ``tree`` over every axis of ``schedule`` and measure the replicas' drift per axis.

  With ``xbar`` the mean over every worker and ``xbar_n`` the mean over the inner axis of
  worker ``w``'s node (two axes), the drift along each axis, relative to ``||xbar||^2``, is

  .. math::
    D_{\mathrm{outer}} = \frac{\operatorname{mean}_w \|\bar x_{n(w)} - \bar x\|^2}
      {\|\bar x\|^2},\qquad
    D_{\mathrm{inner}} = \frac{\operatorname{mean}_w \|x_w - \bar x_{n(w)}\|^2}
      {\|\bar x\|^2},

  whose sum is the total spread ``mean_w ||x_w - xbar||^2 / ||xbar||^2`` (one axis: that
  total alone). The node means are never formed: on the hierarchical route each device holds
  its shard of its node's sum after the reduce-scatter and of the global mean after the
  all-reduce, which give its shard of ``xbar_n - xbar``. One extra all-reduce of 3 float32
  scalars over every axis makes the result the same on every worker (counted by
  :func:`kstep_adam.merge_bytes`).

  Returns:
    ``(mean, drift)``, ``drift`` a float32 vector with one entry per axis (outermost first),
    the same on every worker (an all-reduced value).
  """
  axes = schedule.axis_names
  check_axes_bound(axes)
  n_total = 1
  for a in axes:
    n_total *= jax.lax.axis_size(a)
  if len(axes) == 1:
    mean = tree_mean(tree, axes, schedule.route)
    between = jnp.zeros((), jnp.float32)
  else:
    mean, between = _hierarchical_mean(tree, axes[:-1], axes[-1], with_spread=True)
  spread = _sum_squares(jax.tree.map(lambda x, m: x.astype(jnp.float32) - m, tree, mean))
  totals = jax.lax.psum(jnp.stack([spread, between, _sum_squares(mean)]), axes)
  n_outer = n_total // jax.lax.axis_size(axes[-1])
  total, norm = totals[0] / n_total, totals[2] / n_total
  scale = 1.0 / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
  if len(axes) == 1:
    drift = jnp.stack([total * scale])
  else:
    outer = totals[1] / n_outer
    drift = jnp.stack([outer * scale, jnp.maximum(total - outer, 0.0) * scale])
  leaf = jax.tree.leaves(tree)[0]
  return mean, like_vma(drift, leaf)


def merge_tree(level, tree, schedule: MergeSchedule, state: str):
  """Average ``tree`` on the merge steps of ``state``; return it unchanged otherwise."""
  return switch_merge(level, schedule, state, lambda t: t, lambda t, mean: mean(t), tree)


class MergeParamsState(NamedTuple):
  """State of :func:`merge_params`."""

  count: jax.Array  # shape=(), int32; steps taken so far.


class AdaptiveMergeState(NamedTuple):
  """State of :func:`merge_params` with an adaptive schedule."""

  count: jax.Array  # shape=(), int32; steps taken so far.
  # shape=(num_axes,), float32: the relative drift per axis (outermost first) measured by the
  # last merge over every axis (see `mean_with_drift`); the same on every worker.
  drift: jax.Array


def merge_params(schedule: MergeSchedule) -> optax.GradientTransformationExtraArgs:
  """Turn updates into model-averaging updates on merge steps.

  .. math::
    u_t \\leftarrow \\operatorname{mean}_w(x_t + u_t) - x_t \\quad\\text{if step } t
    \\text{ merges, else } u_t

  so that after ``optax.apply_updates`` every worker holds the mean of the replicas. Chain it
  last (after the learning rate). Needs ``params`` in ``update``, which also takes the extra
  argument ``merge`` (see :func:`declared_merge`).

  Args:
    schedule: merge schedule; its ``'params'`` periods decide the merge steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """

  def init_fn(params):
    del params
    count = jnp.zeros([], jnp.int32)
    if schedule.adaptive is not None:
      return AdaptiveMergeState(count, jnp.zeros([len(schedule.axis_names)], jnp.float32))
    return MergeParamsState(count=count)

  def update_fn(updates, state, params=None, *, merge=None, **extra_args):
    del extra_args
    with declared_merge(schedule, merge):
      return _merge_params_update(updates, state, params)

  def _merge_params_update(updates, state, params):
    count = optax.safe_increment(state.count)
    if not schedule.merges("params"):
      return updates, MergeParamsState(count=count)
    if params is None:
      raise ValueError("merge_params needs `params` in update(updates, state, params)")
    if schedule.adaptive is not None:
      return _adaptive_update(updates, state, params, count)

    def merge_fn(updates, mean):
      new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
      return jax.tree.map(
        lambda m, p, u: (m - p).astype(u.dtype), mean(new_params), params, updates
      )

    # Only `updates` is the switch operand; `params` enters by closure, so that the identity
    # (local) branch carries one parameter-sized tree, not two.
    updates = switch_merge(
      schedule.level_at("params", count), schedule, "params", lambda u: u, merge_fn, updates
    )
    return updates, MergeParamsState(count=count)

  def _adaptive_update(updates, state, params, count):
    level, drift = adaptive_level(schedule), state.drift
    if level:
      new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
      if level == 1:
        mean, drift = mean_with_drift(new_params, schedule)
      else:
        mean = tree_mean(new_params, schedule.axis_names[level - 1 :], schedule.route)
      updates = jax.tree.map(lambda m, p, u: (m - p).astype(u.dtype), mean, params, updates)
    return updates, AdaptiveMergeState(count=count, drift=drift)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
