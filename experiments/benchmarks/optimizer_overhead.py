"""Benchmark: cost of k-step Adam's local steps and merges, and bytes per step per optimizer.

Command: ``python -m experiments.benchmarks.optimizer_overhead`` (``--quick`` for a smoke run;
``--out FILE.json`` also writes the numbers).
Hardware: CPU, 8 simulated devices as 2 nodes x 4 (set up in ``main()``); runs on 2 cores.
Expected: a local step with the merge decided on the host costs what one of ``optax.adam``
does (goal: time ratio <= 1.10, for the full train step and for the update alone); decided in
the graph it costs more on XLA:CPU; a merge step costs more than a local one; bytes per step
fall as 1/k, and 1-bit Adam and random-k send a fraction of DDP's bytes. Runtime and measured
numbers are in docs/benchmarks.md, with this command.

Everything runs the way a user writes a plain ``jax.jit`` loop: one ``jax.jit(shard_map(...))``
step per optimizer, no harness. What is timed, on one MLP replicated on every device:

* ``adam``: ``optax.adam`` (no communication);
* ``in_graph``: ``kstep_adam(k=2)`` called as ``tx.update(grads, state, params)``, which
  decides merges in the graph (``lax.switch`` on its step counter), on its odd (local) and
  even (merge) steps;
* ``hoisted``: the same optimizer called with ``merge=schedule.merges_at(t)`` as a static
  argument of the ``jax.jit``, on its local steps (the program without merge branches; the
  harness's :class:`kstep_adam.parallel.DispatchedStep` runs the same one).

Each is timed for the full train step (forward, backward, optimizer, apply) and for the
optimizer update alone (``tx.update`` + ``apply_updates`` on fixed gradients). Repetitions are
interleaved in a random order, every step is blocked on, and medians are reported, of wall
time and of the process's CPU time (all threads; less disturbed by other jobs time-slicing
the cores). Each repetition also gives a paired ratio (local step over ``optax.adam`` in the
same repetition), which cancels slow drifts in load. On a shared machine trust the ratios,
not the absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import kstep_adam
from experiments._cli import add_config_args
from experiments._cli import config_from_args
from experiments._common import use_cpu_devices
from experiments._common import write_json
from kstep_adam import parallel

AXES = ("node", "local")
NETWORK = kstep_adam.NETWORKS["nvlink+100g"]  # NVLink inside a node, 100 Gb/s NIC across
VARIANTS = ("adam", "in_graph", "hoisted")
BYTES_STEPS = 1000  # steps over which bytes per step are averaged


@dataclasses.dataclass(frozen=True)
class OverheadConfig:
  """What the benchmark times.

  Attributes:
    width: width of each square MLP layer.
    depth: number of MLP layers.
    rows_per_worker: batch rows per worker in the full train step.
    reps: interleaved repetitions (each times two steps of every variant).
    quick: smoke run: width 512 and 6 repetitions.
    out: also write the numbers to this JSON file (None: print only).
  """

  width: int = 1024
  depth: int = 4
  rows_per_worker: int = 8
  reps: int = 30
  quick: bool = False
  out: str | None = None

  def __post_init__(self):
    for name in ("width", "depth", "rows_per_worker", "reps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")


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


def make_step(tx, mesh, mode: str):
  """A user's jitted ``shard_map`` step ``(params_W, state_W, inputs, merge)``.

  ``mode='step'``: ``inputs`` is the global batch (forward, backward, update, apply);
  ``mode='update'``: ``inputs`` are per-worker gradients (update and apply only).
  ``merge`` is static and passed to ``tx.update`` (None: decided in the graph).
  """
  spec = P(AXES)

  def per_worker(params_W, state_W, inputs, merge):
    params, state = jax.tree.map(lambda x: x[0], (params_W, state_W))
    if mode == "step":
      grads = jax.grad(loss_fn)(params, inputs)
    else:
      grads = jax.tree.map(lambda x: x[0], inputs)
    extra = {} if merge is None else {"merge": merge}
    updates, state = tx.update(grads, state, params, **extra)
    params = optax.apply_updates(params, updates)
    return jax.tree.map(lambda x: x[None], (params, state))

  @functools.partial(jax.jit, static_argnames="merge", donate_argnums=(0, 1))
  def step(params_W, state_W, inputs, merge=None):
    body = functools.partial(per_worker, merge=merge)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec))(
      params_W, state_W, inputs
    )

  return step


def bench(mode: str, params, inputs, mesh, reps: int, seed: int = 0) -> dict:
  """Median seconds per step (wall and CPU) and paired ratios to ``optax.adam``.

  All variants are interleaved in a random order each repetition; every variant takes two
  steps per repetition (k=2: one local, one merge step).
  """
  schedule = kstep_adam.merge_schedule(2, axis_name=AXES)
  txs = {
    "adam": optax.adam(1e-4),
    "in_graph": kstep_adam.kstep_adam(1e-4, schedule),
    "hoisted": kstep_adam.kstep_adam(1e-4, schedule),
  }
  steps, carries, counts = {}, {}, {}
  for name, tx in txs.items():
    steps[name] = make_step(tx, mesh, mode)
    carries[name] = parallel.init_replicas(params, tx, mesh)
    counts[name] = 0

  def run(name):
    """One step of ``name``; returns (is_local, wall s, cpu s)."""
    counts[name] += 1
    merging = schedule.merges_at(counts[name])
    merge = merging if name == "hoisted" else None
    wall, cpu = time.perf_counter(), time.process_time()
    carries[name] = jax.block_until_ready(steps[name](*carries[name], inputs, merge=merge))
    return not merging, time.perf_counter() - wall, time.process_time() - cpu

  for name in txs:  # compile and warm up every program; leaves each at an even count.
    for _ in range(4):
      run(name)
  keys = ("adam", "in_graph_local", "in_graph_merge", "hoisted_local", "hoisted_merge")
  wall = {k: [] for k in keys}
  cpu = {k: [] for k in keys}
  rng = np.random.default_rng(seed)
  for _ in range(reps):
    for name in rng.permutation(list(txs)):
      for _ in range(2):
        is_local, dw, dc = run(name)
        key = name if name == "adam" else f"{name}_{'local' if is_local else 'merge'}"
        wall[key].append(dw)
        cpu[key].append(dc)
  out = {}
  for clock, times in (("wall", wall), ("cpu", cpu)):
    out[clock] = {k: float(np.median(v)) for k, v in times.items()}
    adam = np.asarray(times["adam"]).reshape(reps, 2).mean(1)
    for k in ("in_graph_local", "hoisted_local"):
      ratios = np.asarray(times[k]) / adam  # one local step per repetition
      out[clock][f"{k}_paired"] = [float(q) for q in np.percentile(ratios, [25, 50, 75])]
  return out


def bytes_table(params, mesh) -> list[dict]:
  """Bytes per device per step and estimated network time, for every optimizer's schedule."""
  schedules = [("DDP (grads)", kstep_adam.sync_schedule(AXES))]
  schedules += [(f"k={k}", kstep_adam.merge_schedule(k, axis_name=AXES)) for k in (1, 2, 8, 32)]
  schedules += [
    ("1-bit Adam", kstep_adam.compressed_schedule(AXES, "onebit", warmup_steps=100)),
    ("top-k 1%", kstep_adam.compressed_schedule(AXES, "topk", density=0.01)),
    ("random-k 1%", kstep_adam.compressed_schedule(AXES, "randk", density=0.01)),
  ]
  rows = []
  for name, schedule in schedules:
    cost = kstep_adam.comm_bytes(params, schedule, mesh, BYTES_STEPS)
    rows.append(
      {
        "schedule": name,
        "bytes_per_step": {a: b / BYTES_STEPS for a, b in cost.bytes_by_axis.items()},
        "seconds_per_step": NETWORK.seconds(cost) / BYTES_STEPS,
      }
    )
  return rows


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_config_args(parser, OverheadConfig)
  return parser.parse_args(argv)


def main(argv=None):
  config = config_from_args(OverheadConfig, parse_args(argv))
  if config.quick:
    config = dataclasses.replace(config, width=512, reps=6)
  use_cpu_devices(8, cpu_only=True)  # 2 nodes x 4 devices, on any machine; before JAX starts

  mesh = parallel.make_mesh(2, 4)
  params = init_mlp(config.width, config.depth)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  rows = config.rows_per_worker * mesh.size
  rng = np.random.default_rng(1)
  batch = (
    rng.normal(size=(rows, config.width)).astype(np.float32),
    rng.normal(size=(rows, config.width)).astype(np.float32),
  )
  print(
    f"devices: {mesh.size} x {jax.devices()[0].platform} as {dict(mesh.shape)}; "
    f"MLP {config.depth}x{config.width}x{config.width}: {num_params / 1e6:.2f}M params per "
    f"replica; {config.reps} interleaved reps; medians; plain jax.jit steps, no harness"
  )

  batch = jax.tree.map(lambda x: jax.device_put(x, parallel.worker_sharding(mesh, x.ndim)), batch)
  grads_W = parallel.replicate(jax.tree.map(lambda x: 1e-3 * np.ones_like(x), params), mesh)
  results = {"config": dataclasses.asdict(config), "num_params": num_params}
  for mode, inputs, label in (
    ("step", batch, "full train step"),
    ("update", grads_W, "optimizer update only"),
  ):
    med = bench(mode, params, inputs, mesh, config.reps)
    results[mode] = med
    for clock in ("wall", "cpu"):
      m = med[clock]
      print(
        f"[{label}, {clock} time] median ms: optax.adam {m['adam'] * 1e3:.2f} | kstep_adam "
        f"local step: hoisted {m['hoisted_local'] * 1e3:.2f}, in-graph "
        f"{m['in_graph_local'] * 1e3:.2f} | merge step {m['in_graph_merge'] * 1e3:.2f}"
      )
      for name in ("hoisted_local", "in_graph_local"):
        q25, q50, q75 = m[f"{name}_paired"]
        print(
          f"  {name}/adam: ratio of medians {m[name] / m['adam']:.3f}, paired median "
          f"{q50:.3f} (IQR {q25:.3f}-{q75:.3f})"
        )

  table = bytes_table(params, mesh)
  results["bytes"] = table
  print(
    f"bytes per device per step (mean over {BYTES_STEPS} steps; 1-bit Adam after 100 "
    f"warm-up steps) and estimated comm time per step on "
    f"{dict(NETWORK.bandwidth_bytes_per_s)} B/s:"
  )
  for row in table:
    per_step = row["bytes_per_step"]
    print(
      f"  {row['schedule']:12s} node {per_step['node'] / 1e6:9.3f} MB  local "
      f"{per_step['local'] / 1e6:9.3f} MB  ~{row['seconds_per_step'] * 1e3:8.3f} ms"
    )
  if config.out:
    write_json(config.out, results)


if __name__ == "__main__":
  main()
