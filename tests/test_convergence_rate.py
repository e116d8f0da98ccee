"""Tests of experiments/convergence_rate: runner equivalences, checks logic, --quick end to end."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

import theory
from experiments import convergence_rate
from experiments.convergence import checks
from experiments.convergence import problems
from experiments.convergence import runner
from experiments.convergence import sweeps
from experiments.convergence import variants


def test_separable_constants_are_exact():
  p = problems.SeparableCosine(d=4, a=2.0, noise_std=0.5)
  grid = np.linspace(-6, 6, 200_001)
  assert p.f_star == pytest.approx(4 * np.min(grid**2 / 2 + 2 * np.cos(grid)), abs=1e-6)
  assert (p.L, p.tau, p.sigma2) == (3.0, 1.0, 4 * 0.25)
  np.testing.assert_allclose(p.grad(p.x0), np.asarray(__import__("jax").grad(p.f)(p.x0)), rtol=1e-6)
  # Heterogeneous shifts cancel, so every worker-average sees the same global f.
  h = problems.SeparableCosine(d=5, hetero=1.5)
  total = sum(h.shift(w, 3) for w in range(3))
  np.testing.assert_allclose(total, np.zeros(5), atol=1e-5)
  assert float(jnp.linalg.norm(h.shift(0, 3))) > 1.0


def test_logistic_constants_bound_the_estimates():
  p = problems.NonconvexLogistic(n=64, d=4, batch_size=4)
  import jax

  est = theory.smoothness_at_points(p.f, jnp.stack([p.x0, jnp.zeros(4)]), jax.random.PRNGKey(0))
  assert float(est) <= p.L  # power iteration <= the analytic upper bound
  assert p.delta >= float(p.f(p.x0)) - 1e-6  # f* >= 0, so delta is an upper bound
  assert p.sigma2 > 0


def test_noiseless_workers_stay_identical_and_match_one_worker():
  # Without noise and with i.i.d. (identical) data, N replicas of local SGD never drift,
  # so N = 4 must reproduce N = 1 exactly and the spread is zero.
  p = problems.SeparableCosine(d=6, noise_std=0.0)
  v = variants.get_variant("local_sgd")
  kw = dict(T=40, k=4, etas=[0.1, 0.05], num_seeds=1, beta2=0.999)
  one = runner.run_grid(p, v, N=1, **kw)
  four = runner.run_grid(p, v, N=4, **kw)
  np.testing.assert_allclose(four["gap_xbar_ExS"], one["gap_xbar_ExS"], rtol=1e-5)
  np.testing.assert_allclose(four["spread_ExS"], 0.0, atol=1e-10)
  # beta1 = 0: zbar is xbar.
  np.testing.assert_allclose(one["gap_zbar_ExS"], one["gap_xbar_ExS"], rtol=1e-6)


def test_merges_collapse_the_spread_and_noise_creates_it():
  p = problems.SeparableCosine(d=6, noise_std=1.0)
  v = variants.get_variant("kstep_adam_params")
  kw = dict(T=32, N=4, etas=[0.05], num_seeds=2, beta2=0.99)
  every = runner.run_grid(p, v, k=1, **kw)
  rare = runner.run_grid(p, v, k=16, **kw)
  assert np.all(rare["spread_ExS"] > 10 * every["spread_ExS"])
  assert np.all(every["spread_ExS"] < 1e-8)  # k = 1: replicas re-averaged every step


def test_eta_grid_respects_wang_joshi_condition():
  v = variants.get_variant("local_sgd")
  grid = sweeps.eta_grid(v, T=100, k=8, L=3.0, num=4, adam_c_max=8.0)
  assert grid[0] == pytest.approx(theory.local_sgd_max_eta(3.0, 8))
  assert np.all(np.diff(grid) < 0)
  with pytest.raises(ValueError, match="variant"):
    variants.get_variant("adamw")


def _fake_record(gap, *, variant="local_sgd", T=100, sweep="T"):
  info = problems.SeparableCosine(d=4).describe()
  return dict(
    sweep=sweep,
    problem="separable",
    variant=variant,
    T=T,
    N=2,
    k=2,
    k_point=2,
    problem_info=info,
    etas=[0.1],
    beta2=0.99,
    best=0,
    eta_at_grid_edge=True,
    gap_xbar_ExS=[[gap, gap]],
    gap_zbar_ExS=[[gap, gap]],
    ginf_ExS=[[1.0, 1.0]],
    measured_xbar=[gap],
    measured_zbar=[gap],
    theory="wang_joshi",
  )


def test_checks_flag_a_violated_bound():
  info = problems.SeparableCosine(d=4).describe()
  bound = theory.local_sgd_bound(100, 2, 2, 0.1, info["L"], info["sigma2"], info["delta"])
  ok = checks.run_checks([_fake_record(0.5 * bound)])
  assert not ok["failed"]
  bad = checks.run_checks([_fake_record(2.0 * bound)])
  assert [r["bound"] for r in bad["failed"]] == ["wang_joshi"]


def test_checks_slope_against_prediction():
  def recs(exponent):
    out = []
    for T in (1000, 4000, 16000):
      r = _fake_record(1.0, T=T)
      pred = checks.predicted_value(r)
      r["measured_xbar"] = [pred * (T / 1000) ** (exponent + 0.5) * f for f in (0.9, 1.0, 1.1)]
      out.append(r)
    return out

  rows = [r for r in checks.run_checks(recs(-0.5))["rows"] if r["kind"] == "slope"]
  assert rows[0]["passed"] is True
  rows = [r for r in checks.run_checks(recs(0.0))["rows"] if r["kind"] == "slope"]
  assert rows[0]["passed"] is False


def test_quick_end_to_end(tmp_path):
  out = str(tmp_path / "cr")
  code = convergence_rate.main(["--quick", "--check", "--out", out])
  with open(os.path.join(out, "checks.json")) as fh:
    table = json.load(fh)
  assert code == (1 if table["failed"] else 0)
  records = checks.load_records(os.path.join(out, "results.jsonl"))
  assert {r["variant"] for r in records} == set(variants.VARIANTS)
  assert all(math.isfinite(x) for r in records for x in r["measured_xbar"])
  kinds = {(r["kind"], r.get("bound")) for r in table["rows"]}
  assert ("bound", "wang_joshi") in kinds
  assert ("bound", "defossez_thm2 (R along run)") in kinds
  no_bound = [
    r for r in table["rows"] if r["kind"] == "slope" and r["variant"] == "kstep_adam_params"
  ]
  assert no_bound and no_bound[0]["predicted"] is None
  figs = sorted(os.listdir(os.path.join(out, "figures")))
  assert figs == [
    "convergence_gap_vs_T.png",
    "convergence_gap_vs_k.png",
    "convergence_speedup_vs_N.png",
  ]
  # --plot-only rebuilds the figures from the files alone.
  for f in figs:
    os.remove(os.path.join(out, "figures", f))
  assert convergence_rate.main(["--quick", "--plot-only", "--out", out]) == 0
  assert sorted(os.listdir(os.path.join(out, "figures"))) == figs
