"""One process of the two-process test (run by tests/test_multiprocess.py, not by pytest)."""

import os
import sys

import jax


def main(rank: int, port: str, out_path: str):
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
  import numpy as np
  from _runs import NUM_FEATURES
  from _runs import init_params
  from _runs import loss_fn
  from _runs import theta_of
  from _runs import worker_data

  import kstep_adam
  from kstep_adam import parallel

  mesh = parallel.make_mesh(2, 2)  # 'node' = process, 'local' = its two devices.
  tx = kstep_adam.kstep_adam(0.05, {"node": 3, "local": 1}, axis_name=("node", "local"))
  params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
  step = parallel.make_train_step(loss_fn, tx, mesh)
  history = []
  for x, y in worker_data(4, 5):
    params_W, state_W, _ = step(params_W, state_W, (x.reshape(-1, NUM_FEATURES), y.reshape(-1)))
    mine = [theta_of(parallel.unreplicate(params_W, worker=w)) for w in (2 * rank, 2 * rank + 1)]
    history.append(np.stack(mine))
  np.save(out_path, np.stack(history))
  assert step.local_jitted is not None
  jax.distributed.shutdown()


if __name__ == "__main__":
  # Configured here, not at import: the suite's doctest collection imports this file too, and
  # an import-time update would leave every later test with 2 devices.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
