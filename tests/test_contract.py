"""The contract every optimizer of the package keeps, checked on each one (as optax's
``_common_test.py`` does for its aliases).

An optimizer added to the package joins every test here with one entry in ``OPTIMIZERS``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _runs import init_params
from _runs import loss_fn
from _runs import run_harness
from _runs import theta_of
from _runs import worker_data

import kstep_adam
from kstep_adam import parallel

NODE_LOCAL = ("node", "local")


def scale_by_kstep_adam_descent(learning_rate, k, sync="params", axis_name=None):
  """:func:`kstep_adam.scale_by_kstep_adam` turned into a descent step, so it runs as the rest."""
  return optax.chain(
    kstep_adam.scale_by_kstep_adam(k=k, sync=sync, axis_name=axis_name),
    optax.scale_by_learning_rate(learning_rate),
  )


# name: (factory, keyword arguments, the arguments optax.inject_hyperparams must keep static).
# Every factory also takes `axis_name`, which the tests add. Periods are 2, so that a 4-step
# run on a mesh takes local steps and merges.
OPTIMIZERS = {
  "kstep_adam": (kstep_adam.kstep_adam, dict(learning_rate=0.05, k=2), ("k",)),
  "kstep_adam/params+nu": (
    kstep_adam.kstep_adam,
    dict(learning_rate=0.05, k=2, sync="params+nu"),
    ("k",),
  ),
  "kstep_adam/params+moments/mu_bf16": (
    kstep_adam.kstep_adam,
    dict(learning_rate=0.05, k=2, sync="params+moments", mu_dtype=jnp.bfloat16),
    ("k", "mu_dtype"),  # a dtype is callable: inject_hyperparams would take it for a schedule
  ),
  "kstep_adam/desloc": (
    kstep_adam.kstep_adam,
    dict(learning_rate=0.05, k=2, sync="desloc"),
    ("k",),
  ),
  "kstep_adam/local_adam": (
    kstep_adam.kstep_adam,
    dict(learning_rate=0.05, k=2, form="local_adam", sync="params+moments", clip=1.0),
    ("k",),
  ),
  "scale_by_kstep_adam": (
    scale_by_kstep_adam_descent,
    dict(learning_rate=0.05, k=2, sync="params+moments"),
    ("k",),
  ),
  "sync_adam": (kstep_adam.sync_adam, dict(learning_rate=0.05), ()),
  "local_sgd": (kstep_adam.local_sgd, dict(learning_rate=0.05, k=2), ("k",)),
  "local_sgd/nesterov": (
    kstep_adam.local_sgd,
    dict(learning_rate=0.05, k=2, momentum=0.9, nesterov=True),
    ("k",),
  ),
  "diloco": (kstep_adam.diloco, dict(inner_steps=2, inner_learning_rate=0.05), ("inner_steps",)),
  "onebit_adam": (
    kstep_adam.onebit_adam,
    dict(learning_rate=0.05, warmup_steps=2),
    ("warmup_steps",),
  ),
  "topk_ef": (kstep_adam.topk_ef, dict(learning_rate=0.05, density=0.5), ("density",)),
  "topk_ef/randk_warmup": (
    kstep_adam.topk_ef,
    dict(learning_rate=0.05, density=0.5, method="randk", warmup_steps=1),
    ("density", "warmup_steps"),
  ),
}
NAMES = list(OPTIMIZERS)


def _make(name, **extra):
  factory, kwargs, _ = OPTIMIZERS[name]
  return factory(**kwargs, **extra)


def _params(dtype):
  rng = np.random.default_rng(0)
  return {
    "w": jnp.asarray(rng.normal(size=(3, 4)), dtype),
    "b": jnp.asarray(rng.normal(size=4), dtype),
    "s": jnp.asarray(0.3, dtype),
  }


def _grads(params, t):
  return jax.tree.map(lambda p: (jnp.sin(p * (t + 1.0)) + 0.1).astype(p.dtype), params)


def _types(tree):
  """Structure, shapes, dtypes and weak types: what a retrace would be keyed on."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [
    (jax.typeof(x).shape, jax.typeof(x).dtype, jax.typeof(x).weak_type) for x in leaves
  ]


def _tolerance(state) -> tuple[float, float]:
  """(rtol, atol) for comparing two runs of one optimizer that round differently.

  A bfloat16 state shows its rounding: the mean of equal bfloat16 values is taken in bfloat16,
  and an injected (float32 array) ``b1`` times a bfloat16 moment is computed in float32 where
  a Python float keeps it in bfloat16.
  """
  bf16 = any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state))
  return (1e-3, 1e-3) if bf16 else (1e-5, 1e-5)


def _jitted_run(tx, params, steps):
  """Jitted update + apply for ``steps`` steps; returns params, state and the trace count."""
  traces = []

  @jax.jit
  def step(params, state, t):
    traces.append(t)
    updates, state = tx.update(_grads(params, t), state, params)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  init_types = _types(state)
  for t in range(steps):
    params, state, updates = step(params, state, jnp.float32(t))
    assert _types(state) == init_types, f"state types changed at step {t + 1}"
  return params, state, updates, len(traces)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_jit_once_keeps_dtypes_and_state_types(name, dtype):
  params = _params(dtype)
  new_params, _, updates, traces = _jitted_run(_make(name), params, steps=3)
  assert traces == 1, "a later step recompiled the update"
  for tree in (new_params, updates):
    assert jax.tree.map(lambda x: x.dtype, tree) == jax.tree.map(lambda x: x.dtype, params)
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(new_params))


@pytest.mark.parametrize("name", NAMES)
def test_works_under_inject_hyperparams(name):
  factory, kwargs, static_args = OPTIMIZERS[name]
  injected = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
  params = _params(jnp.float32)
  got, state, _, traces = _jitted_run(injected, params, steps=3)
  want, want_state, _, _ = _jitted_run(_make(name), params, steps=3)
  assert traces == 1
  # Float arguments are injected, so adjustable (those that shape the state stay static).
  floats = {k for k, v in kwargs.items() if isinstance(v, float) and k not in static_args}
  assert floats and floats <= set(state.hyperparams)
  rtol, atol = _tolerance(want_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


@pytest.mark.parametrize("name", NAMES)
def test_descends_on_one_device_without_axis(name):
  target = jax.tree.map(lambda p: jnp.full_like(p, 2.0), _params(jnp.float32))
  loss = lambda p: sum(
    jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(target))
  )
  tx = _make(name)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params = _params(jnp.float32)
  state, start = tx.init(params), loss(params)
  for _ in range(20):
    params, state = step(params, state)
  assert loss(params) < 0.8 * start


@pytest.mark.parametrize("name", NAMES)
def test_on_the_mesh_with_identical_data_equals_one_device(name):
  """Under shard_map every worker sees the same data, so averaging changes nothing: the
  replicas stay equal and follow the optimizer run on one device without an axis. This
  catches a sum where a mean belongs, a wrong sign or scale in a merge, or a merge whose
  collectives the harness cannot run."""
  mesh = parallel.make_mesh(2, 2)
  data = worker_data(mesh.size, 4, identical=True)
  got, (_, state_W, _) = run_harness(_make(name, axis_name=NODE_LOCAL), mesh, data)
  tx = _make(name)
  params = init_params()
  state = tx.init(params)
  rtol, atol = _tolerance(state)
  for t, (x, y) in enumerate(data):
    grads = jax.grad(loss_fn)(params, (x[0], y[0]))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    want = np.broadcast_to(theta_of(params), got[t].shape)
    np.testing.assert_allclose(got[t], want, rtol=rtol, atol=atol, err_msg=f"step {t + 1}")
  # The per-worker state keeps the one-device state's types, with a leading worker dimension.
  one, per_worker = jax.tree.leaves(state), jax.tree.leaves(state_W)
  assert [(x.shape, x.dtype) for x in one] == [(x.shape[1:], x.dtype) for x in per_worker]
