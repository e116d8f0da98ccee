"""The hooks a CTR run uses: a progress bar, metric records and periodic evaluation.

Each is a :class:`kstep_adam.ctr.Hook`; :meth:`Trainer.fit` calls them after every step with a
:class:`HookView` of the run, not the trainer itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kstep_adam._distributed import Processes
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._loop import StepResult
from kstep_adam.ctr.train._meters import CommMeter
from kstep_adam.ctr.train._meters import Timer


class HookView(NamedTuple):
  """What a hook sees of the run (:meth:`Hook.after_step`'s first argument), and nothing else.

  The shipped hooks read these fields and no others. A hook that needs more of the run gets
  one more documented field here, rather than reaching into the trainer.

  Attributes:
    config: the run's configuration.
    processes: the run's processes (``count``, this one's ``index``, ``is_main``).
    timer: wall time per phase so far (``timer.totals()``).
    meter: the communication accounting so far (``meter.totals()``).
    hit_rate: ``hit_rate()``, the share of this process's table reads served from memory.
    log: ``log(record)`` appends a strict-JSON record to ``metrics.jsonl`` (nothing without an
      output directory).
    evaluate: ``evaluate(test=True)`` scores the merged replicas on the validation set (if
      any) and, unless ``test`` is False, the test set; it records, logs and returns the result.
    has_val_set: whether the run has a validation set.
  """

  config: TrainConfig
  processes: Processes
  timer: Timer
  meter: CommMeter
  hit_rate: Callable[[], float]
  log: Callable[[dict], None]
  evaluate: Callable[..., dict]
  has_val_set: bool


class Hook:
  """Something that runs after every training step (logging, evaluation, progress).

  Subclasses override :meth:`after_step`, :meth:`close` if they hold a resource, and
  :meth:`state` / :meth:`restore` if what they do depends on earlier steps (then a resumed
  run's hook continues where the checkpoint was taken).
  """

  def after_step(self, run: HookView, result: StepResult) -> None:
    """Called after every step, in the order the hooks were given, with what the hook may
    see of the run (:class:`HookView`)."""

  def close(self) -> None:
    """Called once when :meth:`Trainer.fit` ends, normally or not."""

  def state(self) -> dict | None:
    """What a checkpoint keeps of this hook (JSON data); None: nothing."""
    return None

  def restore(self, state: dict) -> None:
    """Continue from :meth:`state`, as saved in the checkpoint a run resumes from."""


def keyed(hooks: Sequence[Hook]) -> Iterator[tuple[str, Hook]]:
  """Each hook with its key in a checkpoint: its class name, numbered when repeated."""
  seen: dict[str, int] = {}
  for hook in hooks:
    name = type(hook).__name__
    seen[name] = seen.get(name, 0) + 1
    yield (name if seen[name] == 1 else f"{name}#{seen[name]}"), hook


def hook_states(hooks: Sequence[Hook]) -> dict:
  """What a checkpoint keeps of ``hooks``: each one's :meth:`Hook.state` that is not None, by
  its key."""
  states = {key: hook.state() for key, hook in keyed(hooks)}
  return {key: state for key, state in states.items() if state is not None}


def restore_hooks(hooks: Sequence[Hook], states: dict) -> None:
  """Hand each hook its state from ``states`` (a resumed checkpoint's), taking it out of
  ``states`` so that it is handed over once."""
  for key, hook in keyed(hooks):
    if key in states:
      hook.restore(states.pop(key))


class ProgressBar(Hook):
  """A tqdm bar: steps, examples/s, the recent loss and the cache hit rate."""

  def __init__(self, total: int, *, refresh_every: int = 10):
    from tqdm.auto import tqdm

    self._bar = tqdm(total=total, unit="step", dynamic_ncols=True)
    self._refresh_every, self._losses, self._start = refresh_every, [], time.perf_counter()

  def after_step(self, run: HookView, result: StepResult) -> None:
    self._bar.update(1)
    self._losses = [*self._losses[-(self._refresh_every - 1) :], result.loss]
    if self._bar.n % self._refresh_every == 0 or result.last:
      examples = self._bar.n * run.config.global_batch
      self._bar.set_postfix(
        loss=f"{np.mean(self._losses):.4f}",
        ex_s=f"{examples / (time.perf_counter() - self._start):.0f}",
        hit=f"{run.hit_rate():.3f}",
      )

  def close(self) -> None:
    self._bar.close()


class MetricsLog(Hook):
  """A ``train`` record in ``metrics.jsonl`` every ``every`` steps and at the last step:
  mean loss and examples/s since the previous record, hit rate, time and traffic so far.

  ``examples_per_sec``, ``hit_rate``, ``seconds`` and ``measured_compute_seconds`` describe
  the process (its speed, its cache); every other field is a function of the steps taken,
  the same for a run resumed from a checkpoint as for one that never stopped. Skipped steps
  (non-finite, ``on_nonfinite="skip"``) are counted in ``skipped`` and left out of the loss.
  """

  def __init__(self, every: int):
    self._every, self._losses, self._start = every, [], time.perf_counter()
    self._steps, self._skipped = 0, 0  # steps since the previous record, and how many skipped

  def after_step(self, run: HookView, result: StepResult) -> None:
    self._steps += 1
    if result.skipped:
      self._skipped += 1
    else:
      self._losses.append(result.loss)
    if result.step % self._every and not result.last:
      return
    now = time.perf_counter()
    global_batch = run.config.global_batch
    record = {
      "kind": "train",
      "step": result.step,
      "examples": result.step * global_batch,
      "loss": float(np.mean(self._losses)) if self._losses else None,
      "examples_per_sec": self._steps * global_batch / (now - self._start),
      "hit_rate": run.hit_rate(),
      "seconds": run.timer.totals(),
      **run.meter.totals(),
    }
    if self._skipped:
      record["skipped"] = self._skipped
    run.log(record)
    self._losses, self._start, self._steps, self._skipped = [], now, 0, 0

  def state(self) -> dict:
    return {"losses": list(self._losses), "steps": self._steps, "skipped": self._skipped}

  def restore(self, state: dict) -> None:
    self._losses, self._steps = list(state["losses"]), int(state["steps"])
    self._skipped = int(state["skipped"])


class PeriodicEval(Hook):
  """Evaluate every ``every`` steps (the final evaluation is the caller's).

  With a validation set, only it is scored along the way and the test set waits for the final
  evaluation, so nothing is chosen by looking at the test set (and each evaluation costs less).
  Without one, the test set is scored.
  """

  def __init__(self, every: int):
    self._every = every

  def after_step(self, run: HookView, result: StepResult) -> None:
    if self._every and result.step % self._every == 0 and not result.last:
      run.evaluate(test=not run.has_val_set)


class PushedRows(Hook):
  """Collects the rows every step pushed (for :meth:`Trainer.state`).

  In a multi-process run each process collects its own shard's rows, and a checkpoint keeps
  only process 0's hook states: there a resumed run's rows are those pushed since it resumed.
  """

  def __init__(self):
    self._rows: list[np.ndarray] = []
    self._sharded = False

  def after_step(self, run: HookView, result: StepResult) -> None:
    self._sharded = run.processes.count > 1
    if not result.skipped:
      self._rows.append(result.row_ids_U)

  @property
  def row_ids(self) -> np.ndarray:
    """Every row pushed so far, sorted, each once."""
    return np.unique(np.concatenate(self._rows)) if self._rows else np.zeros(0, np.int64)

  def state(self) -> dict | None:
    # Process 0's rows would be restored on every process, the others' shards included.
    return None if self._sharded else {"row_ids": self.row_ids.tolist()}

  def restore(self, state: dict) -> None:
    self._rows = [np.asarray(state["row_ids"], np.int64)]
