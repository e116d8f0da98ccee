"""Measure convergence rates of k-step Adam and its baselines against what the theorems state.

Usage:
  python -m experiments.convergence_rate [--quick] [--check] [--out DIR] [--figures DIR]
  python -m experiments.convergence_rate --plot-only --out DIR [--figures DIR] [--check]

Writes ``DIR/results.jsonl`` (every run, every grid step size), ``DIR/checks.json`` (the checks
table and the curves the figures draw) and the figures ``convergence_*.png``. Everything
defaults to ``runs/``: the committed ``results/convergence_rate`` and ``figures/`` are written
only when named explicitly (docs/convergence.md gives the full run's command). ``--check`` exits with
status 1 when an enforced check fails. The logic lives in :mod:`experiments.convergence`, the
configs (with the run header) in :mod:`experiments.convergence.configs`, the figures in
:mod:`experiments.plot.convergence`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from experiments import _cli
from experiments import _common
from experiments.convergence import checks as checks_lib
from experiments.convergence import configs
from experiments.convergence import sweeps
from experiments.plot import convergence as plot_convergence


@dataclasses.dataclass(frozen=True)
class Command:
  """What one invocation does.

  Attributes:
    quick: run the smoke-size config (about a minute); its numbers are not evidence.
    check: exit with status 1 when an enforced check fails.
    out: directory for results.jsonl and checks.json; None: runs/convergence_rate (with
      --quick: runs/convergence_rate_quick).
    figures: directory for the figures; None: <out>/figures.
    plot_only: rebuild checks.json and the figures from <out>/results.jsonl without running;
      the checks are those of the config that wrote the file.
  """

  quick: bool = False
  check: bool = False
  out: str | None = None
  figures: str | None = None
  plot_only: bool = False

  @property
  def out_dir(self) -> str:
    if self.out is not None:
      return self.out
    return os.path.join("runs", "convergence_rate_quick" if self.quick else "convergence_rate")

  @property
  def figures_dir(self) -> str:
    return self.figures if self.figures is not None else os.path.join(self.out_dir, "figures")


@_cli.user_errors("convergence_rate")
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _cli.add_config_args(parser, Command)
  _cli.add_debug_flag(parser)
  cmd = _cli.config_from_args(Command, parser.parse_args(argv))
  results_path = os.path.join(cmd.out_dir, "results.jsonl")
  if cmd.plot_only:
    if not os.path.exists(results_path):
      parser.error(f"--plot-only needs {results_path}; run without --plot-only first")
    records = _common.read_jsonl(results_path)
    names = {r["config"] for r in records}
    if len(names) != 1:
      raise ValueError(f"{results_path}: expected records of one config, found {sorted(names)}")
    config = configs.by_name(names.pop())
  else:
    config = configs.QUICK if cmd.quick else configs.FULL
    records = sweeps.run_config(config)
    _common.write_jsonl(results_path, records)
  checks = checks_lib.run_checks(records, config)
  _common.write_json(os.path.join(cmd.out_dir, "checks.json"), checks)
  print(checks_lib.format_table(checks))
  for path in plot_convergence.make_figures(checks, cmd.figures_dir):
    print(f"wrote {path}")
  if not cmd.check:
    return 0
  failed = len(checks["failed"])
  if failed:
    print(f"--check: FAILED: {failed} enforced check(s) failed; exit status 1", file=sys.stderr)
    return 1
  print("--check: passed: no enforced check failed; exit status 0")
  return 0


if __name__ == "__main__":
  sys.exit(main())
