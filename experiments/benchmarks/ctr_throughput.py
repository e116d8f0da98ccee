"""Throughput of the CTR workflow against a plain JAX baseline and the PyTorch CPU peer.

  python -m experiments.benchmarks.ctr_throughput            # CPU: 8 simulated devices
  python -m experiments.benchmarks.ctr_throughput --only-peer --cpu-devices 1  # 1-device cases
  python -m experiments.benchmarks.ctr_throughput --steps 100 --out /tmp/ctr_bench.json
  python -m experiments.benchmarks.ctr_throughput --only-peer  # just the peer comparison
  python -m experiments.benchmarks.ctr_throughput --pipeline-compare --peer-rounds 3 --peer-steps 200
  python -m experiments.benchmarks.ctr_throughput --native-compare --peer-rounds 3 --peer-steps 200

Peer comparison (needs torch: ``pip install -e '.[bench]'``; skipped with a note without it):
the train step of ``train_ctr --nodes 1 --devices-per-node 1 --batch-size 4096 --optimizer
sync_adam`` (DLRM, a 2^20-row table, lazy SparseAdam, Zipf ids from the default synthetic
data) against :mod:`experiments.benchmarks.torch_peer` (the same model and optimizers in
eager torch, ``--peer-threads`` threads), at batch 4096 and 1024 on one device and at 4096 on
2 x 4 simulated devices (CPU only), plus the device-resident optimizer at batch 4096
(``device_cache_rows`` >= the hot rows). The cases run in ``--peer-rounds`` interleaved
rounds in this one process (the JAX and torch runs alternate which goes first); each
ratio is the median of the per-round ratios, with the best beside it, and the load average
is recorded, because a shared machine's speed drifts between minutes. It also prints the
host-device bytes per step of the embedding tier with the host optimizer and with the
device-resident one.

Baseline: every embedding row in one in-memory ``jax.Array [table_rows, D]``, ``jnp.take``,
``optax.adam`` over embeddings and dense layers together, one jitted step (dense Adam
touches every row each step). Workflow: :func:`kstep_adam.ctr.train` with the tiered
embedding table in exact SparseAdam mode (the same math as ``optax.adam`` on the full table)
and synchronous Adam on the dense layers (plus k-step Adam, k=8, on 2 x 4 simulated CPU
devices, whose merge steps give the "merge" column), in two settings: the table fully in the
host tier, and a host cache 10x smaller than the table (a vocabulary large enough to
overflow it).
Both read the same pre-generated global batches from memory, so data generation is not
timed; the workflow still hashes and deduplicates keys on its reader thread. Prints
examples/s, the ratio to the baseline and the workflow's time breakdown (data wait, pull,
compute, push, merge).

Runs unchanged on a GPU (one device: the 8-device case is CPU-only, simulated). Expected on
the 2-core CPU box: see docs/benchmarks.md; the numbers are ratios within one process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time

import numpy as np

from experiments._common import use_cpu_devices
from experiments._common import write_json


def _batches(num_steps: int, global_batch: int, vocab_size: int, seed: int):
  from kstep_adam import ctr

  data = ctr.SyntheticCTR(num_workers=1, vocab_size=vocab_size, seed=seed)
  return data, [data.batch(s, 0, global_batch)[0] for s in range(num_steps)]


def run_baseline(
  batches, *, table_rows: int, embed_dim: int, lr: float, sparse_lr: float, seed: int
) -> dict:
  """One device, one jitted step: jnp.take from a full table, optax.adam on everything."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from kstep_adam import ctr
  from kstep_adam import embedding
  from kstep_adam.ctr.train._loss import bce_loss

  model = ctr.make_model("dlrm", num_dense=13, num_categorical=26, embed_dim=embed_dim, seed=seed)
  graphdef, params = nnx.split(model)
  table = jnp.asarray(embedding.init_rows(np.arange(table_rows), embed_dim, seed=seed, scale=0.05))
  tx = optax.multi_transform(
    {"dense": optax.adam(lr), "sparse": optax.adam(sparse_lr)}, ("dense", "sparse")
  )
  state = (params, table)
  opt_state = tx.init(state)

  def step(state, opt_state, rows_BxF, dense_BxI, label_B):
    def loss_fn(state):
      params, table = state
      emb_BxFxD = jnp.take(table, rows_BxF, axis=0)
      return bce_loss(nnx.merge(graphdef, params)(emb_BxFxD, dense_BxI), label_B)

    loss, grads = jax.value_and_grad(loss_fn)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  rows = [embedding.hash_keys_to_rows(b.keys_BxF, table_rows, salt=seed) for b in batches]
  start = None
  for i, (b, r) in enumerate(zip(batches, rows)):
    state, opt_state, loss = step(state, opt_state, r, b.dense_BxI, b.label_B)
    if i == 0:
      jax.block_until_ready(loss)
      start = time.perf_counter()
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  return {
    "examples_per_sec": (len(batches) - 1) * batches[0].size / seconds,
    "seconds": seconds,
    "final_loss": float(loss),
  }


def dlrm_train_flops(model) -> float:
  """FLOP of one example's forward and backward pass through a DLRM: 2 per multiply-add of
  every Linear layer and of the full ``[N, N]`` Gram matrix of the interaction, times 3 (the
  backward pass costs twice the forward). Elementwise work is not counted, nor the zero
  vectors the interaction pads its ``N`` vectors with (to a multiple of 4): they are not the
  model's work."""
  if model.bottom is None:
    raise ValueError("a DLRM without dense features: no width to count the interaction")
  layers = [*model.bottom.layers, *model.top.layers]
  macs = sum(int(np.prod(layer.kernel.shape)) for layer in layers)
  dim = model.bottom.layers[-1].kernel.shape[1]  # the bottom MLP ends at the embedding width
  n = model.num_vectors
  return 3 * 2 * (macs + n * n * dim)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  """GFLOP/s of a jitted float32 ``[size, size] @ [size, size]`` on the default device, the
  best of ``repeats`` (the reference rate the CTR step's FLOP rate is compared with)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(a, a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def _with_matmul_around(run) -> tuple[dict, float]:
  """``run()``'s result and the faster of a matmul's GFLOP/s timed right before and after."""
  before = matmul_gflops()
  result = run()
  return result, max(before, matmul_gflops())


def run_workflow(
  batches,
  *,
  nodes: int,
  devices_per_node: int,
  table_rows: int,
  host_cache_rows: int,
  device_cache_rows: int,
  embed_dim: int,
  lr: float,
  sparse_lr: float,
  sparse_mode: str,
  seed: int,
  test_batches,
  optimizer: str = "sync_adam",
  k: int = 1,
  pipeline: bool = True,
) -> dict:
  from kstep_adam import ctr

  workers = nodes * devices_per_node
  config = ctr.TrainConfig(
    batch_size=batches[0].size // workers,
    embed_dim=embed_dim,
    learning_rate=lr,
    sparse_learning_rate=sparse_lr,
    sparse_mode=sparse_mode,
    optimizer=optimizer,
    k=k,
    nodes=nodes,
    devices_per_node=devices_per_node,
    steps=len(batches),
    log_every=10**9,
    eval_every=0,
    table_rows=table_rows,
    host_cache_rows=host_cache_rows,
    device_cache_rows=device_cache_rows,
    pipeline=pipeline,
    seed=seed,
  )
  source = ctr.batches_source("benchmark", batches, test_batches)
  s = ctr.train(config, source)
  table = s["table_stats"]
  return {
    "examples_per_sec": s["examples_per_sec"],
    "host_device_bytes_per_step": s["host_device_bytes_per_step"],
    "device_hit_rate": table.get("device_hit_rate"),
    "seconds": s["train_seconds"],
    "breakdown_seconds": s["time_breakdown_seconds"],
    "hit_rate": s["table_stats"]["hit_rate"],
    "table_bytes_read": s["table_stats"]["bytes_read"],
    "evictions": s["table_stats"]["evictions"],
    "test_auc": s["test_auc"],
  }


def _peer_workflow(args, batches, test_batches, **case):
  """``run_workflow`` as the peer cases run it (the train_ctr defaults: a 2^20-row table
  behind a 2^18-row host cache, lazy SparseAdam), for one case's settings."""
  return functools.partial(
    run_workflow,
    batches,
    table_rows=1 << 20,
    host_cache_rows=1 << 18,
    sparse_mode="lazy",
    test_batches=test_batches,
    embed_dim=args.embed_dim,
    lr=2e-3,
    sparse_lr=2e-2,
    seed=args.seed,
    **case,
  )


PEER_CASES = {  # name: (global batch, nodes, devices per node, device_cache_rows)
  "batch 4096, 1 device": (4096, 1, 1, 0),
  "batch 4096, 1 device, device-resident optimizer": (4096, 1, 1, 1 << 16),
  "batch 1024, 1 device": (1024, 1, 1, 0),
  "batch 4096, 2x4 simulated devices": (4096, 2, 4, 0),
}


def run_peer_comparison(args) -> dict:
  """The JAX train step against the torch peer, interleaved; see the module docstring."""
  from experiments.benchmarks import torch_peer

  # libgomp's threads spin while they wait for work; on a shared machine (or next to XLA's
  # own thread pool) that spinning takes the cores torch needs. Must precede importing torch.
  os.environ.setdefault("OMP_WAIT_POLICY", args.peer_omp_wait.upper())
  try:
    torch_peer.require_torch()
  except ImportError as error:
    print(f"peer comparison skipped: {error}")
    return {"skipped": str(error)}
  import jax
  from flax import nnx

  from kstep_adam import ctr

  cases = {
    name: case for name, case in PEER_CASES.items() if case[1] * case[2] <= jax.device_count()
  }
  if skipped := sorted(set(PEER_CASES) - set(cases)):
    print(f"skipped (more devices than this process has, see --cpu-devices): {skipped}")
  data = {}
  for batch in sorted({case[0] for case in cases.values()}):
    stream, batches = _batches(args.peer_steps, batch, args.peer_vocab_size, args.seed)
    data[batch] = (batches, [b for b, _ in stream.test_batches(4096)][:1])
  model = ctr.make_model("dlrm", num_dense=13, num_categorical=26, embed_dim=args.embed_dim)
  flax_params = nnx.split(model)[1]
  flops_per_example = dlrm_train_flops(model)
  rounds: dict[str, list] = {name: [] for name in cases}
  load_before = os.getloadavg()
  for round_index in range(args.peer_rounds):
    for name, (batch, nodes, per_node, device_rows) in cases.items():
      batches, test = data[batch]

      jax_run = _peer_workflow(
        args,
        batches,
        test,
        nodes=nodes,
        devices_per_node=per_node,
        device_cache_rows=device_rows,
      )
      torch_run = functools.partial(
        torch_peer.run,
        batches,
        threads=args.peer_threads,
        table_rows=1 << 20,
        embed_dim=args.embed_dim,
        seed=args.seed,
        flax_params=flax_params,
      )
      # The matmul right before and after the JAX run: the machine's speed drifts between
      # minutes, so the FLOP rate is rated against the same minute's matmul (the faster one).
      jax_run = functools.partial(_with_matmul_around, jax_run)
      if round_index % 2 == 0:
        (jax_result, matmul), torch_result = jax_run(), torch_run()
      else:
        torch_result, (jax_result, matmul) = torch_run(), jax_run()
      rounds[name].append(
        {
          "jax": jax_result,
          "torch_examples_per_sec": torch_result["examples_per_sec"],
          "ratio": jax_result["examples_per_sec"] / torch_result["examples_per_sec"],
          "matmul_gflops": matmul,
          "share_of_matmul_rate": jax_result["examples_per_sec"] * flops_per_example / 1e9 / matmul,
        }
      )
  summary = {}
  for name, runs in rounds.items():
    ratios = [r["ratio"] for r in runs]
    last = runs[-1]["jax"]
    summary[name] = {
      "jax_examples_per_sec": float(np.median([r["jax"]["examples_per_sec"] for r in runs])),
      "torch_examples_per_sec": float(np.median([r["torch_examples_per_sec"] for r in runs])),
      "ratio_median": float(np.median(ratios)),
      "ratio_best": float(max(ratios)),
      "ratios": ratios,
      "share_of_matmul_rate": float(np.median([r["share_of_matmul_rate"] for r in runs])),
      "matmul_gflops": float(np.median([r["matmul_gflops"] for r in runs])),
      "embedding_bytes_per_step": last["host_device_bytes_per_step"]["embedding"],
      "batch_bytes_per_step": last["host_device_bytes_per_step"]["batch"],
      "device_hit_rate": last["device_hit_rate"],
    }
  return {
    "cases": summary,
    "rounds": rounds,
    "load_average_before": load_before,
    "load_average_after": os.getloadavg(),
    "flops_per_example": flops_per_example,
    "torch_threads": args.peer_threads,
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    "steps": args.peer_steps,
  }


# What an A/B comparison of the main peer case varies: its two variants, each with the
# workflow's settings and the environment it runs in.
COMPARISONS = {
  "pipeline": {
    "pipelined": ({"pipeline": True}, {}),
    "synchronous": ({"pipeline": False}, {}),
  },
  # The C++ kernels (the pair interaction in the program, the host's SparseAdam step) or
  # XLA's batched matmul and the NumPy step they replace.
  "native": {
    "kernels": ({}, {"KSTEP_ADAM_NATIVE_KERNELS": "1"}),
    "xla+numpy": ({}, {"KSTEP_ADAM_NATIVE_KERNELS": "0"}),
  },
}


@contextlib.contextmanager
def _environment(variables: dict[str, str]):
  saved = {name: os.environ.get(name) for name in variables}
  os.environ.update(variables)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def run_comparison(args, what: str = "pipeline") -> dict:
  """The peer comparison's main case (batch 4096, 1 device, lazy SparseAdam on the host tier)
  in the two variants of ``COMPARISONS[what]`` (the pipelined step and the synchronous one;
  the C++ kernels and the forms they replace), interleaved in this process, ``--peer-rounds``
  rounds of ``--peer-steps`` steps; each run's FLOP share is rated against the matmul timed
  right before and after it."""
  from kstep_adam import ctr

  variants = COMPARISONS[what]
  first, second = variants
  stream, batches = _batches(args.peer_steps, 4096, args.peer_vocab_size, args.seed)
  test = [b for b, _ in stream.test_batches(4096)][:1]
  model = ctr.make_model("dlrm", num_dense=13, num_categorical=26, embed_dim=args.embed_dim)
  flops_per_example = dlrm_train_flops(model)
  load_before = os.getloadavg()
  rounds = []
  for round_index in range(args.peer_rounds):
    runs = {}
    for variant in (first, second) if round_index % 2 == 0 else (second, first):
      settings, environment = variants[variant]
      case = dict(nodes=1, devices_per_node=1, device_cache_rows=0, **settings)
      with _environment(environment):
        result, matmul = _with_matmul_around(_peer_workflow(args, batches, test, **case))
      steps = len(batches)
      runs[variant] = {
        "examples_per_sec": result["examples_per_sec"],
        "matmul_gflops": matmul,
        "share_of_matmul_rate": result["examples_per_sec"] * flops_per_example / 1e9 / matmul,
        "ms_per_step": {
          k: 1e3 * v / steps for k, v in result["breakdown_seconds"].items() if v is not None
        },
        "test_auc": result["test_auc"],
      }
    rounds.append(runs)
  ratios = [r[first]["examples_per_sec"] / r[second]["examples_per_sec"] for r in rounds]
  median = lambda variant, key: float(np.median([r[variant][key] for r in rounds]))
  return {
    "compared": what,
    "variants": [first, second],
    "rounds": rounds,
    "ratio_median": float(np.median(ratios)),
    "ratios": ratios,
    "cases": {
      variant: {key: median(variant, key) for key in ("examples_per_sec", "share_of_matmul_rate")}
      for variant in (first, second)
    },
    "load_average_before": load_before,
    "load_average_after": os.getloadavg(),
    "steps": args.peer_steps,
  }


def print_comparison(result: dict) -> None:
  first, second = result["variants"]
  print(
    f"\nThe CTR step, {first} against {second} (batch 4096, 1 device), "
    f"{len(result['rounds'])} interleaved rounds of {result['steps']} steps; the ratio is the "
    f"median of the rounds' ratios"
  )
  for i, runs in enumerate(result["rounds"]):
    line = "  ".join(
      f"{variant} {r['examples_per_sec']:8.0f} ex/s {r['share_of_matmul_rate']:4.0%} "
      f"(pull {r['ms_per_step']['pull']:.1f} compute {r['ms_per_step']['compute']:.1f} "
      f"push {r['ms_per_step']['push']:.1f} ms)"
      for variant, r in runs.items()
    )
    print(f"round {i}: {line}")
  cases = result["cases"]
  print(
    f"{first} / {second}: {result['ratio_median']:.2f} "
    f"(rounds {', '.join(f'{r:.2f}' for r in result['ratios'])}); share of the matmul rate "
    f"{cases[first]['share_of_matmul_rate']:.0%} against "
    f"{cases[second]['share_of_matmul_rate']:.0%}"
  )


def print_peer_comparison(peer: dict) -> None:
  if "skipped" in peer:
    return
  load = lambda x: "/".join(f"{v:.1f}" for v in x)
  print(
    f"\nJAX train step vs the PyTorch CPU peer ({peer['torch_threads']} threads, "
    f"OMP_WAIT_POLICY={peer['omp_wait_policy']}), "
    f"{len(next(iter(peer['rounds'].values())))} interleaved rounds of {peer['steps']} steps, "
    f"load average {load(peer['load_average_before'])} before, "
    f"{load(peer['load_average_after'])} after"
  )
  print(
    f"FLOP rate of the JAX step: {peer['flops_per_example'] / 1e3:.0f}k FLOP per example "
    "(forward and backward) against a float32 2048^3 matmul timed right before and after "
    "each JAX run (the faster of the two; median of the rounds' shares)"
  )
  print(
    f"{'case':50s} {'jax ex/s':>9s} {'torch':>9s} {'ratio':>6s} {'best':>6s} "
    f"{'matmul':>7s} {'GFLOP/s':>8s} {'emb B/step':>11s} {'hit':>5s}"
  )
  for name, c in peer["cases"].items():
    hit = c["device_hit_rate"]
    print(
      f"{name:50s} {c['jax_examples_per_sec']:9.0f} {c['torch_examples_per_sec']:9.0f} "
      f"{c['ratio_median']:6.2f} {c['ratio_best']:6.2f} {c['share_of_matmul_rate']:7.0%} "
      f"{c['matmul_gflops']:8.0f} {c['embedding_bytes_per_step']:11.0f} "
      f"{'-' if hit is None else f'{hit:.2f}':>5s}"
    )
  host = peer["cases"].get("batch 4096, 1 device")
  device = peer["cases"].get("batch 4096, 1 device, device-resident optimizer")
  if host and device:
    print(
      "embedding host-device bytes per step, host optimizer / device-resident optimizer: "
      f"{host['embedding_bytes_per_step'] / device['embedding_bytes_per_step']:.1f}x "
      f"(device hit rate {device['device_hit_rate']:.2f}; batch inputs add "
      f"{device['batch_bytes_per_step']:.0f} B/step to both)"
    )


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--global-batch", type=int, default=1024)
  p.add_argument("--embed-dim", type=int, default=16)
  p.add_argument("--table-rows", type=int, default=1 << 18)
  p.add_argument("--vocab-size", type=int, default=5000, help="host-tier case")
  p.add_argument(
    "--big-vocab-size",
    type=int,
    default=200_000,
    help="10x case: enough distinct ids to overflow the small host cache",
  )
  p.add_argument("--sparse-mode", default="exact", choices=("exact", "lazy"))
  p.add_argument("--device-cache-rows", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--peer-rounds", type=int, default=5, help="interleaved rounds vs torch")
  p.add_argument("--peer-steps", type=int, default=60, help="steps per run vs torch")
  p.add_argument("--peer-threads", type=int, default=2, help="torch threads")
  p.add_argument(
    "--peer-omp-wait",
    default="passive",
    choices=("passive", "active"),
    help="OMP_WAIT_POLICY for torch (unless set in the environment)",
  )
  p.add_argument("--peer-vocab-size", type=int, default=5000, help="train_ctr's default data")
  p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer comparison")
  p.add_argument("--only-peer", action="store_true", help="only the PyTorch peer comparison")
  p.add_argument(
    "--pipeline-compare",
    action="store_true",
    help="only the main peer case with the pipelined step and without, interleaved",
  )
  p.add_argument(
    "--native-compare",
    action="store_true",
    help="only the main peer case with the C++ kernels and without (KSTEP_ADAM_NATIVE_KERNELS)",
  )
  p.add_argument(
    "--cpu-devices",
    type=int,
    default=None,
    help="simulated CPU devices of this process (default: 1 for the A/B comparisons, which run "
    "one device, as train_ctr does; 8 otherwise, which the 2 x 4 cases need). A one-device "
    "case runs slower in an 8-device process; the peer cases that need more devices than "
    "this are skipped",
  )
  p.add_argument("--out", default=None, help="write the results as JSON here")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)

  compare = args.pipeline_compare or args.native_compare
  devices = args.cpu_devices if args.cpu_devices is not None else (1 if compare else 8)
  use_cpu_devices(devices)  # a GPU backend ignores it
  import jax

  platform = jax.default_backend()
  common = dict(
    table_rows=args.table_rows, embed_dim=args.embed_dim, lr=2e-3, sparse_lr=2e-2, seed=args.seed
  )
  results = {"platform": platform, "device": str(jax.devices()[0]), "args": vars(args)}
  if args.pipeline_compare or args.native_compare:
    what = "pipeline" if args.pipeline_compare else "native"
    results[what] = run_comparison(args, what)
    print_comparison(results[what])
    if args.out:
      write_json(args.out, results)
    return results
  if not args.no_peer:
    results["peer"] = run_peer_comparison(args)
  if args.only_peer:
    print_peer_comparison(results["peer"])
    if args.out:
      write_json(args.out, results)
    return results
  data, batches = _batches(args.steps, args.global_batch, args.vocab_size, args.seed)
  test = [b for b, _ in data.test_batches(4096)]
  results["baseline"] = run_baseline(batches, **common)
  wf = dict(
    common,
    sparse_mode=args.sparse_mode,
    device_cache_rows=args.device_cache_rows,
    test_batches=test,
  )
  results["workflow_host_1dev"] = run_workflow(
    batches, nodes=1, devices_per_node=1, host_cache_rows=args.table_rows, **wf
  )
  if platform == "cpu":
    results["workflow_host_2x4"] = run_workflow(
      batches, nodes=2, devices_per_node=4, host_cache_rows=args.table_rows, **wf
    )
    results["workflow_host_2x4_kstep8"] = run_workflow(
      batches,
      nodes=2,
      devices_per_node=4,
      host_cache_rows=args.table_rows,
      optimizer="kstep_adam",
      k=8,
      **wf,
    )
  big_data, big_batches = _batches(args.steps, args.global_batch, args.big_vocab_size, args.seed)
  results["baseline_big_vocab"] = run_baseline(big_batches, **common)
  results["workflow_cache_10x_1dev"] = run_workflow(
    big_batches,
    nodes=1,
    devices_per_node=1,
    host_cache_rows=args.table_rows // 10,
    **dict(wf, test_batches=[b for b, _ in big_data.test_batches(4096)]),
  )

  base = results["baseline"]["examples_per_sec"]
  big_base = results["baseline_big_vocab"]["examples_per_sec"]
  print(
    f"platform={platform} device={results['device']} steps={args.steps} "
    f"global_batch={args.global_batch} table_rows={args.table_rows} D={args.embed_dim}"
  )
  print(
    f"{'case':34s} {'ex/s':>9s} {'ratio':>6s} {'data':>6s} {'pull':>6s} {'compute':>8s} "
    f"{'push':>6s} {'merge':>6s} {'hit':>5s}"
  )
  for name, r in results.items():
    if not isinstance(r, dict) or "examples_per_sec" not in r:
      continue
    ref = big_base if "big" in name or "10x" in name else base
    b = r.get("breakdown_seconds", {})
    fmt = lambda x: f"{x:6.2f}" if isinstance(x, (int, float)) else f"{'-':>6s}"
    print(
      f"{name:34s} {r['examples_per_sec']:9.0f} {r['examples_per_sec'] / ref:6.2f} "
      f"{fmt(b.get('data'))} {fmt(b.get('pull'))} {fmt(b.get('compute')):>8s} "
      f"{fmt(b.get('push'))} {fmt(b.get('merge'))} "
      f"{r.get('hit_rate', float('nan')):5.2f}"
    )
  if "peer" in results:
    print_peer_comparison(results["peer"])
  if args.out:
    write_json(args.out, results)
  return results


if __name__ == "__main__":
  main()
