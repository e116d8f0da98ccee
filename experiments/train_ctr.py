r"""Train one CTR model with the k-step Adam workflow: the README's main job.

Command (synthetic Criteo-shaped data with a hidden teacher; DLRM with k-step Adam, k = 8, on
2 nodes x 4 devices; 800 steps of 1024 examples, evaluated every 200):

  python -m experiments.train_ctr --out runs/train_ctr

Hardware: a CPU with 8 simulated devices (``jax_num_cpu_devices``); the same command runs
unchanged on accelerators. Measured runtime: the README and docs/ctr.md.
Expected result: test AUC 0.7895 against the teacher's (Bayes-optimal) 0.8203.

Your own data (without ``--test-data`` the lines in the last ``--test-fraction`` of the file's
bytes are the test set, a time split):

  python -m experiments.train_ctr --data criteo:day_0_100k.txt.gz --out runs/criteo
  python -m experiments.train_ctr --data csv:avazu_train.csv --test-data csv:avazu_test.csv

Checkpoints, and a run that continues exactly where a killed one stopped:

  python -m experiments.train_ctr --checkpoint-every 100 --out runs/ckpt
  python -m experiments.train_ctr --checkpoint-every 100 --out runs/ckpt --resume

Every optimizer of the family runs on the same harness, sparse tier and byte accounting
(``--optimizer sync_adam|kstep_adam|local_sgd|diloco|onebit_adam|topk_ef``, with ``--sync``,
``--form``, ``--k``, ``--momentum``, ``--outer-learning-rate``, ``--density``,
``--warmup-steps``), and ``--dense-tower 2048 1024`` gives the DLRM 2.9M dense parameters:

  python -m experiments.train_ctr --optimizer diloco --k 16 --dense-tower 2048 1024

Every flag comes from :class:`kstep_adam.ctr.DataConfig` and :class:`kstep_adam.ctr.TrainConfig`
(``--help`` lists them with their defaults). Writes ``OUT/run.json`` (what the run is),
``OUT/metrics.jsonl`` (every ``--log-every`` steps and every evaluation), ``OUT/summary.json``
and, with ``--checkpoint-every``, ``OUT/checkpoints/``. An ``--out`` that holds another run is
refused unless ``--resume`` (continue it) or ``--overwrite`` (replace it) says what to do.
A diverged run (non-finite or exploding loss) exits with status 3 and says at which step;
its ``summary.json`` records ``"status": "diverged"``. Ctrl-C (SIGINT) or SIGTERM stops the
run at the next step boundary, says where its last checkpoint is and how to continue
(``--resume``), and exits with status 130 or 143; a second one stops it at once. Any other
error the user can cause (a missing or corrupt file, a full disk) is one line naming the file
and what to do, exit status 1; ``--debug`` (or ``KSTEP_ADAM_DEBUG=1``) shows the traceback.

Several processes (one per node; docs/multiprocess.md): the same command under
:mod:`kstep_adam.launch` or ``srun``. Each process then simulates ``--devices-per-node`` CPU
devices, keeps its shard of the table, and process 0 writes the files and prints:

  python -m kstep_adam.launch --num-processes 2 -- \
    python -m experiments.train_ctr --nodes 2 --devices-per-node 2 --out runs/p2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from experiments._cli import DefaultsHelpFormatter
from experiments._cli import add_config_args
from experiments._cli import add_debug_flag
from experiments._cli import config_from_args
from experiments._cli import debug_requested
from experiments._cli import user_errors
from experiments._common import use_cpu_devices
from kstep_adam import _distributed
from kstep_adam import ctr
from kstep_adam._jsonio import finite_or_none
from kstep_adam.ctr.run import _interrupt
from kstep_adam.ctr.run._context import check_processes

# The short spellings users know, beside the generated --learning-rate / --sparse-learning-rate.
ALIASES = {
  "learning_rate": ["--lr"],
  "sparse_learning_rate": ["--sparse-lr"],
  "top_mlp": ["--dense-tower"],
}

# The exit status of a diverged run (a sweep tells it from a crash by it).
DIVERGED_EXIT_STATUS = 3

# What the command prints; everything else is in summary.json.
PRINTED = (
  "test_auc",
  "test_logloss",
  "teacher_auc",
  "examples_per_sec",
  "dense_bytes_by_axis",
  "sparse_bytes",
  "estimated_comm_seconds",
  "measured_compute_seconds",
  "time_breakdown_seconds",
)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="train_ctr",  # every error line starts alike, whichever path reports it
    description=__doc__.split("\n\n")[0],
    formatter_class=DefaultsHelpFormatter,
  )
  add_config_args(parser.add_argument_group("data"), ctr.DataConfig)
  add_config_args(
    parser.add_argument_group("model, optimizer and run"), ctr.TrainConfig, aliases=ALIASES
  )
  out = parser.add_argument_group("output")
  out.add_argument(
    "--out", default="runs/train_ctr", help="output directory, one run per directory"
  )
  start = out.add_mutually_exclusive_group()
  start.add_argument(
    "--resume",
    action="store_true",
    help="continue the run in --out from its latest checkpoint (with the same flags; a new "
    "run if --out is empty)",
  )
  start.add_argument(
    "--overwrite",
    action="store_true",
    help="replace the run in --out (its files are deleted when this run starts)",
  )
  out.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="show a progress bar (steps, examples/s, loss, cache hit rate)",
  )
  add_debug_flag(parser)
  return parser


def build(args: argparse.Namespace) -> tuple[ctr.TrainConfig, ctr.DataConfig]:
  """The run's two configs from parsed flags (each validates itself)."""
  return config_from_args(ctr.TrainConfig, args), config_from_args(ctr.DataConfig, args)


def interrupted_message(error: ctr.RunInterrupted, argv: list[str] | None, out: str) -> str:
  """What a stopped run prints: where it stopped, its last checkpoint, how to continue."""
  argv = sys.argv[1:] if argv is None else argv
  again = " ".join(a for a in argv if a not in ("--resume", "--overwrite"))
  command = f"python -m experiments.train_ctr {again} --resume".replace("  ", " ")
  if error.checkpoint is None:
    how = f"{command} starts it over (save checkpoints with --checkpoint-every N)"
  else:
    how = f"continue it with: {command}"
  return f"train_ctr: the run in {out} {error.describe()}; {how}"


@user_errors("train_ctr")
def main(argv=None) -> dict:
  with _interrupt.stop_at_step_boundaries():  # a signal stops the run at a step boundary
    return _main(argv)


def _main(argv) -> dict:
  parser = make_parser()
  args = parser.parse_args(argv)
  try:
    config, data = build(args)
  except ValueError as error:
    parser.error(str(error))
  processes = _distributed.processes_from_env()
  try:  # the trainer's own check, before the JAX backend starts
    check_processes(config, processes)
  except ValueError as error:
    parser.error(str(error))
  # Before the JAX backend starts: join the multi-process run, if this is one, and ask for
  # this process's simulated devices (ignored on GPU/TPU).
  processes = _distributed.initialize()
  use_cpu_devices(config.num_workers // processes.count)
  # A refused out dir or a diverged run ends every process the same way (they all see it);
  # any other error ends this one at once (exit_on_error) and the others at their next
  # collective.
  with _distributed.exit_on_error(processes, debug=debug_requested(argv)):
    source = ctr.make_source(data, config, part=(processes.index, processes.count))
    try:
      summary = ctr.train(
        config,
        source,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.progress,
      )
    except ctr.RunDirectoryError as error:
      if debug_requested(argv):  # the exception, with its traceback
        raise
      parser.exit(2, f"{parser.prog}: error: {error}\n")
    except ctr.DivergenceError as error:
      if processes.is_main:
        print(f"error: {error}", file=sys.stderr)
        print(f"wrote {os.path.join(args.out, 'summary.json')} (status: diverged)", file=sys.stderr)
      sys.exit(DIVERGED_EXIT_STATUS)
    except OSError as error:
      if error.filename is None and error.strerror:  # a write deep in the run (a full disk)
        raise type(error)(error.errno, f"{error.strerror} (writing the run)", args.out) from error
      raise
    except ctr.RunInterrupted as error:
      if processes.is_main:
        print(interrupted_message(error, argv, args.out), file=sys.stderr)
      sys.exit(error.exit_status)
  if not processes.is_main:
    return summary
  print(json.dumps(finite_or_none({key: summary[key] for key in PRINTED}), indent=1))
  for warning in summary["warnings"]:
    print(f"warning: {warning}", file=sys.stderr)
  if summary["data"]["lines_skipped"]:
    print(
      f"skipped {summary['data']['lines_skipped']} bad lines, e.g. "
      f"{summary['data']['skip_messages'][:3]}",
      file=sys.stderr,
    )
  print(
    f"wrote {os.path.join(args.out, 'metrics.jsonl')} and {os.path.join(args.out, 'summary.json')}"
  )
  signum = _interrupt.requested()
  if signum is not None:  # after the run completed: its results are whole, but say so
    print(f"train_ctr: {signal.Signals(signum).name} after the run completed", file=sys.stderr)
    sys.exit(128 + signum)
  return summary


if __name__ == "__main__":
  main()
