"""The compared algorithms, built from this codebase's optimizers (never re-implemented).

Each variant maps ``(learning_rate, k, beta2)`` to an optax transformation that averages
over the named axis ``'w'`` (the simulated workers) and says which bound covers it.

============================  ===============================================  ==========================
variant                       kstep_adam call                                  theory
============================  ===============================================  ==========================
``local_sgd``                 ``local_sgd(lr, k)``                             Wang & Joshi (explicit)
``kstep_adam_params``         ``kstep_adam(lr, k, sync='params')``             no bound
``kstep_adam_moments``        ``kstep_adam(lr, k, sync='params+moments')``     C&G shape (approximate:
                                                                               bias correction, eps)
``local_adam``                ``kstep_adam(..., form='local_adam',             C&G shape (exact form)
                              sync='params+moments')``
``sync_adam``                 ``sync_adam(lr)``                                Minibatch Adam shape
``adam_defossez``             ``kstep_adam(lr_n, 1, form='local_adam', b1=0)`` Défossez Thm 2 (explicit,
                              one worker, ``lr_n = eta sqrt(1-beta2^n)``       exact form, N = 1)
============================  ===============================================  ==========================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import optax

import kstep_adam

__all__ = ["Variant", "VARIANTS", "SHAPE_VARIANTS", "get_variant", "ADAM_BETA1", "ADAM_EPS"]

AXIS = "w"
ADAM_BETA1 = 0.9
ADAM_EPS = 1e-3  # lambda (inside the root) for 'local_adam'; eps for the 'adam' form.
# Averaging x, u and v together: measured (and tuned) at Cheng & Glasgow's zbar.
SHAPE_VARIANTS = ("local_adam", "kstep_adam_moments")


class Variant(NamedTuple):
  """One compared algorithm."""

  name: str
  family: str  # 'sgd' or 'adam': picks the step-size grid.
  beta1: float  # momentum used for Cheng & Glasgow's zbar (0: zbar = xbar).
  theory: str  # which bound covers it, or 'no bound'.
  make: Callable[[Callable, int, float], optax.GradientTransformation]


def _kstep(sync: str, form: str):
  def make(lr, k, beta2):
    return kstep_adam.kstep_adam(
      lr, k, axis_name=AXIS, sync=sync, form=form, b1=ADAM_BETA1, b2=beta2, eps=ADAM_EPS
    )

  return make


def _defossez(lr, k, beta2):
  del k

  # Défossez et al.'s alpha_n = alpha sqrt((1-beta2^n)/(1-beta2)) with v unnormalised equals
  # the Local Adam form with lr_n = alpha sqrt(1-beta2^n) (theory/derivations.md, section 2).
  def schedule(count):
    return lr(count) * jnp.sqrt(1.0 - beta2 ** (count + 1.0))

  return kstep_adam.kstep_adam(
    schedule, 1, axis_name=AXIS, sync="params", form="local_adam", b1=0.0, b2=beta2, eps=ADAM_EPS
  )


VARIANTS = {
  "local_sgd": Variant(
    "local_sgd",
    "sgd",
    0.0,
    "wang_joshi",
    lambda lr, k, b2: kstep_adam.local_sgd(lr, k, axis_name=AXIS),
  ),
  "kstep_adam_params": Variant(
    "kstep_adam_params", "adam", ADAM_BETA1, "no bound", _kstep("params", "adam")
  ),
  "kstep_adam_moments": Variant(
    "kstep_adam_moments",
    "adam",
    ADAM_BETA1,
    "cheng_glasgow_shape (approx.: bias-corrected, eps outside root)",
    _kstep("params+moments", "adam"),
  ),
  "local_adam": Variant(
    "local_adam", "adam", ADAM_BETA1, "cheng_glasgow_shape", _kstep("params+moments", "local_adam")
  ),
  "sync_adam": Variant(
    "sync_adam",
    "adam",
    ADAM_BETA1,
    "minibatch_adam_shape",
    lambda lr, k, b2: kstep_adam.sync_adam(lr, axis_name=AXIS, b1=ADAM_BETA1, b2=b2, eps=ADAM_EPS),
  ),
  "adam_defossez": Variant("adam_defossez", "adam", 0.0, "defossez_thm2", _defossez),
}


def get_variant(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)!r}, got {name!r}")
  return VARIANTS[name]
