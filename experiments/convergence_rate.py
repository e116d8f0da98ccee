"""Measure convergence rates of k-step Adam and its baselines against the theory.

Usage:
  python -m experiments.convergence_rate [--quick] [--check] [--out DIR] [--figures DIR]
  python -m experiments.convergence_rate --plot-only --out DIR [--figures DIR]

Writes ``DIR/results.jsonl`` (every run), ``DIR/checks.json`` (the checks table) and the
figures ``convergence_*.png`` (to ``--figures``; default ``figures/`` for the full run and
``DIR/figures`` for ``--quick``). ``--check`` exits with status 1 when an explicit-constant
bound is violated or a T-slope falls outside its interval. The logic lives in
:mod:`experiments.convergence`; the configs (with their run headers) in
:mod:`experiments.convergence.configs`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from experiments.convergence import checks as checks_lib
from experiments.convergence import configs
from experiments.convergence import plots
from experiments.convergence import sweeps


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smoke run (about a minute)")
  parser.add_argument(
    "--check", action="store_true", help="exit 1 if a covered bound is violated or a slope is off"
  )
  parser.add_argument("--out", default="results/convergence_rate", help="output directory")
  parser.add_argument("--figures", default=None, help="figure directory")
  parser.add_argument(
    "--plot-only", action="store_true", help="rebuild checks and figures from DIR/results.jsonl"
  )
  args = parser.parse_args(argv)

  config = configs.quick() if args.quick else configs.full()
  fig_dir = args.figures or (os.path.join(args.out, "figures") if args.quick else "figures")
  results_path = os.path.join(args.out, "results.jsonl")
  if args.plot_only:
    if not os.path.exists(results_path):
      parser.error(f"--plot-only needs {results_path}; run without --plot-only first")
  else:
    sweeps.run_config(config, args.out)

  checks = checks_lib.run_checks(
    checks_lib.load_records(results_path), adam_c_max=config["adam_c_max"]
  )
  checks_path = os.path.join(args.out, "checks.json")
  with open(checks_path, "w") as fh:
    json.dump(checks, fh, indent=1)
  print(checks_lib.format_table(checks))
  for path in plots.make_figures(results_path, checks_path, fig_dir):
    print(f"wrote {path}")
  if args.check and checks["failed"]:
    print(f"--check: {len(checks['failed'])} bound/slope check(s) failed", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
