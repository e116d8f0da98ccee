"""The hooks a CTR run uses: a progress bar, metric records and periodic evaluation.

Each is a :class:`kstep_adam.ctr.Hook`; :meth:`Trainer.fit` calls them after every step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from kstep_adam.ctr.train._loop import StepResult

if TYPE_CHECKING:  # hooks see the trainer, which lives in the run room above this one
  from kstep_adam.ctr.run._trainer import Trainer


class Hook:
  """Something that runs after every training step (logging, evaluation, progress).

  Subclasses override :meth:`after_step`, :meth:`close` if they hold a resource, and
  :meth:`state` / :meth:`restore` if what they do depends on earlier steps (then a resumed
  run's hook continues where the checkpoint was taken).
  """

  def after_step(self, trainer: Trainer, result: StepResult) -> None:
    """Called after every step, in the order the hooks were given."""

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


class ProgressBar(Hook):
  """A tqdm bar: steps, examples/s, the recent loss and the cache hit rate."""

  def __init__(self, total: int, *, refresh_every: int = 10):
    from tqdm.auto import tqdm

    self._bar = tqdm(total=total, unit="step", dynamic_ncols=True)
    self._refresh_every, self._losses, self._start = refresh_every, [], time.perf_counter()

  def after_step(self, trainer: Trainer, result: StepResult) -> None:
    self._bar.update(1)
    self._losses = [*self._losses[-(self._refresh_every - 1) :], result.loss]
    if self._bar.n % self._refresh_every == 0 or result.last:
      examples = self._bar.n * trainer.config.global_batch
      self._bar.set_postfix(
        loss=f"{np.mean(self._losses):.4f}",
        ex_s=f"{examples / (time.perf_counter() - self._start):.0f}",
        hit=f"{trainer.tier.hit_rate():.3f}",
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

  def after_step(self, trainer: Trainer, result: StepResult) -> None:
    self._steps += 1
    if result.skipped:
      self._skipped += 1
    else:
      self._losses.append(result.loss)
    if result.step % self._every and not result.last:
      return
    now = time.perf_counter()
    global_batch = trainer.config.global_batch
    record = {
      "kind": "train",
      "step": result.step,
      "examples": result.step * global_batch,
      "loss": float(np.mean(self._losses)) if self._losses else None,
      "examples_per_sec": self._steps * global_batch / (now - self._start),
      "hit_rate": trainer.tier.hit_rate(),
      "seconds": trainer.timer.totals(),
      **trainer.meter.totals(),
    }
    if self._skipped:
      record["skipped"] = self._skipped
    trainer.log(record)
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

  def after_step(self, trainer: Trainer, result: StepResult) -> None:
    if self._every and result.step % self._every == 0 and not result.last:
      trainer.evaluate(test=trainer.val_set is None)


class PushedRows(Hook):
  """Collects the rows every step pushed (for :meth:`Trainer.state`).

  In a multi-process run each process collects its own shard's rows, and a checkpoint keeps
  only process 0's hook states: there a resumed run's rows are those pushed since it resumed.
  """

  def __init__(self):
    self._rows: list[np.ndarray] = []
    self._sharded = False

  def after_step(self, trainer: Trainer, result: StepResult) -> None:
    self._sharded = trainer.sharded
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
