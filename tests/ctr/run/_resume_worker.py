"""A CTR run in its own process, to its end or killed with SIGKILL at a chosen point (run by
tests/ctr/run/test_checkpoint.py, not by pytest).

    python tests/ctr/run/_resume_worker.py SPEC_JSON

SPEC_JSON: ``{"out": ..., "config": {TrainConfig fields}, "data": {...}, "resume": bool,
"kill": {...} or null, "cache": DIR}`` with ``data`` either ``{"synthetic": {DataConfig
fields}}`` or ``{"file": PATH, "block_bytes": N}``. A run that ends writes every worker's
dense parameters to ``OUT.params.npz``. The processes of a test share JAX's compilation cache
in ``cache``, so only the first one compiles. ``kill`` is one of

* ``{"at": "step", "step": N}``: after step N's hooks, write ``OUT.paused`` and wait to be
  killed (the test sends the SIGKILL).

A kill at a named point of a checkpoint is set in the environment instead
(``KSTEP_ADAM_FAULT``, :mod:`kstep_adam._faults`).
"""

import json
import os
import sys
import time


def main(spec: dict):
  from kstep_adam import ctr

  config = ctr.TrainConfig(**spec["config"])
  if "file" in spec["data"]:
    source = ctr.file_source(
      spec["data"]["file"], skip_bad_lines=True, block_bytes=spec["data"]["block_bytes"]
    )
  else:
    source = ctr.make_source(ctr.DataConfig(**spec["data"]["synthetic"]), config)
  kill = spec["kill"] or {"at": None}

  if kill["at"] == "step":

    class PauseAt(ctr.Hook):
      def after_step(self, trainer, result):
        if result.step == kill["step"]:
          with open(spec["out"] + ".paused", "w") as f:
            f.write(str(result.step))
          time.sleep(600)  # the test kills this process

    original_fit = ctr.Trainer.fit
    ctr.Trainer.fit = lambda self, hooks=(): original_fit(self, [*hooks, PauseAt()])
  _, state = ctr.train(config, source, spec["out"], resume=spec["resume"], return_state=True)
  if kill["at"] is not None or os.environ.get("KSTEP_ADAM_FAULT"):
    sys.exit("the run ended without being killed")
  np.savez(spec["out"] + ".params.npz", *jax.tree.leaves(state["params_W"]))


if __name__ == "__main__":
  # Configured here, not at import: the suite's doctest collection imports this file too.
  import jax
  import numpy as np

  spec = json.loads(sys.argv[1])
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 8)
  jax.config.update("jax_compilation_cache_dir", spec["cache"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  main(spec)
