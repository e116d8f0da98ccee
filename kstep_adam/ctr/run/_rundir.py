"""The output directory of a CTR run: one run per directory, never a mix of two.

A run's directory (``--out``) holds::

  run.json       what the run is (its TrainConfig, its data and their files' fingerprints)
                 and where its embedding table lives, with the table's version at the start
  metrics.jsonl  a record every log_every steps and every evaluation
  summary.json   the results, written (atomically) when the run ends: completed or diverged
  checkpoints/   step_<N>/ (see ``_checkpoint``), when the run saves checkpoints
  table/         the embedding table, when the run saves checkpoints and names no table_dir
  LOCK           held (flock) by the process writing the directory

What a new run does with it (:class:`RunDirectory`):

* an empty or missing directory: start;
* a directory holding a run: refuse, unless ``resume`` (continue that run from its latest
  checkpoint, if its configuration and data are the same; refused otherwise) or
  ``overwrite`` (delete that run's files, then start);
* a directory holding only what a start killed before ``run.json`` leaves (its ``table/``):
  start over, also with ``resume`` (a preemptible job may always pass it);
* anything else (files this trainer did not write): refuse, also with ``overwrite``; nothing
  that is not a run's output is ever deleted.

The temporary files of the run's atomic writes (``.summary.json.<hex>.tmp``, likewise for
``run.json`` and ``metrics.jsonl``), which a kill inside a write leaves, are the run's outputs:
a resumed run deletes them, as an overwriting one deletes every output.

Every refusal happens before anything is written, also the ``LOCK`` file: a directory that
holds files that are not a run's (``--out /``, a link to ``/etc``) is refused as found.
Overwriting deletes the old run's files result first (``summary.json``, then checkpoints,
metrics, table) and ``run.json`` last, so a kill in between leaves the old run, without some
of its results, never two runs mixed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil

from kstep_adam._jsonio import finite_or_none
from kstep_adam._jsonio import is_temporary
from kstep_adam._jsonio import read_json
from kstep_adam._jsonio import write_json
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.train._config import TrainConfig

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
TABLE_DIR = "table"
LOCK_FILE = "LOCK"
# A run's own files, in the order overwriting deletes them (run.json last).
RUN_OUTPUTS = (SUMMARY_FILE, CHECKPOINT_DIR, METRICS_FILE, TABLE_DIR, RUN_FILE)
# The files the run writes atomically (their temporary files are its outputs too).
ATOMIC_FILES = (SUMMARY_FILE, METRICS_FILE, RUN_FILE)
# What a start killed before it recorded run.json may have left (besides those temporaries).
BEFORE_RECORD = (TABLE_DIR,)
# TrainConfig fields that do not change what a run computes: a resumed run may change them.
RESUMABLE_CHANGES = ("prefetch", "pipeline", "checkpoint_every", "keep_checkpoints")


class RunDirectoryError(ValueError):
  """An output directory the run refuses to write into; the message says what to do."""


class OutDirLockedError(RunDirectoryError):
  """Another process is writing the output directory."""


def run_identity(config: TrainConfig, source: DataSource) -> dict:
  """What a run computes: its configuration (less :data:`RESUMABLE_CHANGES`) and its data
  (the source's description, with the files' fingerprints). JSON data."""
  train = dataclasses.asdict(config)
  for name in RESUMABLE_CHANGES:
    train.pop(name)
  # JSON round trip: what is compared with a recorded run.json is what it would record.
  return json.loads(
    json.dumps(finite_or_none({"config": train, "data": {"name": source.name, **source.info}}))
  )


def _differences(recorded, current, prefix: str = "") -> list[str]:
  """``key: recorded -> current`` for every leaf that differs (dotted keys)."""
  if isinstance(recorded, dict) and isinstance(current, dict):
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
      out += _differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
    return out
  if recorded != current:
    return [f"{prefix[:-1]}: {recorded!r} -> {current!r}"]
  return []


class RunDirectory:
  """Decide what a run may do with its output directory, then hold it while the run writes.

  Creating it locks the directory and checks it; nothing else is written until
  :meth:`clear` (a fresh start over leftovers or an overwritten run) and :meth:`record`
  (``run.json``).

  Args:
    path: the output directory (created if missing).
    identity: :func:`run_identity` of the run that wants it.
    resume: continue the run recorded there (or start, if there is none).
    overwrite: replace the run recorded there.

  Attributes:
    resuming: a recorded run with this identity is being continued.
    recorded: that run's ``run.json`` (None when starting).

  Raises:
    RunDirectoryError: the directory holds another run (or a run with another
      configuration, when resuming), files that are not a run's, or a run that is finished
      or diverged (when resuming); the message says what was found and what to pass.
    OutDirLockedError: another process is writing it.
  """

  def __init__(self, path: str, identity: dict, *, resume: bool, overwrite: bool):
    if resume and overwrite:
      raise RunDirectoryError("pass resume or overwrite, not both")
    self.path, self.identity = path, identity
    if os.path.lexists(path) and not os.path.isdir(path):
      raise RunDirectoryError(f"--out {path} exists and is not a directory; pass another --out")
    if os.path.isdir(path):  # refused as found, before the lock file is written
      self._refuse_foreign(sorted(set(os.listdir(path)) - {LOCK_FILE}))
    os.makedirs(path, exist_ok=True)
    self._lock = open(os.path.join(path, LOCK_FILE), "a")
    try:
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._lock.close()
      raise OutDirLockedError(
        f"{path} is being written by another run (it holds {LOCK_FILE}); wait for it or pass "
        "another --out"
      ) from None
    try:
      self._inspect(resume=resume, overwrite=overwrite)
    except BaseException:
      self.close()
      raise

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def _refuse_foreign(self, entries: list[str]) -> None:
    foreign = [e for e in entries if e not in RUN_OUTPUTS and not is_temporary(e, ATOMIC_FILES)]
    if foreign:
      raise RunDirectoryError(
        f"{self.path} holds files that are not a run's outputs: {foreign[:5]}; choose another "
        "--out (nothing there is deleted, also not with --overwrite)"
      )

  def _inspect(self, *, resume: bool, overwrite: bool) -> None:
    entries = sorted(set(os.listdir(self.path)) - {LOCK_FILE})
    self.resuming, self.recorded, self._leftovers = False, None, entries
    if not entries:
      return
    self._refuse_foreign(entries)
    if not os.path.exists(self.file(RUN_FILE)):
      if overwrite:
        return  # outputs of an older trainer, or of a start killed before run.json
      named = [e for e in entries if not is_temporary(e, ATOMIC_FILES)]
      if resume and set(named) <= set(BEFORE_RECORD):
        return  # a start killed before it recorded run.json: start over
      raise RunDirectoryError(
        f"{self.path} holds run outputs ({', '.join(entries)}) but no {RUN_FILE} to say which "
        "run wrote them; pass --overwrite to replace them, or another --out"
      )
    recorded = read_json(
      self.file(RUN_FILE),
      keys=("identity", "table"),
      what_to_do="pass --overwrite to start the run over there, or another --out",
    )
    if overwrite:
      return
    if not resume:
      raise RunDirectoryError(
        f"{self.path} holds a run already ({', '.join(entries)}); pass --resume to "
        "continue it, --overwrite to replace it, or another --out"
      )
    differ = _differences(recorded["identity"], self.identity)
    if differ:
      raise RunDirectoryError(
        f"cannot resume the run in {self.path}: its configuration or data differ "
        f"(recorded -> now): {'; '.join(differ[:8])}; resume with the recorded ones, or pass "
        "--overwrite to start a new run there"
      )
    status = self.status()
    if status == "diverged":
      raise RunDirectoryError(
        f"the run in {self.path} diverged (see its {SUMMARY_FILE}); resuming it would repeat "
        "that. Change the configuration and start a new run (--overwrite or another --out)"
      )
    self.resuming, self.recorded = True, recorded
    self._leftovers = [e for e in entries if is_temporary(e, ATOMIC_FILES)]

  def status(self) -> str | None:
    """How the recorded run ended (its ``summary.json``): ``completed``, ``diverged``, or
    None while it has not."""
    path = self.file(SUMMARY_FILE)
    if not os.path.exists(path):
      return None
    return read_json(
      path,
      keys=("status",),
      what_to_do="delete it to resume the run (its end is redone), or pass --overwrite",
    )["status"]

  def clear(self) -> None:
    """Delete what the start found there of a run's: an overwritten run's files, run.json
    last, or (resuming) the temporary files of writes a kill interrupted."""
    present = set(self._leftovers)
    temporary = [e for e in self._leftovers if is_temporary(e, ATOMIC_FILES)]
    for name in [*temporary, *RUN_OUTPUTS]:
      if name in present:
        path = self.file(name)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        else:
          os.unlink(path)
    self._leftovers = []

  def record(self, table: dict) -> None:
    """Write ``run.json``: this run's identity and its table (path, version at the start)."""
    self.recorded = {"identity": self.identity, "table": table}
    write_json(self.file(RUN_FILE), self.recorded)

  def close(self) -> None:
    self._lock.close()  # releases the flock


class FollowerRunDirectory:
  """The run directory as a process other than 0 sees it: where its parts are, and what
  process 0 found there. It writes nothing.

  Attributes:
    resuming: process 0 is continuing the run recorded there.
    recorded: that run's ``run.json`` (as process 0 read or wrote it).
  """

  def __init__(self, path: str, resuming: bool, recorded: dict | None):
    self.path, self.resuming, self.recorded = path, resuming, recorded

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def clear(self) -> None:
    """Process 0 deletes what a fresh start found there."""

  def record(self, table: dict) -> None:
    """Process 0 writes ``run.json``; this one only keeps what it says."""
    self.recorded = {**(self.recorded or {}), "table": table}

  def close(self) -> None:
    pass
