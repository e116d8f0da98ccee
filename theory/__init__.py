"""theory: non-convex convergence bounds as code, and estimators of their constants.

Which bound covers which algorithm, which statements were checked against the papers' text,
and what is derived here, is stated in each module's docstring and in
``theory/derivations.md``. :mod:`theory.asymptotics` says which decay in ``T`` each bound
actually predicts.
"""

from theory.adam import defossez_adam_bound
from theory.adam import defossez_adam_momentum_bound
from theory.adam import defossez_from_no_bias_correction
from theory.adam import defossez_tau_weights
from theory.asymptotics import ASYMPTOTES
from theory.asymptotics import Asymptote
from theory.drift import adam_step_bound
from theory.drift import replica_spread_bound
from theory.estimators import NoiseStats
from theory.estimators import gradient_noise_stats
from theory.estimators import initial_gap
from theory.estimators import max_grad_inf_norm
from theory.estimators import smoothness_at_points
from theory.estimators import smoothness_power_iteration
from theory.local_adam import local_adam_condition_ratios
from theory.local_adam import local_adam_conditions
from theory.local_adam import local_adam_rate
from theory.local_adam import minibatch_adam_rate
from theory.local_sgd import local_sgd_bound
from theory.local_sgd import local_sgd_bound_yu
from theory.local_sgd import local_sgd_max_eta
from theory.local_sgd import local_sgd_optimal_eta
from theory.local_sgd import local_sgd_speedup_max_k

__all__ = [
  "ASYMPTOTES",
  "Asymptote",
  "NoiseStats",
  "adam_step_bound",
  "defossez_adam_bound",
  "defossez_adam_momentum_bound",
  "defossez_from_no_bias_correction",
  "defossez_tau_weights",
  "gradient_noise_stats",
  "initial_gap",
  "local_adam_condition_ratios",
  "local_adam_conditions",
  "local_adam_rate",
  "local_sgd_bound",
  "local_sgd_bound_yu",
  "local_sgd_max_eta",
  "local_sgd_optimal_eta",
  "local_sgd_speedup_max_k",
  "max_grad_inf_norm",
  "minibatch_adam_rate",
  "replica_spread_bound",
  "smoothness_at_points",
  "smoothness_power_iteration",
]
