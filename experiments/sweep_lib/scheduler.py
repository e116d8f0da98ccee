"""Run a sweep's runs in parallel worker processes, one slice of them per shard, resumably.

Every run is a process of its own (:mod:`.worker`): it asks JAX for its own device count, and
a crash or a leak ends with it. The scheduler keeps ``jobs`` of them going, rebuilds
``results.csv`` from the run directories after each one, and never records anything itself:
what a run wrote is the record. So a sweep killed at any moment and started again skips every
finished run, redoes the ones that died halfway, and waits for none that another process
(another shard, a sweep killed without its workers) is still running: their lock says so.

Two-stage tuning (:mod:`.stages`): the runs to do are rebuilt from the directory after each
run ends, so a group's stage 2 starts as soon as its stage 1 has finished. Under ``--shard
I/N`` with N > 1, a shard runs its slice of stage 1, then waits while another process still
holds a stage-1 run, and runs its slice of stage 2 only once all of stage 1 has finished in the
directory (so every shard slices the same stage-2 list); else it logs why and returns.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import experiments
from experiments._common import write_json
from experiments.sweep_lib import results
from experiments.sweep_lib import stages
from experiments.sweep_lib import worker
from experiments.sweep_lib.spec import Run
from experiments.sweep_lib.spec import SweepSpec
from kstep_adam._jsonio import read_json


@dataclasses.dataclass(frozen=True)
class Shard:
  """The ``index``-th of ``count`` disjoint slices of a sweep (0-based): every ``count``-th run
  from the ``index``-th on, so each slice gets a share of every optimizer and seed.

  Attributes:
    index: which slice, in [0, count).
    count: how many slices.
  """

  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not (isinstance(self.count, int) and self.count >= 1 and 0 <= self.index < self.count):
      raise ValueError(f"shard must be I/N with 0 <= I < N, got {self.index}/{self.count}")

  @classmethod
  def parse(cls, text: str) -> Shard:
    """``'2/8'`` -> ``Shard(2, 8)``.

    Examples:
      >>> Shard.parse("1/4").take(list(range(10)))
      [1, 5, 9]
    """
    try:
      index, count = (int(part) for part in text.split("/"))
    except ValueError:
      raise ValueError(f"shard must be I/N (e.g. 0/4), got {text!r}") from None
    return cls(index, count)

  def take(self, runs: list) -> list:
    return runs[self.index :: self.count]


@dataclasses.dataclass
class Outcome:
  """What one invocation did, by run id."""

  skipped: list[str] = dataclasses.field(default_factory=list)  # finished before
  completed: list[str] = dataclasses.field(default_factory=list)
  diverged: list[str] = dataclasses.field(default_factory=list)
  failed: list[str] = dataclasses.field(default_factory=list)
  busy: list[str] = dataclasses.field(default_factory=list)  # locked by another process


def default_jobs() -> int:
  """One run per usable CPU core."""
  return max(len(os.sched_getaffinity(0)), 1)


def _start(out_dir: str, spec: SweepSpec, run: Run) -> subprocess.Popen:
  path = worker.job_file(out_dir, run.run_id, "json")
  if not os.path.exists(path):
    write_json(path, results.run_record(run, spec.task))
  root = os.path.dirname(os.path.dirname(os.path.abspath(experiments.__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  with open(worker.job_file(out_dir, run.run_id, "log"), "a", encoding="utf-8") as log:
    return subprocess.Popen(
      [sys.executable, "-m", "experiments.sweep_lib.worker", out_dir, run.run_id],
      stdout=log,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      env=env,
    )


def _describe(summary: dict, task_metrics: tuple[str, ...]) -> str:
  parts = [summary["status"]]
  if summary.get("diverged_at_step") is not None:
    parts.append(f"at step {summary['diverged_at_step']}")
  for key in task_metrics:
    value = summary.get(key)
    if isinstance(value, float):
      parts.append(f"{key} {value:.4f}")
  return " ".join(parts)


def _stop(processes) -> None:
  for process in processes:
    if process.poll() is None:
      process.terminate()
  deadline = time.monotonic() + 10
  for process in processes:
    try:
      process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      process.kill()


def run_sweep(
  spec: SweepSpec,
  out_dir: str,
  *,
  jobs: int | None = None,
  shard: Shard = Shard(),
  log=print,
) -> Outcome:
  """Run every unfinished run of ``spec`` in this shard, ``jobs`` at a time, in ``out_dir``.

  Args:
    spec: the sweep.
    out_dir: the sweep directory (``sweep.json``, ``runs/``, ``results.csv``).
    jobs: worker processes at a time; None: :func:`default_jobs`.
    shard: the slice of the runs to run here.
    log: where progress lines go.

  Returns:
    The :class:`Outcome`; ``results.csv`` then holds every finished run of the spec, this
    shard's and any other's.

  Raises:
    ValueError: a run directory in ``out_dir`` was made with other fields.
  """
  from experiments.sweep_lib import tasks

  task = tasks.get(spec.task)
  jobs = default_jobs() if jobs is None else jobs
  if not (isinstance(jobs, int) and jobs >= 1):
    raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
  runs = spec.runs()
  results.check_recorded(out_dir, spec, runs)
  os.makedirs(out_dir, exist_ok=True)
  results.write_spec(out_dir, spec)
  outcome = Outcome()
  pending: list[Run] = []
  seen: set[str] = set()  # run ids skipped or queued by this invocation

  def mine(plan: stages.Plan) -> list[Run]:
    """This shard's runs of the plan (see the module docstring for stage 2 under shards)."""
    take = shard.take(plan.stage1)
    if plan.stage2 and (shard.count == 1 or plan.stage1_done):
      take += shard.take(plan.stage2)
    return take

  def add(candidates: list[Run]) -> int:
    added = 0
    for run in candidates:
      if run.run_id in seen:
        continue
      seen.add(run.run_id)
      if worker.read_summary(out_dir, run.run_id) is not None:
        outcome.skipped.append(run.run_id)
      else:
        pending.append(run)
        added += 1
    return added

  plan = stages.plan(out_dir, spec) if spec.two_stage else stages.Plan(runs, [], [], len(runs))
  add(mine(plan))
  if spec.two_stage:
    log(
      f"{spec.name}: two-stage tuning: {len(plan.stage1)} stage-1 runs (every grid point at "
      f"seeds {list(spec.tune_seeds)}), then each group's choice at seeds "
      f"{list(spec.stage2_seeds)}: {plan.total} runs in all; {len(plan.stage2)} stage-2 runs "
      f"known now, {len(plan.waiting)} groups wait for their stage 1"
    )
  log(
    f"{spec.name}: {plan.total} runs; shard {shard.index}/{shard.count} has "
    f"{len(outcome.skipped) + len(pending)}: {len(outcome.skipped)} finished before, "
    f"{len(pending)} to run, {jobs} at a time"
  )
  metrics = tuple(dict.fromkeys((task.selection_metric, task.report_metric)))
  running: dict[subprocess.Popen, tuple[Run, float]] = {}
  started, total = 0, len(pending)
  collected = None if spec.two_stage else runs  # None: results.collect asks the plan
  previous = signal.getsignal(signal.SIGTERM)

  def on_sigterm(signum, frame):
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, on_sigterm)
  try:
    while True:
      if not pending and not running:
        if not spec.two_stage:
          break
        plan = stages.plan(out_dir, spec)
        total += add(mine(plan))
        if pending:
          continue
        if plan.stage1_done or shard.count == 1:
          if plan.waiting:
            log(f"stage 2 waits for unfinished stage-1 runs of: {' '.join(plan.waiting)}")
          break
        if not any(worker.is_locked(out_dir, r.run_id) for r in plan.stage1):
          log(
            f"stage 2 waits for stage 1 to finish in {out_dir} (groups {' '.join(plan.waiting)}); "
            f"run this shard again once the other shards' stage-1 runs are done"
          )
          break
        time.sleep(2.0)  # another shard still runs stage-1 runs: wait for them
        continue
      while pending and len(running) < jobs:
        run = pending.pop(0)
        running[_start(out_dir, spec, run)] = (run, time.monotonic())
        started += 1
      time.sleep(0.2)
      for process in [p for p in running if p.poll() is not None]:
        run, start = running.pop(process)
        done = total - len(pending) - len(running)
        seconds = time.monotonic() - start
        if process.returncode == worker.EXIT_BUSY:
          outcome.busy.append(run.run_id)
          log(f"[{done}/{total}] {run.run_id}: under way in another process, left to it")
          continue
        summary = worker.read_summary(out_dir, run.run_id)
        if process.returncode == 0 and summary is not None:
          getattr(outcome, summary["status"]).append(run.run_id)
          log(f"[{done}/{total}] {run.run_id}: {_describe(summary, metrics)} ({seconds:.0f} s)")
        else:
          outcome.failed.append(run.run_id)
          log(
            f"[{done}/{total}] {run.run_id}: FAILED (exit {process.returncode}); see "
            f"{worker.job_file(out_dir, run.run_id, 'log')}"
          )
        results.write_results(out_dir, spec, collected)
        if spec.two_stage:
          total += add(mine(stages.plan(out_dir, spec)))
  finally:
    _stop(list(running))
    signal.signal(signal.SIGTERM, previous)
  results.write_results(out_dir, spec, collected)
  return outcome


def status(out_dir: str, spec: SweepSpec) -> dict[str, list[str]]:
  """Every run of ``spec`` by state: completed, diverged, failed, running, pending; with
  two-stage tuning only the runs known so far (:func:`.stages.plan`), and ``stage 2 unknown``:
  the groups whose stage-1 runs have not all finished."""
  states: dict[str, list[str]] = {
    k: [] for k in ("completed", "diverged", "failed", "running", "pending")
  }
  plan = stages.plan(out_dir, spec)
  if spec.two_stage:
    states["stage 2 unknown"] = plan.waiting
  for run in plan.runs:
    summary = worker.read_summary(out_dir, run.run_id)
    if summary is not None:
      states[summary["status"]].append(run.run_id)
    elif worker.is_locked(out_dir, run.run_id):
      states["running"].append(run.run_id)
    elif os.path.exists(worker.job_file(out_dir, run.run_id, "failed.json")):
      states["failed"].append(run.run_id)
    else:
      states["pending"].append(run.run_id)
  return states


def failure(out_dir: str, run_id: str) -> str:
  """The last line of a failed run's traceback (a killed run left none: its log says more)."""
  path = worker.job_file(out_dir, run_id, "failed.json")
  try:
    lines = str(read_json(path, keys=("traceback",))["traceback"]).strip().splitlines()
  except (OSError, ValueError):  # it ended without one (killed, exit 1 from a signal)
    return f"no traceback (killed?); see {worker.job_file(out_dir, run_id, 'log')}"
  return lines[-1] if lines else "(no traceback)"
