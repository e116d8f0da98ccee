"""Throughput of the CTR workflow against a plain JAX baseline, same model and same data.

  python -m experiments.benchmarks.ctr_throughput            # CPU: also 8 simulated devices
  python -m experiments.benchmarks.ctr_throughput --steps 100 --out /tmp/ctr_bench.json

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
the 2-core CPU box: see the README; the numbers are ratios within one process.
"""

from __future__ import annotations

import argparse
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
  from kstep_adam.ctr._step import bce_loss

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
    seed=seed,
  )
  source = ctr.DataSource(
    name="benchmark",
    num_dense=13,
    num_categorical=26,
    train_epoch=lambda epoch, global_batch: iter(batches),
    test_batches=lambda: iter(test_batches),
    steps_per_epoch=lambda _: len(batches),
  )
  s = ctr.train(config, source)
  return {
    "examples_per_sec": s["examples_per_sec"],
    "seconds": s["train_seconds"],
    "breakdown_seconds": s["time_breakdown_seconds"],
    "hit_rate": s["table_stats"]["hit_rate"],
    "table_bytes_read": s["table_stats"]["bytes_read"],
    "evictions": s["table_stats"]["evictions"],
    "test_auc": s["test_auc"],
  }


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
  p.add_argument("--out", default=None, help="write the results as JSON here")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)

  use_cpu_devices(8)  # a GPU backend ignores it
  import jax

  platform = jax.default_backend()
  common = dict(
    table_rows=args.table_rows, embed_dim=args.embed_dim, lr=2e-3, sparse_lr=2e-2, seed=args.seed
  )
  results = {"platform": platform, "device": str(jax.devices()[0]), "args": vars(args)}
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
  if args.out:
    write_json(args.out, results)
  return results


if __name__ == "__main__":
  main()
