"""The CTR trainer: the resources of one run, its step loop, and evaluation.

:class:`Trainer` is a context manager that owns everything a run opens (mesh, model and
optimizer state, embedding tier, scratch directory, data prefetcher, output directory and
metrics file) and closes it on exit, error or not. :meth:`Trainer.fit` runs the step loop;
after every step it hands a :class:`StepResult` to each hook (:mod:`._hooks`: progress bar,
metric records, periodic evaluation), so adding a behaviour to the loop means adding a hook,
not editing the loop. :func:`evaluate` scores one set of parameters on the test set.

Two duties are the trainer's own, not hooks', because their order matters: every step is
judged for divergence (:mod:`._divergence`) before anything of it is recorded, and a
checkpoint (:mod:`._checkpoint`) is taken after all hooks ran, so it holds what they wrote.
A run resumed from a checkpoint (``resume=True``) continues exactly: the same steps on the
same batches, the same metric records, the same results (bit for bit on one machine).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kstep_adam import _distributed
from kstep_adam import parallel
from kstep_adam._dispatch import optimizer_step
from kstep_adam._jsonio import dumps
from kstep_adam._schedule import MergeSchedule
from kstep_adam.ctr.data._prefetch import HeldOutSet
from kstep_adam.ctr.data._prefetch import IndexedBatch
from kstep_adam.ctr.data._prefetch import Prefetcher
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.data._sources import process_part
from kstep_adam.ctr.run import _checkpoint
from kstep_adam.ctr.run import _interrupt
from kstep_adam.ctr.run import _processes
from kstep_adam.ctr.run._rundir import CHECKPOINT_DIR
from kstep_adam.ctr.run._rundir import METRICS_FILE
from kstep_adam.ctr.run._rundir import TABLE_DIR
from kstep_adam.ctr.run._rundir import RunDirectory
from kstep_adam.ctr.run._rundir import RunDirectoryError
from kstep_adam.ctr.run._rundir import run_identity
from kstep_adam.ctr.run._state import RunState
from kstep_adam.ctr.run._state import truncate_metrics
from kstep_adam.ctr.train import _loss
from kstep_adam.ctr.train import _step
from kstep_adam.ctr.train._adaptive import AdaptiveRun
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._divergence import DivergenceError
from kstep_adam.ctr.train._divergence import DivergenceMonitor
from kstep_adam.ctr.train._evaluate import evaluate
from kstep_adam.ctr.train._exchange import shard_dir
from kstep_adam.ctr.train._exchange import sharded_device_cache_error
from kstep_adam.ctr.train._hooks import Hook
from kstep_adam.ctr.train._hooks import keyed
from kstep_adam.ctr.train._local_tier import SparseTier
from kstep_adam.ctr.train._loop import StepResult
from kstep_adam.ctr.train._loop import global_batches
from kstep_adam.ctr.train._loop import num_steps
from kstep_adam.ctr.train._loop import run_steps
from kstep_adam.ctr.train._loop import step_budget
from kstep_adam.ctr.train._meters import CommMeter
from kstep_adam.ctr.train._meters import Timer
from kstep_adam.ctr.train._models import make_model
from kstep_adam.ctr.train._sharded_step import make_sharded_train_step
from kstep_adam.ctr.train._sharded_tier import ShardedSparseTier
from kstep_adam.ctr.train._steppers import LocalStepper
from kstep_adam.ctr.train._steppers import Replicas
from kstep_adam.ctr.train._steppers import ShardedStepper
from kstep_adam.embedding import TableVersion

# Host memory a run may spend keeping its test set between evaluations (read once, reused).
MAX_KEPT_TEST_SET_BYTES = 1 << 30


class Trainer:
  """One CTR training run: its resources and its step loop.

  Use it as a context manager; everything it opened is closed on exit::

      with Trainer(config, source, make_optimizer(config), out_dir) as trainer:
        trainer.fit(hooks)
        result = trainer.evaluate()

  Args:
    config: the run's configuration.
    source: training and test data.
    optimizer: ``(tx, schedule)``, the dense optimizer and the merge schedule it runs (for
      byte accounting), e.g. from :func:`kstep_adam.ctr.make_optimizer`.
    out_dir: the run's directory: ``run.json``, ``metrics.jsonl``, checkpoints (and the
      caller's ``summary.json``); None writes nothing. One run per directory: one that
      holds another run is refused (see :class:`~kstep_adam.ctr.run._rundir.RunDirectory`).
    resume: continue the run in ``out_dir`` from its latest checkpoint (from its start if
      it has none; a new run if the directory is empty). Its configuration and data must be
      the recorded ones.
    overwrite: replace the run in ``out_dir`` (its files are deleted when this one starts).

  ``out_dir`` may be relative, hold spaces or pass through symlinks: it is made absolute here,
  once (as :attr:`out_dir`), and every path of the run (checkpoints, the table, orbax's saves,
  which need absolute paths) is built from it, in every process.

  In a multi-process run (``jax.distributed`` initialized, e.g. by :mod:`kstep_adam.launch`)
  every process makes its own ``Trainer`` with the same arguments: the ``'node'`` axis spans
  the processes (``config.nodes`` must equal their number), each reads its share of every
  batch (the source's :attr:`~DataSource.part`, cut here if the source yields whole batches)
  and keeps its shard of the table (:mod:`._sharded_tier`), and process 0 writes the output
  directory (:mod:`._multiprocess`, also for checkpoints and resuming).

  Attributes:
    processes: the processes of the run (``count`` 1 for a single process) and this one's
      ``index``.
    out_dir: the run's directory as an absolute path, or None.
    num_steps: steps :meth:`fit` takes (an estimate for ``epochs`` passes over file data
      until the last pass ends).
    start_step: the optimizer's step count when the run starts (its state's ``count``; the
      checkpoint's step for a resumed run).
    last_step: the optimizer's step count after :meth:`fit` (exact once it has run).
    evals: the evaluation records so far.
    test_set: the held-out batches, read and indexed once if they fit in memory.
    val_set: the validation batches, likewise, or None when the source has none.
    timer: wall time per phase (data, pull, compute, push, eval, checkpoint), compiling steps
      left out.
    train_seconds: wall time of :meth:`fit` without evaluations.
    compile_steps: steps whose program compiled first; compile_step_seconds: their time.
    monitor: the divergence test every step passes (:class:`DivergenceMonitor`).
    checkpoint: the run's latest complete checkpoint (None before its first).
    data_position: where the data continues after the last step taken (JSON data).
    metrics_file: the open ``metrics.jsonl`` of the run (process 0 of a run with an output
      directory; None otherwise), closed when the trainer closes.
    stepper: the step strategy of the run (:mod:`~kstep_adam.ctr.train._steppers`).
  """

  def __init__(
    self,
    config: TrainConfig,
    source: DataSource,
    optimizer: tuple[optax.GradientTransformation, MergeSchedule],
    out_dir: str | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
  ):
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
    self.processes = _distributed.Processes(jax.process_index(), jax.process_count())
    if self.sharded:
      if config.nodes != self.processes.count:
        raise ValueError(
          f"nodes={config.nodes} but the run has {self.processes.count} processes: the "
          f"'node' axis spans the processes, so pass --nodes {self.processes.count}"
        )
      if config.device_cache_rows:  # before anything is written (the tier refuses it too)
        raise ValueError(sharded_device_cache_error(config.device_cache_rows, self.processes.count))
      source = process_part(source, self.processes.index, self.processes.count)
    if out_dir is not None:  # the one place a run's paths are resolved (the class docstring)
      out_dir = os.path.abspath(os.fspath(out_dir))
    self.config, self.source, self.out_dir = config, source, out_dir
    self._resume, self._overwrite = resume, overwrite
    self.num_steps = num_steps(config, source)
    self._tx, self._schedule = optimizer
    self._stack = contextlib.ExitStack()
    self.replicas = Replicas()  # the dense state; the stepper advances it
    self.evals: list[dict] = []
    self.timer = Timer()
    self.train_seconds = 0.0
    self.compile_steps, self.compile_step_seconds = 0, 0.0
    self.monitor = DivergenceMonitor(config)
    self.checkpoint: _checkpoint.Checkpoint | None = None
    self.data_position: dict | None = None
    self._hooks: tuple[Hook, ...] = ()  # those of the current (or last) fit
    self._hook_states: dict = {}  # of the checkpoint resumed from, until fit() hands them over
    self._fit_clock: tuple[float, float] | None = None  # fit's start time and eval time then

  # -- resources ---------------------------------------------------------------------------
  def __enter__(self) -> Trainer:
    try:
      self._open()
    except BaseException:
      self._stack.close()
      raise
    return self

  def __exit__(self, *exc_info) -> None:
    self._stack.close()

  @property
  def params_W(self):
    """The per-worker replicas of the dense parameters."""
    return self.replicas.params_W

  @params_W.setter
  def params_W(self, value) -> None:
    self.replicas.params_W = value

  @property
  def opt_state_W(self):
    """The per-worker replicas of the dense optimizer state."""
    return self.replicas.opt_state_W

  @opt_state_W.setter
  def opt_state_W(self, value) -> None:
    self.replicas.opt_state_W = value

  @property
  def sharded(self) -> bool:
    """Whether the run spans several processes (and shards its table across them)."""
    return self.processes.count > 1

  @property
  def is_main(self) -> bool:
    """Whether this process writes the run's files (process 0)."""
    return self.processes.is_main

  def _open(self) -> None:
    config, source = self.config, self.source
    # Everything that can refuse the run does so before anything is written.
    if self.sharded and self.out_dir is not None:
      self.run_dir, checkpoint = _processes.open_run_dir(
        self._open_run_dir, self.out_dir, self.processes
      )
    else:
      self.run_dir, checkpoint = self._open_run_dir()
      if checkpoint is not None and not isinstance(checkpoint.table, TableVersion):
        raise RunDirectoryError(
          f"{checkpoint.path} was saved by a {len(checkpoint.table)}-process run (one table "
          f"shard per process); resume it with as many (python -m kstep_adam.launch "
          f"--num-processes {len(checkpoint.table)})"
        )
    resuming = self.run_dir is not None and self.run_dir.resuming
    self.table_dir = self._table_dir(resuming)
    devices = _distributed.process_major_devices() if self.sharded else None
    self.mesh = parallel.make_mesh(config.nodes, config.devices_per_node, devices=devices)
    if self.sharded:
      _check_node_per_process(self.mesh)
    model = make_model(
      config.model,
      num_dense=source.num_dense,
      num_categorical=source.num_categorical,
      embed_dim=config.embed_dim,
      top_mlp=config.top_mlp,
      seed=config.seed,
    )
    graphdef, params = nnx.split(model)
    self.params_W, self.opt_state_W = parallel.init_replicas(params, self._tx, self.mesh)
    host = None
    if checkpoint is not None:
      dense, host = _checkpoint.load_checkpoint(checkpoint, self._abstract_dense())
      self.params_W, self.opt_state_W = dense["params_W"], dense["opt_state_W"]
      self.checkpoint = checkpoint
    self.start_step = optimizer_step(self.opt_state_W) or 0
    budget = step_budget(config, source)
    self.num_steps = max((self.num_steps if budget is None else budget) - self.start_step, 0)
    self.last_step = self.start_step + self.num_steps
    if resuming and self.is_main:  # say where it continues (stderr, like the progress bar)
      where = f"step {self.start_step}" if checkpoint else "its start (no checkpoint yet)"
      print(f"resuming {self.out_dir} from {where}, to step {self.last_step}", file=sys.stderr)
    self.predict = _loss.make_predict(graphdef)
    self.meter = CommMeter(config, params, self._schedule, self.mesh)
    self._per_worker = parallel.worker_sharding(self.mesh)
    if self.run_dir is not None:
      # An overwritten run's files (or a killed write's temporaries when resuming): only now
      # that this run can start.
      self.run_dir.clear()
    if self.run_dir is not None and not resuming and self.sharded:
      _checkpoint.barrier()  # the shards go where process 0 just cleared
    self.tier = self._open_tier(resuming, checkpoint)
    skip_nonfinite = config.on_nonfinite == "skip"
    if self.sharded:
      self.step_fn = make_sharded_train_step(
        graphdef, self._tx, self.mesh, skip_nonfinite=skip_nonfinite
      )
    else:  # built after the tier: a device tier's optimizer runs inside the step
      self.step_fn = _step.make_ctr_train_step(
        graphdef,
        self._tx,
        self.mesh,
        skip_nonfinite=skip_nonfinite,
        device_optimizer=self.tier.device_optimizer,
      )
    if self.sharded:
      self.stepper = ShardedStepper(
        self.step_fn, self.tier, self.timer, self.monitor, self.replicas, self.mesh
      )
    else:
      self.stepper = LocalStepper(
        self.step_fn, self.tier, self.timer, self.monitor, self.replicas, self._per_worker
      )
    self.adaptive = None  # k = 'auto': the host decides each step's merge (._adaptive)
    if self._schedule.adaptive is not None:
      self.adaptive = AdaptiveRun(
        config, params, self._schedule, self.mesh, self.step_fn, self.sharded
      )
    if self.run_dir is not None and not resuming:
      if self.sharded:
        versions = _checkpoint.gather_versions(self.tier.table.committed)
        self.run_dir.record({"initial_versions": [v._asdict() for v in versions]})
      else:
        self.run_dir.record({"initial_version": self.tier.table.committed._asdict()})
    self.test_set = HeldOutSet(
      source.test_batches, self.tier.index, max_bytes=MAX_KEPT_TEST_SET_BYTES
    )
    self.val_set = None
    if source.val_batches is not None:
      self.val_set = HeldOutSet(
        source.val_batches, self.tier.index, max_bytes=MAX_KEPT_TEST_SET_BYTES
      )
    self.metrics_file = None
    if self.run_dir is not None and self.is_main:
      path = self.run_dir.file(METRICS_FILE)
      if resuming:  # the records after the checkpoint are written again
        truncate_metrics(path, 0 if host is None else host["metrics_bytes"])
      self.metrics_file = self._stack.enter_context(open(path, "a", encoding="utf-8"))
    if host is not None:
      self._restore_host_state(host)

  def _open_run_dir(self) -> tuple[RunDirectory | None, _checkpoint.Checkpoint | None]:
    """The output directory, claimed for this run, and the checkpoint to resume from."""
    if self.out_dir is None:
      return None, None
    run_dir = RunDirectory(
      self.out_dir,
      run_identity(self.config, self.source),
      resume=self._resume,
      overwrite=self._overwrite,
    )
    self._stack.callback(run_dir.close)
    if not run_dir.resuming:
      return run_dir, None
    checkpoint = _checkpoint.latest_checkpoint(run_dir.file(CHECKPOINT_DIR))
    if checkpoint is None and run_dir.status() == "completed":
      raise RunDirectoryError(
        f"the run in {self.out_dir} is complete and saved no checkpoint: there is nothing to "
        "resume (its results are in summary.json)"
      )
    return run_dir, checkpoint

  def _table_dir(self, resuming: bool) -> str:
    """Where the table lives: ``table_dir``, OUT/table for a run that saves checkpoints, or
    a scratch directory. A fresh run refuses an existing table unless told to start from it."""
    config = self.config
    if config.table_dir is None:
      # The run's own table, also when a resumed run no longer saves checkpoints.
      own = self._own_table_dir()
      if config.checkpoint_every or (resuming and os.path.isdir(own)):
        return own
      scratch = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="ctr_table_"))
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

  def _open_tier(self, resuming: bool, checkpoint) -> SparseTier | ShardedSparseTier:
    """The embedding tier, at the checkpoint's version (or the run's start) when resuming."""
    version = None
    own = self.table_dir  # this process's table: its shard when the table is sharded
    if self.sharded:
      own = shard_dir(self.table_dir, self.processes.index, self.processes.count)
    kept = os.path.isdir(own) and bool(os.listdir(own))
    if checkpoint is not None:
      version = checkpoint.table
    elif resuming and kept:  # no checkpoint yet: the run starts over, from its table's start
      table = self.run_dir.recorded["table"]
      if "initial_versions" in table:  # a multi-process run's shards
        version = [TableVersion(**v) for v in table["initial_versions"]]
      else:
        version = TableVersion(**table["initial_version"])
      if self.sharded and isinstance(version, TableVersion):
        version = [version]  # refused below: one table for several processes
    scratch = self.config.table_dir is None and self.table_dir != self._own_table_dir()
    flush_on_close = False if self.config.checkpoint_every else None
    if self.sharded:
      tier = ShardedSparseTier(
        self.config,
        self.table_dir,
        self.mesh,
        temporary=scratch,
        flush_on_close=flush_on_close,
        version=None if version is None else _processes.shard_version(version, self.processes),
      )
    else:
      if version is not None and not isinstance(version, TableVersion):  # no checkpoint yet
        raise RunDirectoryError(
          f"the run in {self.out_dir} was started with {len(version)} processes (one table "
          f"shard each); resume it with as many (python -m kstep_adam.launch "
          f"--num-processes {len(version)})"
        )
      tier = SparseTier(
        self.config,
        self.table_dir,
        temporary=scratch,
        flush_on_close=flush_on_close,
        version=version,
        mesh=self.mesh,
      )
    self._stack.callback(tier.close)
    return tier

  def _own_table_dir(self) -> str | None:
    """OUT/table: where a run that saves checkpoints keeps its table (no table_dir given)."""
    return None if self.run_dir is None else self.run_dir.file(TABLE_DIR)

  def _abstract_dense(self) -> dict:
    """Shapes, dtypes and shardings of the dense state: where a checkpoint is restored to."""
    state = {"params_W": self.params_W, "opt_state_W": self.opt_state_W}
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )

  def log(self, record: dict) -> None:
    """Append one strict-JSON record to ``metrics.jsonl`` (nothing without an ``out_dir``)."""
    if self.metrics_file is not None:
      self.metrics_file.write(dumps(record) + "\n")
      self.metrics_file.flush()

  # -- the step loop -----------------------------------------------------------------------
  def fit(self, hooks: Sequence[Hook] = ()) -> None:
    """Take :attr:`num_steps` steps (for ``epochs`` passes of file data: until the last pass
    ends); after each, call every hook in order, then save a checkpoint when one is due.

    SIGINT and SIGTERM stop the run at the next step boundary (after that step's hooks and
    checkpoint; see :mod:`._interrupt`), never inside a step or a write.

    Raises:
      DivergenceError: a step's loss or gradients were not finite, or its loss exploded
        (see :mod:`._divergence`); no checkpoint is taken of that step.
      RunInterrupted: a SIGINT or SIGTERM came; it names the step and the last checkpoint.
    """
    with _interrupt.stop_at_step_boundaries():
      self._fit(hooks)

  def check_interrupt(self) -> None:
    """Raise :class:`RunInterrupted` if a SIGINT or SIGTERM came (a step boundary)."""
    checkpoint = self.checkpoint
    _interrupt.check(
      step=self.step,
      checkpoint=None if checkpoint is None else checkpoint.path,
      checkpoint_step=None if checkpoint is None else checkpoint.step,
    )

  def _fit(self, hooks: Sequence[Hook]) -> None:
    self.check_interrupt()  # one that came while the run started
    self._hooks = tuple(hooks)
    self._restore_hooks()
    batches = global_batches(self.config, self.source, self._remaining(), self.data_position)
    prefetcher = Prefetcher(
      batches, self.tier.index, background=self.config.prefetch, positioned=True
    )
    self._stack.callback(prefetcher.close)  # also on error; closing twice is harmless
    start, eval_before = time.perf_counter(), self.timer.total("eval")
    self._fit_clock = (start, eval_before)
    try:
      run_steps(
        self.stepper,
        prefetcher,
        timer=self.timer,
        meter=self.meter,
        adaptive=self.adaptive,
        log=self.log,
        advanced=self._advanced,
        after_step=lambda result, step_start: self._after_step(hooks, result, step_start),
      )
    except DivergenceError:
      self.tier.keep_committed()  # the table's last commit keeps the last good state
      raise
    finally:
      prefetcher.close()
      for hook in hooks:
        hook.close()
      self._fit_clock = None
    eval_seconds = self.timer.total("eval") - eval_before
    self.train_seconds += time.perf_counter() - start - eval_seconds
    self.last_step = self.step

  def _advanced(self, result: StepResult, batch: IndexedBatch) -> None:
    """Right after a step: where the data continues, and whether the run ends here."""
    self.data_position = batch.position
    if result.last:
      self.last_step = result.step

  def _after_step(self, hooks: Sequence[Hook], result: StepResult, step_start: float) -> None:
    """After a step is accounted: its compile time, the hooks, a checkpoint if due (so it
    holds what the hooks wrote), then a pending interrupt."""
    if result.compiled:
      self.compile_steps += 1
      self.compile_step_seconds += time.perf_counter() - step_start
      self.timer.discard_step()
    for hook in hooks:
      hook.after_step(self, result)
    self._checkpoint_if_due(result)
    self.check_interrupt()

  def _remaining(self) -> int | None:
    """Steps left of a fixed budget, or None when the data decides the end."""
    budget = step_budget(self.config, self.source)
    return None if budget is None else max(budget - self.step, 0)

  # -- checkpoints -------------------------------------------------------------------------
  def _checkpoint_if_due(self, result: StepResult) -> None:
    """Every ``checkpoint_every`` steps while the loss is in range (a checkpoint must hold a
    good state), and at the last step."""
    every = self.config.checkpoint_every
    if every and ((result.step % every == 0 and not self.monitor.suspect) or result.last):
      self.save_checkpoint()

  def save_checkpoint(self) -> _checkpoint.Checkpoint:
    """Save a checkpoint of the run at its current step (see :mod:`._checkpoint`)."""
    if self.run_dir is None:
      raise ValueError("a checkpoint needs an output directory (out_dir)")
    self.check_state()  # before anything of the checkpoint is written
    with self.timer("checkpoint"):
      if self.metrics_file is not None:  # the records it counts must be on disk before it is
        self.metrics_file.flush()
        os.fsync(self.metrics_file.fileno())
      self.checkpoint = _checkpoint.save_checkpoint(  # every process saves its part
        self.run_dir.file(CHECKPOINT_DIR),
        self.step,
        {"params_W": self.params_W, "opt_state_W": self.opt_state_W},
        self.host_state(),
        self.tier.flush,
        keep=self.config.keep_checkpoints,
        processes=self.processes,
      )
    return self.checkpoint

  def _parts(self) -> dict:
    """The run's stateful parts, by their key in ``host.json``."""
    return {
      "meter": self.meter,
      "monitor": self.monitor,
      "timer": self.timer,
      "adaptive": self.adaptive,
    }

  def host_state(self) -> dict:
    """Everything of the run besides the dense state and the table, as a checkpoint keeps it
    (JSON data): the data position, counters, records, hook states and time totals."""
    train_seconds = self.train_seconds
    if self._fit_clock is not None:  # inside fit: its time so far, without evaluations
      start, eval_before = self._fit_clock
      evals = self.timer.total("eval") - eval_before
      train_seconds += time.perf_counter() - start - evals
    hooks = {}
    for key, hook in keyed(self._hooks):
      state = hook.state()
      if state is not None:
        hooks[key] = state
    run_state = RunState(
      data_position=self.data_position,
      data_counts=None if self.source.counts is None else self.source.counts(),
      evals=self.evals,
      hook_states=hooks,
      train_seconds=train_seconds,
      compile_steps=self.compile_steps,
      compile_step_seconds=self.compile_step_seconds,
      metrics_bytes=0
      if self.metrics_file is None
      else os.fstat(self.metrics_file.fileno()).st_size,
    )
    return run_state.to_json(self.step, self.tier.table.step, self._parts())

  def _restore_host_state(self, host: dict) -> None:
    if host["table_step"] != self.tier.table.step:
      raise ValueError(
        f"{self.checkpoint.path}: the table is at step {self.tier.table.step}, the checkpoint "
        f"was taken at table step {host['table_step']}"
      )
    where = os.path.join(self.checkpoint.path, _checkpoint.HOST_STATE)
    run_state = RunState.from_json(host, self._parts(), where=where)
    self.data_position = run_state.data_position
    if run_state.data_counts is not None and self.source.restore_counts is not None:
      self.source.restore_counts(run_state.data_counts)
    self.evals = run_state.evals
    self._hook_states = run_state.hook_states
    self.train_seconds = run_state.train_seconds
    self.compile_steps = run_state.compile_steps
    self.compile_step_seconds = run_state.compile_step_seconds

  def _restore_hooks(self) -> None:
    """Hand the resumed checkpoint's hook states to the hooks of this :meth:`fit`."""
    for key, hook in keyed(self._hooks):
      if key in self._hook_states:
        hook.restore(self._hook_states.pop(key))

  def check_state(self) -> None:
    """Refuse a dense state (parameters, optimizer state) with any non-finite value: it is
    divergence, decided before a checkpoint or the run's results are written. (The table's
    rows are checked as they are pushed.) Collective in a multi-process run.

    Raises:
      DivergenceError: at the current step; the table then keeps its last commit.
    """
    bad = _dense_nonfinite({"params_W": self.params_W, "opt_state_W": self.opt_state_W})
    if bad:
      self.tier.keep_committed()
      loss = self.monitor.last_loss
      raise DivergenceError(
        self.step,
        "nonfinite",
        math.nan if loss is None else loss,
        f"{bad} values of the dense parameters and optimizer state are not finite; lower "
        "the learning rates",
      )

  def check_predictions(self, record: dict) -> None:
    """Refuse an evaluation (:meth:`evaluate`'s record) with any non-finite prediction: the
    model diverged, even if every training loss was finite.

    Raises:
      DivergenceError: at the current step; the table then keeps its last commit.
    """
    for split in ("val", "test"):
      bad = record.get(f"{split}_nonfinite_predictions")
      if bad:
        self.tier.keep_committed()
        loss = self.monitor.last_loss
        raise DivergenceError(
          self.step,
          "nonfinite",
          math.nan if loss is None else loss,
          f"{bad} of the {record[f'{split}_examples']} {split} predictions are not finite; "
          "lower the learning rates",
        )

  # -- evaluation and state ----------------------------------------------------------------
  def merged_params(self):
    """The mean of the workers' replicas (what a final merge produces), on the host."""
    return jax.device_get(_loss.replica_mean(self.params_W))

  @property
  def step(self) -> int:
    """The optimizer's step count now (the state's own ``count`` before the first step)."""
    return self.start_step if self.step_fn.step is None else self.step_fn.step

  def evaluate(self, *, test: bool = True) -> dict:
    """Evaluate the merged replicas on the validation set (if any) and, unless ``test`` is
    False, the test set; record and log the result (``val_*`` and ``test_*`` keys)."""
    gather = _distributed.allgather_concat if self.sharded else None
    result = {}
    with self.timer("eval"):
      params = self.merged_params()
      for split, held_out in (("val", self.val_set), ("test", self.test_set if test else None)):
        if held_out is not None:
          result.update(
            evaluate(held_out, self.tier, self.predict, params, split=split, gather=gather)
          )
    record = {"kind": "eval", "step": self.step, **result}
    self.evals.append(record)
    self.log(record)
    return record

  def state(self, row_ids: np.ndarray) -> dict:
    """Every worker's dense replica (NumPy) and the current values of ``row_ids``.

    In a multi-process run: this process's workers' replicas (``workers`` says which) and
    rows of its own shard.
    """
    if self.sharded:
      workers = [w for w in range(self.mesh.size) if _addressable(self.params_W, w)]
      replicas = [parallel.unreplicate(self.params_W, worker=w) for w in workers]
      return {
        "workers": np.asarray(workers),
        "params_W": jax.tree.map(lambda *xs: np.stack(xs), *replicas),
        "row_ids": row_ids,
        "rows": self.tier.rows(row_ids),
      }
    return {
      "params_W": jax.device_get(self.params_W),
      "row_ids": row_ids,
      "rows": self.tier.table.pull(row_ids),
    }

  def table_stats(self) -> dict:
    """The table's counters; in a multi-process run, summed over the shards (hit rate over
    all their reads) with each shard's own under ``shards``. Collective when sharded."""
    return self.tier.run_stats()


def _addressable(tree_W, worker: int) -> bool:
  """Whether this process holds ``worker``'s replica."""
  leaf = jax.tree.leaves(tree_W)[0]
  return any(
    (s.index[0].start or 0) <= worker < (s.index[0].start or 0) + s.data.shape[0]
    for s in leaf.addressable_shards
  )


def _check_node_per_process(mesh) -> None:
  """Every row of the mesh (a ``'node'``) must be one process's devices."""
  for node, devices in enumerate(mesh.devices):
    owners = {d.process_index for d in devices}
    if owners != {node}:
      raise ValueError(
        f"mesh node {node} has devices of processes {sorted(owners)}; with several processes "
        f"each needs devices_per_node devices of its own (on CPU, jax_num_cpu_devices)"
      )


def _dense_nonfinite(tree) -> int:
  """Non-finite values among the floating leaves of a (dense state) pytree."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return sum(int(jnp.sum(~jnp.isfinite(x))) for x in leaves)
