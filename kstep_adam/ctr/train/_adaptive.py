"""The CTR trainer's side of ``k = 'auto'``: the adaptive period's controller, its times, its
records in ``metrics.jsonl`` and its part of a checkpoint.

The controller (:class:`kstep_adam.AdaptiveController`) decides each step's merge level inside
the trainer's :class:`~kstep_adam.parallel.DispatchedStep`. Its times:

* ``C``, a merge's time at each level: the configured network model's estimate for the
  model's dense parameters (:func:`kstep_adam.estimated_merge_seconds`);
* ``Y``, a local step's time: the median measured compute time of the first
  :data:`CALIBRATION_STEPS` timed local steps, taken once (process 0's value in a
  multi-process run, so that every process decides the same) and kept in the state.

Until ``Y`` is measured the rule takes ``C / Y = 1``. With ``config.k_cost_ratio`` set, the
ratio is given instead: ``Y = 1`` and ``C`` is the model's per-level estimate scaled so that a
merge over every axis costs the ratio, and nothing is measured. Every merge writes a record
``{"kind": "merge", "step", "level", "period", "since", "drift", "next_period"}``: the
period in force per axis (``node``, ``local``), the steps since each axis's last merge, the
relative drift per axis measured by a merge over every axis (None at an inner merge) and the
periods it set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kstep_adam import _distributed
from kstep_adam._adaptive import AdaptiveController
from kstep_adam._adaptive import estimated_merge_seconds
from kstep_adam._schedule import MergeSchedule
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._meters import jax_shapes
from kstep_adam.ctr.train._meters import network_model

CALIBRATION_STEPS = 4  # timed local steps whose median compute time is Y


class AdaptiveRun:
  """Attach an adaptive schedule's controller to a trainer's step.

  Args:
    config: the run's configuration (its network model gives ``C``).
    params: one replica's dense parameters.
    schedule: the adaptive merge schedule the optimizer runs.
    mesh: the run's mesh.
    step_fn: the trainer's :class:`~kstep_adam.parallel.DispatchedStep`.
    sharded: whether the run spans several processes.
  """

  def __init__(
    self, config: TrainConfig, params, schedule: MergeSchedule, mesh, step_fn, sharded: bool
  ):
    merge_seconds = estimated_merge_seconds(
      jax_shapes(params), schedule, mesh, network_model(config)
    )
    local_seconds = None
    if config.k_cost_ratio is not None:
      top = max(merge_seconds) or 1.0
      merge_seconds = tuple(config.k_cost_ratio * c / top for c in merge_seconds)
      local_seconds = 1.0
    self.controller = AdaptiveController(
      schedule,
      local_seconds=local_seconds,
      merge_seconds=merge_seconds,
      axis_sizes=mesh,
    )
    step_fn.adaptive = self.controller
    self._step_fn, self._sharded = step_fn, sharded
    self._samples: list[float] = []

  def after_step(self, compute_seconds: float | None, log: Callable[[dict], None]) -> None:
    """Log the step's merge (if it merged); measure ``Y`` until it is known."""
    record = self.controller.last_record
    if record is not None:
      log({"kind": "merge", **record})
    state = self.controller.state
    if state.local_seconds is not None or compute_seconds is None:
      return
    if self._step_fn.last_level == 0:
      self._samples.append(float(compute_seconds))
    if len(self._samples) >= CALIBRATION_STEPS:
      y = float(np.median(self._samples))
      if self._sharded:  # the same steps on every process: one agreed value
        y = float(_distributed.allgather_json(y)[0])
      self.controller.set_times(max(y, 1e-9), state.merge_seconds)

  def state(self) -> dict:
    """The controller's state (JSON data) for a checkpoint."""
    return self.controller.state_dict()

  def restore(self, state: dict) -> None:
    """Continue from :meth:`state`."""
    self.controller.load_state_dict(state)
    self._samples = []
