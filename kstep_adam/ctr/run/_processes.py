"""What a multi-process run does differently with its output directory and checkpoints.

Process 0 owns the run's directory: it alone claims and checks it
(:class:`~._rundir.RunDirectory`) and writes ``run.json``, ``metrics.jsonl``,
``summary.json``, the host state and the manifests. Its decisions reach every process: a
refused directory is refused by all of them with the same message, and a resumed run resumes
from the same checkpoint everywhere. Every process keeps its own shard of the table (under
``OUT/table/shard-p-of-P`` when the run saves checkpoints).

A checkpoint at step ``s`` of a ``P``-process run (the layout of :mod:`._checkpoint`):

* ``dense/``: orbax, every process writing its own workers' replicas (a collective save);
* ``host.json``: process 0's host state (the data position, the counters and the records are
  the same on every process, or process 0's);
* every shard is flushed at ``s``, each committing its own version;
* ``manifest.json``: written by process 0 once every shard has flushed (gathering the
  versions is also the barrier), naming each shard's version in process order.

So a process killed at any moment leaves the previous complete checkpoint, and a resumed run
reopens every shard at the version the manifest names for it, reverting a later flush.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kstep_adam import _distributed
from kstep_adam._jsonio import CorruptFileError
from kstep_adam.ctr.run import _checkpoint
from kstep_adam.ctr.run._rundir import FollowerRunDirectory
from kstep_adam.ctr.run._rundir import RunDirectory
from kstep_adam.ctr.run._rundir import RunDirectoryError
from kstep_adam.embedding import TableVersion


def open_run_dir(
  open_on_main: Callable[[], tuple[RunDirectory | None, _checkpoint.Checkpoint | None]],
  out_dir: str,
  processes: _distributed.Processes,
) -> tuple[RunDirectory | FollowerRunDirectory, _checkpoint.Checkpoint | None]:
  """Process 0 claims and checks the run directory (``open_on_main``); every process learns
  the outcome: the directory (a :class:`FollowerRunDirectory` away from process 0) and the
  checkpoint to resume from.

  Raises:
    RunDirectoryError: on every process, when process 0's check refused the directory.
  """
  decision: dict[str, Any] = {"error": None}
  if processes.is_main:
    try:
      run_dir, checkpoint = open_on_main()
      decision = {
        "error": None,
        "resuming": run_dir.resuming,
        "recorded": run_dir.recorded,
        "checkpoint": None if checkpoint is None else checkpoint_json(checkpoint, processes),
      }
    except (RunDirectoryError, CorruptFileError) as error:  # every process stops with it
      decision = {"error": str(error)}
      refused = error
  decision = _distributed.allgather_json(decision)[0]
  if decision["error"] is not None:
    if processes.is_main:
      raise refused
    raise RunDirectoryError(decision["error"])
  if processes.is_main:
    return run_dir, checkpoint
  follower = FollowerRunDirectory(out_dir, decision["resuming"], decision["recorded"])
  found = decision["checkpoint"]
  if found is None:
    return follower, None
  step, path, versions = found
  return follower, _checkpoint.Checkpoint(
    step, path, tuple(TableVersion(**version) for version in versions)
  )


def checkpoint_json(checkpoint: _checkpoint.Checkpoint, processes: _distributed.Processes) -> list:
  """The checkpoint as JSON, for the other processes; refused if this run cannot resume it.

  Internal helper: :func:`open_run_dir` sends it from process 0 to the others.
  """
  saved_by = 1 if isinstance(checkpoint.table, TableVersion) else len(checkpoint.table)
  if saved_by != processes.count:
    raise RunDirectoryError(
      f"{checkpoint.path} was saved by a {saved_by}-process run (one table shard per "
      f"process); resume it with {saved_by} process(es), not {processes.count}"
    )
  return [checkpoint.step, checkpoint.path, [v._asdict() for v in checkpoint.table]]


def shard_version(versions, processes: _distributed.Processes) -> TableVersion:
  """This process's shard's version among a checkpoint's (or a run's initial) versions."""
  if len(versions) != processes.count:
    raise RunDirectoryError(
      f"the run was started with {len(versions)} processes (one table shard each); resume "
      f"it with {len(versions)}, not {processes.count}"
    )
  version = versions[processes.index]
  return version if isinstance(version, TableVersion) else TableVersion(**version)
