"""What a sweep can train: a CTR model (``ctr``) or a convergence problem (``convergence``).

A task turns a run's fields into a configuration, trains it in the worker process through the
existing harness (``kstep_adam.ctr.train``; the convergence experiment's
:func:`~experiments.convergence.runner.run_grid`), and turns the run's ``summary.json`` into a
row of ``results.csv``. Nothing here is a training loop of its own.

Every summary a task writes has a ``status``: ``completed``, or ``diverged`` with
``diverged_at_step`` and a ``message``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Any

from experiments._common import write_json
from experiments._common import write_jsonl

COMPLETED, DIVERGED = "completed", "diverged"


class Task:
  """The interface of a sweep task (see :class:`CTRTask`)."""

  name: str
  resumable: bool  # run() continues what a killed attempt left in its directory
  selection_metric: str  # chosen on: a validation metric
  report_metric: str  # reported: the test metric of the chosen runs
  higher_is_better: bool
  metric_label: str  # e.g. "AUC"
  hyperparameters: tuple[str, ...]  # the columns of results.csv that describe a run

  def fields(self) -> dict[str, Any]:
    """Field name -> type hint of every field a run may set."""
    raise NotImplementedError

  def check_field(self, field: str, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``field`` is one of :meth:`fields`."""
    if field not in self.fields():
      raise ValueError(
        f"{where}: {field!r} is not a field of the {self.name} task; known: "
        f"{sorted(self.fields())!r}"
      )

  def is_sequence_field(self, field: str) -> bool:
    """Whether ``field`` holds a tuple (then a TOML list is its value, a list of lists a grid)."""
    return typing.get_origin(self.fields().get(field)) is tuple

  def validate(self, params: dict) -> None:
    """Build the run's configuration; ValueError on a bad value."""
    raise NotImplementedError

  def num_devices(self, params: dict) -> int:
    """Devices the run needs (the worker asks JAX for this many CPU devices)."""
    raise NotImplementedError

  def run(self, params: dict, out_dir: str) -> dict:
    """Train; write ``metrics.jsonl`` and ``summary.json`` (with ``status``) in ``out_dir``."""
    raise NotImplementedError

  def row(self, summary: dict) -> dict:
    """The ``results.csv`` columns of a run, from its ``summary.json``."""
    raise NotImplementedError


class CTRTask(Task):
  """A CTR run: :class:`kstep_adam.ctr.TrainConfig` and :class:`kstep_adam.ctr.DataConfig`
  fields, trained by :func:`kstep_adam.ctr.train` on 2-level simulated devices.

  The learning rate is chosen on the validation AUC (``val_examples`` or ``val_fraction``
  must make a validation set) and the test AUC is reported.
  """

  name = "ctr"
  resumable = True
  selection_metric = "val_auc"
  report_metric = "test_auc"
  higher_is_better = True
  metric_label = "AUC"

  @property
  def hyperparameters(self) -> tuple[str, ...]:
    from kstep_adam.ctr.train._config import OPTIMIZER_FIELDS

    fields = dict.fromkeys(f for names in OPTIMIZER_FIELDS.values() for f in names)
    return ("optimizer", "learning_rate", *fields, "batch_size", "top_mlp")

  def fields(self) -> dict[str, Any]:
    from kstep_adam import ctr

    return {
      **typing.get_type_hints(ctr.DataConfig),
      **typing.get_type_hints(ctr.TrainConfig),
    }

  def configs(self, params: dict):
    from kstep_adam import ctr

    names = {f.name for f in dataclasses.fields(ctr.DataConfig)}
    # run.json is JSON: a sequence field comes back as a list.
    params = {
      k: tuple(v) if isinstance(v, list) and self.is_sequence_field(k) else v
      for k, v in params.items()
    }
    data = ctr.DataConfig(**{k: v for k, v in params.items() if k in names})
    config = ctr.TrainConfig(**{k: v for k, v in params.items() if k not in names})
    return config, data

  def validate(self, params: dict) -> None:
    config, data = self.configs(params)
    if not data.val_examples and not data.val_fraction:
      raise ValueError(
        "a sweep chooses its learning rates on a validation set: set val_examples (synthetic "
        "data) or val_fraction (file data) in [base]"
      )
    del config

  def num_devices(self, params: dict) -> int:
    return self.configs(params)[0].num_workers

  def run(self, params: dict, out_dir: str) -> dict:
    from kstep_adam import ctr

    config, data = self.configs(params)
    return train_with_status(config, ctr.make_source(data, config), out_dir)

  def row(self, summary: dict) -> dict:
    from kstep_adam.ctr.train._config import OPTIMIZER_FIELDS

    config = summary["config"]
    relevant = {"optimizer", "learning_rate", "batch_size", "top_mlp"}
    relevant.update(OPTIMIZER_FIELDS[config["optimizer"]])
    hyperparameters = {f: config.get(f) if f in relevant else None for f in self.hyperparameters}
    if "sparse_bytes" not in summary:  # stopped before its final evaluation: no totals
      return {**hyperparameters, "steps": summary.get("steps")}
    dense = summary.get("dense_bytes_by_axis", {})
    dense_node, dense_local = dense.get("node", 0.0), dense.get("local", 0.0)
    sparse, sparse_node = summary["sparse_bytes"], summary["sparse_inter_node_bytes"]
    compute, comm = summary["measured_compute_seconds"], summary["estimated_comm_seconds"]
    timed_steps = summary["steps"] - summary.get("compile_steps", 0)
    return {
      **hyperparameters,
      "steps": summary["steps"],
      "val_auc": summary.get("val_auc"),
      "val_logloss": summary.get("val_logloss"),
      "test_auc": summary.get("test_auc"),
      "test_logloss": summary.get("test_logloss"),
      "teacher_auc": summary.get("teacher_auc"),
      "dense_inter_node_bytes": dense_node,
      "dense_intra_node_bytes": dense_local,
      "sparse_bytes": sparse,
      "inter_node_bytes": dense_node + sparse_node,
      "total_bytes": dense_node + dense_local + sparse,
      "measured_compute_seconds": compute,
      "compute_seconds_per_step": compute / timed_steps if timed_steps > 0 else None,
      "estimated_comm_seconds": comm,
      "train_seconds": summary.get("train_seconds"),
    }


def train_with_status(config, source, out_dir: str) -> dict:
  """Train with :func:`kstep_adam.ctr.train`; return its summary, which says how the run ended.

  The one place where the sweep meets a diverging CTR run. The trainer stops a run whose loss
  or gradients become non-finite, or whose loss explodes (``divergence_factor``), with a
  :class:`kstep_adam.ctr.DivergenceError` naming the step, after writing a ``summary.json``
  with ``status: "diverged"``, ``diverged_at_step`` and the message; the sweep records that
  and goes on. A run that a killed attempt left is continued (``resume``), from its latest
  checkpoint when it saved one (``checkpoint_every``), else from its start; an attempt killed
  before it recorded ``run.json`` left only partial outputs of no run, which are replaced
  (``overwrite``).
  """
  from kstep_adam import ctr

  recorded = os.path.exists(os.path.join(out_dir, "run.json"))
  try:
    return ctr.train(config, source, out_dir, resume=recorded, overwrite=not recorded)
  except ctr.DivergenceError:
    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
      return json.load(f)


class ConvergenceTask(Task):
  """A run of one variant of the convergence experiment on one of its problems, at one step
  size and seed (:func:`experiments.convergence.runner.run_grid` with one of each).

  The metric is the optimization gap, the mean of ``||grad f(xbar_t)||^2`` over the run (lower
  is better), measured with the exact gradient. A problem has no held-out data, so the step
  size is chosen on the same quantity that is reported: a sweep of these tunes and compares
  optimizers on the objective itself.
  """

  name = "convergence"
  resumable = False
  selection_metric = "gap"
  report_metric = "gap"
  higher_is_better = False
  metric_label = "gap (1/T) Σ‖∇f(x̄)‖²"
  hyperparameters = ("variant", "learning_rate", "k", "workers", "beta2")
  PROBLEM_KINDS = ("separable", "logistic")

  def fields(self) -> dict[str, Any]:
    return {
      "problem": dict,
      "variant": str,
      "learning_rate": float,
      "k": int,
      "steps": int,
      "workers": int,
      "beta2": float,
      "log_every": int,
      "seed": int,
    }

  # Fields a run may leave out.
  DEFAULTS: typing.ClassVar = {"k": 1, "workers": 4, "beta2": 0.999, "log_every": 1, "steps": 256}

  def _resolved(self, params: dict) -> dict:
    return {**self.DEFAULTS, **params}

  def _problem(self, spec):
    from experiments.convergence import configs

    if not isinstance(spec, dict) or spec.get("kind") not in self.PROBLEM_KINDS:
      raise ValueError(
        f"problem must be a table with kind = one of {self.PROBLEM_KINDS!r} and the "
        f'problem\'s fields, e.g. {{kind = "separable", d = 32}}; got {spec!r}'
      )
    args = {k: v for k, v in spec.items() if k != "kind"}
    cls = configs.SeparableSpec if spec["kind"] == "separable" else configs.LogisticSpec
    try:
      return cls(name=spec["kind"], **args)
    except TypeError as e:
      raise ValueError(f"problem {spec!r}: {e}") from None

  def validate(self, params: dict) -> None:
    from experiments.convergence import variants
    from kstep_adam._validation import check_float
    from kstep_adam._validation import check_int

    p = self._resolved(params)
    if "problem" not in p or "variant" not in p or "learning_rate" not in p:
      raise ValueError("a convergence run needs problem, variant and learning_rate")
    self._problem(p["problem"]).build()
    variants.get_variant(p["variant"])
    check_float(p["learning_rate"], "learning_rate", low=0.0, low_open=True)
    check_float(p["beta2"], "beta2", low=0.0, high=1.0, high_open=True)
    for name in ("k", "steps", "workers", "log_every"):
      check_int(p[name], name)
    check_int(p["seed"], "seed", minimum=0)

  def num_devices(self, params: dict) -> int:
    return 1  # the workers are simulated by vmap on one device

  def run(self, params: dict, out_dir: str) -> dict:
    import numpy as np

    from experiments.convergence import runner
    from experiments.convergence import variants

    p = self._resolved(params)
    variant = variants.get_variant(p["variant"])
    out = runner.run_grid(
      self._problem(p["problem"]).build(),
      variant,
      T=p["steps"],
      N=p["workers"],
      k=p["k"] if variant.local_steps else 1,
      etas=[p["learning_rate"]],
      num_seeds=1,
      beta2=p["beta2"],
      seed=p["seed"],
      curves=True,
    )
    curve_T = out["grad_norm2_xbar_ExSxT"][0, 0]
    every = p["log_every"]
    records = [
      {"kind": "train", "step": t + 1, "loss": float(curve_T[t])}
      for t in range(len(curve_T))
      if (t + 1) % every == 0 or t + 1 == len(curve_T)
    ]
    write_jsonl(os.path.join(out_dir, "metrics.jsonl"), records)
    bad = np.flatnonzero(~np.isfinite(curve_T))
    gap = float(out["gap_xbar_ExS"][0, 0])
    summary = {
      "status": DIVERGED if bad.size or not math.isfinite(gap) else COMPLETED,
      "diverged_at_step": int(bad[0]) + 1 if bad.size else None,
      "gap": gap,
      "steps": p["steps"],
      "config": p,
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary

  def row(self, summary: dict) -> dict:
    from experiments.convergence import variants

    config = dict(summary["config"])
    if not variants.get_variant(config["variant"]).local_steps:
      config["k"] = None  # it merges every step: k does not apply
    return {
      **{f: config.get(f) for f in self.hyperparameters},
      "steps": summary["steps"],
      "gap": summary["gap"],
    }


TASKS = {task.name: task for task in (CTRTask(), ConvergenceTask())}


def get(name: str) -> Task:
  """The task called ``name``; ValueError lists the known ones."""
  if name not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)!r}, got {name!r}")
  return TASKS[name]
