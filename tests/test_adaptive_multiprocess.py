"""The adaptive period decides the same on one process and on two (gloo), and the two
processes decide exactly alike: the drift they read is all-reduced."""

import json

import jax
import numpy as np
from _adaptive_multiprocess_worker import NUM_STEPS
from _adaptive_multiprocess_worker import controller
from _runs import NUM_FEATURES
from _runs import init_params
from _runs import launch_two_processes
from _runs import loss_fn
from _runs import worker_data

import kstep_adam
from kstep_adam import parallel


def one_process_run():
  mesh = parallel.make_mesh(2, 2)
  ctl = controller(kstep_adam)
  tx = kstep_adam.kstep_adam(0.05, ctl.schedule)
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  step = parallel.make_train_step(loss_fn, tx, mesh, adaptive=ctl)
  levels = []
  for x, y in worker_data(4, NUM_STEPS):
    params_W, state_W, _ = step(params_W, state_W, (x.reshape(-1, NUM_FEATURES), y.reshape(-1)))
    levels.append(step.last_level)
  jax.block_until_ready(params_W)
  return levels, ctl.state_dict()


def test_two_processes_decide_as_one(tmp_path):
  done = launch_two_processes("_adaptive_multiprocess_worker.py", tmp_path)
  assert done.returncode == 0, done.stdout[-3000:]
  ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
  assert ranks[0] == ranks[1]  # bit for bit: the same drift, the same decisions
  levels, state = one_process_run()
  assert ranks[0]["levels"] == levels and len(set(levels)) == 3
  got = ranks[0]["state"]
  assert got["periods"] == state["periods"] and got["merges"] == state["merges"]
  np.testing.assert_allclose(got["drift"], state["drift"], rtol=1e-5)
