"""Train one CTR configuration with the k-step Adam workflow.

Command (the README's main job; synthetic data, 2 nodes x 4 simulated devices):

  python -m experiments.train_ctr --out /tmp/ctr_run

Hardware: 2 shared CPU cores, 8 simulated devices. Expected runtime: 30-60 seconds.
Expected result: test AUC 0.7895 against a teacher (Bayes-optimal) AUC of 0.8203.

Other data:

  python -m experiments.train_ctr --data criteo:day_0_100k.txt.gz --out /tmp/criteo
  python -m experiments.train_ctr --data csv:avazu_train.csv --test-data csv:avazu_test.csv

Without ``--test-data`` the last 10% of the file's lines are the test set (a time split).
Writes ``OUT/metrics.jsonl`` (every ``--log-every`` steps and every evaluation) and
``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  g = p.add_argument_group("data")
  g.add_argument(
    "--data",
    default="synthetic",
    help="'synthetic', 'criteo:PATH' (TSV, plain or gzip) or 'csv:PATH' (header)",
  )
  g.add_argument(
    "--test-data",
    default=None,
    help="held-out file ('criteo:PATH', 'csv:PATH' or a bare path in the "
    "--data format); default: the last 10%% of --data's lines",
  )
  g.add_argument("--epochs", type=int, default=1, help="passes over file data")
  g.add_argument(
    "--skip-bad-lines",
    action="store_true",
    help="skip and count malformed lines instead of stopping",
  )
  g.add_argument("--label-column", default=None, help="csv: name of the label column")
  g.add_argument("--vocab-size", type=int, default=5000, help="synthetic: largest field vocabulary")
  g.add_argument(
    "--sharding",
    default="iid",
    choices=("iid", "non_iid"),
    help="synthetic: how worker shards differ",
  )
  g.add_argument("--test-examples", type=int, default=50_000, help="synthetic: test set size")
  g = p.add_argument_group("model and optimizer")
  g.add_argument("--model", default="dlrm", choices=("dlrm", "dcn_v2"))
  g.add_argument("--embed-dim", type=int, default=16)
  g.add_argument("--batch-size", type=int, default=128, help="examples per worker per step")
  g.add_argument("--lr", type=float, default=2e-3, help="dense Adam learning rate")
  g.add_argument("--sparse-lr", type=float, default=2e-2, help="embedding Adam learning rate")
  g.add_argument(
    "--sparse-mode",
    default="lazy",
    choices=("exact", "lazy"),
    help="embedding Adam: dense-equivalent (exact) or LazyAdam",
  )
  g.add_argument("--optimizer", default="kstep_adam", choices=("kstep_adam", "sync_adam"))
  g.add_argument("--k", type=int, default=8, help="k-step merge period")
  g.add_argument(
    "--sync",
    default="params",
    choices=("params", "params+nu", "params+moments"),
    help="what k-step Adam averages",
  )
  g.add_argument(
    "--merge",
    default="global",
    choices=("global", "node"),
    help="'node': average inside a node every step, across nodes every k",
  )
  g = p.add_argument_group("run")
  g.add_argument("--nodes", type=int, default=2)
  g.add_argument("--devices-per-node", type=int, default=4)
  g.add_argument(
    "--steps",
    type=int,
    default=None,
    help="training steps (default: --epochs passes of file data, or 800 synthetic steps)",
  )
  g.add_argument("--log-every", type=int, default=50)
  g.add_argument("--eval-every", type=int, default=200, help="0: evaluate only at the end")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument(
    "--table-dir",
    default=None,
    help="directory of the embedding table (kept, flushed at the end); "
    "default: a temporary directory",
  )
  g.add_argument("--table-rows", type=int, default=1 << 20)
  g.add_argument("--host-cache-rows", type=int, default=1 << 18)
  g.add_argument("--device-cache-rows", type=int, default=0)
  g.add_argument("--intra-node-gbps", type=float, default=1200.0)
  g.add_argument("--inter-node-gbps", type=float, default=100.0)
  g.add_argument("--out", default="runs/train_ctr", help="output directory")
  g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  return p.parse_args(argv)


def _split_spec(spec: str, default_format: str | None = None) -> tuple[str, str]:
  for fmt in ("criteo", "csv"):
    if spec.startswith(fmt + ":"):
      return fmt, spec[len(fmt) + 1 :]
  if default_format is None:
    raise ValueError(f"--data must be 'synthetic', 'criteo:PATH' or 'csv:PATH', got {spec!r}")
  return default_format, spec


def build(args: argparse.Namespace):
  """Turn parsed flags into ``(TrainConfig, DataSource)``; JAX must be configured already."""
  from kstep_adam import ctr

  config = ctr.TrainConfig(
    model=args.model,
    embed_dim=args.embed_dim,
    batch_size=args.batch_size,
    learning_rate=args.lr,
    sparse_learning_rate=args.sparse_lr,
    sparse_mode=args.sparse_mode,
    optimizer=args.optimizer,
    k=args.k,
    sync=args.sync,
    merge=args.merge,
    nodes=args.nodes,
    devices_per_node=args.devices_per_node,
    steps=args.steps,
    epochs=args.epochs,
    synthetic_steps=800,
    log_every=args.log_every,
    eval_every=args.eval_every,
    table_rows=args.table_rows,
    host_cache_rows=args.host_cache_rows,
    device_cache_rows=args.device_cache_rows,
    table_dir=args.table_dir,
    seed=args.seed,
    intra_node_gbps=args.intra_node_gbps,
    inter_node_gbps=args.inter_node_gbps,
  )
  if args.data == "synthetic":
    if args.test_data is not None:
      raise ValueError(
        "--test-data needs file data (--data criteo:PATH or csv:PATH); the "
        "synthetic source makes its own held-out set (--test-examples)"
      )
    data = ctr.SyntheticCTR(
      num_workers=config.num_workers,
      sharding=args.sharding,
      vocab_size=args.vocab_size,
      seed=args.seed,
    )
    source = ctr.synthetic_source(
      data, batch_size=config.batch_size, test_examples=args.test_examples
    )
  else:
    fmt, path = _split_spec(args.data)
    test_path = None
    if args.test_data is not None:
      test_fmt, test_path = _split_spec(args.test_data, default_format=fmt)
      if test_fmt != fmt:
        raise ValueError(f"--test-data format {test_fmt!r} differs from --data format {fmt!r}")
    kwargs = {"label_column": args.label_column} if fmt == "csv" else {}
    source = ctr.file_source(
      path, format=fmt, test_path=test_path, skip_bad_lines=args.skip_bad_lines, **kwargs
    )
  return config, source


def main(argv=None) -> dict:
  args = parse_args(argv)
  # Simulated devices must be requested before the JAX backend starts (CPU only; a GPU
  # backend ignores this flag).
  import jax

  jax.config.update("jax_num_cpu_devices", max(args.nodes * args.devices_per_node, 1))
  from kstep_adam import ctr

  config, source = build(args)
  summary = ctr.train(config, source, args.out, progress=not args.no_progress)
  keys = (
    "test_auc",
    "test_logloss",
    "teacher_auc",
    "examples_per_sec",
    "dense_bytes_by_axis",
    "sparse_bytes",
    "estimated_comm_seconds",
    "measured_compute_seconds",
    "time_breakdown_seconds",
  )
  print(json.dumps({k: summary[k] for k in keys}, indent=1, default=str))
  if summary["data"]["lines_skipped"]:
    print(
      f"skipped {summary['data']['lines_skipped']} bad lines, e.g. "
      f"{summary['data']['skip_messages'][:3]}",
      file=sys.stderr,
    )
  print(
    f"wrote {os.path.join(args.out, 'metrics.jsonl')} and {os.path.join(args.out, 'summary.json')}"
  )
  return summary


if __name__ == "__main__":
  main()
