"""The two layouts of a run, one process or several: what differs between them when a run opens.

:func:`~._context.open_run` picks one (it alone asks how many processes there are) and calls
the same methods on either: which part of the data this process reads, who opens the run
directory, the mesh, the tier, the step and its stepper, what ``run.json`` records of the
table, and how evaluation joins the processes' predictions. Internal helpers of
:mod:`._context`; a new layout (another sparse-tier strategy) is one more class here.
"""

from __future__ import annotations

from kstep_adam import _distributed
from kstep_adam import parallel
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.data._sources import process_part
from kstep_adam.ctr.run import _checkpoint
from kstep_adam.ctr.run import _processes
from kstep_adam.ctr.run._rundir import RunDirectoryError
from kstep_adam.ctr.train import _step
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._exchange import shard_dir
from kstep_adam.ctr.train._local_tier import SparseTier
from kstep_adam.ctr.train._sharded_step import make_sharded_train_step
from kstep_adam.ctr.train._sharded_tier import ShardedSparseTier
from kstep_adam.ctr.train._steppers import LocalStepper
from kstep_adam.ctr.train._steppers import ShardedStepper
from kstep_adam.embedding import TableVersion


class OneProcess:
  """One process: the whole table here (:class:`SparseTier`), the step of ``train/_step``.

  Its methods are the layout's interface; :class:`Sharded` has the same ones.
  """

  gather = None  # evaluation scores this process's predictions alone

  def __init__(self, processes: _distributed.Processes):
    self.processes = processes

  def part(self, source: DataSource) -> DataSource:
    """The part of ``source`` this process reads (here: all of it)."""
    return source

  def open_run_dir(self, open_here, out_dir):
    """``open_here()`` (claim ``out_dir``, find the checkpoint), with what this layout refuses:
    returns the run directory and the checkpoint to resume from."""
    run_dir, checkpoint = open_here()
    if checkpoint is not None and not isinstance(checkpoint.table, TableVersion):
      raise RunDirectoryError(
        f"{checkpoint.path} was saved by a {len(checkpoint.table)}-process run (one table "
        f"shard per process); resume it with as many (python -m kstep_adam.launch "
        f"--num-processes {len(checkpoint.table)})"
      )
    return run_dir, checkpoint

  def mesh(self, config: TrainConfig):
    """The run's ``('node', 'local')`` device mesh."""
    return parallel.make_mesh(config.nodes, config.devices_per_node, devices=None)

  def cleared(self) -> None:
    """A new run's directory was just cleared: nothing to wait for."""

  def own_table(self, table_dir: str) -> str:
    """Where this process's table lives inside ``table_dir``."""
    return table_dir

  def open_tier(self, config, table_dir, mesh, version, *, temporary, flush_on_close, out_dir):
    """The sparse tier, at ``version`` (the checkpoint's, or the run's initial ones)."""
    if version is not None and not isinstance(version, TableVersion):  # no checkpoint yet
      raise RunDirectoryError(
        f"the run in {out_dir} was started with {len(version)} processes (one table "
        f"shard each); resume it with as many (python -m kstep_adam.launch "
        f"--num-processes {len(version)})"
      )
    return SparseTier(
      config,
      table_dir,
      temporary=temporary,
      flush_on_close=flush_on_close,
      version=version,
      mesh=mesh,
    )

  def stepper(self, config, graphdef, tx, mesh, tier, timer, monitor, replicas) -> LocalStepper:
    """The jitted step over ``tier`` and the stepper that runs it."""
    # An adaptive merge period decides each step's program from the last one's drift: no
    # step can be launched ahead, and the dense state had better be donated.
    pipeline = config.pipeline and tier.can_pull_before_push and config.k != "auto"
    step_fn = _step.make_ctr_train_step(  # built after the tier: a device tier's optimizer
      graphdef,  # runs inside the step
      tx,
      mesh,
      skip_nonfinite=config.on_nonfinite == "skip",
      device_optimizer=tier.device_optimizer,
      host_optimizer=tier.table.optimizer if pipeline else None,
      donate_state=not pipeline,  # the hooks read a step's state while the next computes
    )
    per_worker = parallel.worker_sharding(mesh)
    return LocalStepper(step_fn, tier, timer, monitor, replicas, per_worker, pipeline=pipeline)

  def initial_versions(self, tier) -> dict:
    """What ``run.json`` records of the table a new run starts from."""
    return {"initial_version": tier.table.committed._asdict()}


class Sharded:
  """Several processes: one table shard each (:class:`ShardedSparseTier`), the step of
  ``train/_sharded_step``; process 0 decides about the run directory (:mod:`._processes`)."""

  gather = staticmethod(_distributed.allgather_concat)  # every process scores the whole set

  def __init__(self, processes: _distributed.Processes):
    self.processes = processes

  def part(self, source: DataSource) -> DataSource:
    return process_part(source, self.processes.index, self.processes.count)

  def open_run_dir(self, open_here, out_dir):
    if out_dir is None:
      return open_here()
    return _processes.open_run_dir(open_here, out_dir, self.processes)

  def mesh(self, config: TrainConfig):
    devices = _distributed.process_major_devices()
    mesh = parallel.make_mesh(config.nodes, config.devices_per_node, devices=devices)
    for node, node_devices in enumerate(mesh.devices):  # every node is one process's devices
      owners = {d.process_index for d in node_devices}
      if owners != {node}:
        raise ValueError(
          f"mesh node {node} has devices of processes {sorted(owners)}; with several "
          "processes each needs devices_per_node devices of its own (on CPU, "
          "jax_num_cpu_devices)"
        )
    return mesh

  def cleared(self) -> None:
    """A new run's directory was just cleared: the shards go where process 0 cleared."""
    _checkpoint.barrier()

  def own_table(self, table_dir: str) -> str:
    return shard_dir(table_dir, self.processes.index, self.processes.count)

  def open_tier(self, config, table_dir, mesh, version, *, temporary, flush_on_close, out_dir):
    if isinstance(version, TableVersion):
      version = [version]  # refused by shard_version: one table for several processes
    return ShardedSparseTier(
      config,
      table_dir,
      mesh,
      temporary=temporary,
      flush_on_close=flush_on_close,
      version=None if version is None else _processes.shard_version(version, self.processes),
    )

  def stepper(self, config, graphdef, tx, mesh, tier, timer, monitor, replicas) -> ShardedStepper:
    skip_nonfinite = config.on_nonfinite == "skip"
    step_fn = make_sharded_train_step(graphdef, tx, mesh, skip_nonfinite=skip_nonfinite)
    return ShardedStepper(step_fn, tier, timer, monitor, replicas, mesh)

  def initial_versions(self, tier) -> dict:
    versions = _checkpoint.gather_versions(tier.table.committed)  # collective
    return {"initial_versions": [v._asdict() for v in versions]}
