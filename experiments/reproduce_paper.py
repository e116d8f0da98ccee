"""Reproduce the paper's claim: k-step merging cuts inter-node traffic, AUC barely moves.

Zhao et al., "Communication-Efficient TeraByte-Scale Model Training Framework for Online
Advertising", https://arxiv.org/abs/2201.05500. Synthetic Criteo-like data with a known
teacher; DLRM; 2 nodes x 4 devices; synchronous sparse embeddings every step; dense layers
with synchronous Adam (DDP) or k-step Adam, k in {1, 2, 4, 8, 16, 32, 64}, averaging the
parameters only (production default) or the parameters and both Adam moments.

  python -m experiments.reproduce_paper            # full: 5 seeds x 15 runs
  python -m experiments.reproduce_paper --quick    # smoke run, under a minute
  python -m experiments.reproduce_paper --plot-only  # table + figures from the files

Hardware: 2 shared CPU cores, 8 simulated devices. Expected runtime: full 17-25 minutes,
quick about 1 minute. Writes OUT/runs.jsonl, OUT/<run>/metrics.jsonl, OUT/table.{csv,md}
and figures/paper_{auc_vs_k,traffic_vs_k,loss_curves}.png. Runs already in runs.jsonl are
skipped, so an interrupted run resumes (and a rerun into the committed results/reproduce_paper
only redraws; pass --out to start fresh). The logic lives in :mod:`experiments.paper`, the
figures in :mod:`experiments.plot.paper`.
"""

from __future__ import annotations

import argparse
import dataclasses

from experiments._common import use_cpu_devices
from experiments.paper import config
from experiments.paper import run
from experiments.paper import summary
from experiments.paper import table
from experiments.plot import paper as paper_figures


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="a smoke-sized grid")
  p.add_argument("--plot-only", action="store_true", help="rebuild table and figures only")
  p.add_argument(
    "--out",
    default=None,
    help="results directory (default: results/reproduce_paper, the committed "
    "run behind the figures; runs/reproduce_paper_quick with --quick)",
  )
  p.add_argument(
    "--figures",
    default=None,
    help="figures directory (default figures/, or OUT/figures with --quick)",
  )
  p.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides config)")
  p.add_argument("--steps", type=int, default=None, help="steps per run (overrides config)")
  args = p.parse_args(argv)

  cfg = config.QUICK if args.quick else config.FULL
  if args.seeds is not None:
    cfg = dataclasses.replace(cfg, seeds=tuple(range(args.seeds)))
  if args.steps is not None:
    cfg = dataclasses.replace(cfg, steps=args.steps)
  out = args.out or ("runs/reproduce_paper_quick" if args.quick else "results/reproduce_paper")
  figures = args.figures or (f"{out}/figures" if args.quick else "figures")
  if not args.plot_only:
    use_cpu_devices(8)  # 2 nodes x 4 devices; before the first JAX computation
    run.run_grid(cfg, out, log=lambda s: print(s, flush=True))
  runs = run.read_runs(out)
  if not runs:
    raise SystemExit(f"no results in {out}/runs.jsonl; run without --plot-only first")
  rows = summary.summarize(runs)
  text = table.write_table(rows, out, cfg)
  paper_figures.make_figures(out, figures)
  print(text)
  for variant in summary.kstep_variants(rows):
    k = summary.largest_safe_k(rows, variant)
    print(f"k-step Adam ({variant}): largest k with mean AUC within 0.001 of k=1: {k}")
  return text


if __name__ == "__main__":
  main()
