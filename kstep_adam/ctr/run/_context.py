"""Opening a run: everything a run holds before its first step, and the one choice between one
process and several.

:func:`open_run` (after MaxText's ``setup_train_loop``, which returns a ``TrainContext``) is a
context manager that opens a run's resources in a fixed order and closes them on exit, error or
not: it claims the run directory, picks the table directory, builds the mesh, the model and its
replicas, restores the checkpoint, opens the sparse tier, builds the step and its stepper,
records the run, reads the held-out sets, opens the metrics file and restores the run's host
state. It yields a :class:`RunContext`.

This module is the only one that asks whether a run spans several processes (``jax.distributed``
initialized, e.g. by :mod:`kstep_adam.launch`). It validates that (:func:`check_processes`) and
then picks a layout once: :class:`~._layouts.OneProcess` (the whole table here, the step of
:mod:`~kstep_adam.ctr.train._step`) or :class:`~._layouts.Sharded` (each process reads its
share of every batch and keeps its shard of the table, the step of
:mod:`~kstep_adam.ctr.train._sharded_step`; process 0 decides about the run directory and every
process learns, :mod:`._processes`). Every difference between the two after that lives in the
objects the layout made: the tier, the stepper and the evaluation's gather.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import optax
from flax import nnx

from kstep_adam import _distributed
from kstep_adam import parallel
from kstep_adam._dispatch import optimizer_step
from kstep_adam._schedule import MergeSchedule
from kstep_adam.ctr.data._prefetch import HeldOutSet
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.run import _checkpoint
from kstep_adam.ctr.run._layouts import OneProcess
from kstep_adam.ctr.run._layouts import Sharded
from kstep_adam.ctr.run._rundir import CHECKPOINT_DIR
from kstep_adam.ctr.run._rundir import METRICS_FILE
from kstep_adam.ctr.run._rundir import TABLE_DIR
from kstep_adam.ctr.run._rundir import RunDirectory
from kstep_adam.ctr.run._rundir import RunDirectoryError
from kstep_adam.ctr.run._rundir import run_identity
from kstep_adam.ctr.run._state import MetricsFile
from kstep_adam.ctr.run._state import RunState
from kstep_adam.ctr.run._state import truncate_metrics
from kstep_adam.ctr.train import _loss
from kstep_adam.ctr.train._adaptive import AdaptiveRun
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._divergence import DivergenceMonitor
from kstep_adam.ctr.train._exchange import sharded_device_cache_error
from kstep_adam.ctr.train._loop import num_steps
from kstep_adam.ctr.train._loop import step_budget
from kstep_adam.ctr.train._meters import CommMeter
from kstep_adam.ctr.train._meters import Timer
from kstep_adam.ctr.train._models import make_model
from kstep_adam.ctr.train._steppers import Replicas
from kstep_adam.embedding import TableVersion

# Host memory a run may spend keeping its test set between evaluations (read once, reused).
MAX_KEPT_TEST_SET_BYTES = 1 << 30


def check_processes(config: TrainConfig, processes: _distributed.Processes) -> None:
  """Refuse a configuration that the run's processes cannot run (before JAX starts, too).

  With several processes the ``'node'`` axis spans them (``config.nodes`` must equal their
  number) and the device-resident sparse optimizer is refused. One process accepts any.

  Raises:
    ValueError: what is wrong and what to pass instead.
  """
  if processes.count == 1:
    return
  if config.nodes != processes.count:
    raise ValueError(
      f"--nodes {config.nodes} with {processes.count} processes: the 'node' axis spans the "
      f"processes, so pass --nodes {processes.count}"
    )
  if config.device_cache_rows:  # before anything is written (the tier refuses it too)
    raise ValueError(sharded_device_cache_error(config.device_cache_rows, processes.count))


def current_processes() -> _distributed.Processes:
  """This process's place in the run, as JAX knows it."""
  return _distributed.Processes(jax.process_index(), jax.process_count())


def prepare_run(
  config: TrainConfig,
  source: DataSource,
  out_dir: str | None,
  processes: _distributed.Processes,
  *,
  resume: bool = False,
  overwrite: bool = False,
) -> tuple[DataSource, str | None]:
  """Every check that needs no file, before anything is opened: returns this process's part of
  ``source`` and ``out_dir`` made absolute (the one place a run's paths are resolved, so a
  relative directory works everywhere). Calling it again on its results returns them.

  Raises:
    ValueError: too few devices, an option that needs ``out_dir`` without one, or
      :func:`check_processes`'s errors.
  """
  if config.num_workers > len(jax.devices()):
    raise ValueError(
      f"nodes x devices_per_node = {config.num_workers} exceeds the "
      f"{len(jax.devices())} devices; on CPU set jax_num_cpu_devices first"
    )
  if out_dir is None and (config.checkpoint_every or resume or overwrite):
    raise ValueError(
      "checkpoint_every, resume and overwrite need an output directory (out_dir); got "
      f"checkpoint_every={config.checkpoint_every}, resume={resume}, overwrite={overwrite}"
    )
  check_processes(config, processes)
  source = _layout(processes).part(source)
  return source, None if out_dir is None else os.path.abspath(os.fspath(out_dir))


@dataclasses.dataclass
class RunContext:
  """What :func:`open_run` opened for one run (closed when its ``with`` block ends).

  Attributes:
    config, source, processes, out_dir: the run's configuration, this process's part of the
      data, the processes, and the absolute output directory (or None).
    run_dir: the claimed output directory (None without one).
    table_dir: where the table lives (``table_dir``, OUT/table, or a scratch directory).
    mesh, predict: the device mesh and the jitted prediction of one replica.
    replicas: the dense state (per-worker parameters and optimizer state) the stepper advances.
    tier, stepper: the sparse tier and the step strategy over it.
    timer, monitor, meter, adaptive: the run's stateful parts (time per phase, divergence test,
      communication accounting, and the adaptive merge period or None).
    test_set, val_set: the held-out batches (``val_set`` None without a validation set).
    metrics_file: the open ``metrics.jsonl`` (process 0 with an output directory; else None).
    checkpoint: the checkpoint the run resumed from, or None.
    run_state: the resumed checkpoint's host state (its parts already restored), or None.
    start_step: the optimizer's step count at the start (the checkpoint's when resuming).
    num_steps: steps left to take (an estimate for ``epochs`` passes over file data).
    gather: joins every process's evaluation arrays (None for one process).
  """

  config: TrainConfig
  source: DataSource
  processes: _distributed.Processes
  out_dir: str | None
  run_dir: Any
  table_dir: str
  mesh: Any
  predict: Callable
  replicas: Replicas
  tier: Any
  stepper: Any
  timer: Timer
  monitor: DivergenceMonitor
  meter: CommMeter
  adaptive: AdaptiveRun | None
  test_set: HeldOutSet
  val_set: HeldOutSet | None
  metrics_file: MetricsFile | None
  checkpoint: _checkpoint.Checkpoint | None
  run_state: RunState | None
  start_step: int
  num_steps: int
  gather: Callable | None

  def parts(self) -> dict:
    """The run's stateful parts, by their key in ``host.json``."""
    return {
      "meter": self.meter,
      "monitor": self.monitor,
      "timer": self.timer,
      "adaptive": self.adaptive,
    }


@contextlib.contextmanager
def open_run(
  config: TrainConfig,
  source: DataSource,
  optimizer: tuple[optax.GradientTransformation, MergeSchedule],
  out_dir: str | None = None,
  *,
  resume: bool = False,
  overwrite: bool = False,
  timer: Timer | None = None,
  monitor: DivergenceMonitor | None = None,
) -> Iterator[RunContext]:
  """Open a run's resources (the module docstring's order) and close them on exit.

  Args are :class:`~kstep_adam.ctr.Trainer`'s; ``timer`` and ``monitor`` are the run's own if
  the caller made them already (new ones otherwise).
  """
  processes = current_processes()
  source, out_dir = prepare_run(
    config, source, out_dir, processes, resume=resume, overwrite=overwrite
  )
  with contextlib.ExitStack() as stack:
    yield _open(
      stack,
      config,
      source,
      optimizer,
      out_dir,
      processes,
      resume=resume,
      overwrite=overwrite,
      timer=Timer() if timer is None else timer,
      monitor=DivergenceMonitor(config) if monitor is None else monitor,
    )


def _open(
  stack, config, source, optimizer, out_dir, processes, *, resume, overwrite, timer, monitor
):
  tx, schedule = optimizer
  layout = _layout(processes)
  # Everything that can refuse the run does so before anything is written.
  run_dir, checkpoint = layout.open_run_dir(
    lambda: _open_run_dir(stack, config, source, out_dir, resume=resume, overwrite=overwrite),
    out_dir,
  )
  resuming = run_dir is not None and run_dir.resuming
  table_dir = _table_dir(stack, config, run_dir, resuming)
  mesh = layout.mesh(config)
  model = make_model(
    config.model,
    num_dense=source.num_dense,
    num_categorical=source.num_categorical,
    embed_dim=config.embed_dim,
    top_mlp=config.top_mlp,
    seed=config.seed,
  )
  graphdef, params = nnx.split(model)
  replicas = Replicas(*parallel.init_replicas(params, tx, mesh))
  host = None
  if checkpoint is not None:
    dense, host = _checkpoint.load_checkpoint(checkpoint, _abstract(replicas))
    replicas.params_W, replicas.opt_state_W = dense["params_W"], dense["opt_state_W"]
  start_step = optimizer_step(replicas.opt_state_W) or 0
  budget = step_budget(config, source)
  steps = max((num_steps(config, source) if budget is None else budget) - start_step, 0)
  if resuming and processes.is_main:  # say where it continues (stderr, like the progress bar)
    where = f"step {start_step}" if checkpoint else "its start (no checkpoint yet)"
    print(f"resuming {out_dir} from {where}, to step {start_step + steps}", file=sys.stderr)
  predict = _loss.make_predict(graphdef)
  meter = CommMeter(config, params, schedule, mesh)
  if run_dir is not None:
    # An overwritten run's files (or a killed write's temporaries when resuming): only now
    # that this run can start.
    run_dir.clear()
    if not resuming:
      layout.cleared()
  tier = _open_tier(stack, layout, config, run_dir, table_dir, mesh, resuming, checkpoint, out_dir)
  stepper = layout.stepper(config, graphdef, tx, mesh, tier, timer, monitor, replicas)
  adaptive = None  # k = 'auto': the host decides each step's merge (._adaptive)
  if schedule.adaptive is not None:
    adaptive = AdaptiveRun(config, params, schedule, mesh, stepper.step_fn, processes.count > 1)
  if run_dir is not None and not resuming:
    run_dir.record(layout.initial_versions(tier))
  test_set = HeldOutSet(source.test_batches, tier.index, max_bytes=MAX_KEPT_TEST_SET_BYTES)
  val_set = None
  if source.val_batches is not None:
    val_set = HeldOutSet(source.val_batches, tier.index, max_bytes=MAX_KEPT_TEST_SET_BYTES)
  metrics_file = None
  if run_dir is not None and processes.is_main:
    path = run_dir.file(METRICS_FILE)
    if resuming:  # the records after the checkpoint are written again
      truncate_metrics(path, 0 if host is None else host["metrics_bytes"])
    metrics_file = MetricsFile(path)
    stack.callback(metrics_file.close)
  context = RunContext(
    config=config, source=source, processes=processes, out_dir=out_dir, run_dir=run_dir,
    table_dir=table_dir, mesh=mesh, predict=predict, replicas=replicas, tier=tier,
    stepper=stepper, timer=timer, monitor=monitor, meter=meter, adaptive=adaptive,
    test_set=test_set, val_set=val_set, metrics_file=metrics_file, checkpoint=checkpoint,
    run_state=None, start_step=start_step, num_steps=steps, gather=layout.gather,
  )  # fmt: skip
  if host is not None:
    context.run_state = _restore(context, host)
  return context


def _restore(context: RunContext, host: dict) -> RunState:
  """The checkpoint's host state: its parts restored in place, the run's own fields returned."""
  table_step = context.tier.table.step
  if host["table_step"] != table_step:
    raise ValueError(
      f"{context.checkpoint.path}: the table is at step {table_step}, the checkpoint "
      f"was taken at table step {host['table_step']}"
    )
  where = os.path.join(context.checkpoint.path, _checkpoint.HOST_STATE)
  run_state = RunState.from_json(host, context.parts(), where=where)
  if run_state.data_counts is not None and context.source.restore_counts is not None:
    context.source.restore_counts(run_state.data_counts)
  return run_state


def _open_run_dir(stack, config, source, out_dir, *, resume, overwrite):
  """The output directory, claimed for this run, and the checkpoint to resume from."""
  if out_dir is None:
    return None, None
  run_dir = RunDirectory(out_dir, run_identity(config, source), resume=resume, overwrite=overwrite)
  stack.callback(run_dir.close)
  if not run_dir.resuming:
    return run_dir, None
  checkpoint = _checkpoint.latest_checkpoint(run_dir.file(CHECKPOINT_DIR))
  if checkpoint is None and run_dir.status() == "completed":
    raise RunDirectoryError(
      f"the run in {out_dir} is complete and saved no checkpoint: there is nothing to "
      "resume (its results are in summary.json)"
    )
  return run_dir, checkpoint


def _own_table_dir(run_dir) -> str | None:
  """OUT/table: where a run that saves checkpoints keeps its table (no table_dir given)."""
  return None if run_dir is None else run_dir.file(TABLE_DIR)


def _table_dir(stack, config: TrainConfig, run_dir, resuming: bool) -> str:
  """Where the table lives: ``table_dir``, OUT/table for a run that saves checkpoints, or
  a scratch directory. A fresh run refuses an existing table unless told to start from it."""
  if config.table_dir is None:
    # The run's own table, also when a resumed run no longer saves checkpoints.
    own = _own_table_dir(run_dir)
    if config.checkpoint_every or (resuming and os.path.isdir(own)):
      return own
    scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="ctr_table_"))
    return os.path.join(scratch, "table")
  exists = os.path.isdir(config.table_dir) and bool(os.listdir(config.table_dir))
  if not resuming and exists and not config.init_from_table:
    raise ValueError(
      f"table_dir {config.table_dir} holds a table already; pass init_from_table "
      "(--init-from-table) to start from its rows with fresh dense layers, resume the run "
      "that wrote it (--resume), or choose another table_dir"
    )
  if config.init_from_table and not exists:
    raise ValueError(f"init_from_table: there is no table in table_dir {config.table_dir}")
  return config.table_dir


def _open_tier(stack, layout, config, run_dir, table_dir, mesh, resuming, checkpoint, out_dir):
  """The embedding tier, at the checkpoint's version (or the run's start) when resuming."""
  version = None
  own = layout.own_table(table_dir)  # this process's table: its shard when sharded
  kept = os.path.isdir(own) and bool(os.listdir(own))
  if checkpoint is not None:
    version = checkpoint.table
  elif resuming and kept:  # no checkpoint yet: the run starts over, from its table's start
    table = run_dir.recorded["table"]
    if "initial_versions" in table:  # a multi-process run's shards
      version = [TableVersion(**v) for v in table["initial_versions"]]
    else:
      version = TableVersion(**table["initial_version"])
  tier = layout.open_tier(
    config,
    table_dir,
    mesh,
    version,
    temporary=config.table_dir is None and table_dir != _own_table_dir(run_dir),
    flush_on_close=False if config.checkpoint_every else None,
    out_dir=out_dir,
  )
  stack.callback(tier.close)
  return tier


def _abstract(replicas: Replicas) -> dict:
  """Shapes, dtypes and shardings of the dense state: where a checkpoint is restored to."""
  state = {"params_W": replicas.params_W, "opt_state_W": replicas.opt_state_W}
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _layout(processes: _distributed.Processes) -> OneProcess | Sharded:
  """The one choice between one process and several (see the module docstring)."""
  return Sharded(processes) if processes.count > 1 else OneProcess(processes)
