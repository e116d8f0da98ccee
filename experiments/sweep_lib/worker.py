"""One sweep run in a process of its own: ``python -m experiments.sweep_lib.worker RUN_DIR``.

``RUN_DIR/run.json`` says what to run (task and fields). The worker

1. takes ``RUN_DIR/lock`` (an exclusive ``flock``, held until the process ends): if another
   process holds it, the run is under way elsewhere and the worker exits with
   :data:`EXIT_BUSY`, so two sweeps over one directory never run a run twice at once;
2. exits at once if the run already finished (``summary.json`` with a ``status``);
3. otherwise clears what a killed attempt left (``metrics.jsonl``, ``summary.json``,
   ``failed.json``), appends a line to ``starts.jsonl``, asks JAX for the run's devices, and
   trains through the task;
4. on an exception writes ``failed.json`` (the traceback) and exits with status 1.

A run is finished exactly when its ``summary.json`` has a ``status``: the summary is written
atomically, last, so a run killed at any moment is either finished or redone from the start.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import traceback

from experiments._common import dumps
from experiments._common import use_cpu_devices
from experiments._common import write_json

EXIT_BUSY = 75  # EX_TEMPFAIL: the run is locked by another process
RUN_FILE, SUMMARY_FILE, FAILED_FILE, STARTS_FILE, LOCK_FILE = (
  "run.json",
  "summary.json",
  "failed.json",
  "starts.jsonl",
  "lock",
)
PARTIAL_FILES = ("metrics.jsonl", SUMMARY_FILE, FAILED_FILE)


def read_summary(run_dir: str) -> dict | None:
  """The run's ``summary.json`` if the run finished (it has a ``status``), else None."""
  path = os.path.join(run_dir, SUMMARY_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a JSON document ({e})") from None
  return summary if isinstance(summary, dict) and "status" in summary else None


def try_lock(run_dir: str):
  """An open file holding ``run_dir``'s exclusive lock, or None if another process holds it."""
  fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  return os.fdopen(fd, "r+")


def is_locked(run_dir: str) -> bool:
  """Whether a live process holds ``run_dir``'s lock (a run under way)."""
  if not os.path.exists(os.path.join(run_dir, LOCK_FILE)):
    return False
  lock = try_lock(run_dir)
  if lock is None:
    return True
  lock.close()
  return False


def run(run_dir: str) -> int:
  """Run ``run_dir``'s run unless it is finished or locked; return the exit status."""
  from experiments.sweep_lib import tasks

  lock = try_lock(run_dir)
  if lock is None:
    return EXIT_BUSY
  with lock:
    if read_summary(run_dir) is not None:
      return 0
    with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as f:
      record = json.load(f)
    for name in PARTIAL_FILES:
      path = os.path.join(run_dir, name)
      if os.path.exists(path):
        os.unlink(path)
    with open(os.path.join(run_dir, STARTS_FILE), "a", encoding="utf-8") as f:
      f.write(dumps({"time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}))
      f.write("\n")
    task = tasks.get(record["task"])
    params = record["params"]
    try:
      use_cpu_devices(task.num_devices(params))
      task.run(params, run_dir)
    except Exception:
      write_json(
        os.path.join(run_dir, FAILED_FILE),
        {"run_id": record["run_id"], "traceback": traceback.format_exc()},
      )
      traceback.print_exc()
      return 1
  return 0


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python -m experiments.sweep_lib.worker RUN_DIR")
  sys.exit(run(sys.argv[1]))
