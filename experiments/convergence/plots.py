"""Figures from ``results.jsonl`` and ``checks.json`` (never from in-memory state).

* ``convergence_gap_vs_T.png``: measured ``(1/T) sum ||grad f||^2`` at the tuned step size
  (seed mean, bars = min..max over measure seeds; at xbar, and also at zbar for the
  Cheng & Glasgow forms) against T, log-log, with the explicit bounds at the tuned step
  size (dash-dot: Wang & Joshi, Défossez), the Wang & Joshi bound at its optimal step
  size, and the Cheng & Glasgow / Minibatch Adam shapes times a ``C`` fitted on half of
  the runs (dashed).
* ``convergence_gap_vs_k.png``: the same against k, at fixed T and at fixed rounds R.
* ``convergence_speedup_vs_N.png``: ``gap(N=1) / gap(N)`` against N, with the bound's
  ratio and the ideal ``sqrt(N)`` of a ``1/sqrt(NT)`` rate.
"""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import theory
from experiments.convergence import checks as checks_lib
from experiments.convergence.variants import ADAM_EPS

__all__ = ["make_figures"]

COLORS = dict(
  local_sgd="tab:blue",
  kstep_adam_params="tab:red",
  kstep_adam_moments="tab:orange",
  local_adam="tab:green",
  sync_adam="tab:purple",
  adam_defossez="tab:brown",
)


def _calibrated_C(checks: dict) -> dict[str, float]:
  return {r["variant"]: r["C_median"] for r in checks["rows"] if r["kind"] == "calibrate_C"}


def _series(records, sweep_names, axis):
  groups = defaultdict(list)
  for r in records:
    if r["sweep"] in sweep_names:
      groups[(r["problem"], r["sweep"], r["variant"])].append(r)
  return {key: sorted(recs, key=lambda r: r[axis]) for key, recs in groups.items()}


def _plot_measured(ax, recs, axis, variant):
  x = [r[axis] for r in recs]
  keys = [("measured_xbar", "o", "-", "x̄")]
  if variant in checks_lib.SHAPE_VARIANTS:
    keys.append(("measured_zbar", "s", ":", "z̄"))
  for key, marker, ls, where in keys:
    m = np.stack([np.asarray(r[key]) for r in recs])
    mean = m.mean(1)
    ax.errorbar(
      x,
      mean,
      yerr=[mean - m.min(1), m.max(1) - mean],
      marker=marker,
      ms=4,
      ls=ls,
      capsize=2,
      color=COLORS[variant],
      label=f"{variant} measured at {where}",
    )


def _bound_at_tuned_eta(r):
  """The explicit-constant bound at the run's own tuned step size (what is checked)."""
  info, eta = r["problem_info"], r["etas"][r["best"]]
  if r["variant"] == "local_sgd" and not info.get("hetero"):
    return theory.local_sgd_bound(
      r["T"], r["N"], r["k"], eta, info["L"], info["sigma2"], info["delta"]
    )
  if r["variant"] == "adam_defossez" and info.get("sigma_inf_source") == "exact":
    eps = ADAM_EPS**2 / (1 - r["beta2"])
    R = float(np.max(r["ginf_ExS"][r["best"]])) + info["sigma_inf"] + np.sqrt(eps)
    return theory.defossez_adam_bound(
      N=r["T"],
      alpha=eta,
      beta2=r["beta2"],
      eps=eps,
      d=info["d"],
      R=R,
      L=info["L"],
      delta=info["delta"],
    )
  return None


def _plot_theory(ax, recs, axis, variant, C):
  x = [r[axis] for r in recs]
  tuned = [_bound_at_tuned_eta(r) for r in recs]
  if all(v is not None for v in tuned):
    name = "Wang & Joshi" if variant == "local_sgd" else "Défossez Thm 2"
    ax.plot(x, tuned, ls="-.", color=COLORS[variant], label=f"{variant}: {name} bound at tuned eta")
  if variant == "local_sgd":
    vals, label = [checks_lib.predicted_value(r) for r in recs], "W&J bound at its optimal eta"
  elif variant in C:
    vals = [checks_lib.predicted_value(r, C=C[variant]) for r in recs]
    label = f"rate shape × C={C[variant]:.2g} (C fitted)"
  else:
    return
  if any(v is None for v in vals):
    return
  ax.plot(x, vals, ls="--", color=COLORS[variant], label=f"{variant}: {label}")


def _save(fig, axes, path):
  """Finish every panel the same way (legend, log grid), write the PNG, free the figure."""
  for ax in axes:
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _fig_vs(records, checks, sweep_names, axis, path, title):
  series = _series(records, sweep_names, axis)
  panels = sorted({(p, s) for p, s, _ in series})
  if not panels:
    return None
  C = _calibrated_C(checks)
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
  for ax, (problem, sweep) in zip(axes[0], panels):
    for (p, s, v), recs in sorted(series.items()):
      if (p, s) != (problem, sweep):
        continue
      if len(recs) == 1 and axis == "k_point":  # sync Adam at fixed T: one run
        ax.axhline(
          float(np.mean(checks_lib._measured(recs[0]))),
          color=COLORS[v],
          ls=":",
          label=f"{v} measured (no local steps)",
        )
        continue
      _plot_measured(ax, recs, axis, v)
      _plot_theory(ax, recs, axis, v, C)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("k (merge period)" if axis == "k_point" else axis)
    ax.set_ylabel("(1/T) Σ_t ||∇f(·)||²  (tuned eta; bars: seed min..max)")
    ax.set_title(f"{title}: {problem}, sweep {sweep}", fontsize=9)
  return _save(fig, axes[0], path)


def _fig_speedup(records, path):
  series = _series(records, ("N",), "N")
  if not series:
    return None
  fig, ax = plt.subplots(figsize=(6, 4.5))
  Ns = sorted({r["N"] for recs in series.values() for r in recs})
  ax.plot(Ns, np.sqrt(Ns), "k:", label="ideal sqrt(N) (rate 1/sqrt(NT))")
  for (problem, _, v), recs in sorted(series.items()):
    base = np.mean(checks_lib._measured(recs[0]))
    x = [r["N"] for r in recs]
    y = [base / np.mean(checks_lib._measured(r)) for r in recs]
    ax.plot(x, y, marker="o", color=COLORS[v], label=f"{v} (measured, {problem})")
    p0 = checks_lib.predicted_value(recs[0])
    if v == "local_sgd" and p0 is not None:
      ax.plot(
        x,
        [p0 / checks_lib.predicted_value(r) for r in recs],
        ls="--",
        color=COLORS[v],
        label="local_sgd: Wang & Joshi bound ratio",
      )
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("N (workers)")
  ax.set_ylabel("gap(N=1) / gap(N) at fixed T, tuned eta")
  return _save(fig, [ax], path)


def make_figures(results_path: str, checks_path: str, fig_dir: str) -> list[str]:
  """Write the three figures from the result files; return the paths written."""
  import json

  os.makedirs(fig_dir, exist_ok=True)
  records = checks_lib.load_records(results_path)
  with open(checks_path) as fh:
    checks = json.load(fh)
  out = [
    _fig_vs(
      records,
      checks,
      ("T", "T_defossez"),
      "T",
      os.path.join(fig_dir, "convergence_gap_vs_T.png"),
      "gap vs T",
    ),
    _fig_vs(
      records,
      checks,
      ("k_fixed_T", "k_fixed_R"),
      "k_point",
      os.path.join(fig_dir, "convergence_gap_vs_k.png"),
      "gap vs k",
    ),
    _fig_speedup(records, os.path.join(fig_dir, "convergence_speedup_vs_N.png")),
  ]
  return [p for p in out if p]
