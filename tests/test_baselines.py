"""Baselines (DDP Adam, local SGD, DiLoCo) vs the NumPy reference, through the same harness."""

import _numpy_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _runs import init_params
from _runs import loss_fn
from _runs import run_harness
from _runs import theta_of
from _runs import worker_data

import kstep_adam
from kstep_adam import parallel

NODE_LOCAL = ("node", "local")


def _check(got, want, rtol=1e-4, atol=2e-5):
  for t, (g, w) in enumerate(zip(got, want), start=1):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"step {t}")


def test_sync_adam_matches_numpy_and_keeps_replicas_equal():
  mesh = parallel.make_mesh(2, 4)
  data = worker_data(mesh.size, 5)
  got, _ = run_harness(kstep_adam.sync_adam(0.05, axis_name=NODE_LOCAL), mesh, data)
  _check(got, ref.sync_adam(theta_of(init_params()), data, lr=0.05))
  for g in got:
    np.testing.assert_allclose(np.ptp(g, axis=0), 0.0, atol=1e-6)


def test_sync_adam_runs_the_schedule_it_is_given():
  mesh = parallel.make_mesh(2, 4)
  data = worker_data(mesh.size, 3)
  schedule = kstep_adam.sync_schedule(NODE_LOCAL, route="flat")
  assert schedule == kstep_adam.merge_schedule(1, axis_name=NODE_LOCAL, sync="grads", route="flat")
  got, _ = run_harness(kstep_adam.sync_adam(0.05, schedule), mesh, data)
  want, _ = run_harness(kstep_adam.sync_adam(0.05, axis_name=NODE_LOCAL, route="flat"), mesh, data)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)


def test_sync_adam_without_axis_is_optax_adam():
  params = init_params()
  ours, theirs = kstep_adam.sync_adam(0.1), optax.adam(0.1)
  s1, s2 = ours.init(params), theirs.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  u1, _ = ours.update(grads, s1, params)
  u2, _ = theirs.update(grads, s2, params)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)


@pytest.mark.parametrize(
  "mesh_shape,k,momentum,nesterov",
  [
    ((1, 4), 2, None, False),
    ((2, 4), 3, 0.9, False),
    ((2, 2), 2, 0.8, True),
  ],
)
def test_local_sgd_matches_numpy(mesh_shape, k, momentum, nesterov):
  mesh = parallel.make_mesh(*mesh_shape)
  data = worker_data(mesh.size, 6)
  tx = kstep_adam.local_sgd(0.02, k, momentum=momentum, nesterov=nesterov, axis_name=NODE_LOCAL)
  got, _ = run_harness(tx, mesh, data)
  _check(
    got,
    ref.local_sgd(
      theta_of(init_params()), data, lr=0.02, k=k, momentum=momentum, nesterov=nesterov
    ),
  )


@pytest.mark.parametrize("mesh_shape,route", [((2, 4), "hierarchical"), ((1, 4), "flat")])
def test_diloco_matches_numpy(mesh_shape, route):
  mesh = parallel.make_mesh(*mesh_shape)
  data = worker_data(mesh.size, 7)
  tx = kstep_adam.diloco(3, inner_learning_rate=0.05, axis_name=NODE_LOCAL, route=route)
  got, (_, state_W, _) = run_harness(tx, mesh, data)
  _check(got, ref.diloco(theta_of(init_params()), data, inner_lr=0.05, inner_steps=3))
  # The inner Adam state stays local: the workers' first moments differ.
  assert np.ptp(np.asarray(state_W.inner_state[0].mu["w"]), axis=0).max() > 1e-4


@pytest.mark.parametrize("inner_steps", [2, np.int64(2)])
def test_diloco_on_one_worker_still_takes_outer_steps(inner_steps):
  data = worker_data(1, 4)
  tx = kstep_adam.diloco(inner_steps, inner_learning_rate=0.05)
  params = init_params()
  state = tx.init(params)
  for x, y in data:
    grads = jax.grad(loss_fn)(params, (x[0], y[0]))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  want = ref.diloco(theta_of(init_params()), data, inner_lr=0.05, inner_steps=2)[-1][0]
  np.testing.assert_allclose(theta_of(params), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: kstep_adam.local_sgd(0.1, 0, axis_name="w"), "k must be a positive int"),
    (lambda: kstep_adam.diloco(0, axis_name="w"), "inner_steps must be a positive int"),
    (lambda: kstep_adam.diloco({"w": 2}), "inner_steps as a mapping needs exactly one"),
    (
      lambda: kstep_adam.diloco(kstep_adam.merge_schedule(2, sync="delta")),
      "without axis_name, inner_steps must be a positive int",
    ),
    (
      lambda: kstep_adam.local_sgd(
        0.1, kstep_adam.merge_schedule(2, axis_name="w", sync="params+nu")
      ),
      "averages 'nu', which this optimizer does not have",
    ),
    (
      lambda: kstep_adam.sync_adam(0.1, kstep_adam.merge_schedule(2, axis_name="w", sync="grads")),
      r"needs period 1 on every axis, got axis_periods=\(2,\)",
    ),
    (
      lambda: kstep_adam.sync_adam(0.1, kstep_adam.merge_schedule(1, axis_name="w")),
      "averages 'params', which this optimizer does not have",
    ),
    (
      lambda: kstep_adam.sync_adam(0.1, kstep_adam.sync_schedule("w"), axis_name="w"),
      "pass either a MergeSchedule as schedule or axis_name",
    ),
    (lambda: kstep_adam.sync_adam(0.1, 1), "schedule must be None or a MergeSchedule"),
    (
      lambda: kstep_adam.sync_adam(0.1, kstep_adam.sync_schedule(NODE_LOCAL), route="flat"),
      "route='flat' conflicts with the MergeSchedule given as schedule",
    ),
    (
      lambda: kstep_adam.diloco(
        kstep_adam.merge_schedule(2, axis_name="w", sync="delta"), route="flat"
      ),
      "route='flat' conflicts with the MergeSchedule given as inner_steps",
    ),
    (lambda: kstep_adam.sync_adam(-1.0), r"learning_rate must be a finite number in \[0.0, inf\)"),
    (lambda: kstep_adam.sync_adam(float("nan")), "learning_rate must be"),
    (lambda: kstep_adam.sync_adam(0.1, b1=1.0), r"b1 must be a finite number in \[0.0, 1.0\)"),
    (lambda: kstep_adam.sync_adam(0.1, b2=1.0), r"b2 must be a finite number in \[0.0, 1.0\)"),
    (lambda: kstep_adam.sync_adam(0.1, eps=-1.0), "eps must be"),
    (lambda: kstep_adam.sync_adam(0.1, mu_dtype="int8"), "mu_dtype must be None or a floating"),
    (lambda: kstep_adam.local_sgd(float("inf"), 2), "learning_rate must be"),
    (lambda: kstep_adam.local_sgd(0.1, 2, momentum=1.0), r"momentum must be None or a finite"),
    (lambda: kstep_adam.local_sgd(0.1, 2**31, axis_name="w"), r"at most 2\*\*31 - 1"),
    (lambda: kstep_adam.diloco(2, inner_learning_rate=-1e-3), "inner_learning_rate must be"),
    (lambda: kstep_adam.diloco(2, outer_learning_rate=float("inf")), "outer_learning_rate must"),
    (lambda: kstep_adam.diloco(2, outer_momentum=1.5), "outer_momentum must be None or"),
    (lambda: kstep_adam.diloco(2, inner="adam"), "inner must be None or an optax"),
    (lambda: kstep_adam.diloco(2**31), r"inner_steps must be a positive int \(at most 2\*\*31"),
  ],
)
def test_baselines_reject_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_a_baseline_keeps_the_period_of_the_schedule_it_is_given():
  schedule = kstep_adam.merge_schedule(3, axis_name=NODE_LOCAL, sync={"delta": 2})
  mesh = parallel.make_mesh(1, 4)
  data = worker_data(mesh.size, 6)
  got, _ = run_harness(kstep_adam.diloco(schedule, inner_learning_rate=0.05), mesh, data)
  want, _ = run_harness(
    kstep_adam.diloco(6, inner_learning_rate=0.05, axis_name=NODE_LOCAL), mesh, data
  )
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6)
