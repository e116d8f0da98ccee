"""The adaptive merge period of a CTR run (``--k auto``): k over time beside the loss.

``python -m experiments.plot RUN_DIR --out FIGS`` draws it for a run directory whose
``metrics.jsonl`` holds merge records (``{"kind": "merge", ...}``, one per merge): the period in
force on each axis (``node``, ``local``) as a step function of the training step, the merges
over every axis marked with the relative drift they measured (right axis, log scale), and the
training loss of the ``train`` records below it.
"""

from __future__ import annotations

import json
import os

from experiments.plot import _style
from experiments.plot._style import plt

AXES = ("node", "local")


def read_metrics(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl``."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def has_merge_records(directory: str) -> bool:
  """Whether ``directory`` is a run with an adaptive period (merge records in its metrics)."""
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    return any('"kind": "merge"' in line for line in f)


def period_over_time(records: list[dict], path: str, *, title: str = "") -> str:
  """Draw k per axis over the steps (top) and the training loss (bottom); write ``path``.

  Args:
    records: the records of a run's ``metrics.jsonl``.
    path: the PNG to write.
    title: the figure's title (default: none).

  Returns:
    ``path``.

  Raises:
    ValueError: the records hold no merge record (not a ``--k auto`` run).
  """
  merges = [r for r in records if r.get("kind") == "merge"]
  if not merges:
    raise ValueError("no merge records: the run did not use an adaptive period (--k auto)")
  train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
  last = max([merges[-1]["step"]] + [r["step"] for r in train])
  fig, (ax_k, ax_loss) = plt.subplots(2, 1, figsize=(9.0, 6.0), sharex=True)
  for j, axis in enumerate(AXES[: len(merges[0]["period"])]):
    steps = [0] + [r["step"] for r in merges] + [last]
    periods = [merges[0]["period"][j]] + [r["next_period"][j] for r in merges]
    periods.append(periods[-1])
    ax_k.step(steps, periods, where="post", label=f"k ({axis})", lw=1.6)
  ax_k.set_ylabel("merge period k (steps)")
  ax_k.set_yscale("log", base=2)
  ax_k.grid(True, alpha=0.3)
  full = [r for r in merges if r["level"] == 1 and r.get("drift")]
  if full:
    ax_d = ax_k.twinx()
    for j, axis in enumerate(AXES[: len(full[0]["drift"])]):
      ax_d.plot(
        [r["step"] for r in full],
        [max(r["drift"][j], 1e-30) for r in full],
        ls="none",
        marker="o" if j == 0 else "x",
        ms=4,
        color="0.4",
        label=f"drift ({axis})",
      )
    ax_d.set_yscale("log")
    ax_d.set_ylabel("relative drift at a full merge")
    _style.legend(ax_d, loc="lower right", fontsize=7)
  _style.legend(ax_k, loc="upper left", fontsize=7)
  if train:
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="k", lw=1.2)
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("training loss (mean since the last record)")
  ax_loss.grid(True, alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  return _style.save(fig, path)


def make_figures(directory: str, fig_dir: str) -> list[str]:
  """The figure of one run directory: ``FIGS/adaptive_<run dir name>.png``."""
  os.makedirs(fig_dir, exist_ok=True)
  name = os.path.basename(os.path.normpath(directory))
  records = read_metrics(os.path.join(directory, "metrics.jsonl"))
  path = os.path.join(fig_dir, f"adaptive_{name}.png")
  return [period_over_time(records, path, title=f"{name}: adaptive merge period")]
