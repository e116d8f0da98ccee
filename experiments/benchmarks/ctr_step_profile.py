"""Where the compiled CTR train step's time goes, part by part, from XLA's own trace.

  python -m experiments.benchmarks.ctr_step_profile                  # batch 4096, 1 device
  python -m experiments.benchmarks.ctr_step_profile --batch 256 --steps 3 --out /tmp/p.json

Builds the trainer's jitted step (``make_ctr_train_step``: DLRM, synchronous Adam on the dense
layers, the embedding rows' gradient returned to a host optimizer) on one device and runs it on
one batch of the default synthetic data (its keys hashed and deduplicated as the tier does,
the rows random), first ``--warmup`` times (its wall time), then ``--steps`` times under
``jax.profiler``.
Each op XLA ran is put in the part of the model its ops were traced in, by the named scopes
of ``kstep_adam.ctr``: ``bottom_mlp``, ``embedding_gather`` (with its backward, the rows'
scatter-add), ``interaction`` (the pair dots), ``top_mlp``, ``loss``, ``dense_optimizer``
and ``finite_check``; ops outside them (layout copies, the chunk loop, the sparse pmean) are
``other``. It prints each part's op time per step and its share, the step's wall time, and
the step's FLOP rate against a float32 matmul measured in the same process.

Op times are the trace's op durations summed over XLA's threads: ops of one step may run on
two cores at once, so their sum can exceed the step's wall time. Dots that XLA's CPU runtime
hands to Eigen rather than to a YNNPACK fusion (here the weight gradients, whose left
operand is read transposed) run asynchronously: their events can end before their work does
(a 1024 x 367 by 1024 x 128 one alone took 0.66 ms, its event 0.11), and the rest of their
work shows in the ops that ran beside or after them. The result lists them (``async_dots``),
with their event time, so a reader knows which parts' shares are approximate.

The host work around the step (the tier's pulls and pushes, the reader thread) is not here:
a run's ``summary.json`` (``time_breakdown_seconds``) has it. The trace goes to a temporary
directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import numpy as np

from experiments._common import write_json

PARTS = (
  "dense_optimizer",
  "finite_check",
  "embedding_gather",
  "interaction",
  "bottom_mlp",
  "top_mlp",
  "loss",
)
# Trace events that contain other ops' events (the chunk loop, the executor).
_CONTAINERS = re.compile(r"^(while|call|conditional|ThunkExecutor)")
_HLO_LINE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"')


def part_of(op_name: str) -> str:
  """The model part an op was traced in, from its ``op_name`` metadata (the scope path)."""
  scopes = set(re.split(r"[/()]", op_name))
  return next((part for part in PARTS if part in scopes), "other")


def op_parts(hlo_text: str) -> dict[str, str]:
  """``{op: part}`` for the ops of one compiled module's HLO text."""
  parts = {}
  for line in hlo_text.splitlines():
    if match := _HLO_LINE.match(line):
      parts[match.group(1)] = part_of(match.group(2))
  return parts


_EIGEN_DOT = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = \S+ dot\(")


def eigen_dots(hlo_text: str) -> set[str]:
  """The names of the ``dot`` ops of a compiled module's HLO text that are not inside a
  fusion's computation: XLA's CPU runtime runs them on Eigen's threads, asynchronously."""
  names, in_fusion = set(), False
  for line in hlo_text.splitlines():
    if line.startswith(("%", "ENTRY")):  # a computation's header
      in_fusion = line.lstrip("%").startswith("fused_computation")
    elif not in_fusion and (match := _EIGEN_DOT.match(line)):
      names.add(match.group(1))
  return names


def module_name(hlo_text: str) -> str:
  return hlo_text.split(None, 2)[1].rstrip(",")


def _step_and_inputs(batch: int, table_rows: int, seed: int):
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from kstep_adam import ctr
  from kstep_adam import embedding
  from kstep_adam import parallel
  from kstep_adam.ctr.train import _step
  from kstep_adam.ctr.train._tier import bucket_size

  config = ctr.TrainConfig(
    batch_size=batch, optimizer="sync_adam", nodes=1, devices_per_node=1, seed=seed
  )
  tx, _ = ctr.make_optimizer(config)
  mesh = parallel.make_mesh(1, 1)
  model = ctr.make_model("dlrm", num_dense=13, num_categorical=26, embed_dim=config.embed_dim)
  graphdef, params = nnx.split(model)
  params_W, opt_state_W = parallel.init_replicas(params, tx, mesh)
  step = _step.make_ctr_train_step(graphdef, tx, mesh)

  data = ctr.SyntheticCTR(num_workers=1, seed=seed)
  b = data.batch(0, 0, batch)[0]
  rows_GxF = embedding.hash_keys_to_rows(b.keys_BxF, table_rows, salt=seed)
  unique_U, inverse_GxF = embedding.RowDeduplicator(table_rows)(rows_GxF)
  rng = np.random.default_rng(seed)
  rows_PxD = np.zeros((bucket_size(len(unique_U)), config.embed_dim), np.float32)
  rows_PxD[: len(unique_U)] = 0.05 * rng.standard_normal((len(unique_U), config.embed_dim))
  per_worker = [
    jax.device_put(x, parallel.worker_sharding(mesh, x.ndim))
    for x in (inverse_GxF, b.dense_BxI, b.label_B)
  ]
  replicated = NamedSharding(mesh, P())

  state = [params_W, opt_state_W]

  def run_once():
    rows = jax.device_put(rows_PxD, replicated)  # donated by the step
    state[0], state[1], grads, _, _ = step(state[0], state[1], rows, None, *per_worker)
    jax.block_until_ready(grads)

  return step, model, run_once


def profile(batch: int, steps: int, warmup: int, table_rows: int, seed: int) -> dict:
  import jax

  from experiments.benchmarks.ctr_throughput import dlrm_train_flops
  from experiments.benchmarks.ctr_throughput import matmul_gflops

  step, model, run_once = _step_and_inputs(batch, table_rows, seed)
  run_once()  # compiles

  def timed(count):
    walls = []
    for _ in range(count):
      start = time.perf_counter()
      run_once()
      walls.append(time.perf_counter() - start)
    return 1e3 * float(np.median(walls))

  wall_ms = timed(max(1, warmup))  # without the profiler, which slows the step down
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      profiled_wall_ms = timed(steps)
    finally:
      jax.profiler.stop_trace()
    (trace_file,) = glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz")
    with gzip.open(trace_file) as f:
      events = json.load(f)["traceEvents"]
  modules = {}  # module name -> ({op: part}, its Eigen dots)
  for executable in step.executables:
    text = executable.as_text()
    modules[module_name(text)] = op_parts(text), eigen_dots(text)
  seconds = collections.Counter()
  async_seconds = collections.Counter()
  for event in events:
    args = event.get("args") or {}
    module = modules.get(args.get("hlo_module"))
    if event.get("ph") != "X" or module is None or _CONTAINERS.match(event["name"]):
      continue
    parts, dots = module
    op = args.get("hlo_op", event["name"])
    part = parts.get(op, "other")
    seconds[part] += event["dur"] / 1e6
    if op in dots:
      async_seconds[f"{op} ({part})"] += event["dur"] / 1e6
  ops_ms = {part: 1e3 * seconds[part] / steps for part in (*PARTS, "other")}
  flops = dlrm_train_flops(model) * batch
  matmul = matmul_gflops()
  return {
    "batch": batch,
    "steps": steps,
    "wall_ms_per_step": wall_ms,
    "profiled_wall_ms_per_step": profiled_wall_ms,
    "ops_ms_per_step": ops_ms,
    "ops_ms_total": sum(ops_ms.values()),
    # Eigen dots: their events can end before their work (see the module docstring).
    "async_dots": {op: 1e3 * sec / steps for op, sec in sorted(async_seconds.items())},
    "step_gflops": flops / wall_ms / 1e6,
    "matmul_gflops": matmul,
    "share_of_matmul_rate": flops / wall_ms / 1e6 / matmul,
  }


def print_profile(result: dict) -> None:
  total = result["ops_ms_total"]
  print(
    f"CTR train step, batch {result['batch']}, 1 device: {result['wall_ms_per_step']:.1f} ms a "
    f"step (median, {result['profiled_wall_ms_per_step']:.1f} under the profiler), "
    f"{result['step_gflops']:.0f} GFLOP/s = "
    f"{result['share_of_matmul_rate']:.0%} of a float32 2048^3 matmul "
    f"({result['matmul_gflops']:.0f} GFLOP/s)"
  )
  print(f"{'part':18s} {'ms/step':>8s} {'share':>6s}   (op time summed over threads)")
  for part, ms in sorted(result["ops_ms_per_step"].items(), key=lambda kv: -kv[1]):
    print(f"{part:18s} {ms:8.2f} {ms / total:6.0%}")
  print(f"{'all ops':18s} {total:8.2f}")
  if result["async_dots"]:
    dots = ", ".join(f"{op} {ms:.2f} ms" for op, ms in result["async_dots"].items())
    print(
      f"{len(result['async_dots'])} dots ran asynchronously on Eigen's threads ({dots} of "
      "events): an event can end before their work, which then counts in the ops beside or "
      "after them"
    )


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=4096)
  p.add_argument("--steps", type=int, default=20, help="steps profiled")
  p.add_argument(
    "--warmup", type=int, default=10, help="steps timed without the profiler, before it"
  )
  p.add_argument("--table-rows", type=int, default=1 << 20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the result as JSON here")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  result = profile(args.batch, args.steps, args.warmup, args.table_rows, args.seed)
  print_profile(result)
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
