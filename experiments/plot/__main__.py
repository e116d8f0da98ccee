"""Draw the figures of result directories: ``python -m experiments.plot DIR [DIR ...] --out FIGS``.

Each directory is recognized by what it holds and drawn by its module of this package:

* a sweep directory (``sweep.json``, from ``python -m experiments.sweep``):
  :mod:`experiments.plot.sweep`;
* the paper experiment's (``runs.jsonl`` and ``config.json``, e.g.
  ``results/reproduce_paper``): :mod:`experiments.plot.paper`;
* the convergence experiment's (``checks.json``, e.g. ``results/convergence_rate``):
  :mod:`experiments.plot.convergence`;
* a CTR run with an adaptive period (``--k auto``: merge records in ``metrics.jsonl``):
  :mod:`experiments.plot.adaptive`.

``python -m experiments.plot results/reproduce_paper results/convergence_rate --out figures``
redraws the committed figures of both experiments, as their ``--plot-only`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

KINDS = ("sweep", "paper", "convergence", "adaptive")


def kind_of(directory: str) -> str:
  """Which experiment wrote ``directory``; ValueError if none did."""
  has = lambda name: os.path.exists(os.path.join(directory, name))
  if has("sweep.json"):
    return "sweep"
  if has("runs.jsonl") and has("config.json"):
    return "paper"
  if has("checks.json"):
    return "convergence"
  from experiments.plot.adaptive import has_merge_records

  if has_merge_records(directory):
    return "adaptive"
  raise ValueError(
    f"{directory}: not a results directory: expected sweep.json (a sweep), runs.jsonl and "
    f"config.json (reproduce_paper), checks.json (convergence_rate) or a metrics.jsonl with "
    f"merge records (a --k auto run)"
  )


def draw(directory: str, fig_dir: str) -> list[str]:
  """The figures of one results directory, written to ``fig_dir``."""
  kind = kind_of(directory)
  if kind == "sweep":
    from experiments.plot import sweep

    return sweep.make_figures(directory, fig_dir)
  if kind == "paper":
    from experiments.plot import paper

    return paper.make_figures(directory, fig_dir)
  if kind == "adaptive":
    from experiments.plot import adaptive

    return adaptive.make_figures(directory, fig_dir)
  from experiments.plot import convergence

  with open(os.path.join(directory, "checks.json"), encoding="utf-8") as f:
    return convergence.make_figures(json.load(f), fig_dir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.plot", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("dirs", nargs="+", metavar="DIR", help="results directories")
  parser.add_argument("--out", required=True, help="directory for the figures")
  args = parser.parse_args(argv)
  for directory in args.dirs:
    try:
      paths = draw(directory, args.out)
    except ValueError as e:
      parser.error(str(e))
    for path in paths:
      print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
