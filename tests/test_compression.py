"""Compressed baselines (1-bit Adam, top-k / random-k with error feedback) vs the NumPy
reference, step for step with their error memories; their bytes vs the compiled collectives."""

import re

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

import kstep_adam
from kstep_adam import parallel

NODE_LOCAL = ("node", "local")
# theta = [w (5), b]; each parameter leaf is compressed on its own.
LEAVES = {"w": slice(0, 5), "b": slice(5, 6)}
LEAF_INDEX = {"b": 0, "w": 1}  # positions in jax.tree.leaves(params): keys sorted
PARAMS = {"w": np.zeros((100, 10), np.float32), "b": np.zeros(7, np.float32)}  # as test_comm
SIZES = {"node": 2, "local": 4}


def _run(tx, mesh, data):
  """Harness run; per step the (W, D) parameters and the per-worker optimizer state."""
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  step = parallel.make_train_step(loss_fn, tx, mesh)
  thetas, states = [], []
  for x, y in data:
    batch = (x.reshape(-1, x.shape[-1]), y.reshape(-1))
    params_W, state_W, _ = step(params_W, state_W, batch)
    thetas.append(theta_of(jax.device_get(params_W)))
    states.append(jax.device_get(state_W))
  return thetas, states


def _run_one_worker(tx, data):
  """A jitted loop on one device without an axis (the worker is alone)."""
  params = init_params()
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(loss_fn)(params, (x, y)), state, params)
    return optax.apply_updates(params, updates), state

  thetas, states = [], []
  for x, y in data:
    params, state = step(params, state, x[0], y[0])
    thetas.append(theta_of(params)[None])
    states.append(jax.tree.map(lambda a: np.asarray(a)[None], state))
  return thetas, states


def _close(got, want, what, rtol=1e-4, atol=2e-5):
  for t, (g, w) in enumerate(zip(got, want, strict=True), start=1):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what}, step {t}")


@pytest.mark.parametrize("mesh_shape", [(1, 4), (2, 4), None], ids=["4dev", "8dev", "no_axis"])
def test_onebit_adam_matches_numpy_with_both_error_memories(mesh_shape):
  warmup, lr = 2, 0.05
  if mesh_shape is None:
    data = worker_data(1, 7)
    got, states = _run_one_worker(kstep_adam.onebit_adam(lr, warmup_steps=warmup), data)
  else:
    mesh = parallel.make_mesh(*mesh_shape)
    data = worker_data(mesh.size, 7)
    tx = kstep_adam.onebit_adam(lr, warmup_steps=warmup, axis_name=NODE_LOCAL)
    got, states = _run(tx, mesh, data)
  want, want_states = ref.onebit_adam(
    theta_of(init_params()), data, lr=lr, warmup_steps=warmup, leaves=LEAVES
  )
  _close(got, want, "params")
  onebit = [s[0] for s in states]
  _close([theta_of(s.mu) for s in onebit], [s["mu"] for s in want_states], "momentum")
  _close(
    [theta_of(s.worker_error) for s in onebit],
    [s["worker_error"] for s in want_states],
    "worker error",
  )
  for name in LEAVES:
    _close(
      [s.server_error[name] for s in onebit],
      [s["server_error"][name] for s in want_states],
      f"server error of {name!r}",
    )
  # The errors are really in use after the warm-up (and zero during it) ...
  assert np.abs(theta_of(onebit[warmup - 1].worker_error)).max() == 0
  assert np.abs(theta_of(onebit[-1].worker_error)).max() > 1e-3
  if mesh_shape is not None:  # alone, the server recompresses a compressed vector: no loss
    assert np.abs(onebit[-1].server_error["w"]).max() > 1e-4
  # ... and every worker holds the same momentum and parameters.
  np.testing.assert_array_equal(np.ptp(theta_of(onebit[-1].mu), axis=0), 0.0)
  np.testing.assert_array_equal(np.ptp(got[-1], axis=0), 0.0)


def test_onebit_adam_during_warmup_is_sync_adam():
  mesh = parallel.make_mesh(2, 4)
  data = worker_data(mesh.size, 4)
  onebit, _ = run_harness(
    kstep_adam.onebit_adam(0.05, warmup_steps=3, axis_name=NODE_LOCAL), mesh, data
  )
  sync, _ = run_harness(kstep_adam.sync_adam(0.05, axis_name=NODE_LOCAL), mesh, data)
  for t in range(3):
    np.testing.assert_array_equal(onebit[t], sync[t], err_msg=f"step {t + 1}")
  assert np.abs(onebit[3] - sync[3]).max() > 1e-6  # the compressed phase differs


@pytest.mark.parametrize(
  "mesh_shape,warmup", [((1, 4), 0), ((2, 4), 2), (None, 0)], ids=["4dev", "8dev", "no_axis"]
)
def test_topk_ef_matches_numpy_with_its_error_memory(mesh_shape, warmup):
  density, lr = 0.4, 0.05  # k = 2 of w's 5 entries, 1 of b's 1
  kwargs = dict(density=density, warmup_steps=warmup)
  if mesh_shape is None:
    data = worker_data(1, 6)
    got, states = _run_one_worker(kstep_adam.topk_ef(lr, **kwargs), data)
  else:
    mesh = parallel.make_mesh(*mesh_shape)
    data = worker_data(mesh.size, 6)
    got, states = _run(kstep_adam.topk_ef(lr, axis_name=NODE_LOCAL, **kwargs), mesh, data)
  want, want_errors = ref.sparse_ef_adam(
    theta_of(init_params()), data, lr=lr, density=density, leaves=LEAVES, warmup_steps=warmup
  )
  _close(got, want, "params")
  errors = [theta_of(s[0].error) for s in states]
  _close(errors, want_errors, "error memory")
  assert np.abs(errors[-1][:, LEAVES["w"]]).max() > 1e-3  # w's unsent entries wait there
  np.testing.assert_array_equal(np.ptp(got[-1], axis=0), 0.0)


def test_randk_ef_matches_numpy_with_shared_indices():
  """Every worker sends the entries at the same random indices, drawn as documented."""
  mesh = parallel.make_mesh(2, 2)
  data = worker_data(mesh.size, 5)
  seed, density = 3, 0.6  # k = 3 of w's 5 entries, 1 of b's 1
  tx = kstep_adam.topk_ef(0.05, density=density, method="randk", seed=seed, axis_name=NODE_LOCAL)
  got, states = _run(tx, mesh, data)

  def indices(t, name):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), t), LEAF_INDEX[name])
    size = LEAVES[name].stop - LEAVES[name].start
    k = max(1, round(density * size))
    return np.asarray(jax.random.choice(key, size, (k,), replace=False))

  want, want_errors = ref.sparse_ef_adam(
    theta_of(init_params()),
    data,
    lr=0.05,
    density=density,
    leaves=LEAVES,
    method="randk",
    indices=indices,
  )
  _close(got, want, "params")
  _close([theta_of(s[0].error) for s in states], want_errors, "error memory")
  assert {tuple(sorted(indices(t, "w"))) for t in range(1, 6)} != {(0, 1, 2)}  # indices move


@pytest.mark.parametrize("route", ["hierarchical", "flat"])
def test_topk_at_density_one_is_sync_adam(route):
  mesh = parallel.make_mesh(2, 4)
  data = worker_data(mesh.size, 4)
  topk = kstep_adam.topk_ef(0.05, density=1.0, axis_name=NODE_LOCAL, route=route)
  got, (_, state_W, _) = run_harness(topk, mesh, data)
  want, _ = run_harness(kstep_adam.sync_adam(0.05, axis_name=NODE_LOCAL, route=route), mesh, data)
  _close(got, want, "params", rtol=1e-6, atol=1e-6)  # the sum runs in another order
  np.testing.assert_array_equal(theta_of(jax.device_get(state_W[0].error)), 0.0)


def _collective_bytes(hlo_text: str) -> dict[tuple[str, str], float]:
  """Per-device bytes each (collective, dtype) sends, from the compiled program's result
  types: all-to-all and all-gather send (n-1)/n of their result, all-reduce 2(n-1)/n,
  reduce-scatter n-1 times its result (ring model, as the accounting)."""
  itemsize = {"u8": 1, "s32": 4, "f32": 4, "bf16": 2}
  factors = {
    "all-to-all": lambda n: (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "reduce-scatter": lambda n: n - 1,
  }
  out: dict[tuple[str, str], float] = {}
  pattern = re.compile(r" = (.*?) (all-to-all|all-gather|all-reduce|reduce-scatter)\(")
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    result_type, kind = m.groups()
    n = len(re.search(r"replica_groups=\{\{([\d,]*)\}", line).group(1).split(","))
    for dtype, dims in re.findall(r"(u8|s32|f32|bf16)\[([\d,]*)\]", result_type):
      size = itemsize[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      out[kind, dtype] = out.get((kind, dtype), 0.0) + factors[kind](n) * size
  return out


def _compiled_hlo(tx, mesh):
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  step = parallel.make_train_step(loss_fn, tx, mesh, donate=False)
  batch = jax.tree.map(
    lambda x: jax.device_put(x, parallel.worker_sharding(mesh, x.ndim)),
    (np.zeros((mesh.size, 5), np.float32), np.zeros(mesh.size, np.float32)),
  )
  return step.jitted.lower(params_W, state_W, batch).compile().as_text()


@pytest.mark.parametrize("method", ["onebit", "topk", "randk"])
def test_counted_bytes_equal_the_compiled_collectives(method):
  """What comm_bytes counts after the warm-up is what the program's collectives move."""
  mesh = parallel.make_mesh(2, 4)
  if method == "onebit":
    schedule = kstep_adam.compressed_schedule(NODE_LOCAL, "onebit", warmup_steps=1)
    tx = kstep_adam.onebit_adam(0.1, schedule)
  else:
    schedule = kstep_adam.compressed_schedule(NODE_LOCAL, method, density=0.4)
    tx = kstep_adam.topk_ef(0.1, schedule)
  moved = _collective_bytes(_compiled_hlo(tx, mesh))
  counted = kstep_adam.merge_bytes(init_params(), schedule, mesh, step=2)
  if method == "onebit":  # u8 messages; the warm-up branch's f32 all-reduce is not counted
    row = (ref.onebit_chunk(5, 8) + ref.onebit_chunk(1, 8)) // 8 + 4 * 2  # w and b
    assert moved["all-to-all", "u8"] == moved["all-gather", "u8"] == 7 * row
    assert counted.bytes_by_axis == {"node": 2 * 7 * row, "local": 0.0}
  elif method == "topk":  # values and int32 indices of k = 2 (w) + 1 (b) entries, as bytes
    assert moved == {("all-gather", "u8"): 7 * 3 * (4 + 4)}
    assert counted.bytes_by_axis == {"node": 7 * 3 * (4 + 4), "local": 0.0}
  else:  # 3 values, all-reduced hierarchically (padded to 4 for the 'local' axis)
    assert set(moved) == {("reduce-scatter", "f32"), ("all-reduce", "f32"), ("all-gather", "f32")}
    assert counted.bytes_by_axis == {
      "local": moved["reduce-scatter", "f32"] + moved["all-gather", "f32"],
      "node": moved["all-reduce", "f32"],
    }
  assert counted.total_bytes > 0


def test_accounting_counts_warmup_dense_and_then_the_compressed_messages():
  onebit = kstep_adam.compressed_schedule(NODE_LOCAL, "onebit", warmup_steps=3)
  ddp = kstep_adam.sync_schedule(NODE_LOCAL)
  dense = kstep_adam.merge_bytes(PARAMS, ddp, SIZES, step=1)
  assert kstep_adam.merge_bytes(PARAMS, onebit, SIZES, step=3) == dense
  # w: 1000 entries in 8 chunks of 128 (16 bytes of signs); b: 7 entries, chunks of 8.
  row = 16 + 4 + 1 + 4
  compressed = kstep_adam.merge_bytes(PARAMS, onebit, SIZES, step=4)
  assert compressed.bytes_by_axis == {"node": 2 * 7 * row, "local": 0.0}
  assert compressed.messages_by_axis == {"node": 2 * 7, "local": 0}
  total = kstep_adam.comm_bytes(PARAMS, onebit, SIZES, 10)
  assert total.bytes_by_axis["node"] == 3 * dense.bytes_by_axis["node"] + 7 * 2 * 7 * row
  assert total.bytes_by_axis["local"] == 3 * dense.bytes_by_axis["local"]
  assert kstep_adam.comm_bytes(PARAMS, onebit, SIZES, 2) == dense.scaled(2)
  # top-k 1%: 10 of w's entries and 1 of b's, 4 bytes of value and 4 of index each.
  topk = kstep_adam.compressed_schedule(NODE_LOCAL, "topk", density=0.01)
  assert kstep_adam.merge_bytes(PARAMS, topk, SIZES, step=1).bytes_by_axis["node"] == 7 * 11 * 8
  # random-k: the 11 values alone, all-reduced like DDP's gradients (padded to 12).
  randk = kstep_adam.compressed_schedule(NODE_LOCAL, "randk", density=0.01)
  cost = kstep_adam.merge_bytes(PARAMS, randk, SIZES, step=1)
  assert cost.bytes_by_axis == {"local": 2 * 3 / 4 * 12 * 4, "node": 2 * 1 / 2 * 12 * 4 / 4}
  # bf16 gradients: 2-byte values; one worker: nothing sent.
  half = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), PARAMS)
  assert kstep_adam.merge_bytes(half, topk, SIZES, step=1).bytes_by_axis["node"] == 7 * 11 * 6
  alone = kstep_adam.compressed_schedule(None, "topk", density=0.01)
  assert kstep_adam.comm_bytes(PARAMS, alone, {}, 5).total_bytes == 0


def test_the_harness_and_accounting_share_one_schedule_object():
  schedule = kstep_adam.compressed_schedule(NODE_LOCAL, "randk", density=0.5, route="flat")
  mesh = parallel.make_mesh(2, 2)
  data = worker_data(mesh.size, 3)
  got, _ = run_harness(kstep_adam.topk_ef(0.05, schedule), mesh, data)
  want, _ = run_harness(
    kstep_adam.topk_ef(0.05, density=0.5, method="randk", axis_name=NODE_LOCAL, route="flat"),
    mesh,
    data,
  )
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: kstep_adam.onebit_adam(0.1), "needs warmup_steps"),
    (lambda: kstep_adam.onebit_adam(0.1, warmup_steps=0), r"warmup_steps must be an int >= 1"),
    (lambda: kstep_adam.topk_ef(0.1), "needs density"),
    (lambda: kstep_adam.topk_ef(0.1, density=0.0), r"density must be a finite number in \(0.0"),
    (lambda: kstep_adam.topk_ef(0.1, density=1.5), r"density must be a finite number"),
    (lambda: kstep_adam.topk_ef(0.1, density=0.1, method="top"), "method must be one of"),
    (lambda: kstep_adam.topk_ef(0.1, density=0.1, seed=-1), "seed must be an int >= 0"),
    (
      lambda: kstep_adam.topk_ef(0.1, density=0.1, warmup_steps=-1),
      r"warmup_steps must be an int in \[0,",
    ),
    (
      lambda: kstep_adam.compressed_schedule("w", "onebit", density=0.5),
      "'onebit' sends every sign",
    ),
    (
      lambda: kstep_adam.onebit_adam(0.1, kstep_adam.sync_schedule("w")),
      r"compressed_schedule\(axes, 'onebit'",
    ),
    (
      lambda: kstep_adam.topk_ef(
        0.1, kstep_adam.compressed_schedule("w", "onebit", warmup_steps=1)
      ),
      r"'topk' or 'randk'",
    ),
    (
      lambda: kstep_adam.topk_ef(
        0.1, kstep_adam.compressed_schedule("w", "topk", density=0.1), density=0.2
      ),
      r"density=0.2 conflicts with the MergeSchedule given as schedule",
    ),
    (
      lambda: kstep_adam.topk_ef(
        0.1, kstep_adam.compressed_schedule("w", "topk", density=0.1), axis_name="w"
      ),
      "pass either a MergeSchedule as schedule or axis_name",
    ),
    (
      lambda: kstep_adam.onebit_adam(
        0.1, kstep_adam.compressed_schedule("w", "onebit", warmup_steps=2), route="flat"
      ),
      "route='flat' conflicts",
    ),
    (
      lambda: kstep_adam.kstep_adam(0.1, kstep_adam.compressed_schedule("w", "topk", density=0.1)),
      "compresses its exchange .'topk'.; pass it to topk_ef",
    ),
    (lambda: kstep_adam.onebit_adam(0.1, warmup_steps=2, b2=1.0), "b2 must be"),
    (lambda: kstep_adam.topk_ef(-0.1, density=0.1), "learning_rate must be"),
  ],
)
def test_compressed_baselines_reject_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_onebit_init_outside_the_mesh_says_where_to_run_it():
  tx = kstep_adam.onebit_adam(0.1, warmup_steps=2, axis_name=NODE_LOCAL)
  with pytest.raises(ValueError, match="must run inside shard_map"):
    tx.init(init_params())


def test_a_declared_local_step_is_refused_by_every_step_exchanges():
  mesh = parallel.make_mesh(1, 2)
  for tx in (
    kstep_adam.onebit_adam(0.1, warmup_steps=2, axis_name=NODE_LOCAL),
    kstep_adam.topk_ef(0.1, density=0.5, axis_name=NODE_LOCAL),
    kstep_adam.sync_adam(0.1, axis_name=NODE_LOCAL),
  ):
    params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
    spec = jax.sharding.PartitionSpec(NODE_LOCAL)

    def body(params_W, state_W, tx=tx):
      params, state = jax.tree.map(lambda x: x[0], (params_W, state_W))
      return tx.update(params, state, params, merge=False)[0]

    fn = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    with pytest.raises(ValueError, match="declares a local step, but this optimizer averages"):
      jax.eval_shape(fn, params_W, state_W)
