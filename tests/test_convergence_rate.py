"""Tests of experiments/convergence_rate: problems' constants, variants, the checks' logic, --quick."""

import dataclasses
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep_adam
import theory
from experiments import _common
from experiments import convergence_rate
from experiments.convergence import checks
from experiments.convergence import configs
from experiments.convergence import problems
from experiments.convergence import runner
from experiments.convergence import sweeps
from experiments.convergence import variants

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_separable_constants_are_exact():
  p = problems.SeparableCosine(d=4, a=2.0, noise_std=0.5)
  grid = np.linspace(-6, 6, 200_001)
  assert p.f_star == pytest.approx(4 * np.min(grid**2 / 2 + 2 * np.cos(grid)), abs=1e-6)
  assert (p.L, p.tau, p.sigma2) == (3.0, 1.0, 4 * 0.25)
  np.testing.assert_allclose(p.grad(p.x0), np.asarray(jax.grad(p.f)(p.x0)), rtol=1e-6)
  # Heterogeneous shifts cancel, so every worker-average sees the same global f.
  h = problems.SeparableCosine(d=5, hetero=1.5)
  total = sum(h.shift(w, 3) for w in range(3))
  np.testing.assert_allclose(total, np.zeros(5), atol=1e-5)
  assert float(jnp.linalg.norm(h.shift(0, 3))) > 1.0
  # A Gaussian's 4 sigma is a quantile, not a bound: labelled, not certified.
  assert p.describe()["certified"]["sigma_inf"] is False
  assert problems.SeparableCosine(d=4, noise="uniform").describe()["certified"]["sigma_inf"]


def test_logistic_constants_are_certified_bounds():
  p = problems.NonconvexLogistic(n=64, d=4, batch_size=4)
  key = jax.random.PRNGKey(0)
  xs_PxD = jnp.concatenate([jnp.stack([p.x0, jnp.zeros(4)]), 3.0 * jax.random.normal(key, (30, 4))])
  assert float(theory.smoothness_at_points(p.f, xs_PxD, key)) <= p.L
  assert p.delta >= float(p.f(p.x0)) - 1e-6  # f* >= 0, so delta is an upper bound
  # The certified sigma2 bounds the exact finite-sum variance at every point tried.
  stats = theory.gradient_noise_stats(p.per_sample_grads, p.grad, xs_PxD, batch_size=4)
  assert float(stats.sigma2) <= p.sigma2
  assert p.sigma2_estimate <= p.sigma2
  assert float(stats.sigma_inf) <= p.sigma_inf
  grad_PxD = jax.vmap(p.grad)(xs_PxD)
  assert float(jnp.max(jnp.abs(grad_PxD))) <= p.grad_inf_bound
  assert float(jnp.max(jnp.linalg.norm(grad_PxD, axis=1))) <= p.grad_norm_bound
  # Every coordinate of every stochastic gradient is within the a.s. bound (Défossez's R).
  keys = jax.random.split(key, 200)
  g_PxKxD = jax.vmap(lambda x: jax.vmap(lambda k: p.stoch_grad(x, k, 0, 1))(keys))(xs_PxD)
  assert float(jnp.max(jnp.abs(g_PxKxD))) <= p.stoch_grad_inf_bound
  info = p.describe()
  assert all(info["certified"].values())


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
  # beta1 = 0: zbar is xbar and Défossez's tau weights are uniform.
  np.testing.assert_allclose(one["gap_zbar_ExS"], one["gap_xbar_ExS"], rtol=1e-6)
  np.testing.assert_allclose(one["gap_tau_ExS"], one["gap_xbar_ExS"], rtol=1e-5)


def test_merges_collapse_the_spread_and_noise_creates_it():
  p = problems.SeparableCosine(d=6, noise_std=1.0)
  v = variants.get_variant("kstep_adam_params")
  kw = dict(T=32, N=4, etas=[0.05], num_seeds=2, beta2=0.99)
  every = runner.run_grid(p, v, k=1, **kw)
  rare = runner.run_grid(p, v, k=16, **kw)
  assert np.all(rare["spread_ExS"] > 10 * every["spread_ExS"])
  assert np.all(every["spread_ExS"] < 1e-8)  # k = 1: replicas re-averaged every step


def test_minibatch_adam_is_one_local_adam_update_on_the_mean_gradient():
  g_NxD = jnp.array([[1.0, -2.0, 0.5], [3.0, 0.0, -0.5]])
  tx = variants.get_variant("minibatch_adam").make(lambda c: 0.1, 8, 0.99)

  def two_steps(g_D):
    state = tx.init(jnp.zeros(3))
    u1, state = tx.update(g_D, state)
    u2, _ = tx.update(2 * g_D, state)
    return u1 + u2

  got_NxD = jax.vmap(two_steps, axis_name=variants.AXIS)(g_NxD)
  ref = optax.chain(
    kstep_adam.scale_by_kstep_adam(
      b1=variants.ADAM_BETA1, b2=0.99, eps=variants.ADAM_EPS, form="local_adam"
    ),
    optax.scale_by_learning_rate(0.1),
  )
  state = ref.init(jnp.zeros(3))
  u1, state = ref.update(g_NxD.mean(0), state)
  u2, _ = ref.update(2 * g_NxD.mean(0), state)
  np.testing.assert_allclose(got_NxD, jnp.stack([u1 + u2] * 2), rtol=1e-6)


def test_step_size_grids_are_c_over_sqrt_t():
  cfg = configs.QUICK
  sgd = sweeps.eta_grid(cfg, "sgd", T=400, L=2.0)
  adam = sweeps.eta_grid(cfg, "adam", T=400, L=2.0)
  np.testing.assert_allclose(sgd * 2.0 * 20.0, sweeps.c_grid(cfg, "sgd"))
  np.testing.assert_allclose(adam * 20.0, sweeps.c_grid(cfg, "adam"))
  assert len(sgd) == cfg.num_etas and np.all(np.diff(sgd) < 0)
  with pytest.raises(ValueError, match="variant"):
    variants.get_variant("adamw")


def test_quick_config_is_derived_from_the_full_one():
  full, quick = configs.FULL, configs.QUICK
  same = {"c_max_sgd", "c_max_adam", "beta2_cap", "seed", "slope_tol", "c_tol"}
  assert all(getattr(quick, f) == getattr(full, f) for f in same)
  assert quick.enforce == ("bound",) and set(full.enforce) == set(configs.CHECK_KINDS)
  with pytest.raises(ValueError, match="num_seeds must be even"):
    dataclasses.replace(full, num_seeds=5)
  with pytest.raises(ValueError, match="problem"):
    dataclasses.replace(full, sweeps=(configs.Sweep("T", "nowhere", ("local_sgd",), ((8, 1, 1),)),))
  with pytest.raises(dataclasses.FrozenInstanceError):
    full.num_seeds = 2


# --- The checks' logic, on records built by hand --------------------------------------------


def _record(gaps_by_seed, *, variant="local_sgd", T=100, N=2, k=2, problem=None, **over):
  """A record of one run with one step size, shaped like ``sweeps.run_config``'s output."""
  p = problem or problems.SeparableCosine(d=4)
  v = variants.get_variant(variant)
  gaps = [list(map(float, gaps_by_seed))]
  half = len(gaps_by_seed) // 2
  rec = dict(
    config="quick",
    sweep="T",
    problem="separable",
    variant=variant,
    T=T,
    N=N,
    k=k,
    k_point=k,
    beta2=None if v.family == "sgd" else 0.99,
    beta2_mode="fixed",
    eta_mode="series",
    problem_info=p.describe(),
    theory=v.theory,
    point=v.point,
    family=v.family,
    beta1=v.beta1,
    bias_correction=v.bias_correction,
    half=half,
    cs=[1.0],
    etas=[0.05],
    best=0,
    best_interior=True,
    gap_xbar_ExS=gaps,
    gap_zbar_ExS=gaps,
    gap_tau_ExS=gaps,
    spread_ExS=[[0.0] * len(gaps_by_seed)],
    ginf_ExS=[[1.0] * len(gaps_by_seed)],
  )
  rec.update(over)
  return rec


def _rows(recs, kind, config=configs.QUICK):
  return [r for r in checks.run_checks(recs, config)["rows"] if r["kind"] == kind]


def test_a_violated_explicit_bound_fails_and_is_labelled():
  info = problems.SeparableCosine(d=4).describe()
  bound = theory.local_sgd_bound(100, 2, 2, 0.05, info["L"], info["sigma2"], info["delta"])
  ok = checks.run_checks([_record([0.5 * bound] * 4)], configs.QUICK)
  assert not ok["failed"]
  bad = checks.run_checks([_record([2.0 * bound] * 4)], configs.QUICK)
  assert [r["bound"] for r in bad["failed"]] == ["wang_joshi"]
  rows = {r["bound"]: r for r in bad["rows"] if r["kind"] == "bound"}
  assert rows["wang_joshi"]["constants"] == "certified"
  # Yu et al. needs a gradient bound the separable problem does not have: estimated.
  assert rows["yu_yang_zhu"]["constants"] == "estimated"


def test_step_sizes_outside_the_condition_are_not_checked():
  huge = _record([1e9] * 4, etas=[10.0])  # eta L > 1: Wang & Joshi's bound does not apply
  (row,) = [r for r in _rows([huge], "bound") if r["bound"] == "yu_yang_zhu"] or [None]
  assert row is None
  assert not [r for r in _rows([huge], "bound") if r["bound"] == "wang_joshi"]


def _t_series(exponent, *, variant="local_sgd", seeds=(0.9, 1.0, 1.1, 1.05)):
  return [
    _record([(T / 100) ** exponent * s for s in seeds], variant=variant, T=T)
    for T in (100, 200, 400, 800, 1600)
  ]


def test_slope_check_is_one_sided_at_the_asymptotic_exponent():
  cfg = configs.FULL
  (fast,) = _rows(_t_series(-0.9), "slope", cfg)
  assert fast["passed"] is True  # an upper bound allows faster decay
  assert fast["measured_slope"] == pytest.approx(-0.9)
  assert fast["T_window"] == [200, 400, 800, 1600]  # the top decade only
  (near,) = _rows(_t_series(-0.45), "slope", cfg)
  assert near["passed"] is True  # within the stated tolerance
  (slow,) = _rows(_t_series(-0.2), "slope", cfg)
  assert slow["passed"] is False and "slower" in slow["note"]
  assert len(slow["pairwise_slopes"]) == 4
  # No bound: the slope is reported, never judged.
  (free,) = _rows(_t_series(0.0, variant="kstep_adam_params"), "slope", cfg)
  assert free["passed"] is None and free["threshold"] is None


def test_calibrated_constant_is_tested_on_held_out_seeds():
  p = problems.SeparableCosine(d=4)
  consts = dict(G_inf=1.0, sigma_inf=4.0, G_inf_certified=False, sigma_inf_certified=False)
  recs = []
  for T in (100, 400, 1600):
    shape = checks.shape_value(_record([1.0] * 4, variant="local_adam", T=T, k=4), consts)
    recs.append(_record([2 * shape] * 2 + [2 * shape] * 2, variant="local_adam", T=T, k=4))
  (row,) = _rows(recs, "calibrate_C")
  assert row["C_max"] == pytest.approx(2.0, rel=1e-6) and row["passed"] is True
  assert row["constants"] == "estimated"
  # Held-out seeds far above the calibrated C fail the check.
  shape = checks.shape_value(_record([1.0] * 4, variant="local_adam", T=1600, k=4), consts)
  recs[-1] = _record([2 * shape] * 2 + [5 * shape] * 2, variant="local_adam", T=1600, k=4)
  (row,) = _rows(recs, "calibrate_C")
  assert row["passed"] is False and row["test_worst_run"]["T"] == 1600
  del p


def test_tuning_row_fails_at_the_grid_edge():
  (row,) = _rows([_record([1.0] * 4, best_interior=False)], "tuning")
  assert row["passed"] is False


# --- End to end --------------------------------------------------------------------------------


def _digest(*dirs):
  h = hashlib.sha256()
  for d in dirs:
    for root, _, files in sorted(os.walk(os.path.join(REPO, d))):
      for f in sorted(files):
        with open(os.path.join(root, f), "rb") as fh:
          h.update(f.encode() + fh.read())
  return h.hexdigest()


def test_defaults_never_point_at_committed_directories():
  for cmd in (convergence_rate.Command(), convergence_rate.Command(quick=True)):
    assert cmd.out_dir.startswith("runs") and cmd.figures_dir.startswith("runs")


def test_quick_check_passes_and_leaves_results_and_figures_untouched(tmp_path, monkeypatch):
  before = _digest("results", "figures")
  monkeypatch.chdir(tmp_path)  # the default out (runs/...) resolves inside the temp dir
  assert convergence_rate.main(["--quick", "--check"]) == 0
  out = tmp_path / "runs" / "convergence_rate_quick"
  records = _common.read_jsonl(str(out / "results.jsonl"))
  used = {v for s in configs.QUICK.sweeps for v in s.variants}
  assert {r["variant"] for r in records} == used
  with open(out / "checks.json") as fh:
    table = json.load(fh)
  assert not table["failed"]
  kinds = {(r["kind"], r.get("bound")) for r in table["rows"]}
  assert {("bound", "wang_joshi"), ("bound", "defossez_thm4"), ("bound", "spread_drift")} <= kinds
  figs = sorted(os.listdir(out / "figures"))
  assert figs == sorted(spec[0] for spec in convergence_rate.plot_convergence.FIGURES.values())
  # --plot-only rebuilds checks and figures from the files alone.
  for f in figs:
    os.remove(out / "figures" / f)
  assert convergence_rate.main(["--plot-only", "--check", "--out", str(out)]) == 0
  assert sorted(os.listdir(out / "figures")) == figs
  assert all(math.isfinite(x) for r in records for x in checks.as_array(r["gap_xbar_ExS"])[0])
  assert _digest("results", "figures") == before


def test_check_words_and_exit_status_agree(tmp_path, monkeypatch, capsys):
  """A reported-only row that does not hold never reads FAIL; the last lines say what the exit
  status is, and it is that."""
  info = problems.SeparableCosine(d=4).describe()
  bound = theory.local_sgd_bound(100, 2, 2, 0.05, info["L"], info["sigma2"], info["delta"])
  monkeypatch.setattr(convergence_rate.plot_convergence, "make_figures", lambda *a: [])
  for gap, status in ((0.5 * bound, 0), (2.0 * bound, 1)):
    # A step size at its grid's edge: a tuning row, reported only under QUICK, does not hold.
    recs = [_record([gap] * 4, best_interior=False)]
    monkeypatch.setattr(convergence_rate.sweeps, "run_config", lambda config, r=recs: r)
    assert convergence_rate.main(["--quick", "--check", "--out", str(tmp_path)]) == status
    out, err = capsys.readouterr()
    table = checks.run_checks(recs, configs.QUICK)
    counts = checks.tally(table)
    assert counts["failed"] == len(table["failed"]) == status
    assert f"{counts['passed']} passed, {counts['failed']} failed" in out
    assert counts["reported_do_not_hold"] >= 1 and "does not hold (reported only)" in out
    for line in out.splitlines():
      if "(reported only)" in line:
        assert "FAIL" not in line
    if status:
      assert "--check: FAILED" in err and "exit status 1" in err and "FAIL" in out
    else:
      assert "--check: passed" in out and "exit status 0" in out and "FAIL" not in out + err
