"""The convergence-rate figures, drawn from ``checks.json`` alone (its ``curves``).

Every bound and fitted shape is computed once, by :mod:`experiments.convergence.checks`; this
module only draws. One panel per problem (per problem and sweep for the ``k`` figure), stacked,
each with its legend outside the axes. Measurements and theory are told apart by line style:

* solid line with filled markers and a shaded seed band: measured;
* dashed with crosses: an explicit-constant bound at the run's own step size (points outside
  the bound's step-size condition are left out);
* dotted, no markers: a rate shape with hidden constants, times the fitted ``C_max``.
"""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np

from experiments.plot import _style

__all__ = ["FIGURES", "make_figures"]

KEY = (
  "solid + dots (band: seed min–max) = measured;  dashed + crosses = explicit-constant bound;  "
  "dotted = O~ shape × fitted C_max"
)

# figure key -> (file name, x label, y label, title, style key)
FIGURES = {
  "gap_vs_T": (
    "convergence_gap_vs_T.png",
    "T (steps per worker)",
    "(1/T) Σ‖∇f‖²  at the bound's point",
    "Gap against T at one c = η√T per series (β2 fixed per series)",
    KEY,
  ),
  "beta2": (
    "convergence_beta2.png",
    "T (steps per worker)",
    "(1/T) Σ‖∇f(x̄_t)‖²",
    "β2 fixed per series against the schedule β2 = 1 − 1/(k√T), same form with and without "
    "local steps, at x̄",
    "solid + dots: β2 fixed;  dashed + dots: β2 = 1 − 1/(k√T) at each T;  "
    "band: seed min–max (all measured)",
  ),
  "defossez": (
    "convergence_defossez.png",
    "N = T (steps, one worker)",
    "Σ_j w_j ‖∇f(x_j)‖²  (Défossez τ weights)",
    "One-worker Adam against Défossez et al.'s explicit bounds (α = c/√N, β2 = 1 − 1/N)",
    KEY,
  ),
  "gap_vs_k": (
    "convergence_gap_vs_k.png",
    "k (merge period)",
    "(1/T) Σ‖∇f‖²  at the bound's point",
    "Gap against k at fixed T and at fixed rounds R (c chosen per point, β2 = 1 − 1/(k√T))",
    KEY,
  ),
  "speedup_N": (
    "convergence_speedup_vs_N.png",
    "N (workers)",
    "gap(N=1) / gap(N)",
    "Speedup in N (c chosen per point)",
    KEY + ";  dash-dot: ideal √N",
  ),
}

COLORS = dict(
  local_sgd="tab:blue",
  kstep_adam_params="tab:red",
  kstep_adam_moments="tab:orange",
  local_adam="tab:green",
  minibatch_adam="tab:olive",
  sync_adam="tab:purple",
  adam_defossez="tab:brown",
  adam_defossez_momentum="tab:pink",
)


def _draw(ax, curve) -> None:
  color = COLORS.get(curve["variant"], "black")
  x = np.asarray(curve["x"], float)
  y = np.array([np.nan if v is None else v for v in curve["y"]], float)
  if curve["style"] == "measured":
    ls = curve.get("linestyle", "-")
    ax.plot(x, y, ls=ls, marker="o", ms=4, lw=1.5, color=color, label=curve["label"])
    if "lo" in curve:
      ax.fill_between(x, curve["lo"], curve["hi"], color=color, alpha=0.15, lw=0)
  elif curve["style"] == "bound":
    ax.plot(x, y, ls="--", marker="x", ms=5, lw=1.5, color=color, label=curve["label"])
  else:
    ax.plot(x, y, ls=":", lw=2.0, color=color, label=curve["label"])


def _figure(key: str, curves: list[dict], fig_dir: str) -> str | None:
  if not curves:
    return None
  name, xlabel, ylabel, title, style_key = FIGURES[key]
  panels = defaultdict(list)
  for c in curves:
    panels[c["panel"]].append(c)
  fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
  for ax, (panel, panel_curves) in zip(axes[:, 0], sorted(panels.items())):
    for curve in sorted(panel_curves, key=lambda c: (c["style"] != "measured", c["variant"])):
      _draw(ax, curve)
    if key == "speedup_N":
      Ns = sorted({n for c in panel_curves for n in c["x"]})
      ax.plot(Ns, np.sqrt(Ns), color="black", ls="-.", lw=1, label="ideal √N (rate 1/√(NT))")
      ax.set_yscale("log", base=2)
    else:
      ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(panel, fontsize=10)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.1)
    _style.legend(ax, outside=True, fontsize=7)
  fig.suptitle(f"{title}\n{style_key}", fontsize=9)
  os.makedirs(fig_dir, exist_ok=True)
  return _style.save(fig, os.path.join(fig_dir, name))


def make_figures(checks: dict, fig_dir: str) -> list[str]:
  """Write every convergence figure whose curves ``checks`` holds; return the paths."""
  by_figure = defaultdict(list)
  for curve in checks["curves"]:
    by_figure[curve["figure"]].append(curve)
  paths = [_figure(key, by_figure.get(key, []), fig_dir) for key in FIGURES]
  return [p for p in paths if p]
