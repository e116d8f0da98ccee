"""Figures from ``results.jsonl`` and ``checks.json`` (never from in-memory state).

* ``convergence_gap_vs_T.png``: measured ``(1/T) sum ||grad f||^2`` at the tuned step size
  (seed mean, bars = min..max over measure seeds) against T, log-log, with the
  Wang & Joshi bound (Local SGD, explicit constants) and the calibrated Cheng & Glasgow /
  Minibatch Adam shapes (dashed: ``C`` fitted on half of the runs).
* ``convergence_gap_vs_k.png``: the same against k, at fixed T and at fixed rounds R.
* ``convergence_speedup_vs_N.png``: ``gap(N=1) / gap(N)`` against N, with the bound's
  ratio and the ideal ``sqrt(N)`` of a ``1/sqrt(NT)`` rate.
"""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.convergence import checks as checks_lib  # noqa: E402

__all__ = ["make_figures"]

COLORS = dict(local_sgd="tab:blue", kstep_adam_params="tab:red", kstep_adam_moments="tab:orange",
              local_adam="tab:green", sync_adam="tab:purple", adam_defossez="tab:brown")


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
    m = np.stack([checks_lib._measured(r) for r in recs])
    mean = m.mean(1)
    ax.errorbar(x, mean, yerr=[mean - m.min(1), m.max(1) - mean], marker="o", ms=4,
                capsize=2, color=COLORS[variant], label=f"{variant} (measured)")


def _plot_theory(ax, recs, axis, variant, C):
    if variant == "local_sgd":
        vals, label = [checks_lib.predicted_value(r) for r in recs], "Wang & Joshi bound"
    elif variant in C:
        vals = [checks_lib.predicted_value(r, C=C[variant]) for r in recs]
        label = f"shape × C={C[variant]:.2g} (fitted)"
    else:
        return
    if any(v is None for v in vals):
        return
    ax.plot([r[axis] for r in recs], vals, ls="--", color=COLORS[variant],
            label=f"{variant}: {label}")


def _fig_vs(records, checks, sweep_names, axis, path, title):
    series = _series(records, sweep_names, axis)
    panels = sorted({(p, s) for p, s, _ in series})
    if not panels:
        return None
    C = _calibrated_C(checks)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (problem, sweep) in zip(axes[0], panels):
        for (p, s, v), recs in sorted(series.items()):
            if (p, s) != (problem, sweep):
                continue
            _plot_measured(ax, recs, axis, v)
            _plot_theory(ax, recs, axis, v, C)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("(1/T) Σ ||∇f(x̄_t)||²  (z̄ for Local Adam forms)")
        ax.set_title(f"{title}: {problem}, sweep {sweep}", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
            ax.plot(x, [p0 / checks_lib.predicted_value(r) for r in recs], ls="--",
                    color=COLORS[v], label="local_sgd: Wang & Joshi bound ratio")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("N (workers)")
    ax.set_ylabel("gap(N=1) / gap(N) at fixed T, tuned eta")
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_figures(results_path: str, checks_path: str, fig_dir: str) -> list[str]:
    """Write the three figures from the result files; return the paths written."""
    import json
    os.makedirs(fig_dir, exist_ok=True)
    records = checks_lib.load_records(results_path)
    with open(checks_path) as fh:
        checks = json.load(fh)
    out = [
        _fig_vs(records, checks, ("T", "T_defossez"), "T",
                os.path.join(fig_dir, "convergence_gap_vs_T.png"), "gap vs T"),
        _fig_vs(records, checks, ("k_fixed_T", "k_fixed_R"), "k",
                os.path.join(fig_dir, "convergence_gap_vs_k.png"), "gap vs k"),
        _fig_speedup(records, os.path.join(fig_dir, "convergence_speedup_vs_N.png")),
    ]
    return [p for p in out if p]
