"""Run the sweeps of a config and return one record per (sweep, problem, variant, T, N, k).

Step sizes are ``eta = c / sqrt(T)`` (``c / (L sqrt(T))`` for SGD) on a grid of ``c``. The
first half of the seeds chooses ``c`` and the second half is what gets reported, so the choice
does not select for lucky noise: one ``c`` for a whole ``T`` sweep (``eta='series'``), so the
measured ``T``-slope is the method's and not the grid's, or one per point (``eta='point'``).
Every grid point is kept in the records, so the explicit-constant bounds are checked at every
step size, not only the chosen one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import numpy as np

from experiments.convergence import runner
from experiments.convergence import variants as variants_lib
from experiments.convergence.configs import Config
from experiments.convergence.configs import Sweep

__all__ = ["c_grid", "eta_grid", "iter_jobs", "run_config", "gap_key"]


def _r(x) -> list:
  """Round to 6 significant digits for the JSON file (keeps inf)."""
  return np.vectorize(lambda v: float(f"{v:.6g}"), otypes=[float])(np.asarray(x)).tolist()


def gap_key(point: str) -> str:
  """The result array holding the gap at ``point`` (``'xbar'``, ``'zbar'`` or ``'tau'``)."""
  return f"gap_{point}_ExS"


def c_grid(config: Config, family: str) -> np.ndarray:
  """Halvings of ``c`` from the family's maximum, ``config.num_etas`` of them."""
  top = config.c_max_sgd if family == "sgd" else config.c_max_adam
  return top * 2.0 ** -np.arange(config.num_etas)


def eta_grid(config: Config, family: str, *, T: int, L: float) -> np.ndarray:
  """``c / (L sqrt(T))`` for SGD (``1/L`` is its natural scale), ``c / sqrt(T)`` for Adam."""
  scale = L if family == "sgd" else 1.0
  return c_grid(config, family) / (scale * math.sqrt(T))


def _beta2(config: Config, sweep: Sweep, family: str, T: int, k_point: int) -> float | None:
  if family == "sgd":
    return None
  if sweep.beta2 == "one_over_T":
    return 1.0 - 1.0 / T
  T_beta2 = max(p[0] for p in sweep.points) if sweep.beta2 == "fixed" else T
  return runner.adam_beta2(T_beta2, k_point, cap=config.beta2_cap)


def iter_jobs(config: Config) -> Iterator[dict[str, Any]]:
  """Yield every (sweep, problem, variant, T, N, k) job of a config, in sweep order."""
  for sweep in config.sweeps:
    for name in sweep.variants:
      variant = variants_lib.get_variant(name)
      for T, N, k_point in sweep.points:
        yield dict(
          sweep=sweep.name,
          problem=sweep.problem,
          variant=name,
          T=T,
          N=N,
          k=k_point if variant.local_steps else 1,
          k_point=k_point,
          beta2=_beta2(config, sweep, variant.family, T, k_point),
          beta2_mode=sweep.beta2,
          eta_mode=sweep.eta,
        )


def _choose(tune_PxE: np.ndarray) -> int:
  """The grid index minimising the summed log tuning gap over the points (inf: diverged)."""
  with np.errstate(divide="ignore"):
    score_E = np.sum(np.log(tune_PxE), axis=0)
  return int(np.argmin(np.where(np.isnan(score_E), math.inf, score_E)))


def run_config(config: Config, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Run every job of ``config``; return the records (one per job, in sweep order)."""
  problems = {spec.name: spec.build() for spec in config.problems}
  infos = {name: p.describe() for name, p in problems.items()}
  half = config.num_seeds // 2
  cache: dict[tuple, dict[str, Any]] = {}
  jobs = list(iter_jobs(config))
  t_start = time.time()
  for i, job in enumerate(jobs):
    key = (job["problem"], job["variant"], job["T"], job["N"], job["k"], job["beta2"])
    if key in cache:
      continue
    problem = problems[job["problem"]]
    variant = variants_lib.get_variant(job["variant"])
    etas = eta_grid(config, variant.family, T=job["T"], L=problem.L)
    t0 = time.time()
    res = runner.run_grid(
      problem,
      variant,
      T=job["T"],
      N=job["N"],
      k=job["k"],
      etas=etas,
      num_seeds=config.num_seeds,
      beta2=1.0 - 1e-3 if job["beta2"] is None else job["beta2"],
      seed=config.seed,
    )
    cache[key] = dict(
      cs=c_grid(config, variant.family).tolist(),
      etas=_r(etas),
      seconds=round(time.time() - t0, 2),
      **{name: _r(value) for name, value in res.items()},
    )
    log(
      f"  [{i + 1}/{len(jobs)}] {job['sweep']:>16} {job['problem']:>17} {job['variant']:>22} "
      f"T={job['T']:<5} N={job['N']:<3} k={job['k']:<3} ({cache[key]['seconds']}s)"
    )
  records = []
  for job in jobs:
    variant = variants_lib.get_variant(job["variant"])
    key = (job["problem"], job["variant"], job["T"], job["N"], job["k"], job["beta2"])
    records.append(
      dict(
        job,
        config=config.name,
        problem_info=infos[job["problem"]],
        theory=variant.theory,
        point=variant.point,
        family=variant.family,
        beta1=variant.beta1,
        bias_correction=variant.bias_correction,
        half=half,
        **cache[key],
      )
    )
  _choose_step_sizes(records, config)
  log(f"ran {len(cache)} distinct jobs in {time.time() - t_start:.1f}s")
  return records


def _choose_step_sizes(records: list[dict[str, Any]], config: Config) -> None:
  """Set ``best`` (grid index) and ``best_interior`` on every record, from the tuning seeds."""
  half = config.num_seeds // 2
  series: dict[tuple, list[dict[str, Any]]] = {}
  for rec in records:
    if rec["eta_mode"] == "series":
      series.setdefault((rec["sweep"], rec["problem"], rec["variant"]), []).append(rec)
    else:
      series[(rec["sweep"], rec["problem"], rec["variant"], rec["T"], rec["N"], rec["k_point"])] = [
        rec
      ]
  for recs in series.values():
    tune_PxE = np.array(
      [np.mean(np.asarray(r[gap_key(r["point"])], float)[:, :half], axis=1) for r in recs]
    )
    best = _choose(tune_PxE)
    for rec in recs:
      rec["best"] = best
      rec["best_interior"] = 0 < best < config.num_etas - 1
