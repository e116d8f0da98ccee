"""The compared algorithms, built from this codebase's optimizers (never re-implemented).

Each variant maps ``(learning_rate, k, beta2)`` to an optax transformation that averages
over the named axis ``'w'`` (the simulated workers) and says which bound covers it, and at
which point the bound measures the gradient.

==========================  ===================================================  =============
variant                     built from                                           theory
==========================  ===================================================  =============
``local_sgd``               ``local_sgd(lr, k)``                                 Wang & Joshi
``kstep_adam_params``       ``kstep_adam(lr, k, sync='params')``                 no bound
``kstep_adam_moments``      ``kstep_adam(lr, k, sync='params+moments')``         no bound (1)
``local_adam``              ``kstep_adam(..., form='local_adam',                 Cheng &
                            sync='params+moments')``                             Glasgow (2)
``minibatch_adam``          mean of the workers' gradients, then                 Cheng &
                            ``scale_by_kstep_adam(form='local_adam')``           Glasgow (3)
``sync_adam``               ``sync_adam(lr)`` (DDP: optax Adam on mean grads)    no bound (1)
``adam_defossez``           ``kstep_adam(lr_n, 1, form='local_adam', b1=0)``,    Défossez
                            one worker, ``lr_n = eta sqrt(1-beta2^n)``           Thm 2 (4)
``adam_defossez_momentum``  the same with ``b1=0.9``                             Défossez
                                                                                 Thm 4 (4)
==========================  ===================================================  =============

(1) Bias correction on and ``eps`` outside the root: not the algorithm Cheng & Glasgow
analyse, so no bound is claimed. (2) Their Algorithm 1 exactly (no clipping: ``rho = inf``),
measured at their ``zbar``. (3) Their Minibatch Adam with ``K = 1``: one step of Algorithm 1's
update per round on the mean of ``N`` gradients. (4) Exactly Défossez et al.'s algorithm via
the map of ``theory/derivations.md`` section 2, measured with their ``tau`` weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import optax

import kstep_adam

__all__ = ["Variant", "VARIANTS", "get_variant", "ADAM_BETA1", "ADAM_EPS", "AXIS"]

AXIS = "w"
ADAM_BETA1 = 0.9
ADAM_EPS = 1e-3  # lambda (inside the root) for 'local_adam'; eps for the 'adam' form.

Make = Callable[[Callable, int, float], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Variant:
  """One compared algorithm and the bound that covers it.

  Attributes:
    name: the variant's key in :data:`VARIANTS`.
    family: ``'sgd'`` or ``'adam'``: picks the step-size grid.
    beta1: momentum; sets Cheng & Glasgow's ``zbar`` and Défossez's ``tau`` weights.
    theory: key into :data:`theory.ASYMPTOTES` of the bound that covers it, or ``'no bound'``.
    point: where that bound measures the gradient: ``'xbar'`` (replica average), ``'zbar'``
      (Cheng & Glasgow's auxiliary average) or ``'tau'`` (Défossez's weighted average).
    bias_correction: whether the Adam update divides by ``1 - beta^t`` (drift bound constant).
    local_steps: whether replicas take steps between merges (False: ``k`` is forced to 1).
    make: ``(learning_rate, k, beta2) -> optax.GradientTransformation``.
  """

  name: str
  family: str
  beta1: float
  theory: str
  point: str
  bias_correction: bool
  local_steps: bool
  make: Make


def _kstep(sync: str, form: str) -> Make:
  def make(lr, k, beta2):
    return kstep_adam.kstep_adam(
      lr, k, axis_name=AXIS, sync=sync, form=form, b1=ADAM_BETA1, b2=beta2, eps=ADAM_EPS
    )

  return make


def _minibatch_adam(lr, k, beta2):
  del k  # one update per round on the mean gradient: no local steps.
  return optax.chain(
    optax.stateless(lambda g, params=None: kstep_adam.tree_mean(g, AXIS)),
    kstep_adam.scale_by_kstep_adam(b1=ADAM_BETA1, b2=beta2, eps=ADAM_EPS, form="local_adam"),
    optax.scale_by_learning_rate(lr),
  )


def _sync_adam(lr, k, beta2):
  del k
  return kstep_adam.sync_adam(lr, axis_name=AXIS, b1=ADAM_BETA1, b2=beta2, eps=ADAM_EPS)


def _defossez(b1: float) -> Make:
  def make(lr, k, beta2):
    del k

    # Défossez et al.'s alpha_n = alpha (1-beta1) sqrt((1-beta2^n)/(1-beta2)) with unnormalised
    # m and v equals the Local Adam form with lr_n = alpha sqrt(1-beta2^n), for any beta1
    # (theory/derivations.md, section 2). optax calls the schedule with count = n - 1.
    def schedule(count):
      return lr(count) * jnp.sqrt(1.0 - beta2 ** (count + 1.0))

    return kstep_adam.kstep_adam(
      schedule, 1, axis_name=AXIS, sync="params", form="local_adam", b1=b1, b2=beta2, eps=ADAM_EPS
    )

  return make


def _local_sgd(lr, k, beta2):
  del beta2
  return kstep_adam.local_sgd(lr, k, axis_name=AXIS)


VARIANTS = {
  v.name: v
  for v in (
    Variant("local_sgd", "sgd", 0.0, "wang_joshi", "xbar", False, True, _local_sgd),
    Variant(
      "kstep_adam_params",
      "adam",
      ADAM_BETA1,
      "no bound",
      "xbar",
      True,
      True,
      _kstep("params", "adam"),
    ),
    Variant(
      "kstep_adam_moments",
      "adam",
      ADAM_BETA1,
      "no bound",
      "xbar",
      True,
      True,
      _kstep("params+moments", "adam"),
    ),
    Variant(
      "local_adam",
      "adam",
      ADAM_BETA1,
      "cheng_glasgow_local_adam",
      "zbar",
      False,
      True,
      _kstep("params+moments", "local_adam"),
    ),
    Variant(
      "minibatch_adam",
      "adam",
      ADAM_BETA1,
      "cheng_glasgow_minibatch_adam",
      "zbar",
      False,
      False,
      _minibatch_adam,
    ),
    Variant("sync_adam", "adam", ADAM_BETA1, "no bound", "xbar", True, False, _sync_adam),
    Variant("adam_defossez", "adam", 0.0, "defossez_thm2", "tau", False, False, _defossez(0.0)),
    Variant(
      "adam_defossez_momentum",
      "adam",
      ADAM_BETA1,
      "defossez_thm4",
      "tau",
      False,
      False,
      _defossez(ADAM_BETA1),
    ),
  )
}


def get_variant(name: str) -> Variant:
  """Return the variant called ``name``; ValueError lists the known ones otherwise."""
  if name not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)!r}, got {name!r}")
  return VARIANTS[name]
