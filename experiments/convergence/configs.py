"""Configs of the convergence-rate experiment.

Full run (``full()``), the one the figures in ``figures/convergence_*.png`` come from:

  Command:  python -m experiments.convergence_rate --out results/convergence_rate --check
  Hardware: CPU only, a 2-core VM shared with three other jobs (JAX 0.10.2).
  Runtime:  about 11 minutes on that machine under load (mostly XLA compiles: one per run).
  Expected: (committed run, results/convergence_rate/checks.json) every explicit-constant
            bound holds at every step size (Wang & Joshi: max measured/bound 0.50; Défossez
            Thm 2: 0.014; derived drift bound: 7e-4); T-slopes: Local SGD -0.60 vs predicted
            -0.61, sync Adam -0.50 vs -0.54, Local Adam (zbar) -0.68 vs -0.64 on the separable
            problem; two slope checks FAIL (k-step Adam with moments, separable: -0.47 vs
            -0.64; Local Adam, logistic: -0.75 vs -0.64), so ``--check`` exits 1.
            k-step Adam (params only) is reported as "no bound".

Quick run (``quick()``): ``python -m experiments.convergence_rate --quick --out /tmp/cr``,
about 1 minute on the same machine; a smoke test of every code path, not evidence.
"""

from __future__ import annotations

from typing import Any

__all__ = ["full", "quick", "ALL_VARIANTS"]

ALL_VARIANTS = ["local_sgd", "kstep_adam_params", "kstep_adam_moments", "local_adam", "sync_adam"]


def _sweeps(
  *,
  T_list,
  N_list,
  N_fixed,
  T_fixed,
  k_fixed,
  k_list,
  R_fixed,
  problem,
  extra_T_problems=(),
  hetero_problem=None,
  nk_variants=tuple(ALL_VARIANTS),
) -> list[dict[str, Any]]:
  sweeps = [
    dict(
      name="T",
      problem=problem,
      variants=ALL_VARIANTS,
      points=[dict(T=T, N=N_fixed, k=k_fixed) for T in T_list],
    ),
    dict(
      name="N",
      problem=problem,
      variants=list(nk_variants),
      points=[dict(T=T_fixed, N=N, k=k_fixed) for N in N_list],
    ),
    dict(
      name="k_fixed_T",
      problem=problem,
      variants=list(nk_variants),
      points=[dict(T=T_fixed, N=N_fixed, k=k) for k in k_list],
    ),
    dict(
      name="k_fixed_R",
      problem=problem,
      variants=list(nk_variants),
      points=[dict(T=R_fixed * k, N=N_fixed, k=k) for k in k_list],
    ),
    dict(
      name="T_defossez",
      problem=problem + "_uniform",
      variants=["adam_defossez"],
      points=[dict(T=T, N=1, k=1) for T in T_list],
    ),
  ]
  for name in extra_T_problems:
    sweeps.append(
      dict(
        name="T",
        problem=name,
        variants=ALL_VARIANTS,
        points=[dict(T=T, N=N_fixed, k=k_fixed) for T in T_list],
      )
    )
  if hetero_problem is not None:
    sweeps.append(
      dict(
        name="k_fixed_T",
        problem=hetero_problem,
        variants=ALL_VARIANTS,
        points=[dict(T=T_fixed, N=N_fixed, k=k) for k in k_list],
      )
    )
  return sweeps


def full() -> dict[str, Any]:
  """The real run behind the figures (see the module docstring for its header)."""
  d = 32
  return dict(
    num_seeds=8,
    num_etas=8,
    adam_c_max=8.0,
    seed=0,
    problems=dict(
      separable=dict(kind="separable", d=d, a=2.0, noise_std=1.0),
      separable_uniform=dict(kind="separable", d=d, a=2.0, noise_std=1.0, noise="uniform"),
      separable_hetero=dict(kind="separable", d=d, a=2.0, noise_std=1.0, hetero=1.0),
      logistic=dict(kind="logistic", n=512, d=16, lam=0.1, batch_size=8),
    ),
    sweeps=_sweeps(
      T_list=[256, 512, 1024, 2048, 4096],
      N_list=[1, 2, 4, 8, 16],
      N_fixed=4,
      T_fixed=1024,
      k_fixed=8,
      k_list=[1, 2, 4, 8, 16, 32],
      R_fixed=32,
      problem="separable",
      extra_T_problems=("logistic",),
      hetero_problem="separable_hetero",
    ),
  )


def quick() -> dict[str, Any]:
  """A smoke run of every code path in about a minute; its numbers are not evidence.

  Command: python -m experiments.convergence_rate --quick --out /tmp/cr [--check]
  Hardware/runtime: shared 2-core CPU VM, about 1 minute.
  Expected: a results.jsonl, checks.json and three figures under --out.
  """
  d = 8
  return dict(
    num_seeds=4,
    num_etas=4,
    adam_c_max=8.0,
    seed=0,
    problems=dict(
      separable=dict(kind="separable", d=d, a=2.0, noise_std=1.0),
      separable_uniform=dict(kind="separable", d=d, a=2.0, noise_std=1.0, noise="uniform"),
    ),
    sweeps=_sweeps(
      T_list=[64, 128],
      N_list=[1, 4],
      N_fixed=4,
      T_fixed=128,
      k_fixed=4,
      k_list=[1, 4],
      R_fixed=16,
      problem="separable",
      nk_variants=("local_sgd",),
    ),
  )
