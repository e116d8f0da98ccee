"""Benchmark: cost of k-step Adam's local steps and merges, and bytes per step vs k.

Command: ``python -m experiments.benchmarks.optimizer_overhead`` (``--quick`` for a smoke run).
Hardware: CPU, 8 simulated devices as 2 nodes x 4 (set up in ``main()``); runs on 2 cores.
Expected: a non-merge step of kstep_adam costs what one of optax.adam does (goal: time ratio
<= 1.03); a merge step costs more than a local one; bytes per step fall as 1/k. Runtime and
measured numbers are in the README ("k-step Adam and its baselines"), with this command.

What is timed, on one MLP replicated on every simulated device:
* the full train step (forward, backward, optimizer, apply) of ``optax.adam`` (no
  communication) and of ``kstep_adam(k=2)`` on its odd (local) and even (merge) steps;
* the optimizer update alone (``tx.update`` + ``apply_updates`` on fixed gradients), which
  isolates the optimizer's own overhead.
Repetitions are interleaved in a random order, every step is blocked on, and medians are
reported. On a shared machine, trust the ratios (both sides run in the same process, back to
back), not the absolute times.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import kstep_adam
from experiments._common import use_cpu_devices
from kstep_adam import parallel

AXES = ("node", "local")
NETWORK = kstep_adam.NETWORKS["nvlink+100g"]  # NVLink inside a node, 100 Gb/s NIC across


def init_mlp(width: int, depth: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    f"l{i}": {
      "w": (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32),
      "b": np.zeros(width, np.float32),
    }
    for i in range(depth)
  }


def loss_fn(params, batch):
  x_BxD, y_BxD = batch
  h = x_BxD
  for i in range(len(params)):
    h = jnp.tanh(h @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"])
  return jnp.mean((h - y_BxD) ** 2)


def make_update_only(tx, mesh, assume_local=()):
  """Jitted shard_map of ``tx.update`` + ``apply_updates`` on given per-worker gradients.

  ``assume_local``: schedules to trace as local steps (the harness's local program).
  """
  spec = P(AXES)

  def per_worker(params_W, state_W, grads_W):
    params, state, grads = jax.tree.map(lambda x: x[0], (params_W, state_W, grads_W))
    with kstep_adam.assume_local_step(*assume_local):
      updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return jax.tree.map(lambda x: x[None], (params, state))

  return jax.jit(
    jax.shard_map(per_worker, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec)),
    donate_argnums=(0, 1),
  )


def timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def bench(mode: str, params, batch, mesh, reps: int, seed: int = 0):
  """Median seconds per step, all variants interleaved in a random order each repetition.

  * ``adam``: ``optax.adam``, no communication;
  * ``switch_local`` / ``switch_merge``: ``kstep_adam(k=2)`` as one program with the merge
    inside ``lax.switch``, on its odd (local) and even (merge) steps;
  * ``dispatch_local``: the local program that the harness runs on non-merge steps when given
    the schedule (no conditional, no collective).
  """
  schedule = kstep_adam.merge_schedule(2, axis_name=AXES)
  txs = {
    "adam": optax.adam(1e-4),
    "switch": kstep_adam.kstep_adam(1e-4, schedule),
    "dispatch": kstep_adam.kstep_adam(1e-4, schedule),
  }
  runners, carries = {}, {}
  for name, tx in txs.items():
    params_W, state_W = parallel.init_replicas(params, tx, mesh)
    if mode == "step":
      step = parallel.make_train_step(loss_fn, tx, mesh)
      step.prepare(params_W, state_W, batch)
      fn = step.local_jitted if name == "dispatch" else step.jitted
      runners[name] = lambda p, s, fn=fn: fn(p, s, batch)[:2]
    else:
      update = make_update_only(tx, mesh, (schedule,) if name == "dispatch" else ())
      runners[name] = lambda p, s, update=update: update(p, s, batch)
    carries[name] = (params_W, state_W)
    for _ in range(4):  # Compile and warm up; leaves kstep at an even count (next: local).
      carries[name], _ = timed(runners[name], *carries[name])
  times = {"adam": [], "switch_local": [], "switch_merge": [], "dispatch_local": []}
  rng = np.random.default_rng(seed)
  for _ in range(reps):
    for name in rng.permutation(list(txs)):
      for slot in ("local", "merge"):  # k=2: odd steps local, even steps merge.
        carries[name], dt = timed(runners[name], *carries[name])
        if name == "adam":
          times["adam"].append(dt)
        elif name == "switch":
          times[f"switch_{slot}"].append(dt)
        else:
          times["dispatch_local"].append(dt)  # This program never merges.
  med = {name: float(np.median(ts)) for name, ts in times.items()}
  # Paired estimate: per repetition, local-step time over adam time in the same repetition
  # (two steps each), which cancels slow drifts in machine load.
  pair = lambda name: np.asarray(times[name]).reshape(reps, -1).mean(1)
  adam = pair("adam")
  for name in ("dispatch_local", "switch_local"):
    ratios = pair(name) / adam
    med[f"{name}_paired"] = tuple(float(q) for q in np.percentile(ratios, [25, 50, 75]))
  return med


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--rows-per-worker", type=int, default=8)
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--quick", action="store_true", help="~1e6 params, 6 reps")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  width, depth, reps = (512, 4, 6) if args.quick else (args.width, args.depth, args.reps)

  use_cpu_devices(8, cpu_only=True)  # 2 nodes x 4 devices, on any machine; before JAX starts
  mesh = parallel.make_mesh(2, 4)
  params = init_mlp(width, depth)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  rows = args.rows_per_worker * mesh.size
  rng = np.random.default_rng(1)
  batch = (
    rng.normal(size=(rows, width)).astype(np.float32),
    rng.normal(size=(rows, width)).astype(np.float32),
  )
  print(
    f"devices: {mesh.size} x {jax.devices()[0].platform} as {dict(mesh.shape)}; "
    f"MLP {depth}x{width}x{width}: {num_params / 1e6:.2f}M params per replica; "
    f"{reps} interleaved reps; medians"
  )

  batch = jax.tree.map(lambda x: jax.device_put(x, parallel.worker_sharding(mesh, x.ndim)), batch)
  grads_W = parallel.replicate(jax.tree.map(lambda x: 1e-3 * np.ones_like(x), params), mesh)
  for mode, what in (("step", batch), ("update", grads_W)):
    med = bench(mode, params, what, mesh, reps)
    label = "full train step" if mode == "step" else "optimizer update only"
    print(
      f"[{label}] median ms: optax.adam {med['adam'] * 1e3:.2f} | kstep_adam local step: "
      f"host-dispatched {med['dispatch_local'] * 1e3:.2f}, in-graph switch "
      f"{med['switch_local'] * 1e3:.2f} | merge step {med['switch_merge'] * 1e3:.2f}"
    )
    print(
      f"  non-merge ratio kstep_adam/optax.adam: host-dispatched "
      f"{med['dispatch_local'] / med['adam']:.3f} (goal <= 1.03), in-graph switch "
      f"{med['switch_local'] / med['adam']:.3f}; merge/non-merge "
      f"{med['switch_merge'] / med['dispatch_local']:.3f}"
    )
    for name in ("dispatch_local", "switch_local"):
      q25, q50, q75 = med[f"{name}_paired"]
      print(f"  paired per-rep ratio {name}/adam: median {q50:.3f} (IQR {q25:.3f}-{q75:.3f})")

  print(
    "bytes per device per step (params only, hierarchical route; mean over 64 steps), "
    "and estimated comm time per step on "
    f"{dict(NETWORK.bandwidth_bytes_per_s)} B/s:"
  )
  ddp = kstep_adam.sync_schedule(AXES)
  for name, schedule in [("DDP (grads)", ddp)] + [
    (f"k={k}", kstep_adam.merge_schedule(k, axis_name=AXES)) for k in (1, 2, 4, 8, 16, 32)
  ]:
    cost = kstep_adam.comm_bytes(params, schedule, mesh, 64)
    per_step = {a: b / 64 for a, b in cost.bytes_by_axis.items()}
    seconds = NETWORK.seconds(cost) / 64
    print(
      f"  {name:12s} node {per_step['node'] / 1e6:9.3f} MB  local "
      f"{per_step['local'] / 1e6:9.3f} MB  ~{seconds * 1e3:8.3f} ms"
    )


if __name__ == "__main__":
  main()
