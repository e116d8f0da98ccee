"""Divergence: a training loss or gradient that is not finite, or a loss that explodes.

A diverged run stops with :class:`DivergenceError`, which names the step and says why; the
trainer saves no checkpoint of a diverged state, so the last checkpoint keeps the last good
one, and :func:`kstep_adam.ctr.train` records the outcome (``status: "diverged"``) in
``summary.json`` and ``metrics.jsonl`` before raising.

*Exploding* is defined against the run's initial loss ``L0``, the loss of its first step
(computed with the initial parameters): the loss exploded at step ``t`` when it was above
``divergence_factor * L0`` for ``divergence_steps`` consecutive steps ending at ``t``. A
healthy CTR run's loss stays below its initial value (a cross-entropy near ``log 2``) once
it has started to learn; one that sits an order of magnitude above it is predicting the
wrong class with confidence, batch after batch. While the loss is above that limit the
run is *suspect*: the trainer takes no periodic checkpoint then, so the last checkpoint of a
run that goes on to diverge is one from before its loss left the range.

A run that *ends* suspect (its last step's loss above the limit, however few steps it was
so) has diverged too, and so has one whose model predicts a non-finite probability for any
held-out example, or whose stored state (dense parameters, the embedding rows and their
optimizer moments, as float32) holds a non-finite value: such a run never ends "completed".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kstep_adam.ctr.train._config import TrainConfig


class DivergenceError(RuntimeError):
  """Training diverged at ``step``: a non-finite loss or gradient, or an exploding loss.

  Attributes:
    step: the 1-based step whose loss or gradients gave it away.
    reason: ``"nonfinite"`` or ``"exploding"``.
    loss: that step's training loss (may be NaN or infinite).
    checkpoint_step: the step of the last checkpoint, which holds the last good state (None
      when the run saved none).
  """

  def __init__(
    self, step: int, reason: str, loss: float, message: str, checkpoint_step: int | None = None
  ):
    self.step, self.reason, self.loss = step, reason, loss
    self.checkpoint_step = checkpoint_step
    self.detail = message
    super().__init__(self._text())

  def _text(self) -> str:
    kept = (
      f"; the last checkpoint (step {self.checkpoint_step}) holds the last good state"
      if self.checkpoint_step is not None
      else ""
    )
    return f"training diverged at step {self.step}: {self.detail}{kept}"

  def with_checkpoint(self, checkpoint_step: int | None) -> DivergenceError:
    """This error, saying which checkpoint keeps the last good state."""
    self.checkpoint_step = checkpoint_step
    self.args = (self._text(),)
    return self

  def record(self) -> dict:
    """The machine-readable outcome: what ``summary.json`` and ``metrics.jsonl`` hold."""
    return {
      "status": "diverged",
      "diverged_at_step": self.step,
      "reason": self.reason,
      "loss": self.loss,
      "message": str(self),
      "checkpoint_step": self.checkpoint_step,
    }


class DivergenceMonitor:
  """Watches every step's loss and finiteness; raises :class:`DivergenceError` or, with
  ``on_nonfinite="skip"``, counts the non-finite steps the step program skipped.

  Its state (:meth:`state`, :meth:`restore`) goes into checkpoints, so a resumed run judges
  its steps exactly as the uninterrupted run would.
  """

  def __init__(self, config: TrainConfig):
    self._skip = config.on_nonfinite == "skip"
    self._factor, self._patience = config.divergence_factor, config.divergence_steps
    self.initial_loss: float | None = None  # L0, the loss of the run's first step
    self.above = 0  # consecutive steps so far with a loss above factor * L0
    self.skipped_steps: list[int] = []  # steps skipped for non-finite values
    self.last_loss: float | None = None  # the loss of the last step judged

  def check(self, step: int, loss: float, finite: bool, *, last: bool = False) -> bool:
    """Judge one step; return whether it was skipped (its row push must be too).

    ``last``: the run's last step, which must end with the loss in range.

    Raises:
      DivergenceError: the step's loss or gradients are not finite (unless skipping), the
        loss has exploded, or it is the last step and its loss is above the limit.
    """
    self.last_loss = loss
    if not finite or not math.isfinite(loss):
      what = "the loss" if not math.isfinite(loss) else "a gradient"
      if self._skip:
        self.skipped_steps.append(step)
        return True
      raise DivergenceError(
        step,
        "nonfinite",
        loss,
        f"{what} is not finite (loss {loss!r}); lower the learning rates, or pass "
        f"on_nonfinite='skip' (--on-nonfinite skip) to skip such steps",
      )
    if self.initial_loss is None:
      self.initial_loss = loss
    limit = self._factor * self.initial_loss
    self.above = self.above + 1 if self._factor and loss > limit else 0
    if self.above >= self._patience:
      raise DivergenceError(
        step,
        "exploding",
        loss,
        f"the loss has been above {self._factor:g} x its initial value {self.initial_loss:.6g} "
        f"for {self.above} steps (now {loss:.6g}); lower the learning rates (divergence_factor "
        f"and divergence_steps set this test)",
      )
    if last and self.above:
      raise DivergenceError(
        step,
        "exploding",
        loss,
        f"the run ended with its loss above {self._factor:g} x its initial value "
        f"{self.initial_loss:.6g} (now {loss:.6g}, for the last {self.above} steps); lower the "
        f"learning rates (divergence_factor sets this test)",
      )
    return False

  @property
  def suspect(self) -> bool:
    """The last step's loss was above ``divergence_factor`` x the initial loss."""
    return self.above > 0

  def state(self) -> dict:
    return {
      "initial_loss": self.initial_loss,
      "above": self.above,
      "skipped_steps": list(self.skipped_steps),
    }

  def restore(self, state: dict) -> None:
    self.initial_loss = state["initial_loss"]
    self.above = int(state["above"])
    self.skipped_steps = [int(s) for s in state["skipped_steps"]]


def check_dense(step: int, dense, last_loss: float | None) -> None:
  """Refuse a dense state (a pytree of parameters and optimizer state) with any non-finite
  value: it is divergence at ``step``, whatever the losses were.

  Raises:
    DivergenceError: with the count of non-finite values.
  """
  leaves = [x for x in jax.tree.leaves(dense) if jnp.issubdtype(x.dtype, jnp.floating)]
  bad = sum(int(jnp.sum(~jnp.isfinite(x))) for x in leaves)
  if bad:
    raise _nonfinite(
      step,
      last_loss,
      f"{bad} values of the dense parameters and optimizer state are not finite; lower "
      "the learning rates",
    )


def check_predictions(step: int, record: dict, last_loss: float | None) -> None:
  """Refuse an evaluation record (``val_*`` / ``test_*`` keys) with any non-finite prediction:
  the model diverged at ``step``, even if every training loss was finite.

  Raises:
    DivergenceError: naming the split and the count.
  """
  for split in ("val", "test"):
    bad = record.get(f"{split}_nonfinite_predictions")
    if bad:
      raise _nonfinite(
        step,
        last_loss,
        f"{bad} of the {record[f'{split}_examples']} {split} predictions are not finite; "
        "lower the learning rates",
      )


def _nonfinite(step: int, last_loss: float | None, why: str) -> DivergenceError:
  return DivergenceError(step, "nonfinite", math.nan if last_loss is None else last_loss, why)
