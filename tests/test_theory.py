"""Property tests for theory/: monotonicity, k = 1 reductions, rates, conditions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import theory

BASE = dict(T=10_000, N=4, L=2.0, sigma2=1.0, delta=3.0)


# --- Local SGD (Wang & Joshi; Yu, Yang & Zhu) ---------------------------------


def test_local_sgd_reduces_to_synchronous_sgd_at_k1():
  eta = 0.01
  got = theory.local_sgd_bound(k=1, eta=eta, **BASE)
  want = 2 * BASE["delta"] / (eta * BASE["T"]) + eta * BASE["L"] * BASE["sigma2"] / BASE["N"]
  assert got == pytest.approx(want, rel=1e-12)
  assert theory.local_sgd_max_eta(BASE["L"], 1) == pytest.approx(1 / BASE["L"])


@pytest.mark.parametrize("k", [1, 2, 8, 32])
def test_local_sgd_bound_monotone(k):
  eta = 0.5 * theory.local_sgd_max_eta(BASE["L"], 64)
  b = theory.local_sgd_bound(k=k, eta=eta, **BASE)
  assert theory.local_sgd_bound(k=k + 1, eta=eta, **BASE) > b  # grows with k
  assert theory.local_sgd_bound(k=k, eta=eta, **{**BASE, "T": 2 * BASE["T"]}) < b
  assert theory.local_sgd_bound(k=k, eta=eta, **{**BASE, "N": 2 * BASE["N"]}) < b
  assert theory.local_sgd_bound(k=k, eta=eta, **{**BASE, "sigma2": 2.0}) > b


def test_local_sgd_max_eta_solves_condition_and_shrinks_with_k():
  for k in (1, 2, 5, 40):
    eta, L = theory.local_sgd_max_eta(3.0, k), 3.0
    assert eta * L + eta**2 * L**2 * k * (k - 1) == pytest.approx(1.0)
    assert theory.local_sgd_max_eta(3.0, k + 1) < eta


def test_local_sgd_optimal_eta_minimises_bound():
  for k in (1, 4, 16):
    args = dict(T=5000, N=8, k=k, L=2.0, sigma2=0.5, delta=1.0)
    eta_star = theory.local_sgd_optimal_eta(**args)
    best = theory.local_sgd_bound(eta=eta_star, **args)
    grid = np.geomspace(eta_star / 4, min(4 * eta_star, theory.local_sgd_max_eta(2.0, k)), 201)
    assert best <= min(theory.local_sgd_bound(eta=float(e), **args) for e in grid) * (1 + 1e-9)


def test_local_sgd_optimal_rate_scales_as_one_over_sqrt_nt():
  def rate(T, N):
    eta = theory.local_sgd_optimal_eta(T, N, 2, 1.0, 1.0, 1.0)
    return theory.local_sgd_bound(T, N, 2, eta, 1.0, 1.0, 1.0)

  for N in (1, 4, 16):
    # x100 in T  ->  /10 in the bound, up to the vanishing k-term.
    assert rate(10**8, N) / rate(10**10, N) == pytest.approx(10.0, rel=0.02)
  # x4 in N at large T  ->  /2 in the bound (linear speedup).
  assert rate(10**10, 1) / rate(10**10, 4) == pytest.approx(2.0, rel=0.02)
  # The closed form without the k-term: 2 sqrt(2 Delta L sigma2 / (N T)).
  assert rate(10**10, 4) == pytest.approx(2 * math.sqrt(2 / (4 * 10**10)), rel=0.01)


def test_local_sgd_k_term_breaks_speedup_beyond_threshold():
  T, N = 10**6, 4
  k_max = theory.local_sgd_speedup_max_k(T, N)
  assert k_max == pytest.approx(1000 / 8)
  assert theory.local_sgd_speedup_max_k(T, N, bound="yu") == pytest.approx(10**1.5 / 4**0.75)

  def rate(k):
    eta = theory.local_sgd_optimal_eta(T, N, k, 1.0, 1.0, 1.0)
    return theory.local_sgd_bound(T, N, k, eta, 1.0, 1.0, 1.0)

  assert rate(int(k_max) // 10) < 1.1 * rate(1)
  assert rate(int(k_max)) < 2.0 * rate(1)
  assert rate(int(100 * k_max)) > 2 * rate(1)
  with pytest.raises(ValueError, match="bound"):
    theory.local_sgd_speedup_max_k(T, N, bound="stich")


@pytest.mark.parametrize(
  "bad", [dict(eta=1.0), dict(k=0), dict(T=0), dict(N=2.5), dict(sigma2=-1.0), dict(delta=0.0)]
)
def test_local_sgd_rejects_bad_inputs(bad):
  args = dict(k=4, eta=0.01, **BASE)
  args.update(bad)
  with pytest.raises(ValueError, match=next(iter(bad))):
    theory.local_sgd_bound(**args)


def test_yu_bound_condition_and_shape():
  args = dict(T=1000, N=4, k=2, L=2.0, sigma2=1.0, G2=5.0, delta=1.0)
  with pytest.raises(ValueError, match="1/L"):
    theory.local_sgd_bound_yu(eta=0.6, **args)
  b = theory.local_sgd_bound_yu(eta=0.1, **args)
  assert theory.local_sgd_bound_yu(eta=0.1, **{**args, "k": 3}) > b
  # Yu et al.'s bound is looser than Wang & Joshi's when G2 >= sigma2.
  assert b > theory.local_sgd_bound(1000, 4, 2, 0.1, 2.0, 1.0, 1.0)


# --- Local Adam (Cheng & Glasgow), Minibatch Adam ------------------------------

ADAM = dict(N=4, L=2.0, delta=1.0, sigma=1.0, lam=1e-3, G_inf=0.0, sigma_inf=0.0)


def test_local_adam_monotone_in_k_and_t():
  for K in (1, 4, 16):
    r = theory.local_adam_rate(T=4096, K=K, **ADAM)
    assert theory.local_adam_rate(T=4096, K=2 * K, **ADAM) > r
    assert theory.local_adam_rate(T=8192, K=K, **ADAM) < r
    assert theory.local_adam_rate(T=4096, K=K, **{**ADAM, "N": 8}) < r


def test_local_adam_k1_reduces_to_minibatch_rate():
  ratios = [
    theory.local_adam_rate(T=T, K=1, **ADAM)
    / theory.minibatch_adam_rate(R=T, N=4, K=1, L=2.0, delta=1.0, sigma=1.0, lam=1e-3)
    for T in (10**4, 10**8, 10**16)
  ]
  assert ratios[0] > ratios[1] > ratios[2] > 1.0
  assert ratios[2] == pytest.approx(1.0, abs=0.01)


def test_local_and_minibatch_rates_carry_the_same_norm_conversion():
  # Both bound the lambda H^-1 norm; converting to the plain norm multiplies both by
  # 1 + (G_inf + sigma_inf)/lambda, so their ratio is the paper's comparison.
  kw = dict(N=4, L=2.0, delta=1.0, sigma=1.0, lam=0.5)
  plain_local = theory.local_adam_rate(T=4096, K=8, **kw)
  plain_mini = theory.minibatch_adam_rate(R=512, K=8, **kw)
  noisy = dict(G_inf=1.0, sigma_inf=0.5)
  assert theory.local_adam_rate(T=4096, K=8, **kw, **noisy) == pytest.approx(4 * plain_local)
  assert theory.minibatch_adam_rate(R=512, K=8, **kw, **noisy) == pytest.approx(4 * plain_mini)


def test_local_adam_scales_as_one_over_sqrt_nt():
  r = lambda T, N: theory.local_adam_rate(T=T, K=4, **{**ADAM, "N": N})
  assert r(10**14, 4) / r(10**16, 4) == pytest.approx(10.0, rel=0.01)
  assert r(10**16, 1) / r(10**16, 16) == pytest.approx(4.0, rel=0.03)


def test_local_adam_tau_defaults_to_l_and_c_scales():
  a = theory.local_adam_rate(T=1000, K=8, **ADAM)
  assert a == theory.local_adam_rate(T=1000, K=8, tau=2.0, **ADAM)
  assert theory.local_adam_rate(T=1000, K=8, C=3.0, **ADAM) == pytest.approx(3 * a)
  assert theory.local_adam_rate(T=1000, K=8, tau=0.0, **ADAM) < a


def test_local_adam_clipping_term():
  args = dict(T=1000, K=8, **{**ADAM, "G_inf": 2.0, "sigma_inf": 1.0})
  base = theory.local_adam_rate(**args)
  assert theory.local_adam_rate(rho=3.0, **args) == base  # clipping never acts
  with pytest.raises(ValueError, match="rho"):
    theory.local_adam_rate(rho=2.5, **args)  # it can act: term unknown
  assert theory.local_adam_rate(rho=2.5, clip_term=0.1, **args) == pytest.approx(base + 0.1)


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(beta1=0.99), "beta1"),
    (dict(beta2=0.9), "beta2"),
    (dict(eta=0.5), "eta"),
    (dict(beta1=1.0), "beta1"),
    (dict(K=0), "K"),
    (dict(lam=0.0), "lam"),
  ],
)
def test_local_adam_conditions_reject(bad, match):
  args = dict(beta1=0.5, beta2=0.9999, eta=1e-3, K=4, R=64, lam=1.0, L=2.0)
  theory.local_adam_conditions(**args)  # in-condition: no error
  with pytest.raises(ValueError, match=match):
    theory.local_adam_conditions(**{**args, **bad})


def test_local_adam_condition_ratios_follow_the_papers_eq_c20():
  r = theory.local_adam_condition_ratios(
    beta1=0.5, beta2=1 - 1 / 32, eta=0.01, K=4, R=16, lam=0.1, L=2.0, tau=1.0
  )
  assert r["beta1"] == pytest.approx(0.5 / 0.9)
  assert r["beta2"] == pytest.approx(1.0)  # 1 - beta2 = K^-3/2 R^-1/2 exactly
  # eta/lambda = 0.1 against min(1/(K tau), (1-beta1)^2/L) = min(0.25, 0.125).
  assert r["eta"] == pytest.approx(0.1 / 0.125)
  # A smaller lambda needs a proportionally smaller step.
  smaller = theory.local_adam_condition_ratios(
    beta1=0.5, beta2=1 - 1 / 32, eta=0.01, K=4, R=16, lam=0.01, L=2.0, tau=1.0
  )
  assert smaller["eta"] == pytest.approx(10 * r["eta"])


def test_asymptotes_state_only_the_papers_exponents():
  assert {a.exponent for a in theory.ASYMPTOTES.values()} == {-0.5}
  cg = theory.ASYMPTOTES["cheng_glasgow_local_adam"]
  # The log^{1/4} factor of eq. (C.27) adds 1/(4 ln T) to the local slope.
  assert cg.slack(1024) == pytest.approx(0.25 / math.log(1024))

  # The shape's finite-range slope is not -1/2 and drifts towards it: only the limit is stated.
  def local_slope(T):
    r = lambda t: theory.local_adam_rate(T=t, K=8, **ADAM)
    return math.log(r(2 * T) / r(T)) / math.log(2)

  assert local_slope(2**8) < local_slope(2**20) < local_slope(2**40) < -0.5 + 1e-3
  assert local_slope(2**40) == pytest.approx(-0.5, abs=0.01)


# --- Défossez et al. -----------------------------------------------------------


def test_defossez_rate_under_recommended_hyperparameters():
  def b(N):
    return theory.defossez_adam_bound(
      N=N, alpha=N**-0.5, beta2=1 - 1 / N, eps=1e-8, d=10, R=1.0, L=1.0, delta=1.0
    )

  # O(d ln N / sqrt N): the normalised bound is bounded and decreasing in N.
  normed = [b(N) * math.sqrt(N) / math.log(N) for N in (10**4, 10**6, 10**8)]
  assert b(10**6) < b(10**4)
  assert max(normed) / min(normed) < 2.0


def test_defossez_momentum_matches_structure_at_beta1_zero():
  args = dict(N=1000, alpha=0.01, beta2=0.999, eps=1e-8, d=5, R=2.0, L=1.0, delta=1.0)
  plain = theory.defossez_adam_bound(**args)
  mom0 = theory.defossez_adam_momentum_bound(beta1=0.0, **args)
  assert mom0 > plain  # the momentum proof's 12 d R^2 term vs 4 d R^2
  assert theory.defossez_adam_momentum_bound(beta1=0.5, **args) > mom0
  with pytest.raises(ValueError, match="beta1"):
    theory.defossez_adam_momentum_bound(beta1=0.9995, **args)
  with pytest.raises(ValueError, match="R must exceed"):
    theory.defossez_adam_bound(**{**args, "R": 1e-5})


def test_defossez_tau_weights():
  w = theory.defossez_tau_weights(50, 0.9)
  assert w.sum() == pytest.approx(1.0)
  assert np.all(np.diff(w) <= 0)  # the last iterates are sampled least
  np.testing.assert_allclose(theory.defossez_tau_weights(7, 0.0), np.full(7, 1 / 7))


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_defossez_map_runs_their_algorithm_exactly(beta1):
  # Their recursion (unnormalised m, v; eps in the root; alpha_n with the beta2 correction)
  # against the package's Local Adam form with lr_n = alpha sqrt(1 - beta2^n).
  import optax

  import kstep_adam

  alpha, beta2, lam, steps = 0.05, 0.99, 1e-2, 40
  _, eps = theory.defossez_from_no_bias_correction(eta=alpha, beta2=beta2, lam=lam)
  g_TxD = np.random.default_rng(0).normal(size=(steps, 3)) * np.array([1.0, 10.0, 0.1])
  m = v = np.zeros(3)
  x_ref = np.zeros(3)
  for n in range(1, steps + 1):
    m, v = beta1 * m + g_TxD[n - 1], beta2 * v + g_TxD[n - 1] ** 2
    alpha_n = alpha * (1 - beta1) * math.sqrt((1 - beta2**n) / (1 - beta2))
    x_ref = x_ref - alpha_n * m / np.sqrt(eps + v)
  tx = optax.chain(
    kstep_adam.scale_by_kstep_adam(b1=beta1, b2=beta2, eps=lam, form="local_adam"),
    optax.scale_by_learning_rate(lambda c: alpha * jnp.sqrt(1 - beta2 ** (c + 1.0))),
  )
  x = jnp.zeros(3)
  state = tx.init(x)
  for g in g_TxD:
    u, state = tx.update(jnp.asarray(g, jnp.float32), state)
    x = x + u
  np.testing.assert_allclose(np.asarray(x), x_ref, rtol=2e-5, atol=1e-6)


def test_defossez_parameter_map_reproduces_update():
  eta, beta2, lam = 0.05, 0.99, 1e-2
  alpha, eps = theory.defossez_from_no_bias_correction(eta=eta, beta2=beta2, lam=lam)
  g = np.array([0.3, -2.0, 1e-3])
  v_norm, v_raw = (1 - beta2) * g**2, g**2  # one step from zero state
  ours = eta * g / np.sqrt(v_norm + lam**2)
  theirs = alpha / math.sqrt(1 - beta2) * g / np.sqrt(eps + v_raw)
  np.testing.assert_allclose(ours, theirs, rtol=1e-12)


# --- Estimators ----------------------------------------------------------------


def test_power_iteration_on_separable_cosine():
  a = 3.0
  f = lambda x: jnp.sum(0.5 * x**2 + a * jnp.cos(x))
  key = jax.random.PRNGKey(0)
  # Hessian = diag(1 - a cos x): at x = pi it is 1 + a = L; at 0 it is 1 - a.
  at_pi = theory.smoothness_power_iteration(f, jnp.full(6, jnp.pi), key)
  assert float(at_pi) == pytest.approx(1 + a, rel=1e-4)
  at_0 = theory.smoothness_power_iteration(f, jnp.zeros(6), key)
  assert float(at_0) == pytest.approx(abs(1 - a), rel=1e-4)
  mixed = jnp.array([0.0, jnp.pi, 1.0])
  assert float(theory.smoothness_at_points(f, mixed[None], key)) == pytest.approx(1 + a, rel=1e-3)


def test_noise_stats_exact_on_finite_sum():
  offsets_SxD = jax.random.normal(jax.random.PRNGKey(1), (50, 3))
  per_sample = lambda x: x[None, :] + offsets_SxD
  full = lambda x: x + offsets_SxD.mean(0)
  xs = jnp.zeros((2, 3))
  stats = theory.gradient_noise_stats(per_sample, full, xs, batch_size=5)
  dev = offsets_SxD - offsets_SxD.mean(0)
  assert float(stats.sigma2) == pytest.approx(float(jnp.mean(jnp.sum(dev**2, -1))) / 5, rel=1e-5)
  assert float(stats.sigma_inf) == pytest.approx(float(jnp.max(jnp.abs(dev))), rel=1e-6)
  traj = jnp.stack([jnp.zeros(3), jnp.array([0.0, -4.0, 1.0])])
  assert float(theory.max_grad_inf_norm(lambda x: 2 * x, traj)) == pytest.approx(8.0)


def test_initial_gap():
  f = lambda x: jnp.sum(x**2)
  assert theory.initial_gap(f, jnp.ones(2), f_star=0.0) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="exactly one"):
    theory.initial_gap(f, jnp.ones(2))
  with pytest.raises(ValueError, match="positive"):
    theory.initial_gap(f, jnp.zeros(2), f_lower=1.0)


# --- Derived here: replica drift of k-step Adam -------------------------------


@pytest.mark.parametrize("bias_correction", [False, True])
def test_adam_step_bound_holds_on_adversarial_gradients(bias_correction):
  import optax

  b1, b2, T = 0.9, 0.99, 300
  B = theory.adam_step_bound(beta1=b1, beta2=b2, T=T, bias_correction=bias_correction)
  rng = np.random.default_rng(0)
  # Heavy-tailed, sign-flipping gradients spanning 12 orders of magnitude.
  g = rng.standard_cauchy((T, 5)) * 10.0 ** rng.uniform(-6, 6, (T, 5))
  if bias_correction:
    tx = optax.scale_by_adam(b1=b1, b2=b2, eps=0.0)
  else:
    import kstep_adam

    tx = kstep_adam.scale_by_kstep_adam(b1=b1, b2=b2, eps=0.0, form="local_adam")

  def step(state, g_t):
    u, state = tx.update(g_t, state)
    return state, jnp.max(jnp.abs(u))

  _, worst_T = jax.lax.scan(step, tx.init(jnp.zeros(5)), jnp.asarray(g, jnp.float32))
  worst = float(jnp.max(worst_T))
  assert worst <= B * (1 + 1e-5)  # (loose: worst/B is about 0.1 here)


def test_replica_spread_bound_is_attained_given_b():
  # beta1 = 0, lambda -> 0: the first step from zero state moves each coordinate by exactly
  # eta B = eta / sqrt(1 - beta2). Two replicas with opposite gradients are then eta B on
  # either side of their mean: the spread is d (eta B)^2 at j = 1 and 0 at j = 0, whose mean
  # over the round is the bound (the earlier d (2 j eta B)^2 was four times too loose).
  import kstep_adam

  eta, beta2, d = 0.1, 0.99, 3
  tx = kstep_adam.scale_by_kstep_adam(b1=0.0, b2=beta2, eps=1e-12, form="local_adam")
  step = lambda g: eta * tx.update(g, tx.init(jnp.zeros(d)))[0]
  x_2xD = jnp.stack([step(jnp.ones(d)), step(-jnp.ones(d))])
  spread_j1 = float(jnp.mean(jnp.sum((x_2xD - x_2xD.mean(0)) ** 2, -1)))
  measured = (0.0 + spread_j1) / 2  # j = 0 then j = 1, T = k = 2
  bound = theory.replica_spread_bound(
    eta=eta, beta1=0.0, beta2=beta2, k=2, d=d, T=2, bias_correction=False
  )
  assert measured == pytest.approx(bound, rel=1e-5)


def test_replica_spread_bound_properties():
  kw = dict(eta=0.01, beta1=0.9, beta2=0.999, d=10, T=1000, bias_correction=False)
  assert theory.replica_spread_bound(k=1, **kw) == 0.0
  vals = [theory.replica_spread_bound(k=k, **kw) for k in (2, 4, 8)]
  assert vals[0] < vals[1] < vals[2]
  with pytest.raises(ValueError, match="beta1"):
    theory.replica_spread_bound(k=2, **{**kw, "beta1": 0.9999})


def test_counts_refuse_bools_and_accept_numpy_ints():
  assert theory.local_sgd_bound(np.int64(100), 4, 1, 0.1, 1.0, 1.0, 1.0) > 0
  with pytest.raises(ValueError, match="T must be an int"):
    theory.local_sgd_bound(True, 4, 1, 0.1, 1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match="L must be a finite number"):
    theory.local_sgd_bound(100, 4, 1, 0.1, True, 1.0, 1.0)
