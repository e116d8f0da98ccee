"""Reproduce the paper's claim: k-step merging cuts inter-node traffic, AUC barely moves.

Zhao et al., "Communication-Efficient TeraByte-Scale Model Training Framework for Online
Advertising", https://arxiv.org/abs/2201.05500. Synthetic Criteo-like data with a known
teacher; DLRM; 2 nodes x 4 devices; synchronous sparse embeddings every step; dense layers
with synchronous Adam (DDP) or k-step Adam over a range of k, averaging the parameters only
(production default) or the parameters and both Adam moments.

  python -m experiments.reproduce_paper --out runs/paper  # the full grid (a fresh run)
  python -m experiments.reproduce_paper --quick           # smoke run into runs/
  python -m experiments.reproduce_paper --plot-only       # table + figures from the files

Writes OUT/config.json, OUT/runs.jsonl, OUT/<run>/metrics.jsonl, OUT/table.{csv,md} and
FIGURES/paper_{auc_vs_k,traffic_vs_k,loss_curves}.png. Runs already in runs.jsonl are skipped,
so an interrupted run resumes. Only the full config, unchanged, defaults to the committed
results/reproduce_paper (whose runs are all done, so it only redraws) and figures/; ``--quick``
or any changed grid flag defaults to runs/, and figures go beside their results (OUT/figures)
unless OUT is the committed directory. The grid, its flags and the full run's header (hardware,
runtime, expected result) are in :mod:`experiments.paper.config`; the logic in
:mod:`experiments.paper`, the figures in :mod:`experiments.plot.paper`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from experiments._cli import DefaultsHelpFormatter
from experiments._cli import add_config_args
from experiments._cli import add_debug_flag
from experiments._cli import config_from_args
from experiments._cli import user_errors
from experiments._common import use_cpu_devices
from experiments.paper import config
from experiments.paper import run
from experiments.paper import summary
from experiments.paper import table
from experiments.paper.config import PaperConfig
from experiments.plot import paper as paper_figures

COMMITTED_RESULTS, COMMITTED_FIGURES = "results/reproduce_paper", "figures"


def _parser(base: PaperConfig, *, add_help: bool = True) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=DefaultsHelpFormatter,
    add_help=add_help,
  )
  p.add_argument(
    "--quick", action="store_true", help="start from the quick grid (grid flags still apply)"
  )
  p.add_argument("--plot-only", action="store_true", help="rebuild table and figures only")
  p.add_argument(
    "--out",
    default=None,
    help=f"results directory (default: {COMMITTED_RESULTS} for the full config unchanged; "
    "runs/reproduce_paper_quick with --quick; runs/reproduce_paper otherwise)",
  )
  p.add_argument(
    "--figures",
    default=None,
    help=f"figures directory (default: {COMMITTED_FIGURES}/ when OUT is {COMMITTED_RESULTS}, "
    "else OUT/figures)",
  )
  add_config_args(
    p.add_argument_group("grid"),
    PaperConfig,
    aliases={"num_seeds": ["--seeds"]},
    defaults=dataclasses.asdict(base),
  )
  add_debug_flag(p)
  return p


def parse_args(argv=None) -> tuple[argparse.Namespace, PaperConfig]:
  """The flags and the config: :data:`~experiments.paper.config.QUICK` with ``--quick``, else
  :data:`~experiments.paper.config.FULL`, with any grid flag applied on top."""
  quick = _parser(config.FULL, add_help=False).parse_known_args(argv)[0].quick
  parser = _parser(config.QUICK if quick else config.FULL)
  args = parser.parse_args(argv)
  try:
    return args, config_from_args(PaperConfig, args)
  except ValueError as e:
    parser.error(str(e))


def output_dirs(args: argparse.Namespace, cfg: PaperConfig) -> tuple[str, str]:
  """``(results, figures)``: committed directories only for the full config, unchanged."""
  if args.out:
    out = args.out
  elif cfg == config.FULL:
    out = COMMITTED_RESULTS
  else:
    out = "runs/reproduce_paper_quick" if args.quick else "runs/reproduce_paper"
  committed = os.path.normpath(out) == COMMITTED_RESULTS
  figures = args.figures or (COMMITTED_FIGURES if committed else os.path.join(out, "figures"))
  return out, figures


@user_errors("reproduce_paper")
def main(argv=None) -> str:
  args, cfg = parse_args(argv)
  out, figures = output_dirs(args, cfg)
  if not args.plot_only:
    try:
      run.check_resumable(cfg, out)
    except ValueError as e:
      raise SystemExit(f"reproduce_paper: {e}") from None
    use_cpu_devices(8)  # 2 nodes x 4 devices; before the first JAX computation
    run.run_grid(cfg, out, log=lambda s: print(s, flush=True))
  runs = run.read_runs(out)
  if not runs:
    raise SystemExit(f"no results in {out}/runs.jsonl; run without --plot-only first")
  rows = summary.summarize(runs)
  text = table.write_table(rows, out, run.recorded_config(out) or cfg)
  paper_figures.make_figures(out, figures)
  print(text)
  for variant in summary.kstep_variants(rows):
    k = summary.largest_safe_k(rows, variant)
    print(f"k-step Adam ({variant}): largest k with mean AUC within 0.001 of k=1: {k}")
  return text


if __name__ == "__main__":
  main()
