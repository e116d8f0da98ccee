"""The comparison table of a sweep: ``selection.csv`` (every number) and ``table.md``.

One row per group (optimizer and non-tuned grid values) from :func:`~.select.select`: the
chosen tuned values, the validation metric they were chosen on, the test metric over seeds,
the paired difference to the reference, and for CTR sweeps the bytes each device sent, the
modelled time (the sweep's common compute per step times the steps, see
:func:`~.results.common_compute_per_step`, plus the communication the byte accounting
estimates under the sweep's network) and the modelled time to reach the reference's final
validation AUC.
"""

from __future__ import annotations

import math
import os

from experiments._common import write_atomic
from experiments.sweep_lib import results
from experiments.sweep_lib import select
from experiments.sweep_lib import tasks
from experiments.sweep_lib.spec import SweepSpec


def selections(spec: SweepSpec, rows: list[dict]) -> list[select.Selection]:
  """:func:`~.select.select` with the spec's grouping, tuning, metrics and reference."""
  task = tasks.get(spec.task)
  names = {row["name"] for row in rows}
  return select.select(
    rows,
    group_by=spec.group_fields(),
    tune=spec.tune,
    metric=task.selection_metric,
    report=task.report_metric,
    higher_is_better=task.higher_is_better,
    reference=spec.reference if spec.reference in names else None,
    tune_seeds=spec.tune_seeds if spec.two_stage else None,
  )


def target(spec: SweepSpec, chosen: list[select.Selection]) -> float | None:
  """The reference's final validation metric (mean over its seeds), the time-to-target goal."""
  ref = [s for s in chosen if s.name == spec.reference]
  if not ref or math.isnan(ref[0].val[0]):
    return None
  return ref[0].val[0]


def report_rows(out_dir: str, spec: SweepSpec, rows: list[dict]) -> list[dict]:
  """One dict per group with every reported number (``selection.csv``'s rows)."""
  task = tasks.get(spec.task)
  chosen = selections(spec, rows)
  goal = target(spec, chosen)
  per_step = results.common_compute_per_step(rows)
  out = []
  for s in chosen:
    row = {
      "name": s.name,
      **s.group,
      **{f"best_{k}": v for k, v in s.tuned.items()},
      "seeds": len(s.seeds),
      "candidates": len(s.candidates),
      "diverged_candidates": sum(1 for c in s.candidates if c.diverged),
      f"{task.selection_metric}_mean": s.val[0],
      f"{task.selection_metric}_std": s.val[1],
      f"{task.report_metric}_mean": s.test[0],
      f"{task.report_metric}_std": s.test[1],
      f"d_{task.report_metric}_vs_reference_mean": s.paired[0],
      f"d_{task.report_metric}_vs_reference_std": s.paired[1],
      "paired_seeds": len(s.paired_seeds),
    }
    if spec.task == "ctr":
      for column in (
        "steps",
        "inter_node_bytes",
        "total_bytes",
        "estimated_comm_seconds",
        "measured_compute_seconds",
        "modelled_seconds",
      ):
        row[f"{column}_mean"], row[f"{column}_std"] = s.mean(column)
      hits = []  # (step, comm s, modelled s) where each seed first reached the target
      if goal is not None:
        for run_id in s.run_ids:
          curve = results.curves(out_dir, run_id, per_step)
          at = [
            results.time_to_target(
              curve, goal, metric=task.selection_metric, higher=task.higher_is_better, key=key
            )
            for key in ("step", "comm_seconds", "modelled_seconds")
          ]
          if at[0] is not None:
            hits.append(at)
      row["target"] = goal
      row["common_compute_seconds_per_step"] = per_step
      for i, name in enumerate(("steps", "comm_seconds", "time")):
        row[f"{name}_to_target_mean"], row[f"{name}_to_target_std"] = select.mean_std(
          [h[i] for h in hits]
        )
      row["time_to_target_reached"] = len(hits)
    row["run_ids"] = " ".join(s.run_ids)
    out.append(row)
  return out


ONE_SEED = "1 seed: no spread"


def spread_text(seed_counts) -> str:
  """How a spread over seeds reads: ``'mean ± std over seeds'``, or :data:`ONE_SEED` when
  every group has one seed (a std of one value is no measurement of spread)."""
  counts = list(seed_counts)
  if counts and all(n == 1 for n in counts):
    return ONE_SEED
  if any(n == 1 for n in counts):
    return f"mean ± std over seeds; {ONE_SEED} where a row has 1"
  return "mean ± std over seeds"


def _pm(mean: float, std: float, digits: int = 4, signed: bool = False, seeds: int = 2) -> str:
  if mean is None or math.isnan(mean):
    return "–"
  sign = "+" if signed else ""
  if seeds == 1:
    return f"{mean:{sign}.{digits}f}"
  return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def _value(v) -> str:
  return "–" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def markdown(spec: SweepSpec, report: list[dict]) -> str:
  """The sweep's table (``table.md``, as in docs/sweeps.md): one line per group, then a line on how to read it."""
  task = tasks.get(spec.task)
  sel, rep = task.selection_metric, task.report_metric
  group = spec.group_fields()
  ctr = spec.task == "ctr"
  held_out = sel != rep  # a validation metric chosen on, a test metric reported
  one_seed = bool(report) and all(r["seeds"] == 1 for r in report)
  spread = "1 seed" if one_seed else "mean ± std"
  head = ["optimizer", *group, *(f"best {t}" for t in spec.tune)]
  if held_out:
    head += [f"val {task.metric_label}", f"test {task.metric_label} ({spread})"]
  else:
    head += [f"{task.metric_label} ({spread})"]
  if spec.reference:
    head += [f"Δ {'test ' if held_out else ''}vs {spec.reference} (paired)"]
  if ctr:
    head += [
      "inter-node MB / device",
      "comm s (modelled)",
      "compute s (measured)",
      "wall s (modelled)",
      "to target: steps · comm s · wall s",
    ]
  head += ["seeds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in report:
    cells = [r["name"], *(_value(r.get(g)) for g in group)]
    cells += [_value(r.get(f"best_{t}")) for t in spec.tune]
    n = r["seeds"]
    if held_out:
      cells.append(_pm(r[f"{sel}_mean"], r[f"{sel}_std"], seeds=n))
    cells.append(_pm(r[f"{rep}_mean"], r[f"{rep}_std"], seeds=n))
    if spec.reference:
      d_mean, d_std = r[f"d_{rep}_vs_reference_mean"], r[f"d_{rep}_vs_reference_std"]
      cells += [_pm(d_mean, d_std, signed=True, seeds=r["paired_seeds"])]
    if ctr:
      cells += [
        f"{r['inter_node_bytes_mean'] / 1e6:.1f}",
        f"{r['estimated_comm_seconds_mean']:.2f}",
        f"{r['measured_compute_seconds_mean']:.1f}",
        f"{r['modelled_seconds_mean']:.1f}",
        "not reached"
        if not r["time_to_target_reached"]
        else f"{r['steps_to_target_mean']:.0f} · {r['comm_seconds_to_target_mean']:.2f} · "
        f"{r['time_to_target_mean']:.1f}"
        + (
          ""
          if r["time_to_target_reached"] == r["seeds"]
          else f" ({r['time_to_target_reached']}/{r['seeds']} seeds)"
        ),
      ]
    seeds = str(r["seeds"])
    if r["diverged_candidates"]:
      seeds += f" ({r['diverged_candidates']} of {r['candidates']} candidates diverged)"
    cells.append(seeds)
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  if held_out:
    note = (
      f"Best {', '.join(spec.tune)} per row chosen on the validation {task.metric_label} "
      f"(mean over seeds); test {task.metric_label} of that choice, mean ± sample std over "
      f"seeds"
    )
    if one_seed:
      note = (
        f"Best {', '.join(spec.tune)} per row chosen on the validation {task.metric_label}; "
        f"test {task.metric_label} of that choice; {ONE_SEED}"
      )
  else:
    note = (
      f"Best {', '.join(spec.tune)} per row chosen on the mean {task.metric_label} over "
      f"seeds, which is also what is reported (mean ± sample std): the task has no held-out "
      f"data"
    )
    if one_seed:
      note = (
        f"Best {', '.join(spec.tune)} per row chosen on the {task.metric_label}, which is also "
        f"what is reported (the task has no held-out data); {ONE_SEED}"
      )
  if spec.two_stage:
    note += (
      f"; two-stage tuning: chosen on seeds {list(spec.tune_seeds)} only, the other seeds "
      f"run only the choice, and every number of a row is over all its seeds"
    )
  if spec.reference:
    note += f"; Δ paired by seed against {spec.reference}'s own choice"
  if ctr and report:
    goal = report[0].get("target")
    note += (
      "; inter-node MB: what each device sent over the inter-node links in the whole run, "
      "dense and sparse; comm s: those bytes and the intra-node ones under the sweep's "
      "network model; compute s: measured, summed over the run's steady steps (the runs "
      "shared a machine: compare with care); wall s = steps × the sweep's median measured "
      "compute per step"
    )
    per_step = report[0].get("common_compute_seconds_per_step")
    if per_step is not None:
      note += f" ({per_step * 1e3:.1f} ms)"
    note += ", the same for every optimizer, + modelled communication"
    if goal is not None:
      note += (
        f"; to target: the step, the modelled communication seconds and the modelled wall "
        f"seconds at the first evaluation reaching {spec.reference}'s final validation "
        f"{task.metric_label} ({goal:.4f}), mean over the seeds that reach it (wall s to "
        f"target under another compute speed c s/step: steps × c + comm s)"
      )
  lines.append(note + ".")
  return "\n".join(lines)


def write_report(out_dir: str, spec: SweepSpec, rows: list[dict]) -> str:
  """Write ``selection.csv`` and ``table.md`` in ``out_dir``; return the markdown."""
  report = report_rows(out_dir, spec, rows)
  write_atomic(os.path.join(out_dir, "selection.csv"), results.csv_text(report))
  text = markdown(spec, report)
  write_atomic(os.path.join(out_dir, "table.md"), text + "\n")
  return text
