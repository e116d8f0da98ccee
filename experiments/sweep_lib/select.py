"""Fair selection: the best tuned value per group on validation, reported on test over seeds.

A *group* is one optimizer configuration compared after tuning: the optimizer's ``name`` and
its values of the non-tuned grid fields (e.g. ``k``). Within a group, each *candidate* (one
value of the tuned fields, e.g. a learning rate) is scored by its mean validation metric over
seeds; a candidate with a diverged or unscored seed cannot win while another candidate scored
every seed. The chosen candidate's *test* metric is then reported as mean ± std over its seeds
(sample std), and, where a reference optimizer is named, as paired differences: the same seed's
test metric of the reference's own chosen candidate subtracted, mean ± std over the seeds both
have. Nothing about the test set influences any choice.

With ``tune_seeds`` (two-stage tuning) a candidate is scored on those seeds' rows only; rows
of its other seeds (the chosen candidate's stage 2) count in what is reported, never in the
choice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


def mean_std(values) -> tuple[float, float]:
  """Mean and sample std (0 for one value); NaN for no values.

  Examples:
    >>> mean_std([1.0, 3.0])
    (2.0, 1.4142135623730951)
  """
  values = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
  if not values.size:
    return math.nan, math.nan
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One tuned value of a group, over its seeds.

  Attributes:
    tuned: the tuned fields' values.
    runs: seed -> that seed's row.
    score: mean validation metric over the seeds scored (every seed, or the tune seeds), NaN
      when some of them has none.
    diverged: seeds that diverged.
  """

  tuned: tuple
  runs: dict
  score: float
  diverged: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Selection:
  """The chosen candidate of one group and what is reported for it.

  Attributes:
    name: the optimizer's name.
    group: the group's values of the non-tuned grid fields, ``{field: value}``.
    tuned: the chosen values of the tuned fields, ``{field: value}``.
    candidates: every candidate of the group, in the rows' order.
    chosen: the chosen candidate.
    val: mean and std of the selection metric over the chosen candidate's seeds.
    test: mean and std of the reported metric.
    paired: mean and std of the paired difference to the reference (NaN without one).
    paired_seeds: seeds in the paired difference.
  """

  name: str
  group: dict
  tuned: dict
  candidates: tuple[Candidate, ...]
  chosen: Candidate
  val: tuple[float, float]
  test: tuple[float, float]
  paired: tuple[float, float] = (math.nan, math.nan)
  paired_seeds: tuple[int, ...] = ()

  @property
  def seeds(self) -> tuple[int, ...]:
    return tuple(sorted(self.chosen.runs))

  @property
  def run_ids(self) -> list[str]:
    return [self.chosen.runs[s]["run_id"] for s in self.seeds]

  def mean(self, column: str) -> tuple[float, float]:
    """Mean and std over the chosen seeds of another column (bytes, modelled seconds...)."""
    return mean_std([self.chosen.runs[s].get(column) for s in self.seeds])

  @property
  def label(self) -> str:
    """``name`` and the group's values, e.g. ``'kstep_adam-params, k=16'``."""
    values = ", ".join(f"{k}={v}" for k, v in self.group.items() if v is not None)
    return f"{self.name}, {values}" if values else self.name


def _score(values: list, higher: bool) -> float:
  if not values or any(v is None or not math.isfinite(v) for v in values):
    return math.nan
  return float(np.mean(values))


def _better(a: float, b: float, higher: bool) -> bool:
  """Whether score ``a`` beats ``b``; a NaN score loses to any number."""
  if math.isnan(a):
    return False
  if math.isnan(b):
    return True
  return a > b if higher else a < b


def select(
  rows: Sequence[dict],
  *,
  group_by: Sequence[str],
  tune: Sequence[str],
  metric: str,
  report: str,
  higher_is_better: bool = True,
  reference: str | None = None,
  tune_seeds: Sequence[int] | None = None,
) -> list[Selection]:
  """Choose the best tuned values per group on ``metric``; report ``report`` over seeds.

  Args:
    rows: one dict per run with ``run_id``, ``name``, ``seed``, ``status``, the ``group_by``
      and ``tune`` columns, ``metric`` and ``report`` (``results.csv``'s rows).
    group_by: columns that, with ``name``, identify a group (the non-tuned grid fields).
    tune: columns whose best value is chosen per group (e.g. ``['learning_rate']``).
    metric: the selection column (a validation metric).
    report: the reported column (the test metric).
    higher_is_better: direction of both metrics.
    reference: the ``name`` of the reference optimizer for paired differences; it must have
      exactly one group.
    tune_seeds: score candidates on the rows of these seeds only; None: every row.

  Returns:
    One :class:`Selection` per group, in the order the groups first appear.

  Raises:
    ValueError: a (group, candidate, seed) appears twice, a column is missing, or the
      reference is absent or has several groups.

  Examples:
    >>> rows = [
    ...   dict(run_id=f"a-lr{lr}-s{s}", name="a", seed=s, status="completed", learning_rate=lr,
    ...        val=v, test=t)
    ...   for lr, s, v, t in [(0.1, 0, 0.70, 0.69), (0.1, 1, 0.72, 0.71),
    ...                       (0.3, 0, 0.75, 0.60), (0.3, 1, 0.74, 0.61)]
    ... ]
    >>> best, = select(rows, group_by=[], tune=["learning_rate"], metric="val", report="test")
    >>> best.tuned, round(best.test[0], 3)
    ({'learning_rate': 0.3}, 0.605)
  """
  groups: dict[tuple, dict[tuple, dict[int, dict]]] = {}
  for row in rows:
    missing = [c for c in ("run_id", "name", "seed", *group_by, *tune) if c not in row]
    if missing:
      raise ValueError(f"row {row.get('run_id')!r} has no column(s) {missing!r}")
    key = (row["name"], *(row[c] for c in group_by))
    tuned = tuple(row[c] for c in tune)
    seeds = groups.setdefault(key, {}).setdefault(tuned, {})
    if row["seed"] in seeds:
      raise ValueError(
        f"runs {seeds[row['seed']]['run_id']!r} and {row['run_id']!r} are the same group, "
        f"tuned values and seed"
      )
    seeds[row["seed"]] = row
  selections = []
  for key, by_tuned in groups.items():
    candidates = tuple(
      Candidate(
        tuned,
        runs,
        _score(
          [r.get(metric) for s, r in runs.items() if tune_seeds is None or s in tune_seeds],
          higher_is_better,
        ),
        tuple(sorted(s for s, r in runs.items() if r.get("status") == "diverged")),
      )
      for tuned, runs in by_tuned.items()
    )
    chosen = candidates[0]
    for candidate in candidates[1:]:
      if _better(candidate.score, chosen.score, higher_is_better):
        chosen = candidate
    runs = chosen.runs.values()
    selections.append(
      Selection(
        name=key[0],
        group=dict(zip(group_by, key[1:])),
        tuned=dict(zip(tune, chosen.tuned)),
        candidates=candidates,
        chosen=chosen,
        val=mean_std([r.get(metric) for r in runs]),
        test=mean_std([r.get(report) for r in runs]),
      )
    )
  if reference is None:
    return selections
  refs = [s for s in selections if s.name == reference]
  if len(refs) != 1:
    raise ValueError(
      f"reference {reference!r} must have exactly one group of runs, found {len(refs)}"
    )
  ref = refs[0].chosen.runs
  out = []
  for selection in selections:
    seeds = tuple(
      s
      for s in sorted(selection.chosen.runs)
      if s in ref
      and selection.chosen.runs[s].get(report) is not None
      and ref[s].get(report) is not None
    )
    diffs = [selection.chosen.runs[s][report] - ref[s][report] for s in seeds]
    out.append(dataclasses.replace(selection, paired=mean_std(diffs), paired_seeds=seeds))
  return out
