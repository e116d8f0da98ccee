"""The step loop: what a step did, how many steps a run takes, its batches, and the loop
itself (:func:`run_steps`, the same for every sparse-tier strategy)."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from kstep_adam.ctr.data._prefetch import IndexedBatch
from kstep_adam.ctr.data._prefetch import Prefetcher
from kstep_adam.ctr.data._records import CTRBatch
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.data._sources import positioned_epoch
from kstep_adam.ctr.train._config import TrainConfig


class StepResult(NamedTuple):
  """What one training step did, handed to every hook."""

  step: int  # the optimizer's step count after this step (1-based)
  loss: float  # global-mean training loss of the step's batch
  row_ids_U: np.ndarray  # int64 [U], the table rows the step pushed (in a multi-process
  # run, those of this process's shard)
  compiled: bool  # a step program compiled during this step (its own; in a pipelined run
  # also the next step's, launched during it): left out of throughput and breakdown
  last: bool = False  # the run's last step (the data or the step budget ends here)
  skipped: bool = False  # non-finite, skipped (on_nonfinite="skip"): nothing was updated


def num_steps(config: TrainConfig, source: DataSource) -> int:
  """Steps of a run: ``config.steps``, else ``epochs`` passes of file data (estimated until a
  pass is complete: the run ends when its last pass does), else ``synthetic_steps`` of an
  endless stream."""
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


def step_budget(config: TrainConfig, source: DataSource) -> int | None:
  """The run's steps if fixed in advance (``steps``, or ``synthetic_steps`` of an endless
  stream); None when the data decides (``epochs`` whole passes over file data)."""
  if config.steps is not None:
    return config.steps
  if source.steps_per_epoch(config.global_batch) is None:
    return config.synthetic_steps
  return None


def global_batches(
  config: TrainConfig, source: DataSource, count: int | None, start: dict | None = None
) -> Iterator[tuple[CTRBatch, dict]]:
  """Global batches from data position ``start`` (None: the beginning), each with the
  position after it, ``{"epoch": e, "position": p}``: ``count`` of them, continuing into the
  next epoch as needed, or (``count`` None) until ``config.epochs`` passes are complete."""
  epoch = 0 if start is None else int(start["epoch"])
  resume_at = None if start is None else start["position"]  # inside the first pass only
  produced = 0
  while count is None or produced < count:
    if count is None and epoch >= config.epochs:
      return
    produced_before = produced
    for batch, after in positioned_epoch(source, epoch, config.global_batch, resume_at):
      yield batch, {"epoch": epoch, "position": after}
      produced += 1
      if produced == count:
        return
    if resume_at is None and produced == produced_before:
      raise ValueError(f"{source.name} yielded no full global batch of {config.global_batch}")
    epoch, resume_at = epoch + 1, None


def next_or_none(prefetcher: Prefetcher) -> IndexedBatch | None:
  """The next prepared batch, or None when the data (or the step budget) has ended."""
  try:
    return prefetcher.get()
  except StopIteration:
    return None


def run_steps(
  stepper,
  prefetcher: Prefetcher,
  *,
  timer,
  meter,
  adaptive,
  log: Callable[[dict], None],
  advanced: Callable[[StepResult, IndexedBatch], None],
  after_step: Callable[[StepResult, float], None],
) -> None:
  """Step until the data (or the step budget) ends, with no branch on the tier strategy.

  For each batch: ``stepper.advance`` (a step on it, the next batch read meanwhile), then
  ``advanced(result, batch)``, the step's accounting (``meter``; the adaptive period, if any,
  which may ``log``), then ``after_step(result, step_start)`` (the trainer: compile time, hooks,
  checkpoint, interrupt check, in that order).
  """
  with timer("data"):
    current = next_or_none(prefetcher)
  if current is not None:
    stepper.tier.prefetch(current.row_ids_U)
  try:
    while current is not None:
      step_start = time.perf_counter()
      timer.new_step()
      result, upcoming = stepper.advance(current, prefetcher)
      advanced(result, current)
      current = upcoming
      compute = None if result.compiled else timer.step.get("compute", 0.0)
      level = stepper.step_fn.last_level if adaptive is not None else None
      meter.add_step(
        result.step,
        len(result.row_ids_U),
        compute,
        sparse_cost=stepper.sparse_cost,
        level=level,
        step_seconds=time.perf_counter() - step_start,
      )
      if adaptive is not None:
        adaptive.after_step(compute, log)
      after_step(result, step_start)
  finally:  # a stop between steps (an interrupt, an error) drops a step launched ahead
    stepper.discard_ahead()
