"""The CTR trainer: the resources of one run, its step loop, and evaluation.

:class:`Trainer` is a context manager that owns everything a run opens (mesh, model and
optimizer state, embedding tier, scratch directory, data prefetcher, metrics file) and closes
it on exit, error or not. :meth:`Trainer.fit` runs the step loop; after every step it hands a
:class:`StepResult` to each hook (:mod:`._hooks`: progress bar, metric records, periodic
evaluation), so adding a behaviour to the loop means adding a hook, not editing the loop.
:func:`evaluate` scores one set of parameters on the test set.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kstep_adam import parallel
from kstep_adam._dispatch import optimizer_step
from kstep_adam._jsonio import dumps
from kstep_adam._schedule import MergeSchedule
from kstep_adam.ctr import _step
from kstep_adam.ctr._batch import CTRBatch
from kstep_adam.ctr._comm import CommMeter
from kstep_adam.ctr._config import TrainConfig
from kstep_adam.ctr._metrics import auc
from kstep_adam.ctr._metrics import logloss
from kstep_adam.ctr._models import make_model
from kstep_adam.ctr._pipeline import HeldOutSet
from kstep_adam.ctr._pipeline import IndexedBatch
from kstep_adam.ctr._pipeline import Prefetcher
from kstep_adam.ctr._pipeline import Timer
from kstep_adam.ctr._sources import DataSource
from kstep_adam.ctr._tier import SparseTier

# Host memory a run may spend keeping its test set between evaluations (read once, reused).
MAX_KEPT_TEST_SET_BYTES = 1 << 30


class StepResult(NamedTuple):
  """What one training step did, handed to every hook."""

  step: int  # the optimizer's step count after this step (1-based)
  loss: float  # global-mean training loss of the step's batch
  row_ids_U: np.ndarray  # int64 [U], the table rows the step pulled and pushed
  compiled: bool  # the step program compiled first (left out of throughput and breakdown)


class Hook:
  """Something that runs after every training step (logging, evaluation, checkpoints).

  Subclasses override :meth:`after_step`, and :meth:`close` if they hold a resource.
  """

  def after_step(self, trainer: Trainer, result: StepResult) -> None:
    """Called after every step, in the order the hooks were given."""

  def close(self) -> None:
    """Called once when :meth:`Trainer.fit` ends, normally or not."""


def num_steps(config: TrainConfig, source: DataSource) -> int:
  """Steps of a run: ``config.steps``, else ``epochs`` passes of file data, else
  ``synthetic_steps`` of an endless stream."""
  if config.steps is not None:
    return config.steps
  per_epoch = source.steps_per_epoch(config.global_batch)
  if per_epoch is None:
    return config.synthetic_steps
  if per_epoch < 1:
    raise ValueError(
      f"{source.name} has fewer training lines than one global batch "
      f"({config.global_batch}); lower --batch-size or use fewer workers"
    )
  return config.epochs * per_epoch


def global_batches(config: TrainConfig, source: DataSource, count: int) -> Iterator[CTRBatch]:
  """``count`` global batches, continuing into the next epoch as needed."""
  produced, epoch = 0, 0
  while produced < count:
    count_before = produced
    for batch in source.train_epoch(epoch, config.global_batch):
      yield batch
      produced += 1
      if produced == count:
        return
    if produced == count_before:
      raise ValueError(f"{source.name} yielded no full global batch of {config.global_batch}")
    epoch += 1


def eval_metrics(labels_N: np.ndarray, probs_N: np.ndarray) -> dict:
  """AUC and logloss of click probabilities, or None with a reason where one is undefined.

  Returns:
    ``test_auc`` and ``test_logloss`` (floats, or None), ``test_examples``, ``test_positives``
    and, when a metric is None, ``test_note`` saying why: a test set with a single class has
    no AUC, and non-finite predictions (a diverged model) have neither.

  Examples:
    >>> eval_metrics(np.array([0.0, 0.0]), np.array([0.2, 0.4]))["test_note"]
    'the test set has a single class (2 examples, all labelled 0): AUC is undefined'
  """
  labels_N, probs_N = np.asarray(labels_N), np.asarray(probs_N)
  positives = int(labels_N.sum())
  result = {
    "test_auc": None,
    "test_logloss": None,
    "test_examples": int(labels_N.size),
    "test_positives": positives,
  }
  if labels_N.size == 0:
    return {**result, "test_note": "the test set is empty"}
  bad = int(np.count_nonzero(~np.isfinite(probs_N)))
  if bad:
    return {
      **result,
      "test_note": f"{bad} of {labels_N.size} predictions are not finite (the model diverged)",
    }
  result["test_logloss"] = logloss(labels_N, probs_N)
  if positives in (0, labels_N.size):
    note = (
      f"the test set has a single class ({labels_N.size} examples, all labelled "
      f"{int(positives > 0)}): AUC is undefined"
    )
    return {**result, "test_note": note}
  return {**result, "test_auc": auc(labels_N, probs_N)}


def evaluate(test_set: Iterable[IndexedBatch], tier: SparseTier, predict, params) -> dict:
  """:func:`eval_metrics` of ``params`` (one replica) on the held-out ``test_set``."""
  labels, probs = [], []
  for item in test_set:
    rows = tier.pull(item.row_ids_U, item.inverse_GxF, kind="eval")
    probs.append(np.asarray(predict(params, rows.rows_PxD, rows.inverse_GxF, item.batch.dense_BxI)))
    labels.append(item.batch.label_B)
  if not labels:
    return eval_metrics(np.zeros(0), np.zeros(0))
  return eval_metrics(np.concatenate(labels), np.concatenate(probs))


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
    out_dir: where ``metrics.jsonl`` (and the caller's ``summary.json``) go; None writes
      nothing.

  Attributes:
    num_steps: steps :meth:`fit` takes.
    start_step: the optimizer's step count when the run starts (its state's ``count``).
    last_step: the optimizer's step count after :meth:`fit`.
    evals: the evaluation records so far.
    test_set: the held-out batches, read and indexed once if they fit in memory.
    timer: wall time per phase (data, pull, compute, push, eval), compiling steps left out.
    train_seconds: wall time of :meth:`fit` without evaluations.
    compile_steps: steps whose program compiled first; compile_step_seconds: their time.
  """

  def __init__(
    self,
    config: TrainConfig,
    source: DataSource,
    optimizer: tuple[optax.GradientTransformation, MergeSchedule],
    out_dir: str | None = None,
  ):
    if config.num_workers > len(jax.devices()):
      raise ValueError(
        f"nodes x devices_per_node = {config.num_workers} exceeds the "
        f"{len(jax.devices())} devices; on CPU set jax_num_cpu_devices first"
      )
    self.config, self.source, self.out_dir = config, source, out_dir
    self.num_steps = num_steps(config, source)
    self._tx, self._schedule = optimizer
    self._stack = contextlib.ExitStack()
    self.evals: list[dict] = []
    self.timer = Timer()
    self.train_seconds = 0.0
    self.compile_steps, self.compile_step_seconds = 0, 0.0

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

  def _open(self) -> None:
    config, source = self.config, self.source
    self.mesh = parallel.make_mesh(config.nodes, config.devices_per_node)
    model = make_model(
      config.model,
      num_dense=source.num_dense,
      num_categorical=source.num_categorical,
      embed_dim=config.embed_dim,
      seed=config.seed,
    )
    graphdef, params = nnx.split(model)
    self.params_W, self.opt_state_W = parallel.init_replicas(params, self._tx, self.mesh)
    self.start_step = optimizer_step(self.opt_state_W) or 0
    self.last_step = self.start_step + self.num_steps
    self.step_fn = _step.make_ctr_train_step(graphdef, self._tx, self.mesh)
    self.predict = _step.make_predict(graphdef)
    self.meter = CommMeter(config, params, self._schedule, self.mesh)
    self._replicated = NamedSharding(self.mesh, P())
    self._per_worker = parallel.worker_sharding(self.mesh)
    if config.table_dir:
      self.table_dir = config.table_dir
    else:
      scratch = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="ctr_table_"))
      self.table_dir = os.path.join(scratch, "table")
    self.tier = SparseTier(config, self.table_dir, temporary=not config.table_dir)
    self._stack.callback(self.tier.close)
    self.test_set = HeldOutSet(
      source.test_batches, self.tier.index, max_bytes=MAX_KEPT_TEST_SET_BYTES
    )
    self._writer = None
    if self.out_dir is not None:
      os.makedirs(self.out_dir, exist_ok=True)
      self._writer = self._stack.enter_context(
        open(os.path.join(self.out_dir, "metrics.jsonl"), "w", encoding="utf-8")
      )

  def log(self, record: dict) -> None:
    """Append one strict-JSON record to ``metrics.jsonl`` (nothing without an ``out_dir``)."""
    if self._writer is not None:
      self._writer.write(dumps(record) + "\n")
      self._writer.flush()

  # -- the step loop -----------------------------------------------------------------------
  def fit(self, hooks: Sequence[Hook] = ()) -> None:
    """Take :attr:`num_steps` steps; after each, call every hook in order."""
    prefetcher = Prefetcher(
      global_batches(self.config, self.source, self.num_steps),
      self.tier.index,
      background=self.config.prefetch,
    )
    self._stack.callback(prefetcher.close)  # also on error; closing twice is harmless
    start, eval_before = time.perf_counter(), self.timer.total("eval")
    try:
      with self.timer("data"):
        current = prefetcher.get()
      self.tier.prefetch(current.row_ids_U)
      for index in range(self.num_steps):
        step_start = time.perf_counter()
        self.timer.new_step()
        upcoming = prefetcher if index + 1 < self.num_steps else None
        result, current = self._step(current, upcoming)
        compute = None if result.compiled else self.timer.step.get("compute", 0.0)
        self.meter.add_step(result.step, len(result.row_ids_U), compute)
        if result.compiled:
          self.compile_steps += 1
          self.compile_step_seconds += time.perf_counter() - step_start
          self.timer.discard_step()
        for hook in hooks:
          hook.after_step(self, result)
    finally:
      prefetcher.close()
      for hook in hooks:
        hook.close()
    eval_seconds = self.timer.total("eval") - eval_before
    self.train_seconds += time.perf_counter() - start - eval_seconds

  def _step(self, current: IndexedBatch, prefetcher: Prefetcher | None):
    """One synchronous step on ``current``; returns its result and the next indexed batch,
    read (and its rows staged) while the step computes."""
    timer, tier = self.timer, self.tier
    with timer("pull"):
      rows = tier.pull(current.row_ids_U, current.inverse_GxF)
      rows_PxD = jax.device_put(rows.rows_PxD, self._replicated)
      batch = current.batch
      # Copied here, not on the reader thread: on a CPU host the reader's copy competes with
      # the step for the same cores and did not measure faster.
      inputs = jax.device_put((rows.inverse_GxF, batch.dense_BxI, batch.label_B), self._per_worker)
    with timer("compute"):
      self.params_W, self.opt_state_W, grad_rows_PxD, loss = self.step_fn(
        self.params_W, self.opt_state_W, rows_PxD, *inputs
      )
    upcoming = None
    if prefetcher is not None:
      with timer("data"):
        upcoming = prefetcher.get()
      tier.prefetch(upcoming.row_ids_U)  # stages rows while the step still computes
    with timer("compute"):
      grad_rows_UxD = np.asarray(jax.device_get(grad_rows_PxD))[: rows.num_unique]
      loss = float(loss)
    with timer("push"):
      tier.push(rows.row_ids_U, grad_rows_UxD)
    result = StepResult(self.step_fn.step, loss, rows.row_ids_U, self.step_fn.last_call_compiled)
    return result, upcoming

  # -- evaluation and state ----------------------------------------------------------------
  def merged_params(self):
    """The mean of the workers' replicas (what a final merge produces), on the host."""
    return jax.device_get(_step.replica_mean(self.params_W))

  @property
  def step(self) -> int:
    """The optimizer's step count now (the state's own ``count`` before the first step)."""
    return self.start_step if self.step_fn.step is None else self.step_fn.step

  def evaluate(self) -> dict:
    """Evaluate the merged replicas on the test set; record and log the result."""
    with self.timer("eval"):
      result = evaluate(self.test_set, self.tier, self.predict, self.merged_params())
    record = {"kind": "eval", "step": self.step, **result}
    self.evals.append(record)
    self.log(record)
    return record

  def state(self, row_ids: np.ndarray) -> dict:
    """Every worker's dense replica (NumPy) and the current values of ``row_ids``."""
    return {
      "params_W": jax.device_get(self.params_W),
      "row_ids": row_ids,
      "rows": self.tier.table.pull(row_ids),
    }
