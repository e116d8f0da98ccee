"""The CTR Trainer's pieces: its step loop and hooks, and the resources it owns."""

import dataclasses
import os
import threading

import numpy as np
import pytest

from kstep_adam import ctr
from kstep_adam.ctr.data._prefetch import HeldOutSet
from kstep_adam.ctr.train._evaluate import evaluate


class Recorder(ctr.Hook):
  def __init__(self, fail_at=None):
    self.results, self.closed, self.fail_at = [], False, fail_at

  def after_step(self, trainer, result):
    self.results.append(result)
    if result.step == self.fail_at:
      raise RuntimeError(f"hook failed at step {result.step}")

  def close(self):
    self.closed = True


@pytest.mark.parametrize(
  "pipeline, compiled",
  [
    # k = 4: step 1 compiles the local program, step 4 the merging one; nothing else compiles.
    (False, [True, False, False, True, False, False]),
    # Each step launches the next before its push: step 1 compiles the first step's program
    # and the program that applies a pending push, step 3 the merging one (step 4's).
    (True, [True, False, True, False, False, False]),
  ],
)
def test_hooks_see_every_step_and_which_ones_compiled(
  tmp_path, tiny_config, tiny_source, pipeline, compiled
):
  config = dataclasses.replace(tiny_config, pipeline=pipeline)
  source = tiny_source(config)
  recorder = Recorder()
  with ctr.Trainer(config, source, ctr.make_optimizer(config), str(tmp_path)) as trainer:
    trainer.fit([ctr.MetricsLog(config.log_every), recorder])
    final = trainer.evaluate()
    summary = ctr.summarize(trainer, final)
  assert [r.step for r in recorder.results] == [1, 2, 3, 4, 5, 6] and recorder.closed
  assert [r.compiled for r in recorder.results] == compiled
  assert summary["compile_steps"] == 2 and summary["steps"] == 6
  assert final["step"] == 6 and summary["evals"] == [final]
  assert all(r.row_ids_U.size > 0 and r.loss > 0 for r in recorder.results)


def test_resources_are_released_when_a_step_hook_fails(tmp_path, tiny_config, tiny_source):
  config, source = tiny_config, tiny_source(tiny_config)
  recorder = Recorder(fail_at=2)
  trainer = ctr.Trainer(config, source, ctr.make_optimizer(config), str(tmp_path))
  with pytest.raises(RuntimeError, match="hook failed at step 2"), trainer:
    trainer.fit([recorder])
  assert recorder.closed
  assert not os.path.exists(trainer.table_dir)  # the scratch table is removed
  assert not [t for t in threading.enumerate() if t.name == "ctr-reader"]
  assert trainer.metrics_file.closed


def test_a_table_dir_is_kept_and_flushed(tmp_path, tiny_config, tiny_source):
  config = dataclasses.replace(tiny_config, table_dir=str(tmp_path / "table"))
  source = tiny_source(config)
  with ctr.Trainer(config, source, ctr.make_optimizer(config)) as trainer:
    trainer.fit()
  assert os.listdir(tmp_path / "table")


def test_the_test_set_is_read_once_per_run(tiny_config, tiny_source):
  config = dataclasses.replace(tiny_config, eval_every=2)
  plain = tiny_source(config)
  reads = []

  def counted_test_batches():
    reads.append(1)
    return plain.test_batches()

  source = dataclasses.replace(plain, test_batches=counted_test_batches)
  with ctr.Trainer(config, source, ctr.make_optimizer(config)) as trainer:
    trainer.fit([ctr.PeriodicEval(config.eval_every)])
    final = trainer.evaluate()
    # Kept batches give exactly what a fresh read gives.
    fresh = evaluate(
      HeldOutSet(plain.test_batches, trainer.tier.index, max_bytes=0),
      trainer.tier,
      trainer.predict,
      trainer.merged_params(),
    )
  assert [e["step"] for e in trainer.evals] == [2, 4, 6] and len(reads) == 1
  assert fresh["test_auc"] == final["test_auc"] and fresh["test_examples"] == 512


def test_a_test_set_too_large_to_keep_is_read_at_every_evaluation():
  batches = [
    ctr.CTRBatch(np.zeros((4, 1), np.float32), np.arange(8).reshape(4, 2), np.zeros(4, np.float32))
    for _ in range(3)
  ]
  index = lambda keys: np.unique(keys, return_inverse=True)
  small = HeldOutSet(lambda: iter(batches), index, max_bytes=1 << 20)
  large = HeldOutSet(lambda: iter(batches), index, max_bytes=300)
  for _ in range(3):
    assert len(list(small)) == len(list(large)) == 3
  assert small.reads == 1 and large.reads == 3


def test_resume_says_the_step_it_continues_from(tmp_path, capsys, tiny_config, tiny_source):
  config = dataclasses.replace(tiny_config, checkpoint_every=2)
  source = tiny_source(config)
  with (
    pytest.raises(RuntimeError, match="at step 5"),
    ctr.Trainer(config, source, ctr.make_optimizer(config), str(tmp_path)) as trainer,
  ):
    trainer.fit([Recorder(fail_at=5)])  # stopped after the step-4 checkpoint
  assert "resuming" not in capsys.readouterr().err
  source = tiny_source(config)
  with ctr.Trainer(
    config, source, ctr.make_optimizer(config), str(tmp_path), resume=True
  ) as trainer:
    assert trainer.start_step == 4
    assert f"resuming {tmp_path} from step 4, to step 6" in capsys.readouterr().err
