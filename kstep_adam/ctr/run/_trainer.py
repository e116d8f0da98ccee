"""The CTR trainer: one run's step loop, checkpoints and evaluation, over what it opened.

:class:`Trainer` is a context manager over :func:`~._context.open_run`, which opens everything a
run holds (mesh, model and optimizer state, embedding tier, scratch directory, output directory
and metrics file) and closes it on exit, error or not. :meth:`Trainer.fit` runs the step loop
(:func:`~kstep_adam.ctr.train._loop.run_steps` over the stepper the run opened); after every
step it hands a :class:`StepResult` and a :class:`HookView` of the run to each hook
(:mod:`~kstep_adam.ctr.train._hooks`: progress bar, metric records, periodic evaluation), so
adding a behaviour to the loop means adding a hook, not editing the loop.

Two duties are the trainer's own, not hooks', because their order matters: every step is
judged for divergence before anything of it is recorded, and a checkpoint (:mod:`._checkpoint`)
is taken after all hooks ran, so it holds what they wrote. A run resumed from a checkpoint
continues exactly: the same steps on the same batches, the same records and results (bit for
bit on one machine).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import jax
import numpy as np
import optax

from kstep_adam._schedule import MergeSchedule
from kstep_adam.ctr.data._prefetch import IndexedBatch
from kstep_adam.ctr.data._prefetch import Prefetcher
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.run import _checkpoint
from kstep_adam.ctr.run import _interrupt
from kstep_adam.ctr.run._context import current_processes
from kstep_adam.ctr.run._context import open_run
from kstep_adam.ctr.run._context import prepare_run
from kstep_adam.ctr.run._rundir import CHECKPOINT_DIR
from kstep_adam.ctr.run._state import RunState
from kstep_adam.ctr.train import _loss
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._divergence import DivergenceError
from kstep_adam.ctr.train._divergence import DivergenceMonitor
from kstep_adam.ctr.train._divergence import check_dense
from kstep_adam.ctr.train._divergence import check_predictions
from kstep_adam.ctr.train._evaluate import evaluate
from kstep_adam.ctr.train._hooks import Hook
from kstep_adam.ctr.train._hooks import HookView
from kstep_adam.ctr.train._hooks import hook_states
from kstep_adam.ctr.train._hooks import restore_hooks
from kstep_adam.ctr.train._loop import StepResult
from kstep_adam.ctr.train._loop import global_batches
from kstep_adam.ctr.train._loop import num_steps
from kstep_adam.ctr.train._loop import run_steps
from kstep_adam.ctr.train._loop import step_budget
from kstep_adam.ctr.train._meters import Timer


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
      caller's ``summary.json``); None writes nothing. One that holds another run is refused
      (:class:`~._rundir.RunDirectory`); it may be relative (made absolute once).
    resume: continue the run in ``out_dir`` from its latest checkpoint (from its start if
      it has none; a new run if the directory is empty), with the recorded config and data.
    overwrite: replace the run in ``out_dir`` (its files are deleted when this one starts).

  In a multi-process run (``jax.distributed`` initialized, e.g. by :mod:`kstep_adam.launch`)
  every process makes its own ``Trainer`` with the same arguments: ``config.nodes`` must equal
  their number, each reads its share of every batch and keeps its shard of the table, and
  process 0 writes the output directory; :mod:`._context` is where that is decided.

  Attributes:
    processes: the run's processes (``count`` 1 for a single process) and this one's ``index``.
    out_dir: the run's directory as an absolute path, or None.
    num_steps: steps :meth:`fit` takes (an estimate for ``epochs`` passes of file data).
    start_step: the optimizer's step count at the start (the checkpoint's when resuming).
    last_step: the optimizer's step count after :meth:`fit` (exact once it has run).
    evals: the evaluation records so far.
    timer: wall time per phase (data, pull, compute, push, eval, checkpoint), compiling steps
      left out; monitor: the divergence test every step passes (:class:`DivergenceMonitor`).
    train_seconds: wall time of :meth:`fit` without evaluations.
    compile_steps: steps whose program compiled first; compile_step_seconds: their time.
    checkpoint: the run's latest complete checkpoint (None before its first).
    data_position: where the data continues after the last step taken (JSON data).
    context: what the run opened (:class:`~._context.RunContext`), of which the trainer also
      holds ``run_dir``, ``table_dir``, ``mesh``, ``predict``, ``meter``, ``tier``,
      ``stepper`` (the step strategy), ``replicas``, ``adaptive``, ``test_set``, ``val_set``
      and ``metrics_file``; they exist once the ``with`` block is entered.
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
    self.processes = current_processes()
    source, out_dir = prepare_run(  # errors that need no file come from the constructor
      config, source, out_dir, self.processes, resume=resume, overwrite=overwrite
    )
    self.config, self.source, self.out_dir = config, source, out_dir
    self.num_steps = num_steps(config, source)
    self.evals: list[dict] = []
    self.timer = Timer()
    self.train_seconds = 0.0
    self.compile_steps, self.compile_step_seconds = 0, 0.0
    self.monitor = DivergenceMonitor(config)
    self._stack = contextlib.ExitStack()
    self._opening = open_run(  # opened by __enter__
      config,
      source,
      optimizer,
      out_dir,
      resume=resume,
      overwrite=overwrite,
      timer=self.timer,
      monitor=self.monitor,
    )
    self.checkpoint: _checkpoint.Checkpoint | None = None
    self.data_position: dict | None = None
    self._hooks: tuple[Hook, ...] = ()  # those of the current (or last) fit
    self._hook_states: dict = {}  # of the checkpoint resumed from, until fit() hands them over
    self._fit_clock: tuple[float, float] | None = None  # fit's start time and eval time then

  def __enter__(self) -> Trainer:
    # If opening fails, open_run closes what it opened and nothing else is open yet.
    self.context = context = self._stack.enter_context(self._opening)
    self.run_dir, self.table_dir, self.mesh = context.run_dir, context.table_dir, context.mesh
    self.predict, self.meter, self.tier = context.predict, context.meter, context.tier
    self.stepper, self.replicas, self.adaptive = context.stepper, context.replicas, context.adaptive
    self.test_set, self.val_set = context.test_set, context.val_set
    self.metrics_file, self.checkpoint = context.metrics_file, context.checkpoint
    self.start_step, self.num_steps = context.start_step, context.num_steps
    self.last_step = self.start_step + self.num_steps
    if context.run_state is not None:  # the resumed checkpoint's own fields
      state = context.run_state
      self.data_position, self.evals = state.data_position, state.evals
      self._hook_states, self.train_seconds = state.hook_states, state.train_seconds
      self.compile_steps = state.compile_steps
      self.compile_step_seconds = state.compile_step_seconds
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
  def is_main(self) -> bool:
    """Whether this process writes the run's files (process 0)."""
    return self.processes.is_main

  def log(self, record: dict) -> None:
    """Append one strict-JSON record to ``metrics.jsonl`` (nothing without an ``out_dir``)."""
    if self.metrics_file is not None:
      self.metrics_file.log(record)

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
    last = self.checkpoint
    _interrupt.check(
      step=self.step,
      checkpoint=None if last is None else last.path,
      checkpoint_step=None if last is None else last.step,
    )

  def _fit(self, hooks: Sequence[Hook]) -> None:
    self.check_interrupt()  # one that came while the run started
    self._hooks = tuple(hooks)
    restore_hooks(self._hooks, self._hook_states)  # the resumed checkpoint's, once
    view = self.hook_view()
    budget = step_budget(self.config, self.source)  # None: the data decides the end
    remaining = None if budget is None else max(budget - self.step, 0)
    batches = global_batches(self.config, self.source, remaining, self.data_position)
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
        after_step=lambda result, step_start: self._after_step(hooks, view, result, step_start),
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

  def hook_view(self) -> HookView:
    """What the hooks of :meth:`fit` see of this run (:class:`HookView`)."""
    return HookView(
      config=self.config,
      processes=self.processes,
      timer=self.timer,
      meter=self.meter,
      hit_rate=self.tier.hit_rate,
      log=self.log,
      evaluate=self.evaluate,
      has_val_set=self.val_set is not None,
    )

  def _advanced(self, result: StepResult, batch: IndexedBatch) -> None:
    """Right after a step: where the data continues, and whether the run ends here."""
    self.data_position = batch.position
    if result.last:
      self.last_step = result.step

  def _after_step(
    self, hooks: Sequence[Hook], view: HookView, result: StepResult, step_start: float
  ) -> None:
    """After a step is accounted: its compile time, the hooks, a checkpoint if due (so it
    holds what the hooks wrote), then a pending interrupt."""
    if result.compiled:
      self.compile_steps += 1
      self.compile_step_seconds += time.perf_counter() - step_start
      self.timer.discard_step()
    for hook in hooks:
      hook.after_step(view, result)
    self._checkpoint_if_due(result)
    self.check_interrupt()

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
        self.metrics_file.sync()
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

  def host_state(self) -> dict:
    """Everything of the run besides the dense state and the table, as a checkpoint keeps it
    (JSON data): the data position, counters, records, hook states and time totals."""
    train_seconds = self.train_seconds
    if self._fit_clock is not None:  # inside fit: its time so far, without evaluations
      start, eval_before = self._fit_clock
      evals = self.timer.total("eval") - eval_before
      train_seconds += time.perf_counter() - start - evals
    run_state = RunState(
      data_position=self.data_position,
      data_counts=None if self.source.counts is None else self.source.counts(),
      evals=self.evals,
      hook_states=hook_states(self._hooks),
      train_seconds=train_seconds,
      compile_steps=self.compile_steps,
      compile_step_seconds=self.compile_step_seconds,
      metrics_bytes=0 if self.metrics_file is None else self.metrics_file.size(),
    )
    return run_state.to_json(self.step, self.tier.table.step, self.context.parts())

  def check_state(self) -> None:
    """Refuse a dense state (parameters, optimizer state) with any non-finite value: it is
    divergence, decided before a checkpoint or the run's results are written. (The table's
    rows are checked as they are pushed.) Collective in a multi-process run.

    Raises:
      DivergenceError: at the current step; the table then keeps its last commit.
    """
    self._judge(check_dense, {"params_W": self.params_W, "opt_state_W": self.opt_state_W})

  def check_predictions(self, record: dict) -> None:
    """Refuse an evaluation (:meth:`evaluate`'s record) with any non-finite prediction: the
    model diverged, even if every training loss was finite.

    Raises:
      DivergenceError: at the current step; the table then keeps its last commit.
    """
    self._judge(check_predictions, record)

  def _judge(self, check, what) -> None:
    """``check(step, what, last_loss)``; on divergence the table keeps its last commit."""
    try:
      check(self.step, what, self.monitor.last_loss)
    except DivergenceError:
      self.tier.keep_committed()
      raise

  # -- evaluation and state ----------------------------------------------------------------
  def merged_params(self):
    """The mean of the workers' replicas (what a final merge produces), on the host."""
    return jax.device_get(_loss.replica_mean(self.params_W))

  @property
  def step(self) -> int:
    """The optimizer's step count now (the state's own ``count`` before the first step)."""
    step = self.stepper.step
    return self.start_step if step is None else step

  def evaluate(self, *, test: bool = True) -> dict:
    """Evaluate the merged replicas on the validation set (if any) and, unless ``test`` is
    False, the test set; record and log the result (``val_*`` and ``test_*`` keys)."""
    result = {}
    with self.timer("eval"):
      params = self.merged_params()
      for split, held_out in (("val", self.val_set), ("test", self.test_set if test else None)):
        if held_out is not None:
          gather = self.context.gather  # a multi-process run scores the whole set
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
    return self.stepper.state(row_ids)

  def table_stats(self) -> dict:
    """The table's counters; in a multi-process run, summed over the shards (hit rate over
    all their reads) with each shard's own under ``shards``. Collective when sharded."""
    return self.tier.run_stats()
