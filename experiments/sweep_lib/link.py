"""Wall clock on a real link, composed from a sweep's trajectories and step times measured there.

A run's trajectory (its loss and AUC against steps) does not depend on the link between its
nodes; only its time does. So a sweep trains its trajectories on simulated devices in one
process, and the link experiment (:mod:`experiments.link_experiment`) times each optimizer's
steps between two real processes over a shaped link. A step's *kind* is the dense bytes each
device sent in it (``step_seconds_by_kind`` of a run's ``summary.json`` and ``metrics.jsonl``:
local steps send none; a merge, a synchronous step, 1-bit Adam's warm-up and its compressed
steps each have their size). A trajectory's wall clock at step ``s`` on that link is

  ``T(s) = sum over kinds b of n_b(s) x m_b``

with ``n_b(s)`` the trajectory's timed steps of kind ``b`` up to ``s`` and ``m_b`` the mean
seconds of a kind-``b`` step measured on the link. Steps that compiled are left out of both
sides, and so are evaluations: ``T`` is training-step time. An end-to-end run on the link
measures the same quantity directly (its own ``measured_total`` per kind), which is how the
composition is checked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

from experiments._common import read_jsonl


def kinds_by_bytes(step_seconds_by_kind: Mapping[str, Mapping]) -> dict[float, dict]:
  """``step_seconds_by_kind`` keyed by each kind's dense bytes per step."""
  return {float(k["dense_bytes"]): dict(k) for k in step_seconds_by_kind.values()}


def compose_seconds(counts: Mapping[str, Mapping], timing: Mapping[str, Mapping]) -> float:
  """``sum_b n_b x m_b``: the steps of each kind in ``counts`` (a trajectory's
  ``step_seconds_by_kind``) at the mean seconds ``timing`` (one measured on the link) gives
  that kind: ``measured_total / steps``. The mean, not the median: a total includes the slow
  tail of the step times (here the mean is 5-10% above the median), which a median leaves out.

  Raises:
    ValueError: a kind of ``counts`` that ``timing`` never ran (its steps cannot be priced).

  Examples:
    >>> traj = {"local": {"steps": 30, "dense_bytes": 0.0},
    ...         "merge": {"steps": 10, "dense_bytes": 4e6}}
    >>> link = {"local": {"dense_bytes": 0.0, "steps": 10, "measured_total": 0.3},
    ...         "merge": {"dense_bytes": 4e6, "steps": 2, "measured_total": 0.4}}
    >>> round(compose_seconds(traj, link), 6)
    2.9
  """
  priced = kinds_by_bytes(timing)
  total = 0.0
  for name, kind in counts.items():
    nbytes = _dense_bytes(name, kind, priced)
    if nbytes not in priced:
      raise ValueError(
        f"steps of kind {name!r} ({nbytes:.0f} dense bytes) were never timed on the link "
        f"(timed: {sorted(priced)})"
      )
    timed = priced[nbytes]
    total += kind["steps"] * timed["measured_total"] / timed["steps"]
  return total


def _dense_bytes(name: str, kind: Mapping, priced: Mapping[float, dict]) -> float:
  """A kind's dense bytes per step. Records written before kinds carried their bytes name
  only ``local`` (none) and ``merge`` / ``synchronous`` (every merge, whatever its size):
  those map to the timing's one size of merge, and are refused where it has several."""
  if "dense_bytes" in kind:
    return float(kind["dense_bytes"])
  if name == "local":
    return 0.0
  sizes = sorted(b for b in priced if b > 0)
  if name in ("merge", "synchronous") and len(sizes) == 1:
    return sizes[0]
  raise ValueError(
    f"steps of kind {name!r} do not say their dense bytes and the link timing has "
    f"{len(sizes)} sizes of merge: rerun the trajectory"
  )


def train_records(run_dir: str) -> tuple[list[dict], list[dict]]:
  """A run's ``train`` and ``eval`` records of ``metrics.jsonl``."""
  records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  return (
    [r for r in records if r.get("kind") == "train"],
    [r for r in records if r.get("kind") == "eval"],
  )


def eval_curve(
  run_dir: str, timings: Mapping[str, Mapping[str, Mapping]] | None = None
) -> dict[str, np.ndarray]:
  """At each evaluation of a run: ``step``, ``val_auc``, ``test_auc``, ``measured`` (the
  run's own timed step seconds so far) and, for each ``RATE: timing`` of ``timings``,
  ``seconds@RATE`` (:func:`compose_seconds` of its steps so far at those step times).

  An evaluation's time is read at the train record of the same step (``eval_every`` must be
  a multiple of ``log_every``); one without is NaN.
  """
  timings = dict(timings or {})
  train, evals = train_records(run_dir)
  by_step = {r["step"]: r for r in train}
  keys = ("step", "val_auc", "test_auc", "measured", *(f"seconds@{rate}" for rate in timings))
  out = {k: [] for k in keys}
  for e in evals:
    record = by_step.get(e["step"])
    kinds = record.get("step_seconds_by_kind") if record else None
    out["step"].append(e["step"])
    out["val_auc"].append(_num(e.get("val_auc")))
    out["test_auc"].append(_num(e.get("test_auc")))
    out["measured"].append(
      sum(k["measured_total"] for k in kinds.values()) if kinds is not None else math.nan
    )
    for rate, timing in timings.items():
      out[f"seconds@{rate}"].append(
        compose_seconds(kinds, timing) if kinds is not None else math.nan
      )
  return {k: np.asarray(v, float) for k, v in out.items()}


def first_reaching(curve: Mapping[str, np.ndarray], target: float, key: str) -> float | None:
  """``curve[key]`` at the first evaluation whose validation AUC reaches ``target``, or None.

  Examples:
    >>> c = {"val_auc": np.array([0.7, 0.8, 0.79]), "seconds@1G": np.array([1.0, 2.0, 3.0])}
    >>> first_reaching(c, 0.75, "seconds@1G"), first_reaching(c, 0.9, "seconds@1G")
    (2.0, None)
  """
  values = np.asarray(curve["val_auc"], float)
  hits = np.flatnonzero(np.isfinite(values) & (values >= target))
  return float(curve[key][hits[0]]) if hits.size else None


def converged(curve: Mapping[str, np.ndarray], tolerance: float = 1e-3) -> tuple[bool, float]:
  """Whether the validation AUC gained less than ``tolerance`` over the last fifth of the run
  (the last evaluation against the one at 80% of the steps), and that gain.

  Examples:
    >>> c = {"step": np.array([100.0, 200, 300, 400, 500]),
    ...      "val_auc": np.array([0.70, 0.75, 0.78, 0.7895, 0.79])}
    >>> ok, gain = converged(c)
    >>> ok, round(gain, 6)
    (True, 0.0005)
  """
  steps, values = np.asarray(curve["step"], float), np.asarray(curve["val_auc"], float)
  start = np.flatnonzero(steps >= 0.8 * steps[-1])[0]
  gain = float(values[-1] - values[start])
  return gain < tolerance, gain


def _num(value) -> float:
  return math.nan if value is None else float(value)
