r"""Time a finished sweep's optimizers on a real shaped link, run them end to end there, and
report their time to accuracy.

Usage (as root: the link is network namespaces and ``tc``; see ``kstep_adam.launch``):
  python -m experiments.link_experiment results/sweeps/ctr_link              # all phases
  python -m experiments.link_experiment DIR --phase timing --rates 0.1 1
  python -m experiments.link_experiment DIR --phase e2e --e2e-rate 0.1
  python -m experiments.link_experiment DIR --phase report                   # no root needed

DIR is a finished CTR sweep (``experiments/sweeps/ctr_link.toml``) whose runs use 2 nodes of
1 device. For each compared row (an optimizer group at its chosen learning rate):

* **timing**: its first ``--timing-steps`` steps (seed 0) as 2 real processes over a link
  shaped to each rate, ``DIR/link/timing/ROW@RATE/``; what is kept is the mean seconds of
  each kind of step (``step_seconds_by_kind``);
* **e2e**: the whole seed-0 run over the link at ``--e2e-rate``, ``DIR/link/e2e/ROW@RATE/``;
* **report**: every seed's trajectory priced at the measured step times
  (:mod:`experiments.sweep_lib.link`), the time to reach the reference's final validation AUC
  minus ``--tolerance`` (the mean over seeds where every seed reached it, and the median, a
  seed that never did counting as infinite), the speed-ups over the reference, and the
  end-to-end runs' measured
  time to that target beside the composed one: ``DIR/link/link.json`` and
  ``DIR/link/table.md``. Figures: ``python -m experiments.plot DIR --out figures``.

Runs already finished are kept (the command is resumable); ``--redo`` times them again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from experiments._cli import DefaultsHelpFormatter
from experiments._cli import add_debug_flag
from experiments._cli import config_flags
from experiments._cli import user_errors
from experiments._common import write_atomic
from experiments.sweep_lib import link
from experiments.sweep_lib import report
from experiments.sweep_lib import results
from experiments.sweep_lib import select
from experiments.sweep_lib.worker import run_dir
from kstep_adam._jsonio import finite_or_none
from kstep_adam._jsonio import read_json

LINK_DIR = "link"


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="link_experiment",
    description=__doc__.split("\n\n")[0],
    formatter_class=DefaultsHelpFormatter,
  )
  parser.add_argument("sweep_dir", help="a finished CTR sweep directory")
  parser.add_argument("--phase", choices=("all", "timing", "e2e", "report"), default="all")
  parser.add_argument(
    "--rates", type=float, nargs="+", default=[0.1, 1.0], help="link rates to time (Gbit/s)"
  )
  parser.add_argument(
    "--e2e-rate", type=float, default=0.1, help="link rate of the end-to-end runs (Gbit/s)"
  )
  parser.add_argument(
    "--timing-steps", type=int, default=320, help="steps of each timing run (from step 1)"
  )
  parser.add_argument(
    "--tolerance", type=float, default=1e-3, help="target: reference's final val AUC minus this"
  )
  parser.add_argument(
    "--rows", nargs="+", default=None, help="only these rows (e.g. sync_adam-lr0.001)"
  )
  parser.add_argument("--redo", action="store_true", help="rerun finished link runs")
  add_debug_flag(parser)
  return parser


def chosen_rows(sweep_dir: str) -> tuple[object, list[select.Selection]]:
  """The sweep's spec and its selections (one per compared row)."""
  spec = results.read_spec(sweep_dir)
  rows = results.read_results(os.path.join(sweep_dir, results.RESULTS_FILE))
  if not rows:
    raise ValueError(f"{sweep_dir}: no finished runs (run the sweep first)")
  chosen = report.selections(spec, rows)
  for s in chosen:
    if 0 not in s.chosen.runs:
      raise ValueError(f"{sweep_dir}: row {s.label!r} has no seed-0 run to time")
  return spec, chosen


def row_name(selection: select.Selection) -> str:
  """A row's directory name: its seed-0 run id without the seed."""
  return selection.chosen.runs[0]["run_id"].rsplit("-s", 1)[0]


def run_params(sweep_dir: str, run_id: str) -> dict:
  return read_json(os.path.join(sweep_dir, "jobs", f"{run_id}.json"), keys=("params",))["params"]


def link_run(params: dict, rate: float, out: str, redo: bool, log) -> dict:
  """One 2-process run of these fields over a link shaped to ``rate``; its summary."""
  summary_path = os.path.join(out, "summary.json")
  if not redo and os.path.exists(summary_path):
    summary = read_json(summary_path)
    if summary.get("status") == "completed":
      log(f"  kept {out}")
      return summary
  if params.get("nodes") != 2 or params.get("devices_per_node") != 1:
    raise ValueError(
      f"the link experiment runs 2 processes of 1 device: the sweep's runs need nodes = 2 and "
      f"devices_per_node = 1, got {params.get('nodes')} x {params.get('devices_per_node')}"
    )
  os.makedirs(os.path.dirname(out), exist_ok=True)
  command = [
    sys.executable, "-m", "kstep_adam.launch", "--num-processes", "2", "--link-gbps", str(rate),
    "--", sys.executable, "-m", "experiments.train_ctr", *config_flags(params),
    "--no-progress", "--overwrite", "--out", out,
  ]  # fmt: skip
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"link run {out} exited {done.returncode}: {' | '.join(tail)}")
  log(f"  ran {out} in {time.perf_counter() - start:.0f} s")
  return read_json(summary_path)


def rate_name(rate: float) -> str:
  return f"{rate:g}G"


def run_timing(args, chosen, log) -> None:
  for rate in args.rates:
    for s in chosen:
      params = {
        **run_params(args.sweep_dir, s.chosen.runs[0]["run_id"]),
        "steps": args.timing_steps,
        "eval_every": 0,
      }
      out = os.path.join(args.sweep_dir, LINK_DIR, "timing", f"{row_name(s)}@{rate_name(rate)}")
      log(f"timing {row_name(s)} at {rate:g} Gbit/s")
      link_run(params, rate, out, args.redo, log)


def run_e2e(args, chosen, log) -> None:
  for s in chosen:
    params = run_params(args.sweep_dir, s.chosen.runs[0]["run_id"])
    out = os.path.join(args.sweep_dir, LINK_DIR, "e2e", f"{row_name(s)}@{rate_name(args.e2e_rate)}")
    log(f"end to end {row_name(s)} at {args.e2e_rate:g} Gbit/s")
    link_run(params, args.e2e_rate, out, args.redo, log)


def _read_summary(path: str) -> dict | None:
  path = os.path.join(path, "summary.json")
  return read_json(path) if os.path.exists(path) else None


def build_report(sweep_dir: str, spec, chosen, rates, e2e_rate: float, tolerance: float) -> dict:
  """Everything the table and the figure show, as JSON data."""
  base = os.path.join(sweep_dir, LINK_DIR)
  reference = next((s for s in chosen if s.name == spec.reference), None)
  if reference is None:
    raise ValueError(f"{sweep_dir}: the reference {spec.reference!r} has no finished row")
  ref_curves = [link.eval_curve(run_dir(sweep_dir, rid)) for rid in reference.run_ids]
  final_val = float(np.mean([c["val_auc"][-1] for c in ref_curves]))
  target = final_val - tolerance
  # Each seed draws its own data and held-out sets, whose AUC levels differ by more than the
  # tolerance: a row's seed is held to the reference's own final AUC on that seed (paired).
  targets = {
    seed: float(c["val_auc"][-1]) - tolerance for seed, c in zip(reference.seeds, ref_curves)
  }
  convergence = [link.converged(c) for c in ref_curves]
  n = min(len(c["step"]) for c in ref_curves)
  mean_curve = {
    "step": ref_curves[0]["step"][:n],
    "val_auc": np.mean([c["val_auc"][:n] for c in ref_curves], axis=0),
  }
  mean_converged, mean_gain = link.converged(mean_curve)
  out = {
    "reference": spec.reference,
    "target": target,
    "target_by_seed": {str(k): v for k, v in targets.items()},
    "reference_final_val_auc": final_val,
    "tolerance": tolerance,
    "reference_converged": mean_converged,
    "reference_last_fifth_gain": mean_gain,
    "reference_last_fifth_gain_by_seed": [g for _, g in convergence],
    "rates": list(rates),
    "e2e_rate": e2e_rate,
    "rows": [],
  }
  for s in chosen:
    name = row_name(s)
    timing = {}
    for rate in rates:
      summary = _read_summary(os.path.join(base, "timing", f"{name}@{rate_name(rate)}"))
      if summary is not None:
        timing[rate_name(rate)] = summary["step_seconds_by_kind"]
    row = {
      "row": name,
      "name": s.name,
      "label": s.label,
      "tuned": s.tuned,
      "candidates": [dict(zip(s.tuned, c.tuned)) | {"val": c.score} for c in s.candidates],
      "seeds": list(s.seeds),
      "test_auc": list(s.test),
      "paired_test_auc": list(s.paired),
      "inter_node_bytes": list(s.mean("inter_node_bytes")),
      "timing": timing,
      "curves": {},
      "to_target": {},
    }
    for seed, run_id in zip(s.seeds, s.run_ids):
      curve = link.eval_curve(run_dir(sweep_dir, run_id), timing)
      keys = ["step", *(f"seconds@{rate}" for rate in timing)]
      row["curves"][str(seed)] = {k: curve[k].tolist() for k in (keys[0], "val_auc", *keys[1:])}
      row["to_target"][str(seed)] = {
        k: link.first_reaching(curve, targets.get(seed, math.inf), k) for k in keys
      }
    e2e_dir = os.path.join(base, "e2e", f"{name}@{rate_name(e2e_rate)}")
    e2e = _read_summary(e2e_dir)
    if e2e is not None:
      rate = rate_name(e2e_rate)
      key = f"seconds@{rate}"
      measured = link.eval_curve(e2e_dir, {rate: timing[rate]} if rate in timing else {})
      measured.setdefault(key, np.full_like(measured["step"], math.nan))
      row["e2e"] = {
        "rate": rate,
        "status": e2e.get("status"),
        "train_seconds": e2e.get("train_seconds"),
        **{k: measured[k].tolist() for k in ("step", "val_auc", "measured")},
        "composed": measured[key].tolist(),
        "test_auc": e2e.get("test_auc"),
        "measured_to_target": link.first_reaching(measured, targets.get(0, math.inf), "measured"),
        "composed_to_target": link.first_reaching(measured, targets.get(0, math.inf), key),
        "max_val_auc_gap": _max_gap(row["curves"].get("0", {}), measured),
      }
    out["rows"].append(row)
  ref_row = next(r for r in out["rows"] if r["name"] == spec.reference)
  for row in out["rows"]:
    row["run_seconds"] = {
      rate: float(np.mean([c[f"seconds@{rate}"][-1] for c in row["curves"].values()]))
      for rate in map(rate_name, rates)
      if all(f"seconds@{rate}" in c for c in row["curves"].values())
    }
    row["speedup"], row["median_to_target"], row["median_speedup"] = {}, {}, {}
    for rate in map(rate_name, rates):
      key = f"seconds@{rate}"
      mine, ref = _mean_to_target(row, key), _mean_to_target(ref_row, key)
      row["speedup"][rate] = ref / mine if mine and ref else None
      mine, ref = median_to_target(row, key), median_to_target(ref_row, key)
      row["median_to_target"][rate] = mine
      row["median_speedup"][rate] = ref / mine if mine and ref else None
  return out


def _max_gap(curve: dict, measured: dict) -> float | None:
  """Largest |val AUC| difference between the end-to-end run and the seed-0 trajectory."""
  if not curve:
    return None
  a = dict(zip(curve["step"], curve["val_auc"]))
  gaps = [abs(a[s] - v) for s, v in zip(measured["step"].tolist(), measured["val_auc"]) if s in a]
  return float(max(gaps)) if gaps else None


def _mean_to_target(row: dict, key: str) -> float | None:
  """Mean over seeds of the time to target; None unless every seed reached it."""
  values = [t.get(key) for t in row["to_target"].values()]
  if not values or any(v is None for v in values):
    return None
  return float(np.mean(values))


def median_to_target(row: dict, key: str) -> float | None:
  """Median over seeds of the time to target, a seed that never reached it counting as
  infinite: finite (and not None) when more than half of the seeds reached it.

  With many seeds, "every seed reached it" fails by chance for a row as accurate as the
  reference: its final AUC scatters around the reference's by about the tolerance.

  Examples:
    >>> row = {"to_target": {"0": {"s": 10.0}, "1": {"s": None}, "2": {"s": 30.0}}}
    >>> median_to_target(row, "s")
    30.0
    >>> median_to_target({"to_target": {"0": {"s": 10.0}, "1": {"s": None}}}, "s") is None
    True
  """
  values = [t.get(key) for t in row["to_target"].values()]
  if not values:
    return None
  median = float(np.median([math.inf if v is None else v for v in values]))
  return median if math.isfinite(median) else None


def _fmt(values, digits=1) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "not reached"
  mean, std = select.mean_std(values)
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def markdown(data: dict) -> str:
  rates = [rate_name(r) for r in data["rates"]]
  head = (
    "| row | learning rate | test AUC | Δ test AUC vs "
    f"{data['reference']} (paired) | steps to target | inter-node MB / device | "
    + " | ".join(
      f"@ {r}bit/s: s for the run | s to target | speed-up | median s to target | speed-up "
      "(medians)"
      for r in rates
    )
    + f" | end to end @ {rate_name(data['e2e_rate'])}bit/s: measured / composed s |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for row in data["rows"]:
    seeds = row["to_target"].values()
    n = len(row["seeds"])
    reached = sum(t["step"] is not None for t in seeds)
    steps = _fmt([t["step"] for t in seeds], 0) + ("" if reached == n else f" ({reached}/{n})")
    cells = [
      row["label"],
      ", ".join(f"{v:g}" for v in row["tuned"].values()),
      f"{row['test_auc'][0]:.4f} ± {row['test_auc'][1]:.4f}",
      "—"
      if row["name"] == data["reference"]
      else f"{row['paired_test_auc'][0]:+.4f} ± {row['paired_test_auc'][1]:.4f}",
      steps,
      f"{row['inter_node_bytes'][0] / 1e6:.0f}",
    ]
    for rate in rates:
      run = row.get("run_seconds", {}).get(rate)
      cells.append("—" if run is None else f"{run:.0f}")
      times = [t.get(f"seconds@{rate}") for t in seeds]
      cells.append(
        _fmt(times)
        if all(t is not None for t in times)
        else f"{_fmt(times)} ({sum(t is not None for t in times)}/{n})"
      )
      speedup = row["speedup"].get(rate)
      cells.append(f"{speedup:.2f}×" if speedup else "—")
      median = row["median_to_target"].get(rate)
      cells.append("not reached by half" if median is None else f"{median:.1f}")
      speedup = row["median_speedup"].get(rate)
      cells.append(f"{speedup:.2f}×" if speedup else "—")
    e2e = row.get("e2e")
    if e2e and e2e["measured_to_target"] and e2e["composed_to_target"]:
      m, c = e2e["measured_to_target"], e2e["composed_to_target"]
      cells.append(f"{m:.1f} / {c:.1f} ({m / c - 1:+.0%})")
    elif e2e and e2e["measured"] and e2e["composed"]:
      m, c = e2e["measured"][-1], e2e["composed"][-1]
      cells.append(f"not reached; whole run {m:.1f} / {c:.1f} ({m / c - 1:+.0%})")
    else:
      cells.append("—")
    lines.append("| " + " | ".join(cells) + " |")
  gains = ", ".join(f"{g:+.4f}" for g in data["reference_last_fifth_gain_by_seed"])
  lines += [
    "",
    f"Target, paired by seed: {data['reference']}'s final validation AUC on the same seed "
    f"minus {data['tolerance']:g} ("
    + ", ".join(f"seed {k}: {v:.4f}" for k, v in data["target_by_seed"].items())
    + "; the seeds draw their own data and held-out sets). "
    f"Times are training-step seconds (compilation and evaluations left out), composed from each "
    f"seed's steps and the step times measured on the link; mean ± std over seeds; (m/n): the "
    f"seeds that reached the target, and no speed-up unless all did. The median counts a "
    f"seed that never reached the target as infinite, so it needs more than half to reach it. "
    f"{data['reference']}'s validation AUC (mean over seeds) gained "
    f"{data['reference_last_fifth_gain']:+.4f} over the last fifth of the run "
    f"({'converged' if data['reference_converged'] else 'NOT converged'} by the rule of a gain "
    f"under 0.001; by seed: {gains}).",
  ]
  return "\n".join(lines) + "\n"


@user_errors("link_experiment")
def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  log = lambda s: print(s, flush=True)
  spec, chosen = chosen_rows(args.sweep_dir)
  if args.rows:
    unknown = sorted(set(args.rows) - {row_name(s) for s in chosen})
    if unknown:
      raise ValueError(f"--rows: no such row {unknown}; rows: {[row_name(s) for s in chosen]}")
    chosen_run = [s for s in chosen if row_name(s) in args.rows]
  else:
    chosen_run = chosen
  if args.phase in ("all", "timing", "e2e") and os.geteuid() != 0:
    raise ValueError("the timing and e2e phases need root (network namespaces and tc); "
                     "--phase report needs none")  # fmt: skip
  if args.phase in ("all", "timing"):
    run_timing(args, chosen_run, log)
  if args.phase in ("all", "e2e"):
    run_e2e(args, chosen_run, log)
  data = build_report(args.sweep_dir, spec, chosen, args.rates, args.e2e_rate, args.tolerance)
  base = os.path.join(args.sweep_dir, LINK_DIR)
  os.makedirs(base, exist_ok=True)
  write_atomic(os.path.join(base, "link.json"), json.dumps(finite_or_none(data), indent=1))
  table = markdown(data)
  write_atomic(os.path.join(base, "table.md"), table)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
