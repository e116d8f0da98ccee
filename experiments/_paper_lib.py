"""Library of experiments/reproduce_paper.py: run grid, results files, table and figures.

Results go to files first (``runs.jsonl``: one summary line per run; ``RUN/metrics.jsonl``:
each run's curve); the table and figures are made from those files only, so they can be
rebuilt without retraining (``--plot-only``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time

import numpy as np

KS = (1, 2, 4, 8, 16, 32, 64)
VARIANTS = ("params", "params+moments")  # what k-step Adam averages every k steps


@dataclasses.dataclass(frozen=True)
class PaperConfig:
  """One grid of the paper's experiment: k-step Adam (two variants) against sync Adam."""

  ks: tuple[int, ...] = KS
  variants: tuple[str, ...] = VARIANTS
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  steps: int = 512
  batch_size: int = 128  # per worker; 8 workers
  test_examples: int = 40_000
  vocab_size: int = 5000
  model: str = "dlrm"
  slow_inter_node_gbps: float = 1.0  # the "slow link" the time column assumes
  inter_node_latency_us: float = 50.0


FULL = PaperConfig()
QUICK = PaperConfig(
  ks=(1, 8, 64), variants=("params",), seeds=(0,), steps=96, batch_size=32, test_examples=8192
)


def run_grid(cfg: PaperConfig, out_dir: str, *, log=print) -> None:
  """Run every (optimizer, k, seed) not yet in ``out_dir/runs.jsonl``; append each result."""
  from kstep_adam import ctr

  os.makedirs(out_dir, exist_ok=True)
  results_path = os.path.join(out_dir, "runs.jsonl")
  done = {r["name"] for r in read_runs(results_path)}
  grid = [("sync_adam", "grads", 1)] + [("kstep_adam", v, k) for v in cfg.variants for k in cfg.ks]
  datasets = {}
  for seed in cfg.seeds:
    for optimizer, variant, k in grid:
      name = f"{optimizer}-{variant}-k{k}-s{seed}"
      if name in done:
        continue
      config = ctr.TrainConfig(
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
          num_workers=config.num_workers, vocab_size=cfg.vocab_size, seed=seed
        )
        datasets[seed] = ctr.synthetic_source(
          data, batch_size=cfg.batch_size, test_examples=cfg.test_examples
        )
      start = time.time()
      summary = ctr.train(config, datasets[seed], os.path.join(out_dir, name))
      row = {
        "name": name,
        "optimizer": optimizer,
        "variant": variant,
        "k": k,
        "seed": seed,
        "wall_seconds": time.time() - start,
        **{
          key: summary[key]
          for key in (
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
        },
      }
      with open(results_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      log(
        f"{name}: auc={row['test_auc']:.4f} logloss={row['test_logloss']:.4f} "
        f"node_bytes={row['dense_bytes_by_axis'].get('node', 0):.3g} "
        f"({row['wall_seconds']:.0f}s)"
      )


def read_runs(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> list[dict]:
  """One row per (optimizer, variant, k): means, stds, paired deltas against k = 1."""
  by_key: dict[tuple, dict[int, dict]] = {}
  for r in runs:
    by_key.setdefault((r["optimizer"], r["variant"], r["k"]), {})[r["seed"]] = r
  sync = by_key.get(("sync_adam", "grads", 1), {})
  rows = []
  for (optimizer, variant, k), seeds in sorted(
    by_key.items(), key=lambda x: (x[0][0] != "sync_adam", x[0])
  ):
    ref = by_key.get(("kstep_adam", variant, 1), {}) if optimizer == "kstep_adam" else seeds
    paired = [s for s in seeds if s in ref]
    common_sync = [s for s in seeds if s in sync]
    first = next(iter(seeds.values()))
    comm = first["estimated_comm_seconds_by_kind"]
    row = {
      "optimizer": optimizer,
      "variant": variant,
      "k": k,
      "seeds": len(seeds),
      "auc": _mean_std([r["test_auc"] for r in seeds.values()]),
      "logloss": _mean_std([r["test_logloss"] for r in seeds.values()]),
      "d_auc_vs_k1": _mean_std([seeds[s]["test_auc"] - ref[s]["test_auc"] for s in paired]),
      "d_logloss_vs_k1": _mean_std(
        [seeds[s]["test_logloss"] - ref[s]["test_logloss"] for s in paired]
      ),
      "d_auc_vs_sync": _mean_std([seeds[s]["test_auc"] - sync[s]["test_auc"] for s in common_sync])
      if common_sync
      else (math.nan, 0.0),
      "teacher_auc": float(np.mean([r["teacher_auc"] for r in seeds.values()])),
      "node_bytes": first["dense_bytes_by_axis"].get("node", 0.0),
      "local_bytes": first["dense_bytes_by_axis"].get("local", 0.0),
      "dense_node_seconds": comm.get("dense_node", 0.0),
      "dense_seconds": comm.get("dense_node", 0.0) + comm.get("dense_local", 0.0),
      "sparse_seconds": comm.get("sparse", 0.0),
      "steps": first["steps"],
    }
    rows.append(row)
  return rows


def write_table(rows: list[dict], out_dir: str, cfg: PaperConfig) -> str:
  """Write ``table.csv`` and ``table.md``; return the markdown."""
  fields = [
    "optimizer",
    "variant",
    "k",
    "seeds",
    "auc",
    "d_auc_vs_k1",
    "d_auc_vs_sync",
    "logloss",
    "d_logloss_vs_k1",
    "node_bytes",
    "local_bytes",
    "dense_seconds",
    "sparse_seconds",
    "teacher_auc",
    "steps",
  ]
  with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      [
        c
        for name in fields
        for c in ((name + "_mean", name + "_std") if isinstance(rows[0][name], tuple) else (name,))
      ]
    )
    for row in rows:
      writer.writerow(
        [
          c
          for name in fields
          for c in (row[name] if isinstance(row[name], tuple) else (row[name],))
        ]
      )
  pm = lambda x, d=4: f"{x[0]:+.{d}f} ± {x[1]:.{d}f}"
  lines = [
    f"| dense optimizer | k | AUC (mean ± std) | ΔAUC vs k=1 | ΔAUC vs sync Adam | logloss "
    f"| Δlogloss vs k=1 | dense inter-node MB | est. dense comm s @ "
    f"{cfg.slow_inter_node_gbps:g} Gbit/s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    name = "sync Adam (DDP)" if r["optimizer"] == "sync_adam" else f"k-step Adam ({r['variant']})"
    lines.append(
      f"| {name} | {r['k']} | {r['auc'][0]:.4f} ± {r['auc'][1]:.4f} | {pm(r['d_auc_vs_k1'])} "
      f"| {pm(r['d_auc_vs_sync'])} | {r['logloss'][0]:.4f} ± {r['logloss'][1]:.4f} "
      f"| {pm(r['d_logloss_vs_k1'])} | {r['node_bytes'] / 1e6:.2f} "
      f"| {r['dense_seconds']:.3f} |"
    )
  sparse = rows[0]["sparse_seconds"]
  lines.append("")
  lines.append(
    f"{rows[0]['seeds']} seeds, {rows[0]['steps']} steps of 8 x {cfg.batch_size} "
    f"examples, 2 nodes x 4 devices; teacher AUC {rows[0]['teacher_auc']:.4f}. "
    f"Bytes are per device over the run. Synchronous sparse traffic, the same in "
    f"every row, adds an estimated {sparse:.2f} s on the same link."
  )
  text = "\n".join(lines)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text + "\n")
  return text


def largest_safe_k(rows: list[dict], variant: str, tolerance: float = 0.001) -> int | None:
  """The largest k whose mean AUC is within ``tolerance`` of k = 1's (same variant), such
  that every smaller k is too."""
  best = None
  for r in sorted(
    (r for r in rows if r["optimizer"] == "kstep_adam" and r["variant"] == variant),
    key=lambda r: r["k"],
  ):
    if r["d_auc_vs_k1"][0] < -tolerance:
      break
    best = r["k"]
  return best


def make_figures(rows: list[dict], out_dir: str, figures_dir: str, *, seed: int = 0) -> list[str]:
  """AUC vs k, inter-node traffic vs k, and loss curves; from the results files only."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(figures_dir, exist_ok=True)
  paths = []
  kstep = lambda v: sorted(
    (r for r in rows if r["optimizer"] == "kstep_adam" and r["variant"] == v), key=lambda r: r["k"]
  )
  sync = next((r for r in rows if r["optimizer"] == "sync_adam"), None)
  variants = sorted({r["variant"] for r in rows if r["optimizer"] == "kstep_adam"})

  fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
  for i, v in enumerate(variants):
    rs = kstep(v)
    ks = [r["k"] * 2 ** (0.06 * (2 * i - 1)) for r in rs]  # side by side, not on top
    ax.errorbar(
      ks,
      [r["auc"][0] for r in rs],
      [r["auc"][1] for r in rs],
      marker="o",
      capsize=3,
      label=f"k-step Adam ({v})",
    )
    ax_d.errorbar(
      ks,
      [r["d_auc_vs_k1"][0] for r in rs],
      [r["d_auc_vs_k1"][1] for r in rs],
      marker="o",
      capsize=3,
      label=f"k-step Adam ({v})",
    )
  if sync is not None:
    ax.axhline(sync["auc"][0], color="k", ls="--", label="sync Adam (DDP)")
    ax.axhspan(
      sync["auc"][0] - sync["auc"][1], sync["auc"][0] + sync["auc"][1], color="k", alpha=0.08
    )
  ax_d.axhline(0.0, color="k", lw=0.8)
  ax_d.axhspan(-0.001, 0.001, color="g", alpha=0.1, label="±0.001")
  ax_d.set_xscale("log", base=2)
  ax_d.set_xlabel("merge period k (steps)")
  ax_d.set_ylabel("ΔAUC vs k=1, same seed (mean ± std)")
  ax_d.set_title("Paired change against k = 1")
  ax_d.legend(fontsize=8)
  paths.append(
    _save(
      fig,
      ax,
      os.path.join(figures_dir, "paper_auc_vs_k.png"),
      xlabel="merge period k (steps)",
      ylabel="test AUC (mean ± std over seeds)",
      title=f"Test AUC vs k (teacher AUC {rows[0]['teacher_auc']:.3f})",
    )
  )

  fig, ax = plt.subplots(figsize=(6, 4))
  for v in variants:
    rs = kstep(v)
    ax.plot(
      [r["k"] for r in rs],
      [r["node_bytes"] / 1e6 for r in rs],
      marker="o",
      label=f"k-step Adam ({v})",
    )
  if sync is not None:
    ax.axhline(sync["node_bytes"] / 1e6, color="k", ls="--", label="sync Adam (DDP)")
  ax.set_yscale("log")
  paths.append(
    _save(
      fig,
      ax,
      os.path.join(figures_dir, "paper_traffic_vs_k.png"),
      xlabel="merge period k (steps)",
      ylabel="dense inter-node MB per device (whole run)",
      title="Dense inter-node traffic vs k",
    )
  )

  fig, ax = plt.subplots(figsize=(6, 4))
  curves = (
    [("sync_adam", "grads", 1)] + [("kstep_adam", variants[0], r["k"]) for r in kstep(variants[0])]
    if variants
    else []
  )
  for optimizer, variant, k in curves:
    path = os.path.join(out_dir, f"{optimizer}-{variant}-k{k}-s{seed}", "metrics.jsonl")
    if not os.path.exists(path):
      continue
    recs = [r for r in read_runs(path) if r.get("kind") == "train"]
    label = "sync Adam" if optimizer == "sync_adam" else f"k={k}"
    ax.plot(
      [r["step"] for r in recs],
      [r["loss"] for r in recs],
      label=label,
      color="k" if optimizer == "sync_adam" else None,
      lw=1.2,
    )
  paths.append(
    _save(
      fig,
      ax,
      os.path.join(figures_dir, "paper_loss_curves.png"),
      xlabel="step",
      ylabel="training loss (window mean)",
      log_x=False,
      title=f"Training loss, k-step Adam ({variants[0] if variants else ''}), seed {seed}",
    )
  )
  return paths


def _save(fig, ax, path: str, *, xlabel: str, ylabel: str, title: str, log_x: bool = True) -> str:
  import matplotlib.pyplot as plt

  if log_x:
    ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8, ncol=1 if log_x else 2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
