"""One process of the two-process adaptive-period test (started by ``kstep_adam.launch`` from
tests/test_adaptive_multiprocess.py, not by pytest). Nothing happens at import."""

import json
import os
import sys

NUM_STEPS = 16


def main(out_dir: str):
  from kstep_adam import _distributed

  processes = _distributed.initialize()  # from the launcher's environment
  import jax

  jax.config.update("jax_num_cpu_devices", 2)
  from _runs import NUM_FEATURES
  from _runs import init_params
  from _runs import loss_fn
  from _runs import worker_data

  import kstep_adam
  from kstep_adam import parallel

  with _distributed.exit_on_error(processes):
    # 'node' = process, 'local' = its two devices.
    mesh = parallel.make_mesh(2, 2, devices=_distributed.process_major_devices())
    ctl = controller(kstep_adam)
    tx = kstep_adam.kstep_adam(0.05, ctl.schedule)
    params_W, state_W = parallel.init_replicas(init_params(), tx, mesh)
    step = parallel.make_train_step(loss_fn, tx, mesh, adaptive=ctl)
    levels = []
    for x, y in worker_data(4, NUM_STEPS):
      batch = (x.reshape(-1, NUM_FEATURES), y.reshape(-1))
      params_W, state_W, _ = step(params_W, state_W, batch)
      levels.append(step.last_level)
    with open(os.path.join(out_dir, f"rank{processes.index}.json"), "w") as f:
      json.dump({"levels": levels, "state": ctl.state_dict()}, f)


def controller(kstep_adam):
  """The controller both the one- and the two-process runs use."""
  schedule = kstep_adam.adaptive_schedule(("node", "local"), budget=0.01, k_init=2, k_max=16)
  return kstep_adam.AdaptiveController(schedule, local_seconds=1.0, merge_seconds=(6.0, 1.0))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main(sys.argv[1])
