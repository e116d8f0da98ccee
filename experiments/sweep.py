r"""Run a sweep: every optimizer, grid point and seed of one sweep file, resumably, in parallel.

Usage:
  python -m experiments.sweep CONFIG --out DIR [--quick] [--jobs N] [--shard I/N]
  python -m experiments.sweep CONFIG --out DIR --table-only   # results and table from DIR
  python -m experiments.sweep CONFIG --out DIR --status       # what is done, running, left

CONFIG is a sweep file (``experiments/sweeps/ctr_optimizers.toml``) or the name of a shipped
one (``ctr_optimizers``). Each run writes ``DIR/runs/RUN_ID/`` (``metrics.jsonl``,
``summary.json``); ``DIR/results.csv`` (one row per finished run), ``DIR/selection.csv`` and
``DIR/table.md`` (the best learning rate per optimizer on validation, its test metric over
seeds) are rebuilt from those directories. Running the same command again skips finished runs
and redoes runs that died halfway. ``--shard I/N`` runs the I-th (0-based) of N disjoint
slices, so a cluster array job splits one sweep with no coordinator, e.g. under SLURM:

  #SBATCH --array=0-7
  python -m experiments.sweep ctr_optimizers --out /shared/sweep --jobs 1 \
    --shard $SLURM_ARRAY_TASK_ID/8

then ``--table-only`` once all are done. With ``tune_seeds`` in the sweep file (two-stage
tuning, see :mod:`experiments.sweep_lib.spec`) a shard runs its slice of stage 2 only once all
of stage 1 has finished in DIR: it waits while other shards still run stage-1 runs, else says
so and stops; run it again then. ``--dry-run`` lists the stage-1 runs and the stage-2 runs
already determined by what DIR holds. Figures: ``python -m experiments.plot DIR --out FIGS``.
The logic is in :mod:`experiments.sweep_lib`, the sweep files in ``experiments/sweeps/``.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments._cli import DefaultsHelpFormatter
from experiments._cli import add_debug_flag
from experiments._cli import user_errors
from experiments.sweep_lib import report
from experiments.sweep_lib import results
from experiments.sweep_lib import scheduler
from experiments.sweep_lib import spec as spec_lib
from experiments.sweep_lib import stages

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweeps")


def resolve(config: str) -> str:
  """A sweep file's path: ``config`` itself, or the shipped ``experiments/sweeps/CONFIG.toml``."""
  if os.path.exists(config) or os.sep in config or config.endswith(".toml"):
    return config
  return os.path.join(SHIPPED, f"{config}.toml")


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
  )
  parser.add_argument("config", help="sweep file, or the name of one in experiments/sweeps/")
  parser.add_argument(
    "--out",
    default=None,
    help="sweep directory (default: runs/sweeps/NAME, or runs/sweeps/NAME_quick with --quick)",
  )
  parser.add_argument("--quick", action="store_true", help="the file's smoke-size [quick] sweep")
  parser.add_argument(
    "--jobs",
    type=int,
    default=None,
    help=f"runs at a time, each its own process (default: the usable cores, here "
    f"{scheduler.default_jobs()})",
  )
  parser.add_argument(
    "--shard", default="0/1", help="run only the I-th (0-based) of N disjoint slices: I/N"
  )
  action = parser.add_mutually_exclusive_group()
  action.add_argument(
    "--table-only", action="store_true", help="rebuild results and table from DIR, run nothing"
  )
  action.add_argument("--status", action="store_true", help="list the runs by state, run nothing")
  action.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
  add_debug_flag(parser)
  return parser


@user_errors("sweep")
def main(argv=None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  try:
    shard = scheduler.Shard.parse(args.shard)
  except ValueError as e:
    parser.error(str(e))
  # A bad sweep file is one line naming it (user_errors), not a usage message.
  spec = spec_lib.load(resolve(args.config), quick=args.quick)
  runs = spec.runs()
  out = args.out or os.path.join("runs", "sweeps", spec.name + ("_quick" if args.quick else ""))
  plan = stages.plan(out, spec) if spec.two_stage else stages.Plan(runs, [], [], len(runs))
  if args.dry_run:
    for run in shard.take(plan.stage1):
      print(run.run_id)
    if spec.two_stage:
      for run in shard.take(plan.stage2) if shard.count == 1 or plan.stage1_done else []:
        print(run.run_id)
      print(
        f"# stage 2: the chosen candidate of each group at seeds {list(spec.stage2_seeds)}; "
        f"{len(plan.stage2)} runs listed as chosen from {out}, the stage 2 of "
        f"{len(plan.waiting)} groups depends on the selection after their stage 1"
      )
    return 0
  if args.status:
    states = scheduler.status(out, spec)
    for state, ids in states.items():
      print(f"{state}: {len(ids)}" + (f"  {' '.join(ids)}" if ids and state != "completed" else ""))
    return 0
  if args.table_only:
    try:
      results.check_recorded(out, spec, runs)
    except ValueError as e:
      raise SystemExit(f"sweep: {e}") from None
    rows = results.write_results(out, spec, plan.runs)
  else:
    try:
      outcome = scheduler.run_sweep(
        spec, out, jobs=args.jobs, shard=shard, log=lambda s: print(s, flush=True)
      )
    except ValueError as e:
      raise SystemExit(f"sweep: {e}") from None
    rows = results.read_results(os.path.join(out, results.RESULTS_FILE))
    for run_id in outcome.failed:
      print(f"failed: {run_id}: {scheduler.failure(out, run_id)}", file=sys.stderr)
    if outcome.busy:
      print(f"left to other processes (still running): {' '.join(outcome.busy)}")
  total = stages.plan(out, spec).total if spec.two_stage else len(runs)
  print(f"{len(rows)} of {total} runs finished; wrote {os.path.join(out, 'results.csv')}")
  if rows:
    print(report.write_report(out, spec, rows))
    print(f"figures: python -m experiments.plot {out} --out FIGURES_DIR")
  return 1 if not args.table_only and outcome.failed else 0


if __name__ == "__main__":
  sys.exit(main())
