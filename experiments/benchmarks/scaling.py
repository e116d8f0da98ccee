r"""One process against two: the same CTR run, its throughput and its bytes per mesh axis.

  python -m experiments.benchmarks.scaling                       # 2 x 2 workers, 200 steps
  python -m experiments.benchmarks.scaling --quick --out runs/scaling.json

Each repeat trains the main job's model with the same flags twice, alternating: once as one
process simulating every device (``python -m experiments.train_ctr --nodes 2
--devices-per-node 2``) and once as two processes of two devices each under
``python -m kstep_adam.launch --num-processes 2``, where the ``'node'`` axis spans the
processes and the table is sharded between them. Printed per process count: examples/s
(compiling steps left out), the time breakdown per step, and the bytes each device sends per
step on each axis, dense (the k-step merges, the same program either way) and sparse (one
process: the parameter-server model; two: the all-to-all exchange as sent, padding
included); and the ratios of two processes to one, each from runs of the same invocation
(medians over the repeats for the times).

Both run on this machine's CPU cores over gloo, so the two-process run pays for its
exchange on loopback TCP and shares the cores with its twin's work; what a multi-host run
changes is in docs/multiprocess.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile

from experiments._cli import DefaultsHelpFormatter
from experiments._cli import add_config_args
from experiments._cli import config_from_args
from experiments._common import write_json
from kstep_adam._validation import check_int

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROCESS_COUNTS = (1, 2)


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
  """What the scaling benchmark runs.

  Attributes:
    steps: training steps of every run.
    batch_size: examples per worker per step.
    devices_per_node: devices of each process (its ``'local'`` axis); 2 nodes either way.
    table_rows: rows of the embedding table.
    k: merge period of k-step Adam.
    repeats: runs per process count, alternating between the two.
    timeout_seconds: the longest one run may take before it counts as hung.
  """

  steps: int = 200
  batch_size: int = 128
  devices_per_node: int = 2
  table_rows: int = 1 << 20
  k: int = 8
  repeats: int = 2
  timeout_seconds: int = 1800

  def __post_init__(self):
    for name in ("steps", "batch_size", "devices_per_node", "table_rows", "k", "repeats"):
      check_int(getattr(self, name), name)
    check_int(self.timeout_seconds, "timeout_seconds", minimum=10)


QUICK = dict(steps=30, batch_size=64, table_rows=1 << 16, repeats=1)


def command(config: ScalingConfig, processes: int, out_dir: str) -> list[str]:
  """The command line of one run."""
  train = [
    sys.executable,
    "-m",
    "experiments.train_ctr",
    "--nodes",
    "2",
    "--devices-per-node",
    str(config.devices_per_node),
    "--steps",
    str(config.steps),
    "--batch-size",
    str(config.batch_size),
    "--table-rows",
    str(config.table_rows),
    "--k",
    str(config.k),
    "--eval-every",
    "0",
    "--log-every",
    str(config.steps),
    "--test-examples",
    "2000",
    "--no-progress",
    "--out",
    out_dir,
  ]
  if processes == 1:
    return train
  launch = [sys.executable, "-m", "kstep_adam.launch", "--num-processes", str(processes), "--"]
  return launch + train


def run_once(config: ScalingConfig, processes: int, out_dir: str) -> dict:
  """Train once; return the run's summary (raises with the run's output if it failed)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run(
    command(config, processes, out_dir),
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=config.timeout_seconds,
    check=False,
  )
  if done.returncode != 0:
    raise RuntimeError(
      f"the {processes}-process run failed (status {done.returncode}):\n"
      f"{(done.stdout + done.stderr)[-3000:]}"
    )
  with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def per_step(summary: dict) -> dict:
  """What one run measured, per step where a total is per run."""
  steps = summary["steps"]
  return {
    "examples_per_sec": summary["examples_per_sec"],
    "seconds_per_step": {k: v / steps for k, v in summary["time_breakdown_seconds"].items() if v},
    "dense_bytes_per_step_by_axis": {
      k: v / steps for k, v in summary["dense_bytes_by_axis"].items()
    },
    "sparse_bytes_per_step_by_axis": {
      k: v / steps for k, v in summary["sparse_bytes_by_axis"].items()
    },
    "sparse_transport": summary["sparse_transport"],
    "test_auc": summary["test_auc"],
  }


def _ratio(a: float, b: float) -> float | None:
  return a / b if b else None


def report(runs: dict[int, list[dict]]) -> dict:
  """Medians per process count and the ratios of two processes to one."""
  medians = {}
  for processes, measured in runs.items():
    first = measured[0]
    medians[processes] = {
      **first,
      "examples_per_sec": statistics.median(m["examples_per_sec"] for m in measured),
      "examples_per_sec_runs": [m["examples_per_sec"] for m in measured],
      "seconds_per_step": {
        k: statistics.median(m["seconds_per_step"].get(k, 0.0) for m in measured)
        for k in first["seconds_per_step"]
      },
    }
  one, two = medians[1], medians[2]
  ratios = {
    "examples_per_sec": _ratio(two["examples_per_sec"], one["examples_per_sec"]),
    "paired_examples_per_sec": [
      _ratio(b["examples_per_sec"], a["examples_per_sec"]) for a, b in zip(runs[1], runs[2])
    ],
  }
  for kind in ("dense", "sparse"):
    key = f"{kind}_bytes_per_step_by_axis"
    ratios[f"{kind}_bytes_by_axis"] = {
      axis: _ratio(two[key][axis], one[key][axis]) for axis in one[key]
    }
  return {"processes": {str(p): m for p, m in medians.items()}, "two_over_one": ratios}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
  )
  add_config_args(parser, ScalingConfig)
  parser.add_argument(
    "--quick", action="store_true", help=f"a smoke run in about a minute: {QUICK}"
  )
  parser.add_argument("--out", default=None, help="write the report here as JSON (default: print)")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = config_from_args(ScalingConfig, args, **(QUICK if args.quick else {}))
  runs: dict[int, list[dict]] = {p: [] for p in PROCESS_COUNTS}
  with tempfile.TemporaryDirectory(prefix="scaling_") as scratch:
    for repeat in range(config.repeats):
      for processes in PROCESS_COUNTS:
        out_dir = os.path.join(scratch, f"p{processes}-{repeat}")
        summary = run_once(config, processes, out_dir)
        runs[processes].append(per_step(summary))
        print(
          f"{processes} process(es), run {repeat + 1}/{config.repeats}: "
          f"{summary['examples_per_sec']:.0f} examples/s",
          flush=True,
        )
  result = {"config": dataclasses.asdict(config), **report(runs)}
  print(json.dumps(result, indent=1))
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
