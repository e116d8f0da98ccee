"""Two-stage tuning: which runs a sweep has, given what its directory holds so far.

Without two-stage tuning (:attr:`~.spec.SweepSpec.two_stage`) the runs are every grid point at
every seed, known up front. With it, stage 1 is every grid point at the tune seeds, and stage 2
the chosen candidate of each group at the other seeds; a group's stage 2 is known once every
stage-1 run of the group has finished (completed or diverged) in the sweep directory, and is
chosen on those runs alone (:func:`~.report.selections` scores on the tune seeds). So the plan
is rebuilt from the directory every time, never stored: a stage-2 run of a choice that has
since moved is simply not in it (and not counted in the results).
"""

from __future__ import annotations

import dataclasses

from experiments.sweep_lib import worker
from experiments.sweep_lib.spec import Run
from experiments.sweep_lib.spec import SweepSpec
from experiments.sweep_lib.spec import format_value


@dataclasses.dataclass(frozen=True)
class Plan:
  """The runs of a sweep known so far.

  Attributes:
    stage1: every grid point at the tune seeds (every run when not two-stage).
    stage2: the chosen candidates' runs at the other seeds, for the groups whose stage 1 has
      finished, in the spec's order.
    waiting: labels of the groups whose stage 2 is not known yet (stage 1 unfinished).
    total: how many runs the sweep has once every group's stage 2 is known.
  """

  stage1: list[Run]
  stage2: list[Run]
  waiting: list[str]
  total: int

  @property
  def runs(self) -> list[Run]:
    return [*self.stage1, *self.stage2]

  @property
  def stage1_done(self) -> bool:
    return not self.waiting


def group_key(spec: SweepSpec, run: Run) -> tuple:
  """The group of a run: its optimizer's name and its values of the non-tuned grid fields."""
  return (run.name, *(repr(run.grid.get(f)) for f in spec.group_fields()))


def _point_key(run: Run) -> tuple:
  return (run.name, *(f"{f}={v!r}" for f, v in run.grid.items()))


def _label(spec: SweepSpec, run: Run) -> str:
  """``name`` or ``name[k=4]``: one word, for lists of groups."""
  values = [f"{f}={format_value(run.grid[f])}" for f in spec.group_fields() if f in run.grid]
  return f"{run.name}[{','.join(values)}]" if values else run.name


def plan(out_dir: str, spec: SweepSpec) -> Plan:
  """The runs of ``spec`` known from what ``out_dir`` holds (see the module docstring)."""
  if not spec.two_stage:
    runs = spec.runs()
    return Plan(runs, [], [], len(runs))
  from experiments.sweep_lib import report
  from experiments.sweep_lib import results

  everything = spec.runs()
  stage1 = [r for r in everything if r.seed in spec.tune_seeds]
  groups = list(dict.fromkeys(group_key(spec, r) for r in stage1))
  total = len(stage1) + len(groups) * len(spec.stage2_seeds)
  unfinished = {
    group_key(spec, r) for r in stage1 if worker.read_summary(out_dir, r.run_id) is None
  }
  waiting = [
    _label(spec, next(r for r in stage1 if group_key(spec, r) == g))
    for g in groups
    if g in unfinished
  ]
  done = [r for r in stage1 if group_key(spec, r) not in unfinished]
  if not done:
    return Plan(stage1, [], waiting, total)
  by_id = {r.run_id: r for r in stage1}
  chosen_points = set()
  for selection in report.selections(spec, results.collect(out_dir, spec, done)):
    run = by_id[next(iter(selection.chosen.runs.values()))["run_id"]]
    chosen_points.add(_point_key(run))
  stage2 = [
    r
    for r in everything
    if r.seed not in spec.tune_seeds
    and group_key(spec, r) not in unfinished
    and _point_key(r) in chosen_points
  ]
  return Plan(stage1, stage2, waiting, total)
