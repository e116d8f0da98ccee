"""k-step Adam variants through the shard_map harness vs an independent NumPy implementation."""

import _numpy_reference as ref
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
from jax.sharding import PartitionSpec as P

import kstep_adam
from kstep_adam import parallel
from kstep_adam._dispatch import optimizer_step

NODE_LOCAL = ("node", "local")

# (name, mesh shape, kstep_adam kwargs, reference periods, reference kwargs, steps)
VARIANTS = [
  (
    "params_hierarchical_8dev",
    (2, 4),
    dict(k=3, axis_name=NODE_LOCAL),
    {"params": (3, None)},
    {},
    7,
  ),
  ("params_single_axis_4dev", (1, 4), dict(k=2, axis_name="local"), {"params": (2, None)}, {}, 5),
  (
    "both_moments_local_adam_8dev",
    (2, 4),
    dict(k=2, axis_name=NODE_LOCAL, sync="params+moments", form="local_adam", clip=0.5, eps=1e-3),
    {"params": (2, None), "mu": (2, None), "nu": (2, None)},
    dict(form="local_adam", clip=0.5, eps=1e-3),
    5,
  ),
  (
    "params_nu_flat_route_4dev",
    (2, 2),
    dict(k=2, axis_name=NODE_LOCAL, sync="params+nu", route="flat"),
    {"params": (2, None), "nu": (2, None)},
    {},
    5,
  ),
  (
    "per_state_periods_4dev",
    (2, 2),
    dict(k=1, axis_name=NODE_LOCAL, sync={"params": 2, "mu": 3, "nu": 6}),
    {"params": (2, None), "mu": (3, None), "nu": (6, None)},
    {},
    7,
  ),
  (
    "hierarchical_periods_8dev",
    (2, 4),
    dict(k={"node": 4, "local": 2}, axis_name=NODE_LOCAL),
    {"params": (4, 2)},
    {},
    9,
  ),
  (
    "desloc_hierarchical_8dev",
    (2, 4),
    dict(k={"node": 2, "local": 1}, axis_name=NODE_LOCAL, sync="desloc"),
    {"params": (2, 1), "mu": (6, 3), "nu": (12, 6)},
    {},
    12,
  ),
]


@pytest.mark.parametrize(
  "name,mesh_shape,kwargs,periods,ref_kwargs,steps", VARIANTS, ids=[v[0] for v in VARIANTS]
)
def test_kstep_adam_matches_numpy_step_for_step(
  name, mesh_shape, kwargs, periods, ref_kwargs, steps
):
  """Through the harness, which runs a branch-free local program on non-merge steps."""
  del name
  lr = 0.05
  mesh = parallel.make_mesh(*mesh_shape)
  data = worker_data(mesh.size, steps)
  got, (_, _, step) = run_harness(kstep_adam.kstep_adam(lr, **kwargs), mesh, data)
  assert step.local_jitted is not None and len(step.schedules) == 1
  want = ref.kstep_adam(
    theta_of(init_params()), data, num_nodes=mesh_shape[0], lr=lr, periods=periods, **ref_kwargs
  )
  for t, (g, w) in enumerate(zip(got, want), start=1):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=f"step {t}")
  # Replicas really diverge between merges (data differ per worker) ...
  assert any(np.ptp(g, axis=0).max() > 1e-3 for g in got)
  # ... and agree right after a global merge.
  period_all = periods["params"][0]
  np.testing.assert_allclose(np.ptp(got[period_all - 1], axis=0), 0.0, atol=1e-6)


def test_in_graph_switch_and_host_dispatch_agree():
  mesh = parallel.make_mesh(2, 2)
  data = worker_data(mesh.size, 6)
  schedule = kstep_adam.merge_schedule({"node": 3, "local": 2}, axis_name=NODE_LOCAL, sync="desloc")
  tx = kstep_adam.kstep_adam(0.05, schedule)
  switch, _ = run_harness(tx, mesh, data, dispatch=False)
  dispatch, (_, _, step) = run_harness(tx, mesh, data)
  assert step.schedules == (schedule,)
  # Not bitwise: XLA fuses the two programs differently (1-ulp differences seen).
  np.testing.assert_allclose(np.stack(switch), np.stack(dispatch), rtol=1e-6, atol=1e-7)
  assert step.step == 6 and step.compiles == 2  # one local program (steps 1, 5), one general.


def test_identical_data_makes_averaging_a_no_op():
  mesh = parallel.make_mesh(2, 4)
  data = worker_data(mesh.size, 6, identical=True)
  tx = kstep_adam.kstep_adam(
    0.05, {"node": 3, "local": 2}, axis_name=NODE_LOCAL, sync="params+moments"
  )
  got, _ = run_harness(tx, mesh, data)
  # One worker running optax.adam on the same stream.
  params, adam = init_params(), optax.adam(0.05)
  state = adam.init(params)
  for t, (x, y) in enumerate(data):
    grads = jax.grad(loss_fn)(params, (x[0], y[0]))
    updates, state = adam.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for w in range(mesh.size):
      np.testing.assert_allclose(got[t][w], theta_of(params), rtol=1e-6, atol=1e-7)


def test_no_recompilation_and_state_keeps_shapes_and_dtypes():
  mesh = parallel.make_mesh(2, 2)
  traces = []

  def counting_loss(params, batch):
    traces.append(1)
    return loss_fn(params, batch)

  schedule = kstep_adam.merge_schedule(
    2, axis_name=NODE_LOCAL, sync="desloc", mu_dtype=jnp.bfloat16
  )
  tx = kstep_adam.kstep_adam(0.05, schedule, mu_dtype=jnp.bfloat16)
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  spec0 = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), (params_W, state_W))
  step = parallel.make_train_step(counting_loss, tx, mesh)
  for t, (x, y) in enumerate(worker_data(mesh.size, 5), start=1):
    params_W, state_W, metrics = step(params_W, state_W, (x.reshape(-1, 5), y.reshape(-1)))
    if t == 2:  # Both programs (local: step 1, general: step 2) have been traced by now.
      traces_after_two_steps = len(traces)
  assert len(traces) == traces_after_two_steps <= 3
  assert step.compiles == 2  # the local and the general program, once each
  assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), (params_W, state_W)) == spec0
  assert metrics["loss"].shape == (mesh.size,)
  assert state_W[0].mu["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(state_W[0].count), 5)


def test_batch_not_divisible_by_workers_raises():
  mesh = parallel.make_mesh(2, 2)
  tx = kstep_adam.kstep_adam(0.1, 2, axis_name=NODE_LOCAL)
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  step = parallel.make_train_step(loss_fn, tx, mesh)
  with pytest.raises(ValueError, match="not divisible by the number of workers 4"):
    step(params_W, state_W, (np.zeros((6, 5), np.float32), np.zeros(6, np.float32)))


def test_axis_name_not_in_mesh_raises():
  mesh = parallel.make_mesh(1, 2)
  tx = kstep_adam.kstep_adam(0.1, 2, axis_name="data")
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  step = parallel.make_train_step(loss_fn, tx, mesh)
  with pytest.raises(ValueError, match="axis_name 'data' is not an axis"):
    step(params_W, state_W, (np.zeros((2, 5), np.float32), np.zeros(2, np.float32)))


@pytest.mark.parametrize(
  "args,match",
  [
    ((0, 2), "num_nodes must be an int >= 1, got 0"),
    ((True, 2), "num_nodes must be an int >= 1, got True"),
    ((2, 1.5), "devices_per_node must be an int >= 1, got 1.5"),
    ((4, 4), "exceeds the 8 available devices"),
  ],
)
def test_make_mesh_rejects_bad_shapes(args, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(*args)


@pytest.mark.parametrize("worker", [-1, True, 1.0])
def test_unreplicate_rejects_a_worker_that_is_not_an_index(worker):
  tree_W = parallel.replicate({"a": np.zeros(2, np.float32)}, parallel.make_mesh(2, 4))
  with pytest.raises(ValueError, match="worker must be an int >= 0"):
    parallel.unreplicate(tree_W, worker=worker)


def test_replicate_gives_each_worker_its_own_copy():
  mesh = parallel.make_mesh(2, 4)
  tree_W = parallel.replicate({"a": np.arange(3.0, dtype=np.float32), "s": np.int32(7)}, mesh)
  assert tree_W["a"].shape == (8, 3) and tree_W["s"].shape == (8,)
  np.testing.assert_array_equal(parallel.unreplicate(tree_W, worker=5)["a"], [0.0, 1.0, 2.0])
  assert tree_W["a"].sharding.spec[0] == NODE_LOCAL
  distinct_W = jax.device_put(np.arange(24.0).reshape(8, 3), parallel.worker_sharding(mesh, 2))
  np.testing.assert_array_equal(
    parallel.unreplicate({"d": distinct_W}, worker=5)["d"], [15.0, 16.0, 17.0]
  )


def test_comm_report_uses_the_mesh_axis_sizes():
  mesh = parallel.make_mesh(2, 4)
  schedule = kstep_adam.merge_schedule(4, axis_name=NODE_LOCAL)
  params = {"w": np.zeros(1000, np.float32)}
  net = kstep_adam.NetworkModel({"node": 1e9, "local": 1e11}, {"node": 1e-5, "local": 1e-6})
  report = parallel.comm_report(params, schedule, mesh, num_steps=8, network=net)
  # Two merges of 4000 bytes: local 2*(3/4)*4000, node 2*(1/2)*4000/4 per merge.
  assert report["bytes_by_axis"] == {"node": 2 * 1000.0, "local": 2 * 6000.0}
  assert report["messages_by_axis"] == {"node": 2 * 2, "local": 2 * 6}
  np.testing.assert_allclose(report["seconds"], 2000 / 1e9 + 12000 / 1e11 + 4e-5 + 12e-6)


def test_dispatched_step_serves_a_custom_shard_map_step():
  """A step with its own in/out specs (as the CTR step has) gets the same local dispatch."""
  mesh = parallel.make_mesh(1, 4)
  spec = P(NODE_LOCAL)
  tx = kstep_adam.kstep_adam(0.1, 2, axis_name=NODE_LOCAL)

  def per_worker(params_W, state_W, shift):  # shift: one replicated input for all workers
    params, state = jax.tree.map(lambda x: x[0], (params_W, state_W))
    worker = jax.lax.axis_index(NODE_LOCAL).astype(jnp.float32)
    grads = jax.tree.map(lambda p: p - shift * worker, params)
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda x: x[None], (optax.apply_updates(params, updates), state))

  step = parallel.DispatchedStep(
    lambda body: jax.jit(
      jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, P()), out_specs=(spec, spec))
    ),
    per_worker,
  )
  params_W, state_W = parallel.init_replicas({"w": np.zeros(3, np.float32)}, tx, mesh)
  params_W, state_W = step(params_W, state_W, jnp.float32(1.0))
  assert step.local_jitted is not None and step.is_local(1) and not step.is_local(2)
  assert np.ptp(np.asarray(params_W["w"]), axis=0).max() > 0.01  # diverged on a local step
  params_W, state_W = step(params_W, state_W, jnp.float32(1.0))
  np.testing.assert_allclose(np.ptp(np.asarray(params_W["w"]), axis=0), 0.0, atol=1e-7)
  assert step.step == 2


@pytest.mark.parametrize("start_step", [-1, 1.0, True])
def test_dispatched_step_rejects_a_bad_start_step(start_step):
  with pytest.raises(ValueError, match="start_step must be None or a non-negative int"):
    parallel.DispatchedStep(lambda body: body, lambda: None, start_step=start_step)


def _diverging_step(mesh, tx, **kwargs):
  """A DispatchedStep whose workers move apart on every step, so a merge is visible."""
  spec = P(NODE_LOCAL)

  def per_worker(params_W, state_W, shift):
    params, state = jax.tree.map(lambda x: x[0], (params_W, state_W))
    worker = jax.lax.axis_index(NODE_LOCAL).astype(jnp.float32)
    grads = jax.tree.map(lambda p: p - shift * worker, params)
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda x: x[None], (optax.apply_updates(params, updates), state))

  build = lambda body: jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, P()), out_specs=(spec, spec))
  )
  return parallel.DispatchedStep(build, per_worker, **kwargs)


def _spread(params_W):
  return float(np.ptp(np.asarray(params_W["w"]), axis=0).max())


def test_dispatched_step_takes_the_step_from_a_restored_state():
  """A state that has taken 2 steps (k=3) must merge on its 3rd step, whoever calls it.

  Regression: a new step counted from 0 on the host, ran the local program on the
  optimizer's step 3 and skipped that merge.
  """
  mesh = parallel.make_mesh(1, 4)
  tx = kstep_adam.kstep_adam(0.1, 3, axis_name=NODE_LOCAL)
  params_W, state_W = parallel.init_replicas({"w": np.zeros(3, np.float32)}, tx, mesh)
  first = _diverging_step(mesh, tx)
  for _ in range(2):
    params_W, state_W = first(params_W, state_W, jnp.float32(1.0))
  assert optimizer_step(state_W) == 2 and _spread(params_W) > 0.01
  restored = _diverging_step(mesh, tx)  # e.g. after loading a checkpoint
  params_W, state_W = restored(params_W, state_W, jnp.float32(1.0))
  assert _spread(params_W) < 1e-6  # the count-3 merge ran
  assert restored.step == 3


def test_dispatched_step_refuses_a_start_step_the_state_contradicts():
  mesh = parallel.make_mesh(1, 4)
  tx = kstep_adam.kstep_adam(0.1, 3, axis_name=NODE_LOCAL)
  params_W, state_W = parallel.init_replicas({"w": np.zeros(3, np.float32)}, tx, mesh)
  params_W, state_W = _diverging_step(mesh, tx)(params_W, state_W, jnp.float32(1.0))
  with pytest.raises(ValueError, match=r"start_step=0 but the optimizer state has taken 1 steps"):
    _diverging_step(mesh, tx, start_step=0)(params_W, state_W, jnp.float32(1.0))
  assert _diverging_step(mesh, tx, start_step=1)(params_W, state_W, jnp.float32(1.0))


def test_dispatched_step_follows_a_state_it_did_not_return():
  """Handing the same step an older state re-reads that state's count."""
  mesh = parallel.make_mesh(1, 4)
  tx = kstep_adam.kstep_adam(0.1, 2, axis_name=NODE_LOCAL)
  params0_W, state0_W = parallel.init_replicas({"w": np.zeros(3, np.float32)}, tx, mesh)
  keep = jax.tree.map(jnp.copy, (params0_W, state0_W))
  step = _diverging_step(mesh, tx)
  params_W, state_W = step(params0_W, state0_W, jnp.float32(1.0))
  params_W, state_W = step(params_W, state_W, jnp.float32(1.0))
  assert step.step == 2
  params_W, state_W = step(*keep, jnp.float32(1.0))  # back to count 0: step 1, local
  assert step.step == 1 and _spread(params_W) > 0.01
  params_W, state_W = step(params_W, state_W, jnp.float32(1.0))
  assert step.step == 2 and _spread(params_W) < 1e-6


def test_dispatched_step_reports_the_calls_that_compile():
  mesh = parallel.make_mesh(1, 4)
  tx = kstep_adam.kstep_adam(0.1, 2, axis_name=NODE_LOCAL)
  params_W, state_W = parallel.init_replicas({"w": np.zeros(3, np.float32)}, tx, mesh)
  step = _diverging_step(mesh, tx)
  scalar, vector = jnp.float32(1.0), jnp.ones(3, jnp.float32)  # a new input shape: new programs
  compiled = []
  for shift in (scalar, scalar, scalar, scalar, vector, vector, vector):
    params_W, state_W = step(params_W, state_W, shift)
    compiled.append(step.last_call_compiled)
  # Odd steps run the local program, even steps the general one; each compiles once per shape.
  assert compiled == [True, True, False, False, True, True, False]
  assert step.compiles == 4 and step.compile_seconds > 0
