"""Shared test helpers: per-worker data streams and runs of the harness on a linear model."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kstep_adam import parallel

NUM_FEATURES = 5
ROWS_PER_WORKER = 4
TESTS = os.path.dirname(os.path.abspath(__file__))


def launch_two_processes(worker: str, out_dir) -> subprocess.CompletedProcess:
  """Run ``tests/WORKER`` on 2 processes through ``kstep_adam.launch``, ``out_dir`` its only
  argument; the launcher's merged output in ``stdout``."""
  root = os.path.dirname(TESTS)
  return subprocess.run(
    [sys.executable, "-m", "kstep_adam.launch", "--num-processes", "2", "--"]
    + [sys.executable, os.path.join(TESTS, worker), str(out_dir)],
    cwd=root,
    env=dict(os.environ, PYTHONPATH=os.pathsep.join([root, TESTS])),
    capture_output=True,
    text=True,
    timeout=240,
    check=False,
  )


def loss_fn(params, batch):
  x_MxF, y_M = batch
  return jnp.mean((x_MxF @ params["w"] + params["b"] - y_M) ** 2)


def init_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=NUM_FEATURES).astype(np.float32), "b": np.float32(0.5)}


def theta_of(params) -> np.ndarray:
  """Flat [w, b] parameter vector(s), as the NumPy reference uses."""
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  return np.concatenate([w, b[..., None]], axis=-1)


def worker_data(num_workers: int, num_steps: int, *, seed: int = 1, identical: bool = False):
  """Per-step ``(x_WxMxF, y_WxM)``: a different stream per worker unless ``identical``."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_steps):
    shape = (1 if identical else num_workers, ROWS_PER_WORKER)
    x = rng.normal(size=shape + (NUM_FEATURES,)).astype(np.float32)
    y = (rng.normal(size=shape) + 3.0).astype(np.float32)
    if identical:
      x, y = np.repeat(x, num_workers, 0), np.repeat(y, num_workers, 0)
    out.append((x, y))
  return out


def run_harness(tx, mesh, data, params=None, dispatch=True):
  """Train with ``make_train_step``; return the list of per-step ``(W, D)`` theta arrays."""
  params = init_params() if params is None else params
  params_W, opt_state_W = parallel.init_replicas(params, tx, mesh)
  step = parallel.make_train_step(loss_fn, tx, mesh, dispatch_local_steps=dispatch)
  history = []
  for x_WxMxF, y_WxM in data:
    batch = (x_WxMxF.reshape(-1, NUM_FEATURES), y_WxM.reshape(-1))  # global batch, worker-major
    params_W, opt_state_W, _ = step(params_W, opt_state_W, batch)
    history.append(theta_of(jax.device_get(params_W)))
  return history, (params_W, opt_state_W, step)
