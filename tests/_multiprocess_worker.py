"""One process of the two-process harness test (started by ``kstep_adam.launch`` from
tests/test_multiprocess.py, not by pytest). Nothing happens at import: the suite's doctest
collection imports this file too."""

import os
import sys


def main(out_dir: str):
  from kstep_adam import _distributed

  processes = _distributed.initialize()  # from the launcher's environment
  import jax

  jax.config.update("jax_num_cpu_devices", 2)
  import numpy as np
  from _runs import NUM_FEATURES
  from _runs import init_params
  from _runs import loss_fn
  from _runs import theta_of
  from _runs import worker_data

  import kstep_adam
  from kstep_adam import parallel

  with _distributed.exit_on_error(processes):
    rank = processes.index
    # 'node' = process, 'local' = its two devices.
    mesh = parallel.make_mesh(2, 2, devices=_distributed.process_major_devices())
    tx = kstep_adam.kstep_adam(0.05, {"node": 3, "local": 1}, axis_name=("node", "local"))
    params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
    step = parallel.make_train_step(loss_fn, tx, mesh)
    history = []
    for x, y in worker_data(4, 5):
      batch = (x.reshape(-1, NUM_FEATURES), y.reshape(-1))
      params_W, state_W, _ = step(params_W, state_W, batch)
      mine = [theta_of(parallel.unreplicate(params_W, worker=w)) for w in (2 * rank, 2 * rank + 1)]
      history.append(np.stack(mine))
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.stack(history))
    assert step.local_jitted is not None


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main(sys.argv[1])
