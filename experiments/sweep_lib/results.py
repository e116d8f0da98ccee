"""``results.csv`` rebuilt from the run directories, and each run's curves read back.

A sweep directory holds ``sweep.json`` (the spec), ``runs/RUN_ID/`` per run (the trainer's
``metrics.jsonl`` and ``summary.json``), ``jobs/`` (the sweep's bookkeeping, see
:mod:`.worker`) and ``results.csv``: one row per finished run of the spec, written atomically
from the run directories, never from memory, so it is complete and right after a kill, a rerun
or several shards writing it in turn.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np

from experiments._common import read_jsonl
from experiments._common import write_atomic
from experiments._common import write_json
from experiments.sweep_lib import stages
from experiments.sweep_lib import tasks
from experiments.sweep_lib import worker
from experiments.sweep_lib.spec import Run
from experiments.sweep_lib.spec import SweepSpec
from kstep_adam._jsonio import read_json

RESULTS_FILE, SPEC_FILE = "results.csv", "sweep.json"
ID_COLUMNS = ("run_id", "name", "seed", "status", "diverged_at_step")
run_dir = worker.run_dir


def write_spec(out_dir: str, spec: SweepSpec) -> None:
  write_json(os.path.join(out_dir, SPEC_FILE), spec.to_json())


def read_spec(out_dir: str) -> SweepSpec:
  """The spec recorded in ``out_dir/sweep.json``; ValueError if there is none."""
  path = os.path.join(out_dir, SPEC_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{out_dir}: not a sweep directory (no {SPEC_FILE})")
  with open(path, encoding="utf-8") as f:
    return SweepSpec.from_json(json.load(f))


def run_record(run: Run, task: str) -> dict:
  """What ``jobs/RUN_ID.json`` holds: everything the worker needs."""
  return {
    "run_id": run.run_id,
    "name": run.name,
    "seed": run.seed,
    "task": task,
    "grid": dict(run.grid),
    "params": dict(run.params),
  }


def check_recorded(out_dir: str, spec: SweepSpec, runs: list[Run]) -> None:
  """Raise ValueError if a run directory was made with other fields than the spec gives it
  now (an edited config would otherwise mix two experiments in one table)."""
  for run in runs:
    path = worker.job_file(out_dir, run.run_id, "json")
    if not os.path.exists(path):
      continue
    recorded = read_json(
      path,
      keys=("params",),
      what_to_do=f"delete it and {run_dir(out_dir, run.run_id)} to redo that run",
    )
    wanted = json.loads(json.dumps(run_record(run, spec.task)))  # tuples as JSON has them
    if recorded != wanted:
      differ = sorted(
        k
        for k in set(recorded["params"]) | set(wanted["params"])
        if recorded["params"].get(k) != wanted["params"].get(k)
      )
      raise ValueError(
        f"{path}: run {run.run_id} was made with other fields ({differ}: "
        f"{[recorded['params'].get(k) for k in differ]} there, "
        f"{[wanted['params'].get(k) for k in differ]} now); pass another --out, or delete "
        f"{path} and {run_dir(out_dir, run.run_id)} to redo that run"
      )


def _cell(value) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return ""
  if isinstance(value, (list, tuple, dict)):
    return json.dumps(value)
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _parse(text: str):
  if text == "":
    return None
  for parse in (int, float):
    try:
      return parse(text)
    except ValueError:
      pass
  return text


def common_compute_per_step(rows: list[dict]) -> float | None:
  """The sweep's compute seconds per step: the median over its runs of each run's measured
  compute per steady step (None without any, e.g. a convergence sweep).

  Every optimizer of a CTR sweep runs the same model on the same batches, so its compute per
  step differs from the others' by its own update's cost, which is small next to the model's;
  the measured times differ by much more where the runs share a loaded machine. The modelled
  wall time therefore charges every run this one figure per step (plus the communication it
  sent); each run's own measurement stays in ``results.csv``.

  Examples:
    >>> common_compute_per_step([{"compute_seconds_per_step": v} for v in (0.2, 0.1, 0.5)])
    0.2
  """
  values = [r.get("compute_seconds_per_step") for r in rows]
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.median(values)) if values else None


def collect(out_dir: str, spec: SweepSpec, runs: list[Run] | None = None) -> list[dict]:
  """One row per finished run of ``spec`` found under ``out_dir``, in the spec's order.

  ``runs`` None: every run of the spec; for two-stage tuning, those of
  :func:`~.stages.plan` (stage 1 and the current choices' stage 2, none of an older choice).

  A CTR row's ``modelled_seconds`` is ``steps`` times the sweep's
  :func:`common_compute_per_step` (in ``common_compute_seconds_per_step``) plus the run's
  ``estimated_comm_seconds``; it therefore depends on the runs finished so far, and the file
  is rebuilt whole every time.
  """
  task = tasks.get(spec.task)
  rows = []
  if runs is None:
    runs = stages.plan(out_dir, spec).runs if spec.two_stage else spec.runs()
  for run in runs:
    summary = worker.read_summary(out_dir, run.run_id)
    if summary is None:
      continue
    try:
      losses = curves(out_dir, run.run_id)["loss"]
    except ValueError:  # a damaged metrics.jsonl: the run's results still count
      losses = np.zeros(0)
    rows.append(
      {
        "run_id": run.run_id,
        "name": run.name,
        "seed": run.seed,
        "status": summary["status"],
        "diverged_at_step": summary.get("diverged_at_step"),
        **{f: None for f in spec.grid_fields},
        **task.row(summary),
        "final_train_loss": float(losses[-1]) if losses.size else None,
        **run.grid,
      }
    )
  per_step = common_compute_per_step(rows)
  if per_step is not None:
    for row in rows:
      if row.get("estimated_comm_seconds") is not None:
        row["common_compute_seconds_per_step"] = per_step
        row["modelled_seconds"] = row["steps"] * per_step + row["estimated_comm_seconds"]
  return rows


def csv_text(rows: list[dict]) -> str:
  """The rows as CSV; the columns are the union of the rows' keys in first-seen order."""
  columns = list(dict.fromkeys(key for row in rows for key in row)) or list(ID_COLUMNS)
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow([_cell(row.get(c)) for c in columns])
  return buffer.getvalue()


def write_results(out_dir: str, spec: SweepSpec, runs: list[Run] | None = None) -> list[dict]:
  """Rebuild ``out_dir/results.csv`` from the run directories; return its rows."""
  rows = collect(out_dir, spec, runs)
  write_atomic(os.path.join(out_dir, RESULTS_FILE), csv_text(rows))
  return rows


def read_results(path: str) -> list[dict]:
  """The rows of a ``results.csv`` (numbers parsed, empty cells None).

  Examples:
    >>> import os, tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
    ...   _ = f.write("run_id,learning_rate,test_auc\\nsgd-s0,0.1,\\n")
    >>> read_results(f.name)
    [{'run_id': 'sgd-s0', 'learning_rate': 0.1, 'test_auc': None}]
    >>> os.remove(f.name)
  """
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or "run_id" not in reader.fieldnames:
      raise ValueError(f"{path}: not a sweep results table (no run_id column)")
    return [{k: _parse(v) for k, v in row.items()} for row in reader]


def curves(
  out_dir: str, run_id: str, compute_seconds_per_step: float | None = None
) -> dict[str, np.ndarray]:
  """A run's curves from its ``metrics.jsonl``.

  Args:
    out_dir: the sweep directory.
    run_id: the run.
    compute_seconds_per_step: what ``modelled_seconds`` charges for a step's compute (the
      sweep's :func:`common_compute_per_step`); None: the run's own measured compute.

  Returns:
    ``step``, ``loss`` and, where recorded, ``total_bytes``, ``inter_node_bytes``,
    ``comm_seconds`` (estimated communication) and ``modelled_seconds`` (compute plus
    estimated communication), cumulative, at the ``train`` records; ``eval_step`` and the
    ``val_*`` / ``test_*`` metrics at the ``eval`` records, with ``eval_total_bytes``,
    ``eval_inter_node_bytes``, ``eval_comm_seconds`` and ``eval_modelled_seconds``
    interpolated in the step from the train records (all grow step by step). Missing values
    are NaN.
  """
  path = os.path.join(run_dir(out_dir, run_id), "metrics.jsonl")
  records = read_jsonl(path) if os.path.exists(path) else []
  train = [r for r in records if r.get("kind") == "train"]
  evals = [r for r in records if r.get("kind") == "eval"]
  nan = lambda v: math.nan if v is None else float(v)
  out = {
    "step": np.array([r["step"] for r in train], float),
    "loss": np.array([nan(r.get("loss")) for r in train], float),
  }
  if train and "sparse_bytes" in train[0]:
    dense = [r.get("dense_bytes_by_axis") or {} for r in train]
    out["total_bytes"] = np.array(
      [sum(d.values()) + r["sparse_bytes"] for d, r in zip(dense, train)], float
    )
    out["inter_node_bytes"] = np.array(
      [d.get("node", 0.0) + r["sparse_inter_node_bytes"] for d, r in zip(dense, train)], float
    )
    out["comm_seconds"] = np.array([r["estimated_comm_seconds"] for r in train], float)
    per_step = compute_seconds_per_step
    out["modelled_seconds"] = np.array(
      [
        (r["measured_compute_seconds"] if per_step is None else r["step"] * per_step)
        + r["estimated_comm_seconds"]
        for r in train
      ],
      float,
    )
  out["eval_step"] = np.array([r["step"] for r in evals], float)
  for key in dict.fromkeys(k for r in evals for k in r):
    if key.startswith(("val_", "test_")) and not key.endswith("_note"):
      out[key] = np.array([nan(r.get(key)) for r in evals], float)
  for key in ("total_bytes", "inter_node_bytes", "comm_seconds", "modelled_seconds"):
    if key in out:
      x = np.concatenate([[0.0], out["step"]])
      y = np.concatenate([[0.0], out[key]])
      out["eval_" + key] = np.interp(out["eval_step"], x, y)
  return out


def time_to_target(
  curve: dict[str, np.ndarray],
  target: float,
  *,
  metric: str = "val_auc",
  higher: bool = True,
  key: str = "modelled_seconds",
) -> float | None:
  """``key`` (``modelled_seconds``, ``comm_seconds``, ``step``...) at the first evaluation
  whose ``metric`` reaches ``target``, or None if none does.

  Examples:
    >>> c = {"eval_step": np.array([10.0, 20.0]), "val_auc": np.array([0.6, 0.7]),
    ...      "eval_modelled_seconds": np.array([1.0, 2.0])}
    >>> time_to_target(c, 0.65), time_to_target(c, 0.75), time_to_target(c, 0.65, key="step")
    (2.0, None, 20.0)
  """
  column = "eval_" + key
  if metric not in curve or column not in curve:
    return None
  values = curve[metric]
  reached = values >= target if higher else values <= target
  hits = np.flatnonzero(reached & np.isfinite(values))
  return float(curve[column][hits[0]]) if hits.size else None
