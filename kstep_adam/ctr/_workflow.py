"""The CTR trainer: data-parallel dense layers, a synchronous sparse tier, comm accounting.

Each step (the pass workflow of `docs/design.md` §1.1, one mini-batch at a time):

1. every worker takes its shard of the global batch (read by a background thread);
2. the keys of all workers are hashed to rows and deduplicated together (reader thread);
3. the unique rows are pulled once from the embedding tier (``table.working_set``);
4. every worker runs forward and backward on its own shard (:mod:`._step`);
5. the rows' gradient, averaged over workers, is pushed once (``table.push``): synchronous
   sparse, like a parameter server;
6. the dense replicas follow the optimizer: synchronous Adam, or k-step Adam and its merges.

While step t computes, the thread reads step t+2 and the tier stages step t+1's rows
(``table.prefetch``). Every table call stays on this thread, so the order of pull and push
is the synchronous order: a prefetch stages rows, the pull after the push reads their values.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kstep_adam import parallel
from kstep_adam._baselines import sync_adam
from kstep_adam._kstep_adam import kstep_adam
from kstep_adam._schedule import merge_schedule
from kstep_adam._schedule import sync_schedule
from kstep_adam.ctr import _step
from kstep_adam.ctr._comm import CommMeter
from kstep_adam.ctr._config import TrainConfig
from kstep_adam.ctr._metrics import auc
from kstep_adam.ctr._metrics import logloss
from kstep_adam.ctr._models import make_model
from kstep_adam.ctr._pipeline import Prefetcher
from kstep_adam.ctr._pipeline import Timer
from kstep_adam.ctr._sources import DataSource
from kstep_adam.ctr._tier import SparseTier

AXES = parallel.AXIS_NAMES


def make_optimizer(config: TrainConfig):
  """The dense optimizer and the merge schedule it runs (used for byte accounting)."""
  if config.optimizer == "sync_adam":
    schedule = sync_schedule(AXES)
    return sync_adam(config.learning_rate, schedule), schedule
  k = config.k if config.merge == "global" else {"node": config.k, "local": 1}
  schedule = merge_schedule(k, axis_name=AXES, sync=config.sync)
  return kstep_adam(config.learning_rate, schedule), schedule


def _num_steps(config: TrainConfig, source: DataSource) -> int:
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


def _batches(config: TrainConfig, source: DataSource, num_steps: int):
  """Global batches across epochs until ``num_steps`` are produced."""
  produced, epoch = 0, 0
  while produced < num_steps:
    count_before = produced
    for batch in source.train_epoch(epoch, config.global_batch):
      yield batch
      produced += 1
      if produced == num_steps:
        return
    if produced == count_before:
      raise ValueError(f"{source.name} yielded no full global batch of {config.global_batch}")
    epoch += 1


def evaluate(source: DataSource, tier: SparseTier, predict, params) -> dict:
  """AUC and logloss of ``params`` (one replica) on the source's held-out set."""
  labels, probs = [], []
  for batch in source.test_batches():
    ws = tier.lookup(batch.keys_BxF)
    probs.append(np.asarray(predict(params, ws.rows_PxD, ws.inverse_BxF, batch.dense_BxI)))
    labels.append(batch.label_B)
  labels, probs = np.concatenate(labels), np.concatenate(probs)
  return {
    "test_auc": auc(labels, probs),
    "test_logloss": logloss(labels, probs),
    "test_examples": int(labels.size),
  }


def train(
  config: TrainConfig,
  source: DataSource,
  out_dir: str | None = None,
  *,
  progress: bool = False,
  return_state: bool = False,
):
  """Train a CTR model with the workflow above and return the run summary.

  Args:
    config: the run's configuration.
    source: training and test data (:func:`synthetic_source` or :func:`file_source`).
    out_dir: if given, ``metrics.jsonl`` and ``summary.json`` are written there.
    progress: show a tqdm progress bar (steps, examples/s, loss, cache hit rate).
    return_state: also return the final state (for tests and notebooks).

  Returns:
    The summary dict (also ``summary.json``): ``test_auc``, ``test_logloss``,
    ``teacher_auc``, ``examples_per_sec``, ``dense_bytes_by_axis``, ``sparse_bytes``,
    ``estimated_comm_seconds``, the time breakdown and the full config. With
    ``return_state``, ``(summary, state)`` where ``state`` has ``params_W`` (every worker's
    dense replica, NumPy), ``row_ids`` (every row ever pushed) and ``rows`` (their values).
  """
  if config.num_workers > len(jax.devices()):
    raise ValueError(
      f"nodes x devices_per_node = {config.num_workers} exceeds the "
      f"{len(jax.devices())} devices; on CPU set jax_num_cpu_devices first"
    )
  num_steps = _num_steps(config, source)
  mesh = parallel.make_mesh(config.nodes, config.devices_per_node)
  model = make_model(
    config.model,
    num_dense=source.num_dense,
    num_categorical=source.num_categorical,
    embed_dim=config.embed_dim,
    seed=config.seed,
  )
  graphdef, params = nnx.split(model)
  tx, schedule = make_optimizer(config)
  params_W, opt_state_W = parallel.init_replicas(params, tx, mesh)
  step_fn = _step.make_ctr_train_step(graphdef, tx, mesh)
  predict = _step.make_predict(graphdef)
  meter = CommMeter(config, params, schedule, mesh)
  replicated = NamedSharding(mesh, P())
  per_worker = parallel.worker_sharding(mesh)

  writer = None
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    writer = open(os.path.join(out_dir, "metrics.jsonl"), "w")

  def log(record: dict) -> None:
    if writer is not None:
      writer.write(json.dumps(record) + "\n")
      writer.flush()

  scratch = None if config.table_dir else tempfile.TemporaryDirectory(prefix="ctr_table_")
  table_dir = config.table_dir or os.path.join(scratch.name, "table")
  tier = SparseTier(config, table_dir, temporary=scratch is not None)
  timer = Timer()
  evals, window_loss, window_start = [], [], time.perf_counter()
  compiled, compile_steps, compile_seconds = set(), 0, 0.0
  bar, pushed = None, []
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=num_steps, unit="step", dynamic_ncols=True)
  prefetcher = Prefetcher(
    _batches(config, source, num_steps), tier.index, background=config.prefetch
  )
  try:
    train_start = time.perf_counter()
    with timer("data"):
      current = prefetcher.get()
    tier.prefetch(current.unique_rows)
    for step in range(1, num_steps + 1):
      t0 = time.perf_counter()
      timer.new_step()
      with timer("pull"):
        ws = tier.working_set(current.unique_rows, current.inverse_GxF)
        rows_PxD = jax.device_put(ws.rows_PxD, replicated)
        batch = current.batch
        inputs = jax.device_put((ws.inverse_BxF, batch.dense_BxI, batch.label_B), per_worker)
      with timer("compute"):
        params_W, opt_state_W, grad_rows_UxD, loss = step_fn(
          params_W, opt_state_W, rows_PxD, *inputs
        )
      if step < num_steps:
        with timer("data"):
          upcoming = prefetcher.get()
        tier.prefetch(upcoming.unique_rows)  # stages rows while the step still computes
      with timer("compute"):
        grad_rows = np.asarray(jax.device_get(grad_rows_UxD))[: ws.num_unique]
        loss = float(loss)
      with timer("push"):
        tier.push(ws.unique_rows, grad_rows)
      if return_state:
        pushed.append(ws.unique_rows)
      # The first call of each program (general or local, per row-bucket shape) compiles;
      # such steps are left out of the throughput and the breakdown.
      program = (step_fn.is_local(step), ws.rows_PxD.shape[0])
      compiling = program not in compiled
      meter.add_step(step, ws.num_unique, None if compiling else timer.step.get("compute", 0.0))
      if compiling:
        compiled.add(program)
        compile_steps += 1
        compile_seconds += time.perf_counter() - t0
        timer.discard_step()
      window_loss.append(loss)
      if step < num_steps:
        current = upcoming
      if bar is not None:
        bar.update(1)
        if step % 10 == 0 or step == num_steps:
          bar.set_postfix(
            loss=f"{np.mean(window_loss[-10:]):.4f}",
            ex_s=f"{config.global_batch * step / (time.perf_counter() - train_start):.0f}",
            hit=f"{tier.hit_rate():.3f}",
          )
      if step % config.log_every == 0 or step == num_steps:
        now = time.perf_counter()
        log(
          {
            "kind": "train",
            "step": step,
            "examples": step * config.global_batch,
            "loss": float(np.mean(window_loss)),
            "examples_per_sec": len(window_loss) * config.global_batch / (now - window_start),
            "hit_rate": tier.hit_rate(),
            "seconds": timer.totals(),
            **meter.totals(),
          }
        )
        window_loss, window_start = [], now
      if config.eval_every and step % config.eval_every == 0 and step < num_steps:
        with timer("eval"):
          result = evaluate(source, tier, predict, jax.device_get(_step.replica_mean(params_W)))
        evals.append({"kind": "eval", "step": step, **result})
        log(evals[-1])
    train_seconds = time.perf_counter() - train_start - timer.total("eval")
    prefetcher.close()
    # The end of the pass merges the replicas (as PaddleBox does); evaluate the merged model.
    final = evaluate(source, tier, predict, jax.device_get(_step.replica_mean(params_W)))
    evals.append({"kind": "eval", "step": num_steps, **final})
    log(evals[-1])
    steady_steps = num_steps - compile_steps
    steady_seconds = max(train_seconds - compile_seconds, 1e-9)
    summary = {
      **final,
      "teacher_auc": source.teacher_auc,
      "steps": num_steps,
      "examples": num_steps * config.global_batch,
      "examples_per_sec": (
        steady_steps * config.global_batch / steady_seconds
        if steady_steps
        else num_steps * config.global_batch / max(train_seconds, 1e-9)
      ),
      "train_seconds": train_seconds,
      "compile_steps": compile_steps,
      "compile_step_seconds": compile_seconds,
      "time_breakdown_seconds": {**timer.totals(), "merge": meter.merge_seconds_estimate()},
      **meter.totals(),
      "table_stats": tier.stats(),
      "evals": evals,
      "data": {
        "source": source.name,
        **source.info,
        "lines_skipped": sum(s.lines_skipped for s in source.read_stats),
        "skip_messages": [m for s in source.read_stats for m in s.messages],
      },
      "config": {**vars(config), "table_dir": table_dir},
      "mesh": dict(mesh.shape),
      "devices": [str(d) for d in jax.devices()[: config.num_workers]],
    }
    if out_dir is not None:
      with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    state = None
    if return_state:
      row_ids = np.unique(np.concatenate(pushed))
      state = {
        "params_W": jax.device_get(params_W),
        "row_ids": row_ids,
        "rows": tier.table.pull(row_ids),
      }
  finally:
    prefetcher.close()
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
    tier.close()
    if scratch is not None:
      scratch.cleanup()
  return (summary, state) if return_state else summary
