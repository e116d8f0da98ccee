"""Figures of the paper-reproduction experiment, drawn from its result files only.

``make_figures(results_dir, figures_dir)`` reads ``results_dir/runs.jsonl`` (summarized by
:mod:`experiments.paper.summary`) and the per-run ``metrics.jsonl`` curves, and writes
``paper_auc_vs_k.png``, ``paper_traffic_vs_k.png`` and ``paper_loss_curves.png``.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from experiments._common import read_jsonl
from experiments.paper import run
from experiments.paper import summary
from experiments.plot import _style


def make_figures(results_dir: str, figures_dir: str, *, seed: int = 0) -> list[str]:
  """AUC vs k, inter-node traffic vs k and the loss curves of ``seed``; returns the paths."""
  rows = summary.summarize(run.read_runs(results_dir))
  if not rows:
    raise ValueError(f"{os.path.join(results_dir, 'runs.jsonl')}: no runs to plot")
  os.makedirs(figures_dir, exist_ok=True)
  return [
    auc_vs_k(rows, os.path.join(figures_dir, "paper_auc_vs_k.png")),
    traffic_vs_k(rows, os.path.join(figures_dir, "paper_traffic_vs_k.png")),
    loss_curves(rows, results_dir, os.path.join(figures_dir, "paper_loss_curves.png"), seed=seed),
  ]


def _variant_label(variant: str) -> str:
  return f"k-step Adam ({variant})"


def _finish(ax, *, xlabel: str, ylabel: str, title: str, log_x: bool = True) -> None:
  if log_x:
    ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  _style.legend(ax, ncol=1 if log_x else 2)


def auc_vs_k(rows: list[dict], path: str) -> str:
  """Left: test AUC vs k per variant, sync Adam as a band. Right: paired ΔAUC vs k = 1."""
  sync = next((r for r in rows if r["optimizer"] == "sync_adam"), None)
  fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
  for i, variant in enumerate(summary.kstep_variants(rows)):
    rs = summary.kstep_rows(rows, variant)
    ks = [r["k"] * 2 ** (0.06 * (2 * i - 1)) for r in rs]  # side by side, not on top
    for axis, key in ((ax, "auc"), (ax_d, "d_auc_vs_k1")):
      axis.errorbar(
        ks,
        [r[key][0] for r in rs],
        [r[key][1] for r in rs],
        marker="o",
        capsize=3,
        label=_variant_label(variant),
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
  spread = "1 seed: no spread" if rows[0]["seeds"] == 1 else "mean ± std"
  ax_d.set_ylabel(f"ΔAUC vs k=1, same seed ({spread})")
  ax_d.set_title("Paired change against k = 1")
  _style.legend(ax_d)
  _finish(
    ax,
    xlabel="merge period k (steps)",
    ylabel="test AUC (1 seed: no spread)"
    if rows[0]["seeds"] == 1
    else "test AUC (mean ± std over seeds)",
    title=f"Test AUC vs k (teacher AUC {rows[0]['teacher_auc']:.3f})",
  )
  return _style.save(fig, path)


def traffic_vs_k(rows: list[dict], path: str) -> str:
  """Dense inter-node MB per device over the run, per variant and k; sync Adam as a line."""
  sync = next((r for r in rows if r["optimizer"] == "sync_adam"), None)
  fig, ax = plt.subplots(figsize=(6, 4))
  for variant in summary.kstep_variants(rows):
    rs = summary.kstep_rows(rows, variant)
    ax.plot(
      [r["k"] for r in rs],
      [r["node_bytes"] / 1e6 for r in rs],
      marker="o",
      label=_variant_label(variant),
    )
  if sync is not None:
    ax.axhline(sync["node_bytes"] / 1e6, color="k", ls="--", label="sync Adam (DDP)")
  ax.set_yscale("log")
  _finish(
    ax,
    xlabel="merge period k (steps)",
    ylabel="dense inter-node MB per device (whole run)",
    title="Dense inter-node traffic vs k",
  )
  return _style.save(fig, path)


def loss_curves(rows: list[dict], results_dir: str, path: str, *, seed: int = 0) -> str:
  """Training loss of sync Adam and of the first variant's every k, one seed, from the runs'
  ``metrics.jsonl`` (runs without one are left out)."""
  variants = summary.kstep_variants(rows)
  curves = (
    [("sync_adam", "grads", 1)]
    + [("kstep_adam", variants[0], r["k"]) for r in summary.kstep_rows(rows, variants[0])]
    if variants
    else []
  )
  fig, ax = plt.subplots(figsize=(6, 4))
  for optimizer, variant, k in curves:
    metrics = os.path.join(results_dir, run.run_name(optimizer, variant, k, seed), "metrics.jsonl")
    if not os.path.exists(metrics):
      continue
    records = [r for r in read_jsonl(metrics) if r.get("kind") == "train"]
    ax.plot(
      [r["step"] for r in records],
      [r["loss"] for r in records],
      label="sync Adam" if optimizer == "sync_adam" else f"k={k}",
      color="k" if optimizer == "sync_adam" else None,
      lw=1.2,
    )
  _finish(
    ax,
    xlabel="step",
    ylabel="training loss (window mean)",
    log_x=False,
    title=f"Training loss, k-step Adam ({variants[0] if variants else ''}), seed {seed}",
  )
  return _style.save(fig, path)
