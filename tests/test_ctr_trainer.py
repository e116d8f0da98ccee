"""The CTR Trainer's pieces: its step loop and hooks, and the resources it owns."""

import os
import threading

import pytest

from kstep_adam import ctr


def _small(**overrides):
  base = dict(
    batch_size=16,
    steps=6,
    k=4,
    table_rows=1 << 14,
    host_cache_rows=1 << 12,
    log_every=2,
    eval_every=0,
  )
  config = ctr.TrainConfig(**{**base, **overrides})
  # A tiny vocabulary keeps every step's unique rows inside one shape bucket.
  data = ctr.DataConfig(vocab_size=20, test_examples=512)
  return config, ctr.make_source(data, config)


class Recorder(ctr.Hook):
  def __init__(self, fail_at=None):
    self.results, self.closed, self.fail_at = [], False, fail_at

  def after_step(self, trainer, result):
    self.results.append(result)
    if result.step == self.fail_at:
      raise RuntimeError(f"hook failed at step {result.step}")

  def close(self):
    self.closed = True


def test_hooks_see_every_step_and_which_ones_compiled(tmp_path):
  config, source = _small()
  recorder = Recorder()
  with ctr.Trainer(config, source, ctr.make_optimizer(config), str(tmp_path)) as trainer:
    trainer.fit([ctr.MetricsLog(config.log_every), recorder])
    final = trainer.evaluate()
    summary = ctr.summarize(trainer, final)
  assert [r.step for r in recorder.results] == [1, 2, 3, 4, 5, 6] and recorder.closed
  # k = 4: step 1 compiles the local program, step 4 the merging one; nothing else compiles.
  assert [r.compiled for r in recorder.results] == [True, False, False, True, False, False]
  assert summary["compile_steps"] == 2 and summary["steps"] == 6
  assert final["step"] == 6 and summary["evals"] == [final]
  assert all(r.row_ids_U.size > 0 and r.loss > 0 for r in recorder.results)


def test_resources_are_released_when_a_step_hook_fails(tmp_path):
  config, source = _small()
  recorder = Recorder(fail_at=2)
  trainer = ctr.Trainer(config, source, ctr.make_optimizer(config), str(tmp_path))
  with pytest.raises(RuntimeError, match="hook failed at step 2"), trainer:
    trainer.fit([recorder])
  assert recorder.closed
  assert not os.path.exists(trainer.table_dir)  # the scratch table is removed
  assert not [t for t in threading.enumerate() if t.name == "ctr-reader"]
  assert trainer._writer.closed


def test_a_table_dir_is_kept_and_flushed(tmp_path):
  config, source = _small(table_dir=str(tmp_path / "table"))
  with ctr.Trainer(config, source, ctr.make_optimizer(config)) as trainer:
    trainer.fit()
  assert os.listdir(tmp_path / "table")
