"""Checkpoints of a CTR run: dense state, embedding table and host state, tied to one step.

A checkpoint at step ``s`` is a directory ``OUT/checkpoints/step_<s>/`` written in this
order::

  dense/          every replica's dense parameters and optimizer state (orbax; written to a
                  temporary directory and renamed, so it exists whole or not at all)
  host.json       the rest of the trainer's state at s (atomic write): the data position
                  (epoch and position in the pass), reader counts, the byte length of
                  metrics.jsonl, evaluations, traffic counters, hook states, time totals
  -- the embedding table is flushed: its commit point makes step s durable on disk --
  manifest.json   written last (atomic rename): names the dense state, the host state and
                  the table's version (``embedding.TableVersion``) at s; in a multi-process
                  run, every shard's version, in process order (:mod:`._multiprocess`); and
                  the SHA-256 of every file of the dense state and the host state, which a
                  resumed run checks before it reads them (a changed byte is refused, naming
                  the file)

The manifest is the commit point: a directory without one is an interrupted checkpoint,
ignored and deleted. A kill at any moment therefore leaves the previous complete checkpoint
loadable, also when the table was already flushed at a later step (a kill between a flush
and its manifest): restoring reopens the table at the version the manifest names
(``open_table(..., version=)``), which reverts such a later flush. The table is flushed only
by checkpoints while a run saves them, so its committed state is always one of theirs (or
its state at the start, which ``run.json`` names).

Random state: there is none to save beyond the above. The initial dense parameters come from
``seed`` and are in the dense state; an embedding row's initial value is a hash of (seed,
row); a synthetic batch is drawn from ``default_rng([seed, ..., step])``, so its position is
the step; the file readers draw nothing, and the models have no dropout.

In a multi-process run each process holds a shard of the table: every process flushes its
shard at the same step, process 0 writes the host state and, once all have flushed, the
manifest, which names every shard's version in process order (:mod:`._multiprocess`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

from kstep_adam import _distributed
from kstep_adam import _faults
from kstep_adam._jsonio import read_json
from kstep_adam._jsonio import write_json
from kstep_adam.ctr.run._rundir import RunDirectoryError
from kstep_adam.embedding import TableVersion

MANIFEST = "manifest.json"
HOST_STATE = "host.json"
DENSE_STATE = "dense"
# What to do about a damaged checkpoint file.
_DAMAGED = (
  "delete that checkpoint's directory to resume from the one before, or pass --overwrite to "
  "start the run over"
)
_STEP_DIR = re.compile(r"^step_(\d+)$")


class Checkpoint(NamedTuple):
  """A complete checkpoint: one with a manifest."""

  step: int  # the optimizer step it holds
  path: str  # its directory
  table: TableVersion | tuple[TableVersion, ...]  # the embedding table's version at that
  # step; a tuple of every shard's, in process order, for a multi-process run


def _table_versions(recorded) -> TableVersion | tuple[TableVersion, ...]:
  """A manifest's ``table``: one version, or a list of the shards' versions."""
  if isinstance(recorded, list):
    return tuple(TableVersion(**version) for version in recorded)
  return TableVersion(**recorded)


def step_dir(root: str, step: int) -> str:
  """The directory of the checkpoint at ``step`` under ``root``."""
  return os.path.join(root, f"step_{step:09d}")


def complete_checkpoints(root: str) -> list[Checkpoint]:
  """The complete checkpoints under ``root``, oldest first."""
  found = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
    match = _STEP_DIR.match(name)
    manifest = os.path.join(root, name, MANIFEST)
    if match and os.path.exists(manifest):
      record = read_json(manifest, keys=("step", "table"), what_to_do=_DAMAGED)
      found.append(
        Checkpoint(int(record["step"]), os.path.join(root, name), _table_versions(record["table"]))
      )
  return sorted(found)


def latest_checkpoint(root: str) -> Checkpoint | None:
  """The newest complete checkpoint under ``root``, or None."""
  found = complete_checkpoints(root)
  return found[-1] if found else None


def remove_incomplete(root: str) -> None:
  """Delete interrupted checkpoints (directories without a manifest) and orbax leftovers."""
  for name in os.listdir(root) if os.path.isdir(root) else ():
    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, MANIFEST)):
      shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
  root: str,
  step: int,
  dense: Any,
  host: dict,
  flush_table: Callable[[], TableVersion],
  *,
  keep: int,
  processes: _distributed.Processes | None = None,
) -> Checkpoint:
  """Save the checkpoint at ``step`` in the order above, then keep the newest ``keep``.

  One path for one process and for several. With several (``processes.count > 1``, every
  process calls it at the same step) process 0 alone clears ``root``, writes the host state and
  the manifest and prunes; every process saves its dense shards and flushes its table shard,
  and the manifest names every shard's version in process order (see
  :mod:`~kstep_adam.ctr.run._processes`). With one process no collective runs.

  Args:
    root: the run's checkpoint directory, absolute (orbax needs it; the trainer resolves its
      output directory once).
    step: the optimizer step the state is at.
    dense: the dense pytree (``jax.Array`` leaves, any sharding), saved with orbax.
    host: the host state (JSON data).
    flush_table: flushes the embedding table (this process's shard) and returns the version it
      committed; it must be at ``step``'s state.
    keep: complete checkpoints to keep, this one included.
    processes: the run's processes; None: one.

  Returns:
    The new checkpoint (its ``table``: one version, or a tuple of them with several processes).
  """
  several = processes is not None and processes.count > 1
  main = not several or processes.is_main
  if main:
    os.makedirs(root, exist_ok=True)
    remove_incomplete(root)
  if several:
    barrier()  # nobody writes into root before the interrupted checkpoints are gone
  path = step_dir(root, step)
  save_dense(path, dense)
  _faults.reached("checkpoint.dense")
  if main:
    write_json(os.path.join(path, HOST_STATE), host)
  _faults.reached("checkpoint.host")
  table = flush_table()
  if several:
    table = gather_versions(table)  # returns once every shard has flushed
  if main:
    write_manifest(path, step, table)
    _faults.reached("checkpoint.manifest")
    prune(root, keep)
    _faults.reached("checkpoint.pruned")
  if several:
    barrier()  # the checkpoint is complete, for every process, when this returns
  return Checkpoint(step, path, table)


def save_dense(path: str, dense: Any) -> None:
  """Save the dense pytree into checkpoint directory ``path`` with orbax, and wait for it.

  With several processes every process calls it (each writes its own shards), with the same
  ``path``. Orbax needs an absolute path: the trainer resolves its run's paths once
  (:class:`~kstep_adam.ctr.Trainer`), and a relative one is refused here, not by orbax."""
  if not os.path.isabs(path):
    raise ValueError(f"checkpoint path {path!r} must be absolute (orbax refuses others)")
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, DENSE_STATE), dense)
  checkpointer.wait_until_finished()
  checkpointer.close()


def prune(root: str, keep: int) -> None:
  """Delete all but the newest ``keep`` complete checkpoints."""
  for old in complete_checkpoints(root)[:-keep]:
    os.unlink(os.path.join(old.path, MANIFEST))  # no longer a checkpoint, then gone
    shutil.rmtree(old.path, ignore_errors=True)


def write_manifest(path: str, step: int, table: TableVersion | tuple[TableVersion, ...]) -> None:
  """The commit point of a checkpoint: its manifest, written atomically, with the checksum
  of every file the checkpoint holds so far (its dense and host state)."""
  versions = table._asdict() if isinstance(table, TableVersion) else [v._asdict() for v in table]
  files = {name: _sha256(os.path.join(path, name)) for name in _checkpoint_files(path)}
  write_json(
    os.path.join(path, MANIFEST),
    {"step": step, "dense": DENSE_STATE, "host": HOST_STATE, "table": versions, "files": files},
  )


class CheckpointCorruptError(RunDirectoryError):
  """A file of a checkpoint is missing or differs from what its manifest recorded (a run
  directory the run cannot resume as it is: the command line says so in one line)."""


def verify_files(checkpoint_path: str) -> None:
  """Check every file the checkpoint's manifest names against its recorded SHA-256.

  Raises:
    CheckpointCorruptError: a file is missing or changed; the message names it. (A manifest
      written before checksums were recorded has none to check.)
  """
  manifest = os.path.join(checkpoint_path, MANIFEST)
  files = read_json(manifest, what_to_do=_DAMAGED).get("files", {})
  for name, digest in sorted(files.items()):
    file = os.path.join(checkpoint_path, name)
    if not os.path.isfile(file) or _sha256(file) != digest:
      what = "is missing" if not os.path.isfile(file) else "changed since it was saved"
      raise CheckpointCorruptError(
        f"checkpoint file {file} {what} (its checksum in {manifest} does not match): the "
        f"checkpoint is damaged; delete {checkpoint_path} to resume from the one before it"
      )


def _checkpoint_files(path: str) -> list[str]:
  """The files under a checkpoint directory (but its manifest), relative to it, sorted."""
  found = []
  for root, _, names in os.walk(path):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), path)
      if relative != MANIFEST:
        found.append(relative)
  return sorted(found)


def _sha256(file: str) -> str:
  digest = hashlib.sha256()
  with open(file, "rb") as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def load_checkpoint(checkpoint: Checkpoint, abstract_dense: Any) -> tuple[Any, dict]:
  """The dense state (placed as ``abstract_dense``'s shardings say) and the host state,
  once every file checks against the manifest's checksums (:func:`verify_files`)."""
  import orbax.checkpoint as ocp

  verify_files(checkpoint.path)

  checkpointer = ocp.StandardCheckpointer()
  dense = checkpointer.restore(os.path.join(checkpoint.path, DENSE_STATE), abstract_dense)
  checkpointer.close()
  host = read_json(os.path.join(checkpoint.path, HOST_STATE), keys=("step",), what_to_do=_DAMAGED)
  if host["step"] != checkpoint.step:
    raise ValueError(
      f"{checkpoint.path}: {HOST_STATE} is for step {host['step']}, the manifest says "
      f"{checkpoint.step}"
    )
  return dense, host


def barrier() -> None:
  """Wait until every process gets here (a small collective)."""
  _distributed.allgather_json(None)


def gather_versions(version: TableVersion) -> tuple[TableVersion, ...]:
  """Every shard's version, in process order. Collective."""
  return tuple(TableVersion(**v) for v in _distributed.allgather_json(version._asdict()))
