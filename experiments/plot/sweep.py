"""Figures of a sweep, drawn from its directory alone (``sweep.json``, ``results.csv``, the runs'
``metrics.jsonl``).

Every curve is a group's chosen configuration (best learning rate on validation, as in the
table), the mean over its seeds with a ±1 std band. Files, prefixed ``sweep_NAME_``:

* ``curves_steps.png``: training loss and validation metric against steps;
* ``curves_bytes.png``: the same against the bytes each device sent (CTR);
* ``curves_time.png``: the same against modelled wall time: the sweep's common compute per
  step (:func:`~experiments.sweep_lib.results.common_compute_per_step`) plus the
  communication the byte accounting estimates under the sweep's network (CTR);
* ``final_vs_k.png``: the test metric against k per optimizer, the others as bands;
* ``lr_sensitivity.png``: the validation metric of every learning rate, per group;
* ``time_to_target.png``: modelled time to reach the reference's final validation AUC (CTR).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np

from experiments.plot import _style
from experiments.sweep_lib import report
from experiments.sweep_lib import results
from experiments.sweep_lib import tasks
from experiments.sweep_lib.select import Selection
from experiments.sweep_lib.spec import SweepSpec

# One hue per optimizer (its sweep name: a variant such as kstep_adam-params+nu is its own
# optimizer), one shade and one marker per k within it; the reference is black and dashed.
HUES = (
  "tab:red",
  "tab:blue",
  "tab:green",
  "tab:purple",
  "tab:orange",
  "tab:brown",
  "tab:pink",
  "tab:olive",
  "tab:cyan",
  "gold",
  "navy",
  "teal",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LABELS = {
  "loss": "training loss (window mean)",
  "val_auc": "validation AUC",
  "steps": "step",
  "total_bytes": "MB sent per device (dense + sparse, cumulative)",
  "modelled_seconds": "modelled wall time (s): steps × common compute/step + modelled comm.",
}


def _shade(color, amount: float):
  """``color`` darkened (``amount`` < 0) or lightened (> 0) by that fraction."""
  rgb = np.array(matplotlib.colors.to_rgb(color))
  return tuple(rgb * (1 + amount) if amount < 0 else rgb + (1 - rgb) * amount)


def _k_order(k) -> tuple:
  """Sort key of a group's k: fixed periods by size, then ``'auto'``, then no k."""
  if k is None:
    return (2, 0)
  return (1, 0) if isinstance(k, str) else (0, k)


def colors(chosen: list[Selection], reference: str | None) -> dict[str, tuple]:
  """One color per group label: the reference black; each other optimizer its own hue, and
  its groups (one per k) shades of that hue, from dark (smallest k) to light."""
  names: dict[str, list[Selection]] = {}
  for s in chosen:
    if s.name != reference:
      names.setdefault(s.name, []).append(s)
  out = {s.label: matplotlib.colors.to_rgb("black") for s in chosen if s.name == reference}
  for hue, groups in zip(itertools.cycle(HUES), names.values()):
    groups = sorted(groups, key=lambda s: _k_order(s.group.get("k")))
    amounts = np.linspace(-0.35, 0.45, len(groups)) if len(groups) > 1 else [0.0]
    out.update({s.label: _shade(hue, a) for s, a in zip(groups, amounts)})
  return out


def markers(chosen: list[Selection]) -> dict[str, str]:
  """One marker per value of k across the sweep (the same k, the same marker in every
  optimizer); groups without a k get a plain circle."""
  ks = sorted({s.group["k"] for s in chosen if s.group.get("k") is not None}, key=_k_order)
  by_k = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(ks)}
  return {s.label: by_k.get(s.group.get("k"), "o") for s in chosen}


def seeds_text(chosen: list[Selection]) -> str:
  """``'mean ± std over seeds'``, or ``'1 seed: no spread'`` when every group has one seed."""
  return report.spread_text(len(s.seeds) for s in chosen)


def network_text(out_dir: str, chosen: list[Selection]) -> str:
  """The network the modelled times assume, from a run's recorded config."""
  if not chosen:
    return ""
  path = os.path.join(results.run_dir(out_dir, chosen[0].run_ids[0]), "summary.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f).get("config", {})
  if "inter_node_gbps" not in config:
    return ""
  return (
    f"network: {config['inter_node_gbps']:g} Gbit/s + {config['inter_node_latency_us']:g} µs "
    f"per message between nodes, {config['intra_node_gbps']:g} Gbit/s + "
    f"{config['intra_node_latency_us']:g} µs inside a node"
  )


def _stack(curves: list[dict], x_key: str, y_key: str):
  """Mean x, mean y and std y over seeds, on the records all seeds have."""
  pairs = [(c.get(x_key), c.get(y_key)) for c in curves]
  pairs = [(x, y) for x, y in pairs if x is not None and y is not None and len(x) == len(y)]
  if not pairs:
    return None
  n = min(len(x) for x, _ in pairs)
  if n == 0:
    return None
  x = np.mean([p[0][:n] for p in pairs], axis=0)
  y_SxN = np.array([p[1][:n] for p in pairs])
  with warnings.catch_warnings():  # a diverged run's records are NaN: no point to draw there
    warnings.simplefilter("ignore", RuntimeWarning)
    return x, np.nanmean(y_SxN, axis=0), np.nanstd(y_SxN, axis=0, ddof=1 if len(pairs) > 1 else 0)


def _line(ax, x, y, std, color, label, *, reference: bool, marker: str = "o") -> None:
  ax.plot(
    x,
    y,
    color=color,
    lw=2.0 if reference else 1.4,
    ls="--" if reference else "-",
    label=label,
    marker=None if reference else marker,
    ms=4,
    markevery=max(1, len(x) // 6),
  )
  ax.fill_between(x, y - std, y + std, color=color, alpha=0.15, lw=0)


def curves_figure(
  spec: SweepSpec,
  chosen: list[Selection],
  run_curves: dict[str, dict],
  palette: dict,
  x_key: str,
  path: str,
  *,
  subtitle: str = "",
) -> str | None:
  """Loss and validation metric against ``x_key`` (``steps``, ``total_bytes`` or
  ``modelled_seconds``), one line per group, mean ± std over seeds (one seed: no band)."""
  task = tasks.get(spec.task)
  panels = [("loss", "step" if x_key == "steps" else x_key)]
  if spec.task == "ctr":
    panels.append((task.selection_metric, "eval_step" if x_key == "steps" else "eval_" + x_key))
  fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels) + 2.5, 4.4), squeeze=False)
  drawn, marks = False, markers(chosen)
  for ax, (y_key, x_col) in zip(axes[0], panels):
    plotted = []
    for s in chosen:
      stacked = _stack([run_curves[r] for r in s.run_ids], x_col, y_key)
      if stacked is None:
        continue
      x, y, std = stacked
      scale = 1e-6 if "bytes" in x_key else 1.0
      label = f"{s.label} (lr {_lr(s)})"
      is_ref, marker = s.name == spec.reference, marks[s.label]
      _line(ax, x * scale, y, std, palette[s.label], label, reference=is_ref, marker=marker)
      plotted.append(y)
      drawn = True
    if "bytes" in x_key:
      ax.set_xscale("log")
    ylabel = LABELS.get(y_key, task.metric_label if y_key == "loss" else y_key)
    if y_key == "loss" and spec.task == "convergence":
      ax.set_yscale("log")
    elif y_key == "loss" and plotted:
      ylabel += _clip_outliers(ax, np.concatenate(plotted))
    ax.set_xlabel(LABELS.get(x_key, x_key))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
  if not drawn:
    plt.close(fig)
    return None
  if spec.task == "convergence":
    axes[0][0].set_ylabel("‖∇f(x̄_t)‖²")
  _style.legend(axes[0][-1], outside=True, fontsize=7)
  title = f"{spec.name}: best learning rate per optimizer, {seeds_text(chosen)}"
  fig.suptitle("\n".join(t for t in (title, spec.description, subtitle) if t), fontsize=9)
  return _style.save(fig, path)


def _clip_outliers(ax, y: np.ndarray) -> str:
  """Keep a run whose loss exploded from flattening every other curve: clip the y axis at
  twice the 90th percentile of the plotted values; returns the label's note, if clipped."""
  y = y[np.isfinite(y)]
  if not y.size:
    return ""
  top = 2.0 * float(np.percentile(y, 90))
  if y.max() <= top:
    return ""
  ax.set_ylim(min(0.0, float(y.min())), top)
  return f" (clipped at {top:.2g})"


def _lr(s: Selection) -> str:
  return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in s.tuned.values())


def final_vs_k(spec: SweepSpec, chosen: list[Selection], palette: dict, path: str) -> str | None:
  """Test metric (mean ± std over seeds) against k per optimizer that has several k; every
  other group as a horizontal band."""
  if "k" not in spec.group_fields():
    return None
  task = tasks.get(spec.task)
  by_name: dict[str, list[Selection]] = {}
  for s in chosen:
    by_name.setdefault(s.name, []).append(s)
  fig, ax = plt.subplots(figsize=(9.5, 4.6))
  for name, group in by_name.items():
    # k = 'auto' (an adaptive period) has no place on the k axis: it is drawn as a band.
    with_k = [s for s in group if isinstance(s.group.get("k"), int)]
    with_k.sort(key=lambda s: s.group["k"])
    if len(with_k) > 1:
      ks = [s.group["k"] for s in with_k]
      ax.errorbar(
        ks,
        [s.test[0] for s in with_k],
        [s.test[1] for s in with_k],
        marker="o",
        capsize=3,
        color=palette[with_k[len(with_k) // 2].label],
        label=f"{name} (against k)",
      )
      group = [s for s in group if s not in with_k]
    for s in group:
      mean, std = s.test
      if math.isnan(mean):
        continue
      ls = "--" if s.name == spec.reference else ":"
      k = s.group.get("k")
      label = s.label if k is None else f"{name} (k={k})"
      ax.axhline(mean, color=palette[s.label], ls=ls, lw=1.5, label=label)
      ax.axhspan(mean - std, mean + std, color=palette[s.label], alpha=0.07)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("merge period k (steps; DiLoCo: inner steps H)")
  ax.set_ylabel(f"test {task.metric_label} at the best lr ({seeds_text(chosen)})")
  ax.set_title(f"{spec.name}: final test {task.metric_label} against k", fontsize=10)
  ax.grid(True, alpha=0.3)
  _style.legend(ax, outside=True, fontsize=7)
  return _style.save(fig, path)


def lr_sensitivity(spec: SweepSpec, chosen: list[Selection], palette: dict, path: str) -> str:
  """Validation metric against the learning rate for every group; diverged candidates as
  crosses on the axis floor, the chosen one ringed."""
  task = tasks.get(spec.task)
  metric = task.selection_metric
  fig, ax = plt.subplots(figsize=(9.5, 4.8))
  floor, marks = [], markers(chosen)
  for s in chosen:
    points = []
    for c in s.candidates:
      lr = c.tuned[0]
      # Two-stage tuning: every candidate on the tune seeds, which the choice was made on.
      values = [
        r.get(metric) for seed, r in c.runs.items() if not spec.two_stage or seed in spec.tune_seeds
      ]
      finite = [v for v in values if v is not None and math.isfinite(v)]
      if c.diverged or not finite:
        floor.append((lr, palette[s.label]))
      if finite:
        points.append((lr, float(np.mean(finite)), float(np.std(finite))))
    if not points:
      continue
    points.sort()
    ax.errorbar(
      [p[0] for p in points],
      [p[1] for p in points],
      [p[2] for p in points],
      marker=marks[s.label],
      ms=4,
      capsize=2,
      color=palette[s.label],
      ls="--" if s.name == spec.reference else "-",
      label=s.label,
    )
    best = s.chosen.tuned[0]
    best_point = [p for p in points if p[0] == best]
    if best_point:
      ax.plot(best, best_point[0][1], "o", ms=10, mfc="none", color=palette[s.label])
  ax.set_xscale("log")
  if floor:
    low = ax.get_ylim()[0]
    for lr, color in floor:
      ax.plot(lr, low, "x", ms=8, mew=2, color=color, clip_on=False)
  tuned = ", ".join(spec.tune)
  ax.set_xlabel(f"{tuned} (log scale)")
  ax.set_ylabel(f"{metric} ({seeds_text(chosen)})")
  ax.set_title(
    f"{spec.name}: sensitivity to the {tuned} (ring: chosen; × at the bottom: a seed diverged)",
    fontsize=10,
  )
  ax.grid(True, alpha=0.3)
  _style.legend(ax, outside=True, fontsize=7)
  return _style.save(fig, path)


def time_to_target(
  spec: SweepSpec, report_rows: list[dict], chosen: list[Selection], palette: dict, path: str
) -> str | None:
  """Steps and modelled time to reach the reference's final validation AUC, one bar per
  group in each panel; groups that never reach it get an empty bar to the longest run,
  marked."""
  if spec.task != "ctr" or not report_rows or report_rows[0].get("target") is None:
    return None
  labels = [s.label for s in chosen]
  panels = (
    ("steps_to_target", "steps", LABELS["steps"] + "s"),
    ("time_to_target", "modelled_seconds", LABELS["modelled_seconds"]),
  )
  fig, axes = plt.subplots(1, 2, figsize=(13.0, 0.42 * len(labels) + 2.0), sharey=True)
  for ax, (key, total, xlabel) in zip(axes, panels):
    longest = max(r[f"{total}_mean"] for r in report_rows)
    for i, (s, row) in enumerate(zip(chosen, report_rows)):
      color = palette[s.label]
      if row["time_to_target_reached"]:
        mean = row[f"{key}_mean"]
        ax.barh(i, mean, xerr=row[f"{key}_std"], color=color, capsize=3)
        if row["time_to_target_reached"] < row["seeds"]:
          seeds = f"  {row['time_to_target_reached']}/{row['seeds']} seeds"
          ax.text(mean, i, seeds, va="center", fontsize=7)
      else:
        ax.barh(i, longest, color="none", edgecolor=color, hatch="//")
        ax.text(longest, i, "  not reached", va="center", fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
  axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
  axes[0].invert_yaxis()
  one_seed = all(len(s.seeds) == 1 for s in chosen)
  fig.suptitle(
    f"{spec.name}: steps and modelled time to {spec.reference}'s final validation AUC "
    f"({report_rows[0]['target']:.4f}); "
    + ("1 seed: no spread" if one_seed else "mean ± std over the seeds that reach it"),
    fontsize=9,
  )
  return _style.save(fig, path)


def make_figures(out_dir: str, fig_dir: str) -> list[str]:
  """Every figure of the sweep in ``out_dir`` that its results support; returns the paths."""
  spec = results.read_spec(out_dir)
  rows = results.read_results(os.path.join(out_dir, results.RESULTS_FILE))
  if not rows:
    raise ValueError(f"{out_dir}: results.csv has no finished run to plot")
  chosen = report.selections(spec, rows)
  palette = colors(chosen, spec.reference)
  per_step = results.common_compute_per_step(rows)
  run_curves = {r: results.curves(out_dir, r, per_step) for s in chosen for r in s.run_ids}
  os.makedirs(fig_dir, exist_ok=True)
  name = lambda kind: os.path.join(fig_dir, f"sweep_{spec.name}_{kind}.png")
  network = network_text(out_dir, chosen)
  paths = [
    curves_figure(spec, chosen, run_curves, palette, "steps", name("curves_steps")),
    final_vs_k(spec, chosen, palette, name("final_vs_k")),
    lr_sensitivity(spec, chosen, palette, name("lr_sensitivity")),
  ]
  if spec.task == "ctr":
    paths += [
      curves_figure(spec, chosen, run_curves, palette, "total_bytes", name("curves_bytes")),
      curves_figure(
        spec, chosen, run_curves, palette, "modelled_seconds", name("curves_time"), subtitle=network
      ),
      time_to_target(
        spec, report.report_rows(out_dir, spec, rows), chosen, palette, name("time_to_target")
      ),
    ]
  from experiments.plot import link

  if link.has_link(out_dir):
    paths.append(link.time_to_accuracy(out_dir, name("time_to_accuracy"), spec.name))
  return [p for p in paths if p]
