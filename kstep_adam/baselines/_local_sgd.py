"""Local SGD: SGD on each worker, parameters averaged every k steps."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import optax

from kstep_adam._merge import merge_params
from kstep_adam._schedule import MergeSchedule
from kstep_adam._validation import check_hyperparameter
from kstep_adam.baselines._schedules import baseline_schedule


def local_sgd(
  learning_rate: optax.ScalarOrSchedule,
  k: int | Mapping[str, int] | MergeSchedule,
  *,
  momentum: float | None = None,
  nesterov: bool = False,
  axis_name: str | Sequence[str] | None = None,
  route: str = "hierarchical",
) -> optax.GradientTransformation:
  r"""Local SGD: SGD (optionally with momentum) on each worker, parameters averaged every k.

  .. math:: x^w_t = x^w_{t-1} - \eta_t\, \mathrm{SGD}(g^w_t), \qquad
     x^w_t \leftarrow \tfrac{1}{N}\textstyle\sum_{w'} x^{w'}_t \ \text{ if } k \mid t

  The momentum buffer stays local (it is never averaged).

  Args:
    learning_rate: a float >= 0 or an optax schedule (not checked until called).
    k: merge period, per-axis periods, or a :class:`MergeSchedule` over ``'params'``
      (``merge_schedule(k, axis_name=...)``, built once and passed also to the byte
      accounting; then ``axis_name`` and ``route`` are taken from it).
    momentum: heavy-ball momentum in [0, 1) as in ``optax.sgd``; None disables it.
    nesterov: use Nesterov momentum.
    axis_name: mesh axis or axes to average over; None: plain ``optax.sgd``.
    route: ``'hierarchical'`` or ``'flat'``.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  References:
    Stich, Local SGD Converges Fast and Communicates Little, https://arxiv.org/abs/1805.09767
  """
  check_hyperparameter(learning_rate, "learning_rate", low=0.0, schedule=True)
  check_hyperparameter(momentum, "momentum", low=0.0, high=1.0, high_open=True, allow_none=True)
  schedule = baseline_schedule(k, "params", axis_name, route)
  return optax.chain(
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    merge_params(schedule),
  )
