"""A sweep declared in one TOML file, and the runs it expands to.

A sweep file names its task, the seeds, the fields every run shares (``[base]``), and one
``[[optimizers]]`` table per compared optimizer: a unique ``name`` and its fields, where a list
is a grid (``learning_rate = [1e-3, 3e-3]``, ``k = [4, 16]``). A field whose value is itself a
sequence (a CTR ``top_mlp``) is a grid when given a list of lists. ``[quick]`` derives the
smoke-size sweep of ``--quick`` from the same file: its ``seeds``, its ``base`` (merged over
``[base]``), the ``optimizers`` it keeps, and per optimizer a ``quick`` table merged over that
optimizer's fields.

A run is one point of one optimizer's grid at one seed; its ``run_id`` says which, e.g.
``kstep_adam-params-k16-lr0.003-s1``, and is the name of its directory. Expansion validates every
run's configuration (the task builds it), so a typo fails before the first run, naming the file
and the optimizer.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from experiments.sweep_lib import tasks

# Short spellings of common grid fields in run ids; any other field keeps its name.
ID_ABBREVIATIONS = {
  "learning_rate": "lr",
  "outer_learning_rate": "olr",
  "sparse_learning_rate": "slr",
  "momentum": "mom",
  "outer_momentum": "omom",
}
# A name that names a directory: the sweep's and each optimizer's (no '/', no '..' alone).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9.+_-]*"
# The most runs a sweep may expand to: a larger grid is refused with its size, before any is
# built (a typo such as a 1000-value list in five fields otherwise fills the memory).
MAX_RUNS = 100_000
TOP_LEVEL_KEYS = (
  "name",
  "task",
  "description",
  "seeds",
  "tune_seeds",
  "tune",
  "reference",
  "base",
  "quick",
)
QUICK_KEYS = ("seeds", "tune_seeds", "base", "optimizers")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One compared optimizer of a sweep.

  Attributes:
    name: unique label; the first part of its runs' ids and their ``name`` column.
    fixed: fields with one value.
    grid: ``(field, values)`` pairs, in file order; every combination is run.
  """

  name: str
  fixed: Mapping[str, Any]
  grid: tuple[tuple[str, tuple], ...]

  @property
  def size(self) -> int:
    """How many grid points :meth:`points` gives (computed, not built)."""
    return math.prod(len(values) for _, values in self.grid)

  def points(self) -> list[dict]:
    """Every combination of the grid's values, as ``{field: value}``."""
    fields = [field for field, _ in self.grid]
    return [dict(zip(fields, values)) for values in itertools.product(*(v for _, v in self.grid))]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep.

  Attributes:
    run_id: unique, stable name: optimizer name, grid values, seed.
    name: the optimizer's name in the sweep.
    seed: the run's seed.
    grid: the run's values of its optimizer's grid fields.
    params: every field the task reads (base, optimizer, grid point and seed).
  """

  run_id: str
  name: str
  seed: int
  grid: Mapping[str, Any]
  params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """A parsed sweep file.

  Attributes:
    name: the sweep's name (figure titles, default output directory).
    task: the task every run trains (:data:`experiments.sweep_lib.tasks.TASKS`).
    description: one line on what the sweep compares.
    seeds: every run is repeated at each seed.
    tune: fields selected on the validation metric per group (the other grid fields and the
      optimizer's name form the group).
    reference: the optimizer name that paired differences and the time-to-target use; None:
      none.
    base: fields every run shares.
    optimizers: the compared optimizers.
    source: the file the sweep was read from.
    quick: whether the file's ``[quick]`` part was applied.
    tune_seeds: the seeds the tuned values are chosen on (two-stage tuning, see the module
      docstring); None: every seed.
  """

  name: str
  task: str
  description: str
  seeds: tuple[int, ...]
  tune: tuple[str, ...]
  reference: str | None
  base: Mapping[str, Any]
  optimizers: tuple[Optimizer, ...]
  source: str = ""
  quick: bool = False
  tune_seeds: tuple[int, ...] | None = None

  @property
  def two_stage(self) -> bool:
    """Whether only the tune seeds run every grid point (``tune_seeds`` a proper subset)."""
    return self.tune_seeds is not None and set(self.tune_seeds) != set(self.seeds)

  @property
  def stage2_seeds(self) -> tuple[int, ...]:
    """The seeds only the chosen candidates run (none unless :attr:`two_stage`)."""
    if not self.two_stage:
      return ()
    return tuple(s for s in self.seeds if s not in self.tune_seeds)

  def stage1_runs(self) -> list[Run]:
    """The runs known before any selection: every run at the tune seeds (all if not two-stage)."""
    runs = self.runs()
    if not self.two_stage:
      return runs
    return [run for run in runs if run.seed in self.tune_seeds]

  @property
  def grid_fields(self) -> tuple[str, ...]:
    """Every field some optimizer grids over, in first-seen order."""
    return tuple(dict.fromkeys(f for o in self.optimizers for f, _ in o.grid))

  def group_fields(self) -> tuple[str, ...]:
    """Columns that, with ``name``, identify a group of runs compared after tuning."""
    return tuple(f for f in self.grid_fields if f not in self.tune)

  def runs(self) -> list[Run]:
    """Every run, seed by seed (so a partial sweep has whole seeds first), validated."""
    task = tasks.get(self.task)
    runs, seen = [], {}
    for seed in self.seeds:
      for optimizer in self.optimizers:
        for point in optimizer.points():
          params = {**self.base, **optimizer.fixed, **point, "seed": seed}
          run_id = make_run_id(optimizer.name, point, seed)
          if run_id in seen:
            raise ValueError(
              f"{self.source}: optimizers {seen[run_id]!r} and {optimizer.name!r} both give the "
              f"run id {run_id!r}; rename one"
            )
          seen[run_id] = optimizer.name
          runs.append(Run(run_id, optimizer.name, seed, point, params))
    for run in runs[: len(runs) // max(len(self.seeds), 1)]:  # one seed checks every config
      try:
        task.validate(dict(run.params))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{self.source}: optimizer {run.name!r} (run {run.run_id}): {e}") from None
    return runs

  def to_json(self) -> dict:
    """The spec as plain JSON data (``sweep.json`` in a sweep directory)."""
    return {
      "name": self.name,
      "task": self.task,
      "description": self.description,
      "seeds": list(self.seeds),
      "tune": list(self.tune),
      "reference": self.reference,
      "base": dict(self.base),
      "optimizers": [
        {"name": o.name, "fixed": dict(o.fixed), "grid": {f: list(v) for f, v in o.grid}}
        for o in self.optimizers
      ],
      "source": self.source,
      "quick": self.quick,
      "tune_seeds": None if self.tune_seeds is None else list(self.tune_seeds),
    }

  @classmethod
  def from_json(cls, record: dict) -> SweepSpec:
    """Inverse of :meth:`to_json`."""
    optimizers = tuple(
      Optimizer(o["name"], dict(o["fixed"]), tuple((f, tuple(v)) for f, v in o["grid"].items()))
      for o in record["optimizers"]
    )
    return cls(
      name=record["name"],
      task=record["task"],
      description=record["description"],
      seeds=tuple(record["seeds"]),
      tune=tuple(record["tune"]),
      reference=record["reference"],
      base=dict(record["base"]),
      optimizers=optimizers,
      source=record.get("source", ""),
      quick=record.get("quick", False),
      tune_seeds=None if record.get("tune_seeds") is None else tuple(record["tune_seeds"]),
    )


def format_value(value) -> str:
  """A grid value as it appears in a run id: exact (``repr`` of a float), no odd characters.

  Examples:
    >>> format_value(0.003), format_value(16), format_value("params+nu"), format_value([64, 32])
    ('0.003', '16', 'params+nu', '64x32')
  """
  if isinstance(value, (list, tuple)):
    return "x".join(format_value(v) for v in value)
  if isinstance(value, bool):
    return str(value).lower()
  text = repr(value) if isinstance(value, float) else str(value)
  return re.sub(r"[^A-Za-z0-9.+_]", "_", text)


def make_run_id(name: str, point: Mapping[str, Any], seed: int) -> str:
  """``NAME-<field><value>...-s<seed>``, e.g. ``kstep_adam-params-k16-lr0.003-s1``.

  Examples:
    >>> make_run_id("diloco", {"k": 16, "learning_rate": 0.001}, 2)
    'diloco-k16-lr0.001-s2'
  """
  parts = [name]
  for field, value in point.items():
    parts.append(ID_ABBREVIATIONS.get(field, field) + format_value(value))
  return "-".join([*parts, f"s{seed}"])


def _check_keys(where: str, table: Mapping, allowed: tuple[str, ...]) -> None:
  unknown = [key for key in table if key not in allowed]
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown!r}; allowed: {list(allowed)!r}")


def _is_grid(task, field: str, value) -> bool:
  """A list is a grid, except a flat list given to a field whose value is a sequence."""
  if not isinstance(value, list):
    return False
  if task.is_sequence_field(field):
    return bool(value) and all(isinstance(v, list) for v in value)
  return True


def _as_value(task, field: str, value):
  """TOML lists become tuples where the task's field holds a sequence."""
  if task.is_sequence_field(field) and isinstance(value, list):
    return tuple(value)
  return value


def _optimizer(task, where: str, table: Mapping) -> Optimizer:
  name = table.get("name")
  if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
    raise ValueError(
      f"{where}: needs a name of letters, digits, '.', '+', '_' and '-' (it names run "
      f"directories), got {name!r}"
    )
  fixed, grid = {}, []
  for field, value in table.items():
    if field in ("name", "quick"):
      continue
    if field == "seed":
      raise ValueError(f"{where} ({name}): set seeds at the top level (seeds = [...]), not here")
    task.check_field(field, f"{where} ({name})")
    if _is_grid(task, field, value):
      values = tuple(_as_value(task, field, v) for v in value)
      if not values or len(set(map(repr, values))) != len(values):
        raise ValueError(
          f"{where} ({name}): the grid {field} = {value!r} must be non-empty without repeats"
        )
      grid.append((field, values))
    else:
      fixed[field] = _as_value(task, field, value)
  return Optimizer(name, fixed, tuple(grid))


def parse(document: Mapping, *, source: str = "<sweep>", quick: bool = False) -> SweepSpec:
  """Build a :class:`SweepSpec` from a parsed TOML document (see the module docstring).

  Raises:
    ValueError: naming ``source`` and the table, for an unknown key or field, a missing
      name or task, an empty or repeated grid, an unknown reference, or a duplicate name.

  Examples:
    >>> spec = parse({
    ...   "name": "demo", "task": "ctr", "seeds": [0, 1],
    ...   "base": {"steps": 10, "nodes": 1, "devices_per_node": 2, "val_examples": 1000},
    ...   "optimizers": [{"name": "sgd", "optimizer": "local_sgd", "k": [2, 4]}],
    ... })
    >>> [run.run_id for run in spec.runs()]
    ['sgd-k2-s0', 'sgd-k4-s0', 'sgd-k2-s1', 'sgd-k4-s1']
  """
  document = dict(document)
  optimizer_tables = document.pop("optimizers", None)
  _check_keys(source, document, TOP_LEVEL_KEYS)
  for key in ("name", "task"):
    if not isinstance(document.get(key), str) or not document[key]:
      raise ValueError(f'{source}: needs {key} = "..."')
  if not re.fullmatch(NAME_PATTERN, document["name"]):
    raise ValueError(
      f"{source}: name must be letters, digits, '.', '+', '_' and '-' (it names the sweep's "
      f"directory), got {document['name']!r}"
    )
  try:
    task = tasks.get(document["task"])
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None
  if not isinstance(optimizer_tables, list) or not optimizer_tables:
    raise ValueError(f"{source}: needs at least one [[optimizers]] table")
  base = dict(document.get("base", {}))
  seeds = document.get("seeds", [0])
  tune_seeds = document.get("tune_seeds")
  quick_table = dict(document.get("quick", {}))
  _check_keys(f"{source} [quick]", quick_table, QUICK_KEYS)
  if quick:
    seeds = quick_table.get("seeds", seeds)
    tune_seeds = quick_table.get("tune_seeds", tune_seeds)
    base = {**base, **quick_table.get("base", {})}
    kept = quick_table.get("optimizers")
    if kept is not None:
      names = [t.get("name") for t in optimizer_tables]
      missing = [n for n in kept if n not in names]
      if missing:
        raise ValueError(f"{source} [quick]: optimizers {missing!r} are not in the sweep")
      optimizer_tables = [t for t in optimizer_tables if t.get("name") in kept]
    optimizer_tables = [{**t, **t.get("quick", {})} for t in optimizer_tables]
  for field, value in base.items():
    if field == "seed":
      raise ValueError(f"{source} [base]: set seeds at the top level (seeds = [...]), not here")
    task.check_field(field, f"{source} [base]")
    base[field] = _as_value(task, field, value)
  if (
    not isinstance(seeds, list)
    or not seeds
    or not all(isinstance(s, int) and s >= 0 for s in seeds)
    or len(set(seeds)) != len(seeds)
  ):
    raise ValueError(
      f"{source}: seeds must be a non-empty list of distinct ints >= 0, got {seeds!r}"
    )
  optimizers = tuple(
    _optimizer(task, f"{source} [[optimizers]] #{i + 1}", t) for i, t in enumerate(optimizer_tables)
  )
  size = len(seeds) * sum(o.size for o in optimizers)
  if size > MAX_RUNS:
    grids = ", ".join(f"{o.name}: {o.size}" for o in optimizers)
    raise ValueError(
      f"{source}: the sweep has {size:,} runs ({len(seeds)} seeds x grid points {grids}), more "
      f"than the {MAX_RUNS:,} a sweep may have; use fewer values per grid field"
    )
  names = [o.name for o in optimizers]
  if len(set(names)) != len(names):
    raise ValueError(f"{source}: optimizer names must be unique, got {names!r}")
  tune = document.get("tune", ["learning_rate"])
  if not isinstance(tune, list) or not all(isinstance(f, str) for f in tune):
    raise ValueError(f"{source}: tune must be a list of field names, got {tune!r}")
  for field in tune:
    task.check_field(field, f"{source} tune")
  if tune_seeds is not None:
    where = f"{source}{' [quick]' if quick and 'tune_seeds' in quick_table else ''}: tune_seeds"
    if not isinstance(tune_seeds, list) or not all(
      isinstance(s, int) and not isinstance(s, bool) for s in tune_seeds
    ):
      raise ValueError(f"{where} must be a list of ints (a subset of seeds), got {tune_seeds!r}")
    if not tune_seeds:
      raise ValueError(f"{where} must not be empty (omit it to tune on every seed)")
    if len(set(tune_seeds)) != len(tune_seeds):
      raise ValueError(f"{where} has repeated seeds: {tune_seeds!r}")
    extra = [s for s in tune_seeds if s not in seeds]
    if extra:
      raise ValueError(
        f"{where} must be a subset of the seeds {seeds!r}{' (quick)' if quick else ''}; "
        f"{extra!r} are not"
      )
    if "tune" not in document or not tune:
      raise ValueError(
        f"{source}: tune_seeds needs tune = [...] naming the fields chosen on those seeds"
      )
  reference = document.get("reference")
  if reference is not None and reference not in names:
    raise ValueError(f"{source}: reference {reference!r} is not an optimizer name; have {names!r}")
  return SweepSpec(
    name=document["name"],
    task=document["task"],
    description=str(document.get("description", "")),
    seeds=tuple(seeds),
    tune=tuple(tune),
    reference=reference,
    base=base,
    optimizers=optimizers,
    source=source,
    quick=quick,
    tune_seeds=None if tune_seeds is None else tuple(tune_seeds),
  )


def load(path: str, *, quick: bool = False) -> SweepSpec:
  """Read and parse the sweep file ``path`` (TOML); errors name the file (and line)."""
  try:
    with open(path, "rb") as f:
      document = tomllib.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path}: no such sweep file") from None
  except tomllib.TOMLDecodeError as e:
    raise ValueError(f"{path}: not valid TOML ({e})") from None
  return parse(document, source=path, quick=quick)
