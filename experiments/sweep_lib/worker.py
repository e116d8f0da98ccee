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
import os
import shutil
import socket
import sys
import time
import traceback

from experiments._common import use_cpu_devices
from experiments._common import write_json
from kstep_adam._jsonio import CorruptFileError
from kstep_adam._jsonio import read_json

EXIT_BUSY = 75  # EX_TEMPFAIL: the run is locked by another process
RUNS_DIR, JOBS_DIR = "runs", "jobs"
SUMMARY_FILE = "summary.json"
FINISHED = ("completed", "diverged")  # the statuses of a finished run


def run_dir(out_dir: str, run_id: str) -> str:
  """The run's own directory (the trainer's ``out_dir``)."""
  return os.path.join(out_dir, RUNS_DIR, run_id)


def job_file(out_dir: str, run_id: str, kind: str) -> str:
  """The sweep's bookkeeping file of a run: ``kind`` is ``json``, ``lock``, ``log`` or
  ``failed.json``."""
  return os.path.join(out_dir, JOBS_DIR, f"{run_id}.{kind}")


def read_summary(out_dir: str, run_id: str) -> dict | None:
  """The run's ``summary.json`` if the run finished, else None.

  A run finished when its summary is a JSON object with a ``status`` (``completed`` or
  ``diverged``), its ``config``, and everything its task's row of ``results.csv`` reads. A
  summary that is not (corrupt, cut, edited) is no result: the run is redone
  (:func:`run` deletes it first), never a crash of the whole sweep.
  """
  summary = _summary_or_none(out_dir, run_id)
  if summary is None:
    return None
  if summary.get("status") not in FINISHED or not isinstance(summary.get("config"), dict):
    return None
  task = _task_of(out_dir, run_id)
  if task is not None:
    try:
      task.row(summary)
    except (KeyError, TypeError, AttributeError, ValueError):
      return None
  return summary


def _summary_or_none(out_dir: str, run_id: str) -> dict | None:
  """The run's ``summary.json`` as a dict, or None if it is missing or not a JSON object."""
  try:
    return read_json(os.path.join(run_dir(out_dir, run_id), SUMMARY_FILE))
  except (FileNotFoundError, CorruptFileError):
    return None


def _task_of(out_dir: str, run_id: str):
  """The task of the run (from its ``jobs/RUN_ID.json``), or None if that is unreadable."""
  from experiments.sweep_lib import tasks

  try:
    return tasks.get(read_json(job_file(out_dir, run_id, "json"), keys=("task",))["task"])
  except (OSError, ValueError):
    return None


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
  from kstep_adam.ctr.run._interrupt import RunInterrupted

  lock = try_lock(job_file(out_dir, run_id, "lock"))
  if lock is None:
    return EXIT_BUSY
  with lock:
    if read_summary(out_dir, run_id) is not None:
      return 0
    record = read_json(
      job_file(out_dir, run_id, "json"),
      keys=("task", "params"),
      what_to_do="delete it and rerun the sweep (it is written again from the sweep file)",
    )
    summary = os.path.join(run_dir(out_dir, run_id), SUMMARY_FILE)
    if os.path.lexists(summary):  # not a finished run's (read_summary): the run is redone
      print(f"{summary} is corrupt or incomplete: removed, the run is redone")
      os.unlink(summary)
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
    except RunInterrupted as error:  # SIGTERM from the sweep: stopped at a step boundary
      print(f"{run_id}: {error}; the next sweep continues it")
      return error.exit_status
    except Exception:
      write_json(failed, {"run_id": run_id, "traceback": traceback.format_exc()})
      traceback.print_exc()
      return 1
  return 0


if __name__ == "__main__":
  if len(sys.argv) != 3:
    raise SystemExit("usage: python -m experiments.sweep_lib.worker SWEEP_DIR RUN_ID")
  sys.exit(run(sys.argv[1], sys.argv[2]))
