"""The dense optimizer a :class:`TrainConfig` names, built with its merge schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kstep_adam import embedding
from kstep_adam import parallel
from kstep_adam._adaptive import adaptive_schedule
from kstep_adam._kstep_adam import kstep_adam
from kstep_adam._schedule import compressed_schedule
from kstep_adam._schedule import merge_schedule
from kstep_adam._schedule import sync_schedule
from kstep_adam.baselines._diloco import diloco
from kstep_adam.baselines._local_sgd import local_sgd
from kstep_adam.baselines._onebit_adam import onebit_adam
from kstep_adam.baselines._sync_adam import sync_adam
from kstep_adam.baselines._topk_ef import topk_ef
from kstep_adam.ctr.train._config import OPTIMIZERS
from kstep_adam.ctr.train._config import TrainConfig

AXES = parallel.AXIS_NAMES


def cosine_decay(value: float, steps: int):
  """``value * (1 + cos(pi * min(t, steps) / steps)) / 2`` at step count ``t`` (0-based): from
  ``value`` at the first step to 0 at ``steps``. One function for the dense optimizer (a traced
  count) and the embedding tier's sparse Adam (NumPy counts), so both follow the same curve.

  Examples:
    >>> lr = cosine_decay(1e-3, 100)
    >>> [round(float(lr(step)), 6) for step in (0, 50, 100, 150)]
    [0.001, 0.0005, 0.0, 0.0]
  """

  def schedule(count):
    xp = jnp if isinstance(count, jax.Array) else np
    return value * 0.5 * (1.0 + xp.cos(xp.pi * (xp.minimum(count, steps) / steps)))

  return schedule


def learning_rates(config: TrainConfig) -> tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule]:
  """``(dense, sparse)``: the learning rates of the dense optimizer and of the embedding tier's
  sparse Adam under ``config.lr_schedule``, each a float or a schedule of the step count."""
  if config.lr_schedule == "cosine":
    return (
      cosine_decay(config.learning_rate, config.steps),
      cosine_decay(config.sparse_learning_rate, config.steps),
    )
  return config.learning_rate, config.sparse_learning_rate


def sparse_optimizer(config: TrainConfig) -> embedding.SparseAdam:
  """The embedding tier's sparse Adam of ``config``."""
  return embedding.SparseAdam(
    learning_rate=learning_rates(config)[1], mode=config.sparse_mode, eps=config.sparse_eps
  )


def make_optimizer(config: TrainConfig):
  """The dense optimizer of ``config`` and the merge schedule it runs.

  The schedule is built once and handed to both the optimizer and the byte accounting
  (:class:`~kstep_adam.ctr.train._meters.CommMeter`), so what is counted is what runs.

  Returns:
    ``(tx, schedule)``: an optax transformation over the ``('node', 'local')`` axes and its
    :class:`kstep_adam.MergeSchedule`.

  Examples:
    >>> tx, schedule = make_optimizer(TrainConfig(optimizer="diloco", k=16))
    >>> schedule.states(), schedule.axis_periods
    (('delta',), (16, 16))
  """
  lr = learning_rates(config)[0]
  if config.optimizer == "sync_adam":
    schedule = sync_schedule(AXES)
    return sync_adam(lr, schedule, eps=config.eps), schedule
  # The compression baselines exchange every step; the schedule carries the message format.
  if config.optimizer == "onebit_adam":
    schedule = compressed_schedule(AXES, "onebit", warmup_steps=config.warmup_steps)
    return onebit_adam(lr, schedule, eps=config.eps), schedule
  if config.optimizer == "topk_ef":
    schedule = compressed_schedule(
      AXES, "topk", density=config.density, warmup_steps=config.warmup_steps
    )
    return topk_ef(lr, schedule, eps=config.eps), schedule
  # The k-step family: every k steps over all workers, or inside a node every step and
  # across nodes every k; or periods the host chooses while training (k = 'auto').
  if config.k == "auto":
    states = ("params", "mu", "nu") if config.optimizer == "kstep_adam" else ("params",)
    sync = config.sync if config.optimizer == "kstep_adam" else "params"
    schedule = adaptive_schedule(
      AXES, budget=config.k_budget, k_max=config.k_max, sync=sync, allowed_states=states
    )
    if config.optimizer == "kstep_adam":
      return kstep_adam(lr, schedule, form=config.form, eps=config.eps), schedule
    return local_sgd(lr, schedule, momentum=config.momentum or None), schedule
  k = config.k if config.merge == "global" else {"node": config.k, "local": 1}
  if config.optimizer == "kstep_adam":
    schedule = merge_schedule(k, axis_name=AXES, sync=config.sync)
    return kstep_adam(lr, schedule, form=config.form, eps=config.eps), schedule
  if config.optimizer == "local_sgd":
    schedule = merge_schedule(k, axis_name=AXES, allowed_states=("params",))
    return local_sgd(lr, schedule, momentum=config.momentum or None), schedule
  if config.optimizer == "diloco":
    schedule = merge_schedule(
      k, axis_name=AXES, sync="delta", allowed_states=("delta",), period_name="inner_steps"
    )
    tx = diloco(
      schedule,
      inner=optax.adam(lr, eps=config.eps),
      outer_learning_rate=config.outer_learning_rate,
      outer_momentum=config.outer_momentum,
    )
    return tx, schedule
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
