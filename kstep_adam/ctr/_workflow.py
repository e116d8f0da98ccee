"""The CTR workflow: data-parallel dense layers, a synchronous sparse tier, comm accounting.

Each step (the pass workflow of `docs/design.md` §1.1, one mini-batch at a time):

1. every worker takes its shard of the global batch (read by a background thread);
2. the keys of all workers are hashed to rows and deduplicated together (reader thread);
3. the unique rows are pulled once from the embedding tier (``SparseTier.pull``);
4. every worker runs forward and backward on its own shard (:mod:`._step`);
5. the rows' gradient, averaged over workers, is pushed once (``table.push``): synchronous
   sparse, like a parameter server;
6. the dense replicas follow the optimizer (:func:`make_optimizer`): synchronous Adam, k-step
   Adam and its merges, or a baseline of the family (local SGD, DiLoCo, 1-bit Adam, top-k
   with error feedback).

While step t computes, the thread reads step t+2 and the tier stages step t+1's rows
(``table.prefetch``). Every table call stays on this thread, so the order of pull and push
is the synchronous order: a prefetch stages rows, the pull after the push reads their values.

:func:`train` composes the pieces: a :class:`~kstep_adam.ctr.Trainer` (the run's resources and
step loop), the hooks of :mod:`._hooks` (progress, metric records, periodic evaluation), a
final evaluation and :func:`summarize`.
"""

from __future__ import annotations

import dataclasses
import os

from kstep_adam._jsonio import write_json
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.run import _interrupt
from kstep_adam.ctr.run._rundir import SUMMARY_FILE
from kstep_adam.ctr.run._trainer import Trainer
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._divergence import DivergenceError
from kstep_adam.ctr.train._hooks import MetricsLog
from kstep_adam.ctr.train._hooks import PeriodicEval
from kstep_adam.ctr.train._hooks import ProgressBar
from kstep_adam.ctr.train._hooks import PushedRows
from kstep_adam.ctr.train._optimizer import make_optimizer


def train(
  config: TrainConfig,
  source: DataSource,
  out_dir: str | None = None,
  *,
  resume: bool = False,
  overwrite: bool = False,
  progress: bool = False,
  return_state: bool = False,
):
  """Train a CTR model with the workflow above and return the run summary.

  Args:
    config: the run's configuration (``checkpoint_every`` saves checkpoints in ``out_dir``).
    source: training and test data (:func:`make_source`, :func:`synthetic_source` or
      :func:`file_source`).
    out_dir: if given, the run's directory: ``run.json``, ``metrics.jsonl``,
      ``summary.json`` and its checkpoints. A directory that holds another run is refused.
      In a multi-process run process 0 writes them.
    resume: continue the run in ``out_dir`` from its latest checkpoint (a new run if there
      is none there). The result is the one the run would have had without stopping.
    overwrite: replace the run in ``out_dir``.
    progress: show a tqdm progress bar (steps, examples/s, loss, cache hit rate).
    return_state: also return the final state (for tests and notebooks).

  Returns:
    The summary dict (also ``summary.json``, strict JSON written atomically; see
    :func:`summarize`). With ``return_state``, ``(summary, state)`` where ``state`` has
    ``params_W`` (every worker's dense replica, NumPy), ``row_ids`` (every row ever pushed)
    and ``rows`` (their values); in a multi-process run, this process's workers
    (``workers``) and the rows of its shard (:meth:`Trainer.state`).

  Raises:
    DivergenceError: the loss or a gradient was not finite, the loss exploded or ended above
      the divergence limit, or the final model predicts a non-finite value; it names
      the step. ``summary.json`` (``status: "diverged"``) and a ``diverged`` record in
      ``metrics.jsonl`` say so too, and the last checkpoint keeps the last good state.
    RunDirectoryError: ``out_dir`` holds another run, or a different one to resume.
    RunInterrupted: a SIGINT or SIGTERM stopped the run at a step boundary (see
      :meth:`Trainer.fit`); it names the step and the last checkpoint, and the run has
      no ``summary.json`` (``resume`` continues it).
  """
  with (
    _interrupt.stop_at_step_boundaries(),
    Trainer(
      config, source, make_optimizer(config), out_dir, resume=resume, overwrite=overwrite
    ) as trainer,
  ):
    hooks = [MetricsLog(config.log_every), PeriodicEval(config.eval_every)]
    if progress and trainer.is_main:
      hooks.insert(0, ProgressBar(trainer.num_steps))
    pushed = PushedRows()
    if return_state:
      hooks.append(pushed)
    try:
      trainer.fit(hooks)
      trainer.check_state()  # a non-finite dense state diverged
      # The end of the pass merges the replicas (as PaddleBox does); evaluate the merged model.
      final = trainer.evaluate()
      trainer.check_predictions(final)  # a model with a non-finite prediction diverged
    except DivergenceError as error:
      checkpoint = trainer.checkpoint
      error.with_checkpoint(None if checkpoint is None else checkpoint.step)
      record = {**error.record(), "evals": trainer.evals}
      trainer.log({"kind": "diverged", "step": error.step, **error.record()})
      if out_dir is not None and trainer.is_main:
        summary_path = os.path.join(trainer.out_dir, SUMMARY_FILE)
        write_json(summary_path, {**record, "config": _config(trainer)})
      raise
    trainer.check_interrupt()  # a run stopped here is not finished: no summary
    summary = summarize(trainer, final)
    if out_dir is not None and trainer.is_main:
      write_json(os.path.join(trainer.out_dir, SUMMARY_FILE), summary)
    state = trainer.state(pushed.row_ids) if return_state else None
  return (summary, state) if return_state else summary


def _config(trainer: Trainer) -> dict:
  return {**dataclasses.asdict(trainer.config), "table_dir": trainer.table_dir}


def summarize(trainer: Trainer, final: dict) -> dict:
  """The run summary, ``summary.json``: final test metrics, throughput, time breakdown,
  traffic, data, config.

  This is the one list of its keys (the docs link here); groups that another function builds
  are listed there, by that function:

  - ``status``: ``completed`` (a diverged run's summary says ``diverged`` instead, see
    :func:`train`);
  - from ``final``: ``test_auc``, ``test_logloss``, ``test_examples``, ``test_positives`` and,
    with a validation set, the same ``val_*`` keys; a metric that is undefined is None and
    ``test_note`` or ``val_note`` says why;
  - ``warnings``: what a reader of the numbers must know (such a note, skipped steps);
  - ``teacher_auc``: the teacher's AUC on synthetic data;
  - ``steps``, ``examples``, ``examples_per_sec`` (steps that compiled left out),
    ``train_seconds``, ``compile_steps``, ``compile_step_seconds``;
  - ``time_breakdown_seconds``: data, pull, compute, push, eval, checkpoint, and the
    estimated merge time;
  - the traffic and compute totals of :class:`CommMeter` (its ``totals``: dense bytes and
    messages per axis, sparse bytes, estimated communication seconds,
    ``measured_compute_seconds``, ``step_seconds_by_kind``);
  - ``host_device_bytes`` and ``host_device_bytes_per_step`` (:func:`host_device_traffic`);
  - ``table_stats``; ``evals``; ``data`` (the source and its read counts); ``skipped_steps``
    (non-finite steps skipped, with ``on_nonfinite="skip"``); ``config``; ``mesh``;
    ``devices``; ``processes``.

  A run resumed from a checkpoint has the same summary as one that never stopped, except
  the fields that describe the processes rather than the computation: ``examples_per_sec``,
  ``train_seconds``, ``compile_steps``, ``compile_step_seconds``,
  ``time_breakdown_seconds``, ``measured_compute_seconds``, ``step_seconds_by_kind`` (times,
  summed over the processes, and each process compiles its own programs), ``table_stats``
  (the counters of the last process's cache) and ``host_device_bytes`` /
  ``host_device_bytes_per_step`` (the last process's copies, over its own steps).

  In a multi-process run (collective: every process calls it) the traffic is that of the
  sparse all-to-all (:mod:`._sharded_tier`), the table statistics are summed over the shards,
  and the times and host-device bytes are each process's own (``summary.json`` has process
  0's: its exchange's counts, ids, rows and gradients, and its share of the batch).
  """
  config, source = trainer.config, trainer.source
  steps, global_batch = trainer.step, config.global_batch
  steady_steps = steps - trainer.compile_steps
  steady_seconds = max(trainer.train_seconds - trainer.compile_step_seconds, 1e-9)
  if steady_steps:
    examples_per_sec = steady_steps * global_batch / steady_seconds
  else:  # every step compiled: report what there is
    examples_per_sec = steps * global_batch / max(trainer.train_seconds, 1e-9)
  warnings = [
    f"final evaluation: {final[note]}" for note in ("val_note", "test_note") if note in final
  ]
  skipped = trainer.monitor.skipped_steps
  if skipped:
    warnings.append(f"{len(skipped)} steps had non-finite values and were skipped: {skipped[:10]}")
  return {
    "status": "completed",
    **{key: value for key, value in final.items() if key not in ("kind", "step")},
    "warnings": warnings,
    "teacher_auc": source.teacher_auc,
    "steps": steps,
    "examples": steps * global_batch,
    "examples_per_sec": examples_per_sec,
    "train_seconds": trainer.train_seconds,
    "compile_steps": trainer.compile_steps,
    "compile_step_seconds": trainer.compile_step_seconds,
    "time_breakdown_seconds": {
      **trainer.timer.totals(),
      "merge": trainer.meter.merge_seconds_estimate(),
    },
    **trainer.meter.totals(),
    **host_device_traffic(trainer),
    "table_stats": trainer.table_stats(),
    "evals": trainer.evals,
    "data": {
      "source": source.name,
      **source.info,
      "lines_skipped": sum(s.lines_skipped for s in source.read_stats),
      "skip_messages": [m for s in source.read_stats for m in s.messages],
    },
    "skipped_steps": skipped,
    "config": _config(trainer),
    "mesh": dict(trainer.mesh.shape),
    "devices": [str(d) for d in trainer.mesh.devices.flat],
    "processes": trainer.processes.count,
  }


def host_device_traffic(trainer: Trainer) -> dict:
  """Bytes copied between host and device memory: totals by direction and kind, and per
  training step split into the embedding tier's (rows, optimizer state, gradients, slot
  numbers, step inputs; in a multi-process run, the exchange's counts, ids, rows and
  gradients) and the batch inputs' (the same with or without a device tier). Evaluation
  reads are in the totals (kind ``read``) but not in the per-step figures."""
  totals = trainer.tier.transfer_bytes()
  steps = max(1, trainer.num_steps)
  by_kind: dict[str, int] = {}
  for direction in totals.values():
    for kind, nbytes in direction.items():
      by_kind[kind] = by_kind.get(kind, 0) + nbytes
  batch = by_kind.pop("batch", 0)
  # Not the steps' traffic: the device tier's allocation (once per run) and the table reads
  # of evaluations (``pull``/``working_set`` of resident rows).
  for kind in ("device_tier_init", "read"):
    by_kind.pop(kind, None)
  return {
    "host_device_bytes": totals,
    "host_device_bytes_per_step": {
      "embedding": sum(by_kind.values()) / steps,
      "batch": batch / steps,
    },
  }
