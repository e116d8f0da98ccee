"""kstep_adam without an axis is optax.adam; options, composition and argument validation."""

import _numpy_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _runs import init_params
from _runs import loss_fn
from _runs import theta_of
from _runs import worker_data

import kstep_adam

CLIP = r"clip must be None or a finite number in \(0.0, inf\)"


def _params(dtype):
  rng = np.random.default_rng(0)
  return {
    "w": jnp.asarray(rng.normal(size=(3, 4)), dtype),
    "b": jnp.asarray(rng.normal(size=4), dtype),
    "s": jnp.asarray(0.3, dtype),
  }


def _run(tx, params, steps=6):
  state = tx.init(params)

  @jax.jit
  def step(params, state, t):
    grads = jax.tree.map(lambda p: jnp.sin(p * (t + 1.0)).astype(p.dtype) + 0.1, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    params, state = step(params, state, t)
  return params, state


def _assert_trees_equal(a, b):
  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(
      np.asarray(x, np.float32), np.asarray(y, np.float32)
    ),
    a,
    b,
  )
  jax.tree.map(lambda x, y: (x.shape, x.dtype) == (y.shape, y.dtype) or pytest.fail(), a, b)


@pytest.mark.parametrize(
  "lr,b1,b2,eps,eps_root,param_dtype,mu_dtype",
  [
    (1e-3, 0.9, 0.999, 1e-8, 0.0, jnp.float32, None),
    (0.1, 0.5, 0.9, 1e-3, 1e-6, jnp.float32, None),
    (0.05, 0.0, 0.99, 1e-8, 0.0, jnp.float32, jnp.bfloat16),
    (0.05, 0.9, 0.999, 1e-8, 0.0, jnp.bfloat16, None),
    (0.05, 0.9, 0.999, 1e-5, 0.0, jnp.bfloat16, jnp.bfloat16),
    (optax.linear_schedule(0.1, 0.01, 4), 0.9, 0.95, 1e-8, 0.0, jnp.float32, None),
  ],
)
@pytest.mark.parametrize("k", [1, 3])
def test_without_axis_equals_optax_adam(lr, b1, b2, eps, eps_root, param_dtype, mu_dtype, k):
  params = _params(param_dtype)
  kw = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)
  got_params, got_state = _run(kstep_adam.kstep_adam(lr, k, **kw), params)
  want_params, want_state = _run(optax.adam(lr, **kw), params)
  _assert_trees_equal(got_params, want_params)
  _assert_trees_equal((got_state[0].mu, got_state[0].nu), (want_state[0].mu, want_state[0].nu))


def test_chains_with_clipping_and_works_under_inject_hyperparams():
  params = _params(jnp.float32)
  sched = optax.cosine_decay_schedule(0.1, 10)
  ours = optax.chain(
    optax.clip_by_global_norm(0.5),
    optax.inject_hyperparams(kstep_adam.kstep_adam, static_args=("k",))(
      learning_rate=sched, k=4, b1=0.8
    ),
  )
  theirs = optax.chain(
    optax.clip_by_global_norm(0.5),
    optax.inject_hyperparams(optax.adam)(learning_rate=sched, b1=0.8),
  )
  got, got_state = _run(ours, params)
  want, _ = _run(theirs, params)
  _assert_trees_equal(got, want)
  np.testing.assert_allclose(got_state[1].hyperparams["learning_rate"], sched(5), rtol=1e-6)


def test_clip_may_be_injected_and_traced():
  """Under inject_hyperparams clip arrives as an array (traced under jit); it is not rejected."""
  params = _params(jnp.float32)

  def run(clip, static_args):
    return _run(
      optax.inject_hyperparams(kstep_adam.kstep_adam, static_args=static_args)(
        learning_rate=0.1, k=2, clip=clip
      ),
      params,
    )[0]

  traced, static = run(0.3, ("k",)), run(0.3, ("k", "clip"))
  jax.tree.map(np.testing.assert_array_equal, traced, static)
  assert not np.allclose(traced["w"], run(None, ("k",))["w"], rtol=1e-3)  # clipping is active


def test_inject_hyperparams_with_traced_k_gives_a_clear_error():
  tx = optax.inject_hyperparams(kstep_adam.kstep_adam)(learning_rate=0.1, k=4)
  with pytest.raises(ValueError, match=r"static_args=\('k',\)"):
    tx.init({"a": jnp.ones(2)})


def test_local_adam_form_matches_numpy_on_one_worker():
  data = worker_data(1, 6)
  tx = kstep_adam.kstep_adam(0.05, 2, form="local_adam", eps=1e-2, clip=0.3)
  params, state = init_params(), None
  state = tx.init(params)
  for t, (x, y) in enumerate(data):
    grads = jax.grad(loss_fn)(params, (x[0], y[0]))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    want = ref.kstep_adam(
      theta_of(init_params()),
      data[: t + 1],
      num_nodes=1,
      lr=0.05,
      periods={},
      form="local_adam",
      eps=1e-2,
      clip=0.3,
    )[-1][0]
    np.testing.assert_allclose(theta_of(params), want, rtol=1e-5, atol=1e-6)


def test_local_adam_form_differs_from_adam():
  params = _params(jnp.float32)
  a, _ = _run(kstep_adam.kstep_adam(0.1, 1), params)
  b, _ = _run(kstep_adam.kstep_adam(0.1, 1, form="local_adam"), params)
  assert not np.allclose(a["w"], b["w"])


def test_scale_by_kstep_adam_state_fields():
  tx = kstep_adam.scale_by_kstep_adam(mu_dtype=jnp.bfloat16)
  state = tx.init(_params(jnp.float32))
  assert isinstance(state, kstep_adam.ScaleByKStepAdamState)
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(k=0), "k must be a positive int"),
    (dict(k=-2, axis_name="w"), "k must be a positive int"),
    (dict(k=1.5), "k must be a positive int"),
    (dict(k=True), "k must be a positive int"),
    (dict(k={"node": 2}, axis_name=("node", "local")), "one period per axis"),
    (dict(k={"node": 2, "x": 1}, axis_name="node"), "one period per axis"),
    (dict(k={"node": 0, "local": 1}, axis_name=("node", "local")), "positive int"),
    (dict(k=2, sync="everything"), "sync must be one of"),
    (dict(k=2, sync={"mu": 0}), "sync period for 'mu' must be a positive int"),
    (dict(k=2, sync={"mu": 1.5}), "sync period for 'mu' must be a positive int"),
    (dict(k=2, sync={"grads": 1}), "sync state 'grads' is unknown here"),
    (dict(k=2, route="ring"), "route must be one of"),
    (dict(k=2, form="adamw"), "form must be one of"),
    (dict(k=2, clip=-1.0), CLIP),
    (dict(k=2, clip=np.float32(-1.0)), CLIP),
    (dict(k=2, clip=True), CLIP),
    (dict(k=2, clip="0.5"), CLIP),
    (dict(k=2, clip=np.ones(2)), CLIP),
    (dict(k=2, axis_name=("node", "node")), "repeated axes"),
    (dict(k=2, axis_name=""), "axis_name must be None"),
    (
      dict(k=kstep_adam.merge_schedule(2, axis_name="w"), axis_name="w"),
      "either a MergeSchedule as k or axis_name",
    ),
    (
      dict(
        k=kstep_adam.merge_schedule(2, axis_name="w", sync="params+moments"), mu_dtype=jnp.bfloat16
      ),
      "the schedule averages 'mu' counted as mu_dtype=None",
    ),
    (
      dict(k=kstep_adam.merge_schedule(2, axis_name="w"), sync="params+nu"),
      r"sync='params\+nu' conflicts with the MergeSchedule given as k, which averages "
      r"\{'params': 1\}",
    ),
    (
      dict(k=kstep_adam.merge_schedule(2, axis_name=("n", "w")), route="flat"),
      "route='flat' conflicts with the MergeSchedule given as k, which routes 'hierarchical'",
    ),
  ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kstep_adam.kstep_adam(0.1, **kwargs)


LR = r"learning_rate must be a finite number in \[0.0, inf\)"
K = r"k must be a positive int \(at most 2\*\*31 - 1"


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: kstep_adam.kstep_adam(-1.0, 2), LR + ", got -1.0"),
    (lambda: kstep_adam.kstep_adam(float("nan"), 2), LR + ", got nan"),
    (lambda: kstep_adam.kstep_adam(float("inf"), 2), LR + ", got inf"),
    (lambda: kstep_adam.kstep_adam(np.float32(-0.1), 2), LR),
    (lambda: kstep_adam.kstep_adam(jnp.asarray(-0.1), 2), LR),
    (lambda: kstep_adam.kstep_adam(True, 2), LR),
    (lambda: kstep_adam.kstep_adam(0.1, 2, b1=1.0), r"b1 must be a finite number in \[0.0, 1.0\)"),
    (lambda: kstep_adam.kstep_adam(0.1, 2, b1=-0.1), "b1 must be"),
    (lambda: kstep_adam.kstep_adam(0.1, 2, b2=1.0), r"b2 must be a finite number in \[0.0, 1.0\)"),
    (
      lambda: kstep_adam.kstep_adam(0.1, 2, b2=1.5, form="local_adam"),
      r"b2 must be a finite number in \[0.0, 1.0\]",
    ),
    (lambda: kstep_adam.kstep_adam(0.1, 2, eps=-1e-8), "eps must be"),
    (lambda: kstep_adam.kstep_adam(0.1, 2, eps_root=float("nan")), "eps_root must be"),
    (
      lambda: kstep_adam.kstep_adam(0.1, 2, mu_dtype="int32"),
      "mu_dtype must be None or a floating",
    ),
    (lambda: kstep_adam.kstep_adam(0.1, 2, mu_dtype="float33"), "mu_dtype must be None or a float"),
    (lambda: kstep_adam.kstep_adam(0.1, 2**31, axis_name="w"), K),
    (lambda: kstep_adam.kstep_adam(0.1, {"n": 2**31, "w": 1}, axis_name=("n", "w")), K),
    (lambda: kstep_adam.kstep_adam(0.1, 2**31), K),  # ignored without an axis, still refused
    (lambda: kstep_adam.kstep_adam(0.1, {}), "k as a mapping needs exactly one period per axis"),
    (
      lambda: kstep_adam.kstep_adam(0.1, 2**30, axis_name="w", sync="desloc"),
      r"sync period for 'mu' is 3 x k=1073741824, beyond 2\*\*31 - 1",
    ),
    (lambda: kstep_adam.scale_by_kstep_adam(b1=1.0), "b1 must be"),
    (lambda: kstep_adam.scale_by_kstep_adam(b2=1.0), "b2 must be"),
    (lambda: kstep_adam.merge_schedule(2**31, axis_name="w"), K),
    (lambda: kstep_adam.merge_schedule(2, mu_dtype="float33"), "mu_dtype must be None"),
    (
      lambda: optax.inject_hyperparams(kstep_adam.kstep_adam, static_args=("k",))(
        learning_rate=-0.1, k=2
      ).init({"w": jnp.ones(2)}),
      LR,
    ),
  ],
)
def test_hyperparameters_out_of_range_raise_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize(
  "make",
  [
    lambda: kstep_adam.kstep_adam(0.0, 2, b1=0.0),  # lr = 0 and b1 = 0 are legitimate
    lambda: kstep_adam.kstep_adam(np.float32(0.1), 2**31 - 1, axis_name="w"),
    lambda: kstep_adam.kstep_adam(0.1, 2, b2=1.0, form="local_adam"),  # v never updates
    lambda: kstep_adam.kstep_adam(lambda step: -1.0, 2),  # a schedule is checked when called
    lambda: kstep_adam.kstep_adam(0.1, 2, mu_dtype="bfloat16", eps=0.0, clip=np.float32(1.0)),
    # A schedule with the same sync or route as the one given beside it agrees: no conflict.
    lambda: kstep_adam.kstep_adam(
      0.1, kstep_adam.merge_schedule(2, axis_name="w", sync="desloc"), sync="desloc"
    ),
    lambda: kstep_adam.kstep_adam(
      0.1, kstep_adam.merge_schedule(2, axis_name="w", route="flat"), route="flat"
    ),
  ],
)
def test_edge_values_in_range_are_accepted(make):
  assert isinstance(make(), optax.GradientTransformation)
