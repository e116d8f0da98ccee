"""The collectives: hierarchical mean == flat mean, and no collective on a non-merge step."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _runs import init_params
from _runs import loss_fn
from _runs import theta_of
from _runs import worker_data
from jax.sharding import PartitionSpec as P

import kstep_adam
from kstep_adam import parallel

NODE_LOCAL = ("node", "local")
COLLECTIVE = re.compile(
  r"\b(all-reduce|reduce-scatter|all-gather|collective-permute|all-to-all)"
  r"(-start)?\("
)


def _mean_under_shard_map(tree_W, mesh, axes, route):
  spec = P(tuple(mesh.axis_names))

  def fn(tree_W):
    tree = jax.tree.map(lambda x: x[0], tree_W)
    return jax.tree.map(lambda x: x[None], kstep_adam.tree_mean(tree, axes, route))

  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))(tree_W)


def _per_worker_tree(mesh, seed=0):
  rng = np.random.default_rng(seed)
  n = mesh.size
  tree = {
    "odd": rng.normal(size=(n, 7, 3)).astype(np.float32),  # 21 elements: needs padding.
    "scalar": rng.normal(size=(n,)).astype(np.float32),
    "half": rng.normal(size=(n, 5)).astype(jnp.bfloat16),
  }
  sharded = jax.tree.map(lambda x: jax.device_put(x, parallel.worker_sharding(mesh, x.ndim)), tree)
  return tree, sharded


@pytest.mark.parametrize("mesh_shape", [(2, 4), (2, 2)])
def test_hierarchical_mean_equals_flat_mean(mesh_shape):
  mesh = parallel.make_mesh(*mesh_shape)
  tree, tree_W = _per_worker_tree(mesh)
  hier = _mean_under_shard_map(tree_W, mesh, NODE_LOCAL, "hierarchical")
  flat = _mean_under_shard_map(tree_W, mesh, NODE_LOCAL, "flat")
  for name, x in tree.items():
    want = np.broadcast_to(np.asarray(x, np.float64).mean(0), x.shape)
    tol = 1e-2 if x.dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(hier[name], np.float64), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(
      np.asarray(hier[name], np.float64), np.asarray(flat[name], np.float64), rtol=tol, atol=tol
    )
    assert hier[name].dtype == x.dtype and hier[name].shape == x.shape


@pytest.mark.parametrize("axes", [("local",), "local"])
def test_inner_axis_mean_averages_within_each_node(axes):
  mesh = parallel.make_mesh(2, 4)
  tree, tree_W = _per_worker_tree(mesh)
  out = _mean_under_shard_map(tree_W, mesh, axes, "hierarchical")
  x = tree["odd"].reshape(2, 4, 7, 3).mean(1, keepdims=True)
  np.testing.assert_allclose(
    out["odd"], np.broadcast_to(x, (2, 4, 7, 3)).reshape(8, 7, 3), rtol=1e-6
  )


@pytest.mark.parametrize(
  "axes,route,match",
  [
    (("node", "data"), "hierarchical", "axis_name 'data' is not an axis"),
    (NODE_LOCAL, "ring", "route must be one of"),
    (None, "flat", "needs at least one axis"),
    (("local", "local"), "flat", "axes has repeated axes"),
  ],
)
def test_tree_mean_rejects_bad_axes_and_routes(axes, route, match):
  mesh = parallel.make_mesh(2, 4)
  _, tree_W = _per_worker_tree(mesh)
  with pytest.raises(ValueError, match=match):
    _mean_under_shard_map(tree_W, mesh, axes, route)


def _computations(hlo_text: str) -> dict[str, str]:
  """Split optimized HLO text into {computation name: body}."""
  blocks, name = {}, None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      name = ("ENTRY " if line.startswith("ENTRY") else "") + m.group(1)
      blocks[name] = ""
    elif name is not None:
      blocks[name] += line + "\n"
  return blocks


def _compiled_hlo(tx, mesh, local=False):
  """Optimized HLO of the harness's general step, or of its local program."""
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  step = parallel.make_train_step(loss_fn, tx, mesh, donate=False)
  batch = jax.tree.map(
    lambda x: jax.device_put(x, parallel.worker_sharding(mesh, x.ndim)),
    (np.zeros((mesh.size, 5), np.float32), np.zeros(mesh.size, np.float32)),
  )
  step.prepare(params_W, state_W, batch)
  fn = step.local_jitted if local else step.jitted
  return fn.lower(params_W, state_W, batch).compile().as_text()


def test_collectives_only_inside_merge_branches():
  mesh = parallel.make_mesh(2, 4)
  tx = kstep_adam.kstep_adam(
    0.1, {"node": 4, "local": 2}, axis_name=NODE_LOCAL, sync="params+moments"
  )
  blocks = _computations(_compiled_hlo(tx, mesh))
  branch_names = set()
  for body in blocks.values():
    for group in re.findall(r"branch_computations=\{([^}]*)\}", body):
      branch_names.update(n.strip().lstrip("%") for n in group.split(","))
    for a, b in re.findall(r"true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+)", body):
      branch_names.update((a, b))
  with_collectives = {n for n, body in blocks.items() if COLLECTIVE.search(body)}
  entry = [n for n in blocks if n.startswith("ENTRY")]
  assert len(entry) == 1 and entry[0] not in with_collectives
  assert with_collectives, "the merge branches should contain collectives"
  assert with_collectives <= branch_names, (with_collectives, branch_names)
  # Hierarchical node-level merge: reduce-scatter and all-gather are present.
  text = "".join(blocks[n] for n in with_collectives)
  assert "reduce-scatter(" in text and "all-gather(" in text


def test_host_dispatched_local_program_has_no_collective_and_no_branch():
  mesh = parallel.make_mesh(2, 4)
  schedule = kstep_adam.merge_schedule({"node": 4, "local": 2}, axis_name=NODE_LOCAL, sync="desloc")
  text = _compiled_hlo(kstep_adam.kstep_adam(0.1, schedule), mesh, local=True)
  assert not COLLECTIVE.search(text)
  assert "conditional(" not in text


def test_assume_local_step_ignores_other_schedules():
  """A schedule that differs from the optimizer's keeps the merge branches (safe default)."""
  mesh = parallel.make_mesh(1, 4)
  ours = kstep_adam.merge_schedule(4, axis_name="local")
  other = kstep_adam.merge_schedule(8, axis_name="local")
  tx = kstep_adam.kstep_adam(0.1, ours)
  state = tx.init({"w": jnp.zeros(1)})
  x_W = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=parallel.worker_sharding(mesh))

  def lowered(schedule):
    def fn(x):
      with kstep_adam.assume_local_step(schedule):
        return tx.update({"w": x}, state, {"w": x})[0]["w"]

    spec = P(("node", "local"))
    return (
      jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))
      .lower(x_W)
      .compile()
      .as_text()
    )

  assert COLLECTIVE.search(lowered(other))
  assert not COLLECTIVE.search(lowered(ours))


def _ring_bytes_by_group_size(body: str) -> dict[int, float]:
  """Per-device bytes of the collectives in an HLO body, by replica-group size, ring model."""
  out: dict[int, float] = {}
  for line in body.splitlines():
    m = COLLECTIVE.search(line)
    if not m:
      continue
    result_type = line.split("=", 1)[1].split(m.group(1), 1)[0]
    elems = sum(
      int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      for dims in re.findall(r"f32\[([\d,]*)\]", result_type)
    )
    n = len(re.search(r"replica_groups=\{\{([\d,]*)\}", line).group(1).split(","))
    factor = {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": (n - 1), "all-gather": (n - 1) / n}[
      m.group(1)
    ]  # reduce-scatter result is S/n.
    out[n] = out.get(n, 0.0) + factor * elems * 4
  return out


def test_counted_bytes_equal_the_collectives_in_the_compiled_program():
  """What kstep_adam.merge_bytes counts is what the merge branches of the HLO move."""
  mesh = parallel.make_mesh(2, 4)
  schedule = kstep_adam.merge_schedule({"node": 4, "local": 2}, axis_name=NODE_LOCAL)
  blocks = _computations(_compiled_hlo(kstep_adam.kstep_adam(0.1, schedule), mesh))
  branches = [b for b in blocks.values() if COLLECTIVE.search(b)]
  node_branch = [b for b in branches if "reduce-scatter(" in b]
  local_branch = [b for b in branches if "reduce-scatter(" not in b]
  assert len(node_branch) == 1 and len(local_branch) == 1
  params = init_params()
  at_node = kstep_adam.merge_bytes(params, schedule, mesh, step=4).bytes_by_axis
  at_local = kstep_adam.merge_bytes(params, schedule, mesh, step=2).bytes_by_axis
  hlo_node = _ring_bytes_by_group_size(node_branch[0])
  assert hlo_node == {4: at_node["local"], 2: at_node["node"]}
  assert _ring_bytes_by_group_size(local_branch[0]) == {4: at_local["local"]}
  assert at_local["node"] == 0


@pytest.mark.parametrize("route", ["hierarchical", "flat"])
def test_ddp_counted_bytes_equal_the_collectives_in_the_compiled_program(route):
  """sync_adam runs the schedule it is given, the one the accounting reads: same bytes."""
  mesh = parallel.make_mesh(2, 4)
  schedule = kstep_adam.sync_schedule(NODE_LOCAL, route=route)
  blocks = _computations(_compiled_hlo(kstep_adam.sync_adam(0.1, schedule), mesh))
  entry = next(body for n, body in blocks.items() if n.startswith("ENTRY"))
  counted = kstep_adam.merge_bytes(init_params(), schedule, mesh, step=1).bytes_by_axis
  if route == "flat":  # one ring over all 8 devices, charged to the outer axis
    assert _ring_bytes_by_group_size(entry) == {8: counted["node"]} and counted["local"] == 0
  else:
    assert _ring_bytes_by_group_size(entry) == {4: counted["local"], 2: counted["node"]}


def test_sync_adam_all_reduces_in_the_main_computation():
  """Sanity check of the HLO parser: DDP communicates every step, outside any branch."""
  mesh = parallel.make_mesh(1, 4)
  blocks = _computations(_compiled_hlo(kstep_adam.sync_adam(0.1, axis_name="local"), mesh))
  entry = next(body for n, body in blocks.items() if n.startswith("ENTRY"))
  assert COLLECTIVE.search(entry)


def test_merge_params_needs_params():
  tx = kstep_adam.merge_params(kstep_adam.merge_schedule(2, axis_name="w"))
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update({"a": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}))


@pytest.mark.parametrize(
  "k,live",
  [
    (4, (1,)),  # One period for both axes: only the global merge is ever selected.
    ({"node": 4, "local": 2}, (1, 2)),
    ({"node": 2, "local": 4}, (1,)),  # Every 4th step is also a 2nd step: node level wins.
    ({"node": 3, "local": 2}, (1, 2)),
  ],
)
def test_dead_merge_levels_get_no_branch(k, live):
  schedule = kstep_adam.merge_schedule(k, axis_name=NODE_LOCAL)
  assert schedule.live_levels("params") == live
  for t in range(1, 25):
    assert schedule.level_at("params", t) in (0,) + live


def test_assume_local_step_in_another_thread_does_not_leak():
  """The trace-time registries are per context: a thread holding `assume_local_step` open
  (e.g. a second trainer tracing its local program) must not strip this thread's merges."""
  import threading

  mesh = parallel.make_mesh(2, 4)
  schedule = kstep_adam.merge_schedule(2, axis_name=NODE_LOCAL)
  tx = kstep_adam.kstep_adam(0.1, schedule)
  entered, release = threading.Event(), threading.Event()

  def hold():
    with kstep_adam.assume_local_step(schedule):
      entered.set()
      release.wait(timeout=60)

  thread = threading.Thread(target=hold)
  thread.start()
  try:
    assert entered.wait(timeout=60)
    text = _compiled_hlo(tx, mesh)  # the general program, traced while the other holds
  finally:
    release.set()
    thread.join()
  assert COLLECTIVE.search(text), "merges were traced away by another thread's context"


def _plain_jit_step(tx, mesh):
  """A user's own jitted shard_map step that passes `merge` (static) to the optimizer."""
  spec = P(NODE_LOCAL)

  def per_worker(params_W, state_W, x_W, y_W, merge):
    params, state, x, y = jax.tree.map(lambda a: a[0], (params_W, state_W, x_W, y_W))
    updates, state = tx.update(jax.grad(loss_fn)(params, (x, y)), state, params, merge=merge)
    params = optax.apply_updates(params, updates)
    return jax.tree.map(lambda a: a[None], (params, state))

  @functools.partial(jax.jit, static_argnames="merge")
  def step(params_W, state_W, x_W, y_W, merge=None):
    body = functools.partial(per_worker, merge=merge)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec))(
      params_W, state_W, x_W, y_W
    )

  return step


@pytest.mark.parametrize(
  "make,sync",
  [
    (lambda s: kstep_adam.kstep_adam(0.05, s), "desloc"),
    (lambda s: kstep_adam.local_sgd(0.05, s, momentum=0.9), "params"),
    (lambda s: kstep_adam.diloco(s, inner_learning_rate=0.05), "delta"),
  ],
  ids=["kstep_adam", "local_sgd", "diloco"],
)
@pytest.mark.parametrize("decide", ["host", "always_true"])
def test_a_plain_jit_loop_may_decide_merges_on_the_host(make, sync, decide):
  """merge=schedule.merges_at(t) gives the in-graph run (merge=True on a local step too)."""
  mesh = parallel.make_mesh(2, 2)
  schedule = kstep_adam.merge_schedule({"node": 3, "local": 2}, axis_name=NODE_LOCAL, sync=sync)
  tx = make(schedule)
  data = worker_data(mesh.size, 7)
  step = _plain_jit_step(tx, mesh)
  runs = {}
  for mode in ("in_graph", decide):
    params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
    thetas = []
    for t, (x, y) in enumerate(data, start=1):
      merge = {"in_graph": None, "host": schedule.merges_at(t), "always_true": True}[mode]
      x, y = (jax.device_put(a, parallel.worker_sharding(mesh, a.ndim)) for a in (x, y))
      params_W, state_W = step(params_W, state_W, x, y, merge=merge)
      thetas.append(theta_of(jax.device_get(params_W)))
    runs[mode] = np.stack(thetas)
  # Not bitwise: XLA fuses the branch-free program differently (1-ulp differences).
  np.testing.assert_allclose(runs[decide], runs["in_graph"], rtol=1e-6, atol=1e-7)
  assert np.ptp(runs["in_graph"][0], axis=0).max() > 1e-4  # step 1 is local: replicas differ
  # One program per value of merge (None, and True/False or True), none per step.
  assert step._cache_size() == (3 if decide == "host" else 2)


def test_a_declared_local_step_compiles_without_branch_or_collective():
  mesh = parallel.make_mesh(2, 4)
  schedule = kstep_adam.merge_schedule({"node": 4, "local": 2}, axis_name=NODE_LOCAL, sync="desloc")
  tx = kstep_adam.kstep_adam(0.1, schedule)
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  x_W = parallel.replicate(np.zeros((1, 5), np.float32), mesh)
  y_W = parallel.replicate(np.zeros(1, np.float32), mesh)
  step = _plain_jit_step(tx, mesh)

  def hlo(merge):
    return step.lower(params_W, state_W, x_W, y_W, merge=merge).compile().as_text()

  local = hlo(False)
  assert not COLLECTIVE.search(local) and "conditional(" not in local
  assert COLLECTIVE.search(hlo(True)) and "conditional(" in hlo(True)


@pytest.mark.parametrize(
  "merge,match",
  [
    (jnp.bool_(False), r"mark it static: jax.jit\(..., static_argnames=\('merge',\)\)"),
    ("no", "merge must be None or a bool known when tracing"),
  ],
)
def test_merge_flag_must_be_a_static_bool(merge, match):
  tx = kstep_adam.kstep_adam(0.1, 2)
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match=match):
    tx.update(params, tx.init(params), params, merge=merge)


def test_merge_false_is_refused_where_every_step_merges():
  mesh = parallel.make_mesh(1, 2)
  tx = kstep_adam.kstep_adam(0.1, 1, axis_name=NODE_LOCAL)
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)

  def body(params_W, state_W):
    params, state = jax.tree.map(lambda a: a[0], (params_W, state_W))
    return tx.update(params, state, params, merge=False)[0]

  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(NODE_LOCAL),) * 2, out_specs=P(NODE_LOCAL))
  with pytest.raises(ValueError, match=r"declares a local step, but this optimizer averages"):
    jax.eval_shape(fn, params_W, state_W)
