"""Train every run of a grid and append its result line to ``OUT/runs.jsonl``.

Results go to files first: ``runs.jsonl`` holds one summary line per run and ``RUN/`` each
run's ``metrics.jsonl`` and ``summary.json``; ``config.json`` records the config. A run already
in ``runs.jsonl`` is skipped, so an interrupted grid resumes where it stopped, or grows by more
seeds or values of k; resuming with a config that changes what a run computes (its steps, batch,
data, model or link) is refused instead of mixing two experiments in one table.
"""

from __future__ import annotations

import os
import time

from experiments._common import dumps
from experiments._common import read_jsonl
from experiments.paper import config
from experiments.paper.config import PaperConfig

# The fields of a run's summary.json copied into its runs.jsonl line.
SUMMARY_FIELDS = (
  "test_auc",
  "test_logloss",
  "teacher_auc",
  "examples_per_sec",
  "steps",
  "dense_bytes_by_axis",
  "dense_messages_by_axis",
  "sparse_bytes",
  "estimated_comm_seconds",
  "estimated_comm_seconds_by_kind",
  "measured_compute_seconds",
)


def run_name(optimizer: str, variant: str, k: int, seed: int) -> str:
  """The run's directory under ``OUT`` and its ``name`` in ``runs.jsonl``."""
  return f"{optimizer}-{variant}-k{k}-s{seed}"


def grid(cfg: PaperConfig) -> list[tuple[str, str, int]]:
  """``(optimizer, variant, k)`` of every run per seed: sync Adam first, then k-step Adam."""
  return [("sync_adam", "grads", 1)] + [("kstep_adam", v, k) for v in cfg.variants for k in cfg.ks]


def config_path(out_dir: str) -> str:
  return os.path.join(out_dir, "config.json")


def recorded_config(out_dir: str) -> PaperConfig | None:
  """The config recorded in ``out_dir`` (None when there is none yet)."""
  path = config_path(out_dir)
  return config.read(path) if os.path.exists(path) else None


def check_resumable(cfg: PaperConfig, out_dir: str) -> None:
  """Raise ValueError naming ``out_dir/config.json`` if its runs compute something else."""
  recorded = recorded_config(out_dir)
  if recorded is not None and (differ := config.run_fields_differ(recorded, cfg)):
    raise ValueError(
      f"{config_path(out_dir)}: the runs in {out_dir} were made with "
      + ", ".join(f"{name}={getattr(recorded, name)!r}" for name in differ)
      + ", this config has "
      + ", ".join(f"{name}={getattr(cfg, name)!r}" for name in differ)
      + "; pass another --out"
    )


def read_runs(out_dir: str) -> list[dict]:
  """The lines of ``out_dir/runs.jsonl`` (none when the grid has not started)."""
  path = os.path.join(out_dir, "runs.jsonl")
  return read_jsonl(path) if os.path.exists(path) else []


def run_grid(cfg: PaperConfig, out_dir: str, *, log=print) -> None:
  """Run every (optimizer, k, seed) not yet in ``out_dir/runs.jsonl``; append each result."""
  from kstep_adam import ctr

  check_resumable(cfg, out_dir)
  config.write(cfg, config_path(out_dir))
  results_path = os.path.join(out_dir, "runs.jsonl")
  done = {r["name"] for r in read_runs(out_dir)}
  datasets = {}
  for seed in cfg.seeds:
    for optimizer, variant, k in grid(cfg):
      name = run_name(optimizer, variant, k, seed)
      if name in done:
        continue
      train_config = ctr.TrainConfig(
        model=cfg.model,
        batch_size=cfg.batch_size,
        optimizer=optimizer,
        k=k,
        sync=variant if optimizer == "kstep_adam" else "params",
        nodes=2,
        devices_per_node=4,
        steps=cfg.steps,
        log_every=max(cfg.steps // 32, 1),
        eval_every=0,
        seed=seed,
        inter_node_gbps=cfg.slow_inter_node_gbps,
        inter_node_latency_us=cfg.inter_node_latency_us,
      )
      if seed not in datasets:  # the data (and teacher AUC) depend on the seed only
        data = ctr.SyntheticCTR(
          num_workers=train_config.num_workers, vocab_size=cfg.vocab_size, seed=seed
        )
        datasets[seed] = ctr.synthetic_source(
          data, batch_size=cfg.batch_size, test_examples=cfg.test_examples
        )
      start = time.time()
      # Not in runs.jsonl: any directory of this run is an interrupted attempt, replaced.
      run_dir = os.path.join(out_dir, name)
      summary = ctr.train(train_config, datasets[seed], run_dir, overwrite=True)
      row = {
        "name": name,
        "optimizer": optimizer,
        "variant": variant,
        "k": k,
        "seed": seed,
        "wall_seconds": time.time() - start,
        **{key: summary[key] for key in SUMMARY_FIELDS},
      }
      with open(results_path, "a", encoding="utf-8") as f:
        f.write(dumps(row) + "\n")
      log(
        f"{name}: auc={row['test_auc']:.4f} logloss={row['test_logloss']:.4f} "
        f"node_bytes={row['dense_bytes_by_axis'].get('node', 0):.3g} "
        f"({row['wall_seconds']:.0f}s)"
      )
