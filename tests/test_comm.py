"""Byte accounting: cost model formulas, totals over steps, and the network time model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kstep_adam

NODE_LOCAL = ("node", "local")
SIZES = {"node": 2, "local": 4}
PARAMS = {"w": np.zeros((100, 10), np.float32), "b": np.zeros(7, np.float32)}  # 1007 floats.
S = 1007 * 4
S_PADDED = 1008 * 4  # padded to a multiple of the 'local' size (4).


def test_hierarchical_merge_bytes_follow_the_cost_model():
  schedule = kstep_adam.merge_schedule(4, axis_name=NODE_LOCAL)
  cost = kstep_adam.merge_bytes(PARAMS, schedule, SIZES, step=8)
  assert cost.bytes_by_axis == {"local": 2 * 3 / 4 * S_PADDED, "node": 2 * 1 / 2 * S_PADDED / 4}
  assert cost.messages_by_axis == {"local": 6, "node": 2}
  zero = kstep_adam.merge_bytes(PARAMS, schedule, SIZES, step=7)
  assert zero.total_bytes == 0 and sum(zero.messages_by_axis.values()) == 0


def test_flat_route_charges_one_ring_to_the_outer_axis():
  schedule = kstep_adam.merge_schedule(2, axis_name=NODE_LOCAL, route="flat")
  cost = kstep_adam.merge_bytes(PARAMS, schedule, SIZES, step=2)
  assert cost.bytes_by_axis == {"node": 2 * 7 / 8 * S, "local": 0.0}


def test_inner_level_merge_uses_only_the_local_axis():
  schedule = kstep_adam.merge_schedule({"node": 4, "local": 2}, axis_name=NODE_LOCAL)
  cost = kstep_adam.merge_bytes(PARAMS, schedule, SIZES, step=2)
  assert cost.bytes_by_axis == {"node": 0.0, "local": 2 * 3 / 4 * S}


def test_moments_add_their_own_bytes_with_their_dtype():
  schedule = kstep_adam.merge_schedule(
    1, axis_name="w", sync="params+moments", mu_dtype=jnp.bfloat16
  )
  cost = kstep_adam.merge_bytes(PARAMS, schedule, {"w": 8}, step=1)
  # params (4 bytes) + mu (2 bytes) + nu (4 bytes) per element.
  np.testing.assert_allclose(cost.bytes_by_axis["w"], 2 * 7 / 8 * 1007 * (4 + 2 + 4))


def test_desloc_total_bytes_count_each_state_on_its_period():
  schedule = kstep_adam.merge_schedule(2, axis_name="w", sync="desloc")
  total = kstep_adam.comm_bytes(PARAMS, schedule, {"w": 8}, num_steps=25)
  per_merge = 2 * 7 / 8 * S
  # params every 2 (12 merges), mu every 6 (4), nu every 12 (2).
  np.testing.assert_allclose(total.bytes_by_axis["w"], (12 + 4 + 2) * per_merge)


@pytest.mark.parametrize("num_steps", [0, 5, 64, 100, 131])
def test_comm_bytes_is_the_sum_of_merge_bytes(num_steps):
  schedule = kstep_adam.merge_schedule(
    {"node": 8, "local": 2}, axis_name=NODE_LOCAL, sync={"params": 1, "nu": 3}
  )
  total = kstep_adam.comm_bytes(PARAMS, schedule, SIZES, num_steps)
  want = {"node": 0.0, "local": 0.0}
  for t in range(1, num_steps + 1):
    for a, b in kstep_adam.merge_bytes(PARAMS, schedule, SIZES, step=t).bytes_by_axis.items():
      want[a] += b
  for a in want:
    np.testing.assert_allclose(total.bytes_by_axis[a], want[a])


def test_comm_bytes_is_fast_for_coprime_periods():
  schedule = kstep_adam.merge_schedule(
    {"node": 997, "local": 991}, axis_name=NODE_LOCAL, sync={"params": 1, "nu": 983}
  )
  total = kstep_adam.comm_bytes(PARAMS, schedule, SIZES, 10**9)
  node_merges = 10**9 // 997 + 10**9 // (997 * 983)  # params and nu at the node level
  np.testing.assert_allclose(total.bytes_by_axis["node"], node_merges * S_PADDED / 4)


def test_bytes_per_step_fall_as_one_over_k_and_match_ddp_at_k1():
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
  ddp = kstep_adam.comm_bytes(
    params, kstep_adam.merge_schedule(1, axis_name=NODE_LOCAL, sync="grads"), SIZES, 64
  )
  for k in (1, 2, 4, 8, 16, 32):
    cost = kstep_adam.comm_bytes(
      params, kstep_adam.merge_schedule(k, axis_name=NODE_LOCAL), SIZES, 64
    )
    for a in NODE_LOCAL:
      np.testing.assert_allclose(cost.bytes_by_axis[a], ddp.bytes_by_axis[a] / k)


def test_merge_bytes_computes_once_per_shapes_schedule_and_mesh():
  """A trainer asks every step; the per-merge costs are computed once and never shared out."""
  from kstep_adam import _comm

  schedule = kstep_adam.merge_schedule(2, axis_name=NODE_LOCAL, sync="params+moments")
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
  first = kstep_adam.merge_bytes(PARAMS, schedule, SIZES, step=2)
  first.bytes_by_axis["node"] = -1.0  # the caller owns what it gets
  before = _comm._merge_costs.cache_info()
  for step in range(2, 12, 2):  # arrays or their shapes: the same key
    again = kstep_adam.merge_bytes(shapes if step % 4 else PARAMS, schedule, SIZES, step=step)
    assert again.bytes_by_axis["node"] == 3 * 2 * 1 / 2 * S_PADDED / 4  # params, mu, nu
  after = _comm._merge_costs.cache_info()
  assert (after.hits - before.hits, after.misses - before.misses) == (5, 0)
  assert kstep_adam.merge_bytes(PARAMS, schedule, SIZES, step=3).total_bytes == 0


def test_network_model_turns_bytes_into_seconds():
  net = kstep_adam.NetworkModel({"node": 1e9, "local": 1e11}, {"node": 1e-5})
  cost = kstep_adam.CommCost({"node": 2e9, "local": 1e11}, {"node": 10, "local": 4})
  assert net.seconds_by_axis(cost) == {"node": 2.0 + 1e-4, "local": 1.0}
  assert net.seconds(cost) == pytest.approx(3.0001)


def test_named_network_is_the_ctr_default_and_built_by_the_one_constructor():
  from kstep_adam import ctr
  from kstep_adam.ctr.train._meters import network_model

  net = kstep_adam.NETWORKS["nvlink+100g"]
  assert net.bandwidth_bytes_per_s == {"local": 150e9, "node": 12.5e9}
  assert net.latency_s == {"local": 5e-6, "node": 20e-6}
  assert network_model(ctr.TrainConfig()) == net
  with pytest.raises(TypeError):
    kstep_adam.NETWORKS["mine"] = net  # shared by every caller: read-only


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: kstep_adam.NetworkModel({"node": 0.0}), r"bandwidth_bytes_per_s\['node'\]"),
    (lambda: kstep_adam.NetworkModel({"node": 1.0}, {"node": -1.0}), r"latency_s\['node'\]"),
    (lambda: kstep_adam.NetworkModel({"node": True}), r"bandwidth_bytes_per_s\['node'\]"),
    (
      lambda: kstep_adam.NetworkModel({"node": 1.0}, {"node": float("nan")}),
      r"latency_s\['node'\] must be a finite number",
    ),
    (
      lambda: kstep_adam.comm_bytes(
        PARAMS, kstep_adam.merge_schedule(2, axis_name="w"), {"w": 0}, 4
      ),
      r"axis_sizes\['w'\] must be an int >= 1, got 0",
    ),
    (
      lambda: kstep_adam.NetworkModel({"node": 1.0}).seconds(
        kstep_adam.CommCost({"local": 5.0}, {})
      ),
      "no bandwidth for axis 'local'",
    ),
    (
      lambda: kstep_adam.merge_bytes(
        PARAMS, kstep_adam.merge_schedule(2, axis_name="w"), {"x": 2}, step=2
      ),
      "no size for axes",
    ),
    (
      lambda: kstep_adam.merge_bytes(
        PARAMS, kstep_adam.merge_schedule(2, axis_name="w"), {"w": 2}, step=0
      ),
      r"step \(1-based\) must be an int >= 1",
    ),
    (
      lambda: kstep_adam.merge_bytes(
        PARAMS, kstep_adam.merge_schedule(2, axis_name="w"), {"w": 2}, step=True
      ),
      r"step \(1-based\) must be an int >= 1",
    ),
    (
      lambda: kstep_adam.comm_bytes(
        PARAMS, kstep_adam.merge_schedule(2, axis_name="w"), {"w": 2}, num_steps=-1
      ),
      "num_steps must be an int >= 0",
    ),
  ],
)
def test_bad_accounting_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()
