"""One sweep run in a process of its own: ``python -m experiments.sweep_lib.worker DIR RUN_ID``.

A run's outputs are the trainer's own, in ``DIR/runs/RUN_ID/`` (``metrics.jsonl``,
``summary.json``), which the sweep never writes into. The sweep's bookkeeping of the run lives
beside them, in ``DIR/jobs/``:

* ``RUN_ID.json``: what to run (task and fields), written by the scheduler;
* ``RUN_ID.lock``: an exclusive ``flock`` the worker holds while it runs, so two sweeps over
  one directory (two shards, a rerun beside a sweep killed without its workers) never run one
  run twice at once;
* ``RUN_ID.log``: every attempt's output, each headed by a ``start`` line;
* ``RUN_ID.failed.json``: the traceback of an attempt that raised (removed by the next one).

The worker takes the lock (else exits with :data:`EXIT_BUSY`), exits at once if the run has
finished (its ``summary.json`` has a ``status``), otherwise asks JAX for the run's devices and
trains through the task, which continues what a killed attempt left in the run's directory
(a CTR run resumes from its latest checkpoint, or starts over without one) or, for a task that
cannot, finds it removed. A run is finished exactly when its summary has a status: the trainer
writes it atomically, last, so a run killed at any moment is either finished or redone.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
import traceback

from experiments._common import use_cpu_devices
from experiments._common import write_json

EXIT_BUSY = 75  # EX_TEMPFAIL: the run is locked by another process
RUNS_DIR, JOBS_DIR = "runs", "jobs"
SUMMARY_FILE = "summary.json"


def run_dir(out_dir: str, run_id: str) -> str:
  """The run's own directory (the trainer's ``out_dir``)."""
  return os.path.join(out_dir, RUNS_DIR, run_id)


def job_file(out_dir: str, run_id: str, kind: str) -> str:
  """The sweep's bookkeeping file of a run: ``kind`` is ``json``, ``lock``, ``log`` or
  ``failed.json``."""
  return os.path.join(out_dir, JOBS_DIR, f"{run_id}.{kind}")


def read_summary(out_dir: str, run_id: str) -> dict | None:
  """The run's ``summary.json`` if the run finished (it has a ``status``), else None."""
  path = os.path.join(run_dir(out_dir, run_id), SUMMARY_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a JSON document ({e})") from None
  return summary if isinstance(summary, dict) and "status" in summary else None


def try_lock(path: str):
  """An open file holding the exclusive lock ``path``, or None if another process holds it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  return os.fdopen(fd, "r+")


def is_locked(out_dir: str, run_id: str) -> bool:
  """Whether a live process holds the run's lock (the run is under way)."""
  path = job_file(out_dir, run_id, "lock")
  if not os.path.exists(path):
    return False
  lock = try_lock(path)
  if lock is None:
    return True
  lock.close()
  return False


def run(out_dir: str, run_id: str) -> int:
  """Run ``run_id`` of the sweep in ``out_dir`` unless it finished or is locked; return the
  exit status (0, 1 on an error, :data:`EXIT_BUSY`)."""
  from experiments.sweep_lib import tasks

  lock = try_lock(job_file(out_dir, run_id, "lock"))
  if lock is None:
    return EXIT_BUSY
  with lock:
    if read_summary(out_dir, run_id) is not None:
      return 0
    with open(job_file(out_dir, run_id, "json"), encoding="utf-8") as f:
      record = json.load(f)
    failed = job_file(out_dir, run_id, "failed.json")
    if os.path.exists(failed):
      os.unlink(failed)
    task = tasks.get(record["task"])
    directory = run_dir(out_dir, run_id)
    if os.path.exists(directory) and not task.resumable:  # a killed attempt's: redone whole
      shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    print(f"start {run_id} at {time.ctime()} on {socket.gethostname()}, pid {os.getpid()}")
    params = record["params"]
    try:
      use_cpu_devices(task.num_devices(params))
      task.run(params, directory)
    except Exception:
      write_json(failed, {"run_id": run_id, "traceback": traceback.format_exc()})
      traceback.print_exc()
      return 1
  return 0


if __name__ == "__main__":
  if len(sys.argv) != 3:
    raise SystemExit("usage: python -m experiments.sweep_lib.worker SWEEP_DIR RUN_ID")
  sys.exit(run(sys.argv[1], sys.argv[2]))
