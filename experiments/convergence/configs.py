"""Configs of the convergence-rate experiment: frozen dataclasses, the quick one derived by replace.

Full run (:data:`FULL`), the one behind ``results/convergence_rate`` and
``figures/convergence_*.png``:

  Command:  nice python -m experiments.convergence_rate --out results/convergence_rate
            --figures figures --check
  Hardware: CPU only, a 2-core VM shared with other jobs (JAX 0.10.2).
  Runtime:  see docs/convergence.md (mostly XLA compiles: one per run).
  Expected: every enforced check passes; docs/convergence.md lists the numbers.

Quick run (:data:`QUICK`): ``python -m experiments.convergence_rate --quick [--check]``, about
a minute, writing under ``runs/convergence_rate_quick``. It runs every code path at smoke
sizes and enforces only the explicit-constant bounds, which hold at any size; its slopes and
fitted constants are printed but are not evidence.
"""

from __future__ import annotations

import dataclasses

from experiments.convergence import problems as problems_lib
from kstep_adam._validation import check_choice
from kstep_adam._validation import check_float
from kstep_adam._validation import check_int

__all__ = [
  "Config",
  "FULL",
  "LogisticSpec",
  "QUICK",
  "SeparableSpec",
  "Sweep",
  "CHECK_KINDS",
  "by_name",
]

CHECK_KINDS = ("bound", "slope", "calibrate_C", "tuning")
BETA2_MODES = ("fixed", "schedule", "one_over_T")
ETA_MODES = ("series", "point")


@dataclasses.dataclass(frozen=True)
class SeparableSpec:
  """``f(x) = sum_i x_i^2/2 + a cos x_i`` with additive gradient noise.

  Attributes:
    name: the problem's name in the results and figures.
    d: dimension.
    a: cosine amplitude (``L = 1 + a``, ``tau = a - 1``).
    noise_std: per-coordinate noise standard deviation.
    noise: ``'gaussian'`` or ``'uniform'`` (bounded, so ``sigma_inf`` is exact).
    hetero: amplitude of the per-worker gradient shifts; 0 gives i.i.d. workers.
  """

  name: str
  d: int = 32
  a: float = 2.0
  noise_std: float = 1.0
  noise: str = "gaussian"
  hetero: float = 0.0

  def build(self) -> problems_lib.SeparableCosine:
    return problems_lib.SeparableCosine(
      d=self.d, a=self.a, noise_std=self.noise_std, noise=self.noise, hetero=self.hetero
    )


@dataclasses.dataclass(frozen=True)
class LogisticSpec:
  """Logistic regression plus a non-convex regularizer on a fixed synthetic data set.

  Attributes:
    name: the problem's name in the results and figures.
    n: number of examples.
    d: dimension.
    lam: weight of ``sum_i x_i^2/(1+x_i^2)``.
    batch_size: examples per stochastic gradient (drawn with replacement).
    seed: seed of the data set and the starting point.
  """

  name: str
  n: int = 512
  d: int = 16
  lam: float = 0.1
  batch_size: int = 8
  seed: int = 0

  def build(self) -> problems_lib.NonconvexLogistic:
    return problems_lib.NonconvexLogistic(
      n=self.n, d=self.d, lam=self.lam, batch_size=self.batch_size, seed=self.seed
    )


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One axis of the experiment: a problem, the variants, and the ``(T, N, k)`` points.

  Attributes:
    name: what the sweep varies; names starting with ``T`` vary ``T`` at fixed ``N`` and
      ``k`` and get slope checks, ``N`` gets speedup rows, ``k_fixed_T`` and ``k_fixed_R``
      get growth rows.
    problem: name of one of the config's problems.
    variants: the algorithms run at every point (:mod:`experiments.convergence.variants`).
    points: ``(T, N, k)`` triples.
    beta2: how ``beta2`` is set for the Adam variants: ``'schedule'`` is Cheng & Glasgow's
      condition with constant 1 at each point, ``1 - min(cap, k^-3/2 R^-1/2)``; ``'fixed'``
      is that value at the sweep's largest ``T``, so one ``beta2`` meets the condition at
      every point; ``'one_over_T'`` is Défossez et al.'s ``1 - 1/T``.
    eta: ``'series'`` picks one ``c = eta sqrt(T)`` for the whole sweep (so the ``T``-slope
      is not a tuning artefact); ``'point'`` picks ``c`` per point.
  """

  name: str
  problem: str
  variants: tuple[str, ...]
  points: tuple[tuple[int, int, int], ...]
  beta2: str = "schedule"
  eta: str = "point"

  def __post_init__(self):
    check_choice(self.beta2, "beta2", BETA2_MODES)
    check_choice(self.eta, "eta", ETA_MODES)
    for T, N, k in self.points:
      for name, value in (("T", T), ("N", N), ("k", k)):
        check_int(value, f"sweep {self.name!r} point {name}")


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole experiment: problems, sweeps, seeds, step-size grids and the checks enforced.

  Attributes:
    name: ``'full'`` or ``'quick'``; written into every result line, so ``--plot-only``
      applies the checks of the config that produced the file.
    num_seeds: independent noise seeds, even: the first half choose ``c``, the second half
      are the reported measurements.
    num_etas: points of each step-size grid (halvings of ``c`` from its maximum).
    c_max_sgd: top of the SGD grid in units of ``eta L sqrt(T)``.
    c_max_adam: top of the Adam grid in units of ``eta sqrt(T)``.
    beta2_cap: largest ``1 - beta2`` the ``'schedule'`` and ``'fixed'`` modes use.
    seed: base PRNG seed.
    slope_tol: how far above a bound's asymptotic exponent (plus its log factor's local slope)
      a measured slope's confidence interval may start before the check fails; fixed before
      looking at results.
    c_tol: relative slack of the held-out test of a calibrated constant, on top of three
      standard errors of the seed means (the choice of ``c`` on the tuning seeds favours them).
    enforce: kinds of check rows whose failure makes ``--check`` exit 1.
    problems: the problems, by name.
    sweeps: the sweeps.
  """

  name: str
  num_seeds: int
  num_etas: int
  c_max_sgd: float
  c_max_adam: float
  beta2_cap: float
  seed: int
  slope_tol: float
  c_tol: float
  enforce: tuple[str, ...]
  problems: tuple[SeparableSpec | LogisticSpec, ...]
  sweeps: tuple[Sweep, ...]

  def __post_init__(self):
    check_int(self.num_seeds, "num_seeds", minimum=4)
    if self.num_seeds % 2:
      raise ValueError(f"num_seeds must be even (half tune, half measure), got {self.num_seeds}")
    check_int(self.num_etas, "num_etas", minimum=3)
    check_float(self.c_max_sgd, "c_max_sgd", low=0.0, low_open=True)
    check_float(self.c_max_adam, "c_max_adam", low=0.0, low_open=True)
    check_float(self.beta2_cap, "beta2_cap", low=0.0, high=1.0, low_open=True, high_open=True)
    check_float(self.slope_tol, "slope_tol", low=0.0)
    check_float(self.c_tol, "c_tol", low=0.0)
    for kind in self.enforce:
      check_choice(kind, "enforce", CHECK_KINDS)
    names = [p.name for p in self.problems]
    for sweep in self.sweeps:
      check_choice(sweep.problem, f"sweep {sweep.name!r} problem", tuple(names))

  def problem(self, name: str) -> SeparableSpec | LogisticSpec:
    """The spec of the problem called ``name``."""
    return {p.name: p for p in self.problems}[name]


SGD_AND_ADAM = (
  "local_sgd",
  "kstep_adam_params",
  "kstep_adam_moments",
  "local_adam",
  "minibatch_adam",
  "sync_adam",
)
# The beta2 comparison: the same form with and without local steps, and bias-corrected Adam.
BETA2_VARIANTS = ("local_adam", "minibatch_adam", "kstep_adam_moments")
DEFOSSEZ_VARIANTS = ("adam_defossez", "adam_defossez_momentum")


def sweeps(
  *,
  T_list: tuple[int, ...],
  N_list: tuple[int, ...],
  k_list: tuple[int, ...],
  N_fixed: int,
  k_fixed: int,
  T_fixed: int,
  R_fixed: int,
  t_problems: tuple[str, ...],
  defossez_problems: tuple[str, ...],
  nk_problem: str,
  hetero_problem: str | None,
  variants: tuple[str, ...] = SGD_AND_ADAM,
  nk_variants: tuple[str, ...] = SGD_AND_ADAM,
  beta2_variants: tuple[str, ...] = BETA2_VARIANTS,
  defossez_variants: tuple[str, ...] = DEFOSSEZ_VARIANTS,
) -> tuple[Sweep, ...]:
  """The sweeps of the experiment at the given sizes (the full and quick configs share it)."""
  t_points = tuple((T, N_fixed, k_fixed) for T in T_list)
  out = []
  for problem in t_problems:
    out.append(Sweep("T", problem, variants, t_points, beta2="fixed", eta="series"))
    if beta2_variants:
      out.append(
        Sweep("T_beta2_schedule", problem, beta2_variants, t_points, beta2="schedule", eta="series")
      )
  for problem in defossez_problems:
    out.append(
      Sweep(
        "T_defossez",
        problem,
        defossez_variants,
        tuple((T, 1, 1) for T in T_list),
        beta2="one_over_T",
        eta="series",
      )
    )
  out += [
    Sweep("N", nk_problem, nk_variants, tuple((T_fixed, N, k_fixed) for N in N_list)),
    Sweep("k_fixed_T", nk_problem, nk_variants, tuple((T_fixed, N_fixed, k) for k in k_list)),
    Sweep("k_fixed_R", nk_problem, nk_variants, tuple((R_fixed * k, N_fixed, k) for k in k_list)),
  ]
  if hetero_problem is not None:
    out.append(
      Sweep("k_fixed_T", hetero_problem, nk_variants, tuple((T_fixed, N_fixed, k) for k in k_list))
    )
  return tuple(out)


FULL = Config(
  name="full",
  num_seeds=8,
  num_etas=9,
  c_max_sgd=32.0,
  c_max_adam=8.0,
  beta2_cap=1e-2,
  seed=0,
  slope_tol=0.1,
  c_tol=0.1,
  enforce=CHECK_KINDS,
  problems=(
    SeparableSpec("separable"),
    SeparableSpec("separable_uniform", noise="uniform"),
    SeparableSpec("separable_hetero", hetero=1.0),
    LogisticSpec("logistic"),
  ),
  sweeps=sweeps(
    T_list=(256, 512, 1024, 2048, 4096),
    N_list=(1, 2, 4, 8, 16),
    k_list=(1, 2, 4, 8, 16, 32),
    N_fixed=4,
    k_fixed=8,
    T_fixed=1024,
    R_fixed=32,
    t_problems=("separable", "logistic"),
    defossez_problems=("separable_uniform", "logistic"),
    nk_problem="separable",
    hetero_problem="separable_hetero",
  ),
)

QUICK = dataclasses.replace(
  FULL,
  name="quick",
  num_seeds=4,
  num_etas=6,
  enforce=("bound",),
  problems=(
    SeparableSpec("separable", d=8),
    LogisticSpec("logistic", n=128, d=8),
  ),
  sweeps=sweeps(
    T_list=(64, 256),
    N_list=(1, 4),
    k_list=(1, 4),
    N_fixed=4,
    k_fixed=4,
    T_fixed=64,
    R_fixed=16,
    t_problems=("separable",),
    defossez_problems=("logistic",),
    nk_problem="separable",
    hetero_problem=None,
    nk_variants=("local_sgd", "local_adam"),
    beta2_variants=(),
  ),
)


def by_name(name: str) -> Config:
  """The config called ``name`` (``'full'`` or ``'quick'``)."""
  return {c.name: c for c in (FULL, QUICK)}[check_choice(name, "config", ("full", "quick"))]
