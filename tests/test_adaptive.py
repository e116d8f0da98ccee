"""The adaptive merge period: the rule against hand-computed decisions, the drift a merge
measures against NumPy, equivalence with a fixed schedule when the period cannot move, byte
accounting per actual merge, and resuming mid-run."""

import json

import jax
import numpy as np
import pytest
from _runs import NUM_FEATURES
from _runs import init_params
from _runs import loss_fn
from _runs import run_harness
from _runs import theta_of
from _runs import worker_data
from jax.sharding import PartitionSpec as P

import kstep_adam
from kstep_adam import parallel
from kstep_adam._adaptive import next_period
from kstep_adam._merge import mean_with_drift

NODE_LOCAL = ("node", "local")


def controller(**knobs):
  schedule = kstep_adam.adaptive_schedule(NODE_LOCAL, **knobs)
  return kstep_adam.AdaptiveController(schedule, local_seconds=1.0, merge_seconds=(4.0, 1.0))


def run_trace(ctl, drifts: dict, num_steps: int, start: int = 1):
  """Decide steps start..num_steps, feeding the recorded drift at each merge over every axis."""
  levels = {}
  for step in range(start, num_steps + 1):
    level = ctl.decide(step)
    ctl.observe(level, drifts[step] if level == 1 else None)
    if level:
      levels[step] = level
  return levels


# A recorded drift trace (relative drift per axis, node then local) at the full merges.
TRACE = {4: (0.0016, 0.0004), 12: (0.0032, 0.0032), 22: (0.0, 0.002), 42: (0.001, 0.001)}


def test_rule_matches_hand_computed_decisions():
  # delta = 0.01, c = (4/1, 1/1). By hand, with rho = D / s and k' = min(k_max, 2k,
  # max(k_min, round(sqrt(delta c / rho)))):
  # step 4 (k = 4, 4): rho = (4e-4, 1e-4): sqrt = (10, 10), capped at 2k -> (8, 8).
  # step 12 (s = 8, 8): rho = (4e-4, 4e-4): sqrt = (10, 5) -> (10, 5).
  # step 17: the inner axis reaches 5 first -> level 2; step 22: the outer reaches 10.
  # step 22 (s = 10, 5): rho = (0, 4e-4): no drift doubles (20), sqrt(0.01/4e-4) = 5.
  # then inner merges at 27, 32, 37 and a full merge at 42.
  # step 42 (s = 20, 5): rho = (5e-5, 2e-4): sqrt(800) = 28.3, sqrt(50) = 7.07 -> (28, 7).
  ctl = controller(budget=0.01, k_init=4, k_min=1, k_max=64)
  levels = run_trace(ctl, TRACE, 42)
  assert levels == {4: 1, 12: 1, 17: 2, 22: 1, 27: 2, 32: 2, 37: 2, 42: 1}
  assert ctl.state.merges == (4, 4)
  assert ctl.state.periods == (28, 7)


def test_an_axis_of_one_replica_never_calls_a_merge_of_its_own():
  # The same trace on ("node", "local") of sizes (2, 1): a node of one device has nothing to
  # merge inside it, so the inner merges at 17, 27, 32 and 37 go; the full merges stay, as
  # does the outer axis's period (inner merges never reset its wait). The inner axis's wait
  # now runs from full merge to full merge: at step 42, s = 20 and sqrt(0.01 / 5e-5) = 14.
  schedule = kstep_adam.adaptive_schedule(NODE_LOCAL, budget=0.01, k_init=4, k_max=64)
  times = dict(local_seconds=1.0, merge_seconds=(4.0, 1.0))
  one_device = kstep_adam.AdaptiveController(schedule, axis_sizes={"node": 2, "local": 1}, **times)
  assert run_trace(one_device, TRACE, 42) == {4: 1, 12: 1, 22: 1, 42: 1}
  assert one_device.state.periods == (28, 14) and one_device.state.merges == (4, 0)
  # Sizes (1, 2): one node. The inner axis's period calls the merge over every axis (the
  # same replicas), which measures the drift: every merge is a full one.
  one_node = kstep_adam.AdaptiveController(schedule, axis_sizes=(1, 2), **times)
  # step 4: rho = 4e-4 inside the node, sqrt(0.01 * 1 / 4e-4) = 5; step 9: the same again.
  drifts = {4: (0.0, 0.0016), 9: (0.0, 0.002)}
  assert run_trace(one_node, drifts, 12) == {4: 1, 9: 1}
  assert one_node.state.merges == (2, 0)
  with pytest.raises(ValueError, match="no size for axes \\['local'\\]"):
    kstep_adam.AdaptiveController(schedule, axis_sizes={"node": 2})
  with pytest.raises(ValueError, match="one size >= 1 per axis"):
    kstep_adam.AdaptiveController(schedule, axis_sizes=(2, 0))


def test_next_period_bounds():
  knobs = kstep_adam.AdaptivePeriod(budget=1.0, k_init=4, k_min=2, k_max=6)
  assert next_period(4, 4, 1e9, 1.0, knobs) == 2  # huge drift: k_min
  assert next_period(4, 4, 1e-9, 1.0, knobs) == 6  # tiny drift: k_max (below 2k = 8)
  assert next_period(2, 2, 0.0, 1.0, knobs) == 4  # none measured: doubles
  assert next_period(4, 4, float("nan"), 1.0, knobs) == 6


def test_controller_refuses_out_of_order_steps():
  ctl = controller()
  with pytest.raises(ValueError, match="decides step 1, not 2"):
    ctl.decide(2)
  with pytest.raises(ValueError, match="needs its drift"):
    ctl.observe(1, None)


def test_resume_from_json_reproduces_decisions():
  full = controller(budget=0.01, k_init=4, k_max=64)
  want = run_trace(full, TRACE, 42)
  first = controller(budget=0.01, k_init=4, k_max=64)
  run_trace(first, TRACE, 15)
  saved = json.loads(json.dumps(first.state_dict()))
  resumed = kstep_adam.AdaptiveController(first.schedule, state=saved)
  got = run_trace(resumed, TRACE, 42, start=16)
  assert {s: lv for s, lv in want.items() if s >= 16} == got
  assert resumed.state == full.state


def test_schedule_validation():
  with pytest.raises(ValueError, match="one or two mesh axes"):
    kstep_adam.adaptive_schedule(("a", "b", "c"))
  with pytest.raises(ValueError, match="route='hierarchical'"):
    kstep_adam.adaptive_schedule(NODE_LOCAL, route="flat")
  with pytest.raises(ValueError, match="same steps"):
    kstep_adam.adaptive_schedule(NODE_LOCAL, sync="desloc")
  with pytest.raises(ValueError, match="k_init"):
    kstep_adam.adaptive_schedule(NODE_LOCAL, k_init=300, k_max=256)
  s = kstep_adam.adaptive_schedule(NODE_LOCAL)
  with pytest.raises(ValueError, match="decided on the host"):
    s.merges_at(8)
  with pytest.raises(ValueError, match="per actual merge"):
    kstep_adam.comm_bytes({"w": np.zeros(3, np.float32)}, s, {"node": 2, "local": 2}, 8)


@pytest.mark.parametrize("shape", [(2, 2), (1, 4)])
def test_drift_per_axis_matches_numpy(shape):
  mesh = parallel.make_mesh(*shape)
  schedule = kstep_adam.adaptive_schedule(NODE_LOCAL)
  rng = np.random.default_rng(0)
  x = {"a": rng.normal(size=(4, 7)), "b": rng.normal(size=(4, 3, 2))}
  x = jax.tree.map(lambda v: v.astype(np.float32), x)
  spec = P(NODE_LOCAL)

  def body(t):
    mean, drift = mean_with_drift(jax.tree.map(lambda v: v[0], t), schedule)
    return jax.tree.map(lambda v: v[None], mean), drift[None]

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,), out_specs=(spec, spec)))
  placed = jax.tree.map(lambda v: jax.device_put(v, parallel.worker_sharding(mesh, v.ndim)), x)
  mean, drift = jax.device_get(fn(placed))
  flat = np.concatenate([x["a"].reshape(4, -1), x["b"].reshape(4, -1)], 1).astype(np.float64)
  xbar = flat.mean(0)
  nodes = flat.reshape(shape[0], shape[1], -1).mean(1)
  norm = np.sum(xbar**2)
  outer = np.mean([np.sum((nodes[w // shape[1]] - xbar) ** 2) for w in range(4)]) / norm
  inner = np.mean([np.sum((flat[w] - nodes[w // shape[1]]) ** 2) for w in range(4)]) / norm
  np.testing.assert_allclose(drift, np.tile([outer, inner], (4, 1)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mean["a"], np.tile(x["a"].mean(0), (4, 1)), rtol=1e-6)


def adaptive_run(ctl, mesh, data, tx=None, params_state=None):
  tx = kstep_adam.kstep_adam(0.05, ctl.schedule) if tx is None else tx
  if params_state is None:
    params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  else:
    params_W, state_W = params_state
  step = parallel.make_train_step(loss_fn, tx, mesh, adaptive=ctl)
  history, levels = [], []
  for x, y in data:
    params_W, state_W, _ = step(params_W, state_W, (x.reshape(-1, NUM_FEATURES), y.reshape(-1)))
    history.append(theta_of(jax.device_get(params_W)))
    levels.append(step.last_level)
  return history, levels, (params_W, state_W)


OPTIMIZERS = {
  "kstep_adam": lambda k, **kw: kstep_adam.kstep_adam(0.05, k, **kw),
  "kstep_adam_moments": lambda k, **kw: kstep_adam.kstep_adam(
    0.05, k, **({"sync": "params+moments"} if "axis_name" in kw else {}), **kw
  ),
  "local_sgd": lambda k, **kw: kstep_adam.local_sgd(0.05, k, momentum=0.9, **kw),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_period_equals_fixed_schedule(name):
  """k_min = k_max = k_init = 3: the adaptive run is the fixed k = 3 run, step by step."""
  mesh = parallel.make_mesh(2, 2)
  data = worker_data(4, 8)
  make = OPTIMIZERS[name]
  want, _ = run_harness(make(3, axis_name=NODE_LOCAL), mesh, data)
  sync = "params+moments" if name == "kstep_adam_moments" else "params"
  states = ("params",) if name == "local_sgd" else ("params", "mu", "nu")
  schedule = kstep_adam.adaptive_schedule(
    NODE_LOCAL, k_init=3, k_min=3, k_max=3, sync=sync, allowed_states=states
  )
  ctl = kstep_adam.AdaptiveController(schedule)
  got, levels, _ = adaptive_run(ctl, mesh, data, tx=make(schedule))
  assert levels == [0, 0, 1, 0, 0, 1, 0, 0]
  # Up to XLA fusion rounding: the fixed schedule's merge program branches, these do not.
  np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-5, atol=1e-6)
  assert all(d > 0 for d in ctl.state.drift)  # different data: the replicas drifted


def test_update_takes_the_level_as_merge_and_refuses_none():
  schedule = kstep_adam.adaptive_schedule("w")
  tx = kstep_adam.kstep_adam(0.1, schedule)
  params = {"w": np.ones(3, np.float32)}
  state = tx.init(params)
  with pytest.raises(ValueError, match="adaptive"):
    tx.update(params, state, params)
  _, state = tx.update(params, state, params, merge=0)  # a local step needs no axis
  assert int(state[-1].count) == 1


def test_bytes_counted_per_actual_merge():
  mesh = parallel.make_mesh(2, 2)
  schedule = kstep_adam.adaptive_schedule(NODE_LOCAL, budget=0.5, k_init=2, k_max=64)
  ctl = kstep_adam.AdaptiveController(schedule, local_seconds=1.0, merge_seconds=(8.0, 1.0))
  _, levels, _ = adaptive_run(ctl, mesh, worker_data(4, 14))
  params = init_params()
  total = kstep_adam.CommCost({}, {})
  for step, level in enumerate(levels, 1):
    total = total + kstep_adam.merge_bytes(params, schedule, mesh, step=step, level=level)
  sizes = {"node": 2, "local": 2}
  one = {
    lv: kstep_adam.merge_bytes(params, schedule, sizes, step=1, level=lv).total_bytes
    for lv in (1, 2)
  }
  # A full merge: the hierarchical mean of 6 float32 (padded to 6) plus the drift's
  # all-reduce of 3 float32 over 4 workers: 2 (L-1)/L 24 + 2 (N-1)/N 12 + 2 (4-1)/4 12.
  assert one[1] == pytest.approx(24.0 + 12.0 + 18.0)
  assert one[2] == pytest.approx(24.0)
  assert total.total_bytes == pytest.approx(sum(one[lv] for lv in levels if lv))
  assert ctl.state.merges == (levels.count(1), levels.count(2))
  assert ctl.comm_bytes(params, sizes).bytes_by_axis == pytest.approx(total.bytes_by_axis)


def test_resume_mid_run_reproduces_decisions_and_params():
  mesh = parallel.make_mesh(2, 2)
  data = worker_data(4, 16)
  schedule = kstep_adam.adaptive_schedule(NODE_LOCAL, budget=0.01, k_init=2, k_max=16)
  times = dict(local_seconds=1.0, merge_seconds=(6.0, 1.0))
  want, want_levels, _ = adaptive_run(kstep_adam.AdaptiveController(schedule, **times), mesh, data)
  assert len(set(want_levels)) == 3  # local steps, and merges at both levels
  first = kstep_adam.AdaptiveController(schedule, **times)
  _, levels, (params_W, state_W) = adaptive_run(first, mesh, data[:7])
  saved = json.loads(json.dumps(first.state_dict()))
  host = jax.device_get((params_W, state_W))  # as a checkpoint would hold them
  placed = jax.tree.map(lambda v: jax.device_put(v, parallel.worker_sharding(mesh, v.ndim)), host)
  resumed = kstep_adam.AdaptiveController(schedule, state=saved)
  got, rest, _ = adaptive_run(resumed, mesh, data[7:], params_state=placed)
  assert levels + rest == want_levels
  np.testing.assert_array_equal(np.stack(got), np.stack(want[7:]))


def test_estimated_merge_seconds_from_network_model():
  schedule = kstep_adam.adaptive_schedule(NODE_LOCAL)
  net = kstep_adam.NETWORKS["nvlink+100g"]
  params = {"w": np.zeros(1 << 20, np.float32)}
  c1, c2 = kstep_adam.estimated_merge_seconds(params, schedule, {"node": 2, "local": 4}, net)
  assert c1 > c2 > 0  # a merge over the slow axis costs more than one inside a node
