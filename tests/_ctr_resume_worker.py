"""A CTR run in its own process, to its end or killed with SIGKILL at a chosen point (run by
tests/test_ctr_checkpoint.py, not by pytest).

    python _ctr_resume_worker.py SPEC_JSON

SPEC_JSON: ``{"out": ..., "config": {TrainConfig fields}, "data": {...}, "resume": bool,
"kill": {...} or null, "cache": DIR}`` with ``data`` either ``{"synthetic": {DataConfig
fields}}`` or ``{"file": PATH, "block_bytes": N}``. A run that ends writes every worker's
dense parameters to ``OUT.params.npz``. The processes of a test share JAX's compilation cache
in ``cache``, so only the first one compiles. ``kill`` is one of

* ``{"at": "step", "step": N}``: after step N's hooks, write ``OUT.paused`` and wait to be
  killed (the test sends the SIGKILL);
* ``{"at": "manifest", "checkpoint": N}``: in the N-th checkpoint, between the table flush
  and the manifest;
* ``{"at": "flush", "checkpoint": N}``: in the N-th checkpoint's table flush, after its
  commit point, before the committed rows are all copied into the table.
"""

import json
import os
import signal
import sys
import time


def _kill_self():
  os.kill(os.getpid(), signal.SIGKILL)


def main(spec: dict):
  from kstep_adam import ctr
  from kstep_adam.ctr import _checkpoint
  from kstep_adam.embedding import _store

  config = ctr.TrainConfig(**spec["config"])
  if "file" in spec["data"]:
    source = ctr.file_source(
      spec["data"]["file"], skip_bad_lines=True, block_bytes=spec["data"]["block_bytes"]
    )
  else:
    source = ctr.make_source(ctr.DataConfig(**spec["data"]["synthetic"]), config)
  kill = spec["kill"] or {"at": None}
  checkpoints = []

  if kill["at"] == "step":

    class PauseAt(ctr.Hook):
      def after_step(self, trainer, result):
        if result.step == kill["step"]:
          with open(spec["out"] + ".paused", "w") as f:
            f.write(str(result.step))
          time.sleep(600)  # the test kills this process

    original_fit = ctr.Trainer.fit
    ctr.Trainer.fit = lambda self, hooks=(): original_fit(self, [*hooks, PauseAt()])
  elif kill["at"] == "manifest":
    original_manifest = _checkpoint.write_manifest

    def write_manifest(path, step, table):
      checkpoints.append(step)
      if len(checkpoints) == kill["checkpoint"]:
        _kill_self()
      original_manifest(path, step, table)

    _checkpoint.write_manifest = write_manifest
  elif kill["at"] == "flush":
    original_flush = ctr.Trainer.save_checkpoint

    def save_checkpoint(self):
      checkpoints.append(self.step)
      return original_flush(self)

    original_write_rows = _store.TableStore.write_rows

    def write_rows(self, ids, rows):
      if len(checkpoints) == kill["checkpoint"]:
        _kill_self()
      original_write_rows(self, ids, rows)

    ctr.Trainer.save_checkpoint = save_checkpoint
    _store.TableStore.write_rows = write_rows
  _, state = ctr.train(config, source, spec["out"], resume=spec["resume"], return_state=True)
  if kill["at"] is not None:
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
