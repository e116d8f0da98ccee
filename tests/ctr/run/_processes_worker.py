"""One process of a multi-process CTR run (started by ``kstep_adam.launch`` in the tests).

``python tests/ctr/run/_processes_worker.py OUT NAME=JSON ...`` trains once per ``NAME=JSON``
(the JSON holds TrainConfig and DataConfig fields, and optionally ``kill_at: [rank, step]``,
a process that SIGKILLs itself after that step, and ``resume: true``) and writes
``OUT/NAME/`` (process 0's ``summary.json`` and ``metrics.jsonl``, the checkpoints) and
``OUT/NAME/state-{rank}.npz``: this process's workers' dense replicas, the rows its shard
pushed (``row_ids``, ``rows``) and every row of its shard (``all_rows``). Nothing happens at
import: the suite's doctest collection imports this file too.
"""

import dataclasses
import json
import os
import signal
import sys


def save_state(path: str, state: dict, all_rows) -> None:
  import jax
  import numpy as np

  leaves = jax.tree_util.tree_flatten_with_path(state["params_W"])[0]
  arrays = {f"param{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves}
  np.savez(
    path,
    workers=state["workers"],
    row_ids=state["row_ids"],
    rows=state["rows"],
    all_rows=all_rows,
    **arrays,
  )


def main(out_dir: str, runs: list[str]) -> None:
  from kstep_adam import _distributed

  processes = _distributed.initialize()
  import jax

  jax.config.update("jax_num_cpu_devices", 2)
  import numpy as np

  from kstep_adam import ctr
  from kstep_adam import embedding
  from kstep_adam.ctr.train._exchange import shard_dir

  class KillAt(ctr.Hook):
    """SIGKILLs its own process after step ``step`` (None: never)."""

    def __init__(self, step):
      self._step = step

    def after_step(self, trainer, result) -> None:
      if result.step == self._step:
        print(f"killing myself after step {result.step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

  with _distributed.exit_on_error(processes):
    for run in runs:
      name, _, text = run.partition("=")
      fields = json.loads(text)
      kill_rank, kill_step = fields.pop("kill_at", (None, None))
      resume = fields.pop("resume", False)
      data_names = {f.name for f in dataclasses.fields(ctr.DataConfig)}
      data = ctr.DataConfig(**{k: v for k, v in fields.items() if k in data_names})
      config = ctr.TrainConfig(**{k: v for k, v in fields.items() if k not in data_names})
      source = ctr.make_source(data, config, part=(processes.index, processes.count))
      run_dir = os.path.join(out_dir, name)
      if kill_rank is not None:  # a process dies in the middle of training
        kill = kill_step if processes.index == kill_rank else None
        with ctr.Trainer(config, source, ctr.make_optimizer(config), run_dir) as trainer:
          hooks = [ctr.MetricsLog(config.log_every), ctr.PeriodicEval(config.eval_every)]
          trainer.fit([*hooks, KillAt(kill)])
        raise AssertionError("the run went on after a process died")
      _, state = ctr.train(config, source, run_dir, resume=resume, return_state=True)
      all_rows = np.zeros((0, config.embed_dim), np.float32)
      if config.checkpoint_every:  # the shard as the run's last checkpoint left it
        shard = shard_dir(os.path.join(run_dir, "table"), processes.index, processes.count)
        with embedding.open_table(shard) as table:
          all_rows = table.pull(np.arange(table.num_rows))
      os.makedirs(run_dir, exist_ok=True)
      save_state(os.path.join(run_dir, f"state-{processes.index}.npz"), state, all_rows)
      print(f"{name}: done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
