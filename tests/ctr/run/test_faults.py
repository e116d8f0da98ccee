"""The CTR trainer's fault handling (issue 13, items 4, 5 and 8): an output directory is never
mixed or lost, an existing table is never silently reused, and a diverged run stops with an
error naming the step and a machine-readable record."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from kstep_adam import ctr
from kstep_adam import embedding
from kstep_adam.ctr._metrics import eval_metrics
from kstep_adam.ctr.run import _checkpoint
from kstep_adam.ctr.run._rundir import OutDirLockedError
from kstep_adam.ctr.run._rundir import RunDirectory
from kstep_adam.ctr.run._rundir import run_identity
from kstep_adam.ctr.train._divergence import DivergenceMonitor


@pytest.fixture(scope="module")
def config(tiny_config):
  """The tiny run with one step program to compile: these tests are not about merges."""
  return dataclasses.replace(tiny_config, optimizer="sync_adam")


def _files(directory) -> dict:
  """Every file under ``directory`` with its bytes."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, directory)] = f.read()
  return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, config, tiny_source):
  """A finished run with checkpoints: what a second run finds in its --out."""
  out = tmp_path_factory.mktemp("previous") / "out"
  config = dataclasses.replace(config, checkpoint_every=3)
  ctr.train(config, tiny_source(config), str(out))
  return config, out


@pytest.fixture
def previous(tmp_path, finished_run):
  config, out = finished_run
  copy = tmp_path / "out"
  shutil.copytree(out, copy)
  return config, copy


# -- item 4: --out reuse ------------------------------------------------------------------------
def test_a_second_run_into_a_runs_directory_is_refused_and_changes_nothing(previous, tiny_source):
  config, out = previous
  before = _files(out)
  assert {"run.json", "metrics.jsonl", "summary.json"} <= set(before)
  with pytest.raises(ctr.RunDirectoryError, match=r"holds a run already.*--resume.*--overwrite"):
    ctr.train(config, tiny_source(config), str(out))
  other = dataclasses.replace(config, learning_rate=0.01)
  with pytest.raises(ctr.RunDirectoryError, match=r"learning_rate: 0\.002 -> 0\.01"):
    ctr.train(other, tiny_source(other), str(out), resume=True)
  assert _files(out) == before


def test_the_pipeline_setting_may_change_on_resume(config, tiny_source):
  """It changes no bits, so a run recorded before the setting existed (no key) or with the
  other value resumes: it is not part of what the run computes."""
  from kstep_adam.ctr.run._rundir import run_identity

  piped = run_identity(dataclasses.replace(config, pipeline=True), tiny_source(config))
  plain = run_identity(dataclasses.replace(config, pipeline=False), tiny_source(config))
  assert piped == plain and "pipeline" not in piped["config"]


def test_a_run_that_fails_at_start_up_leaves_the_previous_run_whole(
  previous, tmp_path, tiny_source
):
  """Regression: metrics.jsonl was opened with 'w' before anything was checked, so a run that
  failed at start-up truncated the previous run's metrics beside its old summary.json."""
  config, out = previous
  before = _files(out)
  table_dir = tmp_path / "table"
  embedding.open_table(table_dir, num_rows=64, dim=16).close()
  failing = dataclasses.replace(config, table_dir=str(table_dir))  # refused: it has a table
  with pytest.raises(ValueError, match="holds a table already"):
    ctr.train(failing, tiny_source(failing), str(out), overwrite=True)
  assert _files(out) == before


def test_the_command_line_refuses_a_used_out_and_says_what_to_pass(previous, capsys):
  from experiments import train_ctr

  _, out = previous
  before = _files(out)
  args = ["--out", str(out), "--steps", "6", "--batch-size", "16", "--no-progress"]
  with pytest.raises(SystemExit) as exit_info:
    train_ctr.main(args)
  assert exit_info.value.code == 2
  assert "pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    train_ctr.main([*args, "--resume", "--overwrite"])  # one or the other
  assert _files(out) == before


def test_overwrite_replaces_the_previous_run_whole(previous, tiny_source):
  config, out = previous
  old_run = (out / "run.json").read_text()
  changed = dataclasses.replace(config, steps=4, checkpoint_every=0, learning_rate=0.01)
  summary = ctr.train(changed, tiny_source(changed), str(out), overwrite=True)
  assert summary["steps"] == 4
  assert sorted(os.listdir(out)) == ["LOCK", "metrics.jsonl", "run.json", "summary.json"]
  assert (out / "run.json").read_text() != old_run
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 4]  # train records, then the final eval


def test_files_that_are_not_a_runs_are_never_deleted(previous, tiny_source):
  config, out = previous
  (out / "notes.txt").write_text("mine")
  for flags in ({}, {"overwrite": True}, {"resume": True}):
    with pytest.raises(ctr.RunDirectoryError, match=r"not a run's outputs: \['notes.txt'\]"):
      ctr.train(config, tiny_source(config), str(out), **flags)
  assert (out / "notes.txt").read_text() == "mine"


def test_two_processes_never_write_one_directory(tmp_path, config, tiny_source):
  identity = run_identity(config, tiny_source(config))
  holder = RunDirectory(str(tmp_path), identity, resume=False, overwrite=False)
  try:
    with pytest.raises(OutDirLockedError, match="being written by another run"):
      RunDirectory(str(tmp_path), identity, resume=False, overwrite=False)
  finally:
    holder.close()


def test_resuming_a_finished_run_rewrites_the_same_results(previous, tiny_source):
  config, out = previous
  summary = json.loads((out / "summary.json").read_text())
  records = (out / "metrics.jsonl").read_text()
  again = ctr.train(config, tiny_source(config), str(out), resume=True)  # from its last checkpoint
  assert again["test_auc"] == summary["test_auc"] and again["steps"] == summary["steps"] == 6
  assert (out / "metrics.jsonl").read_text() == records


# -- item 5: --table-dir reuse ------------------------------------------------------------------
def test_an_existing_table_is_refused_unless_the_run_starts_from_it(tmp_path, config, tiny_source):
  """Regression: a table_dir holding a table was reused with fresh dense layers (its step
  going on from 4 to 8) without a word."""
  table_dir = tmp_path / "table"
  config = dataclasses.replace(config, table_dir=str(table_dir), steps=4)
  with embedding.open_table(
    table_dir,
    num_rows=config.table_rows,
    dim=config.embed_dim,
    optimizer=embedding.SparseAdam(learning_rate=config.sparse_learning_rate, mode="lazy"),
    init_scale=config.init_scale,
  ) as table:
    for _ in range(4):
      table.push(np.arange(10), np.ones((10, 16), np.float32))
    rows = table.pull(np.arange(10))
  with pytest.raises(ValueError, match=r"holds a table already; pass init_from_table"):
    ctr.train(config, tiny_source(config))
  with embedding.open_table(table_dir) as table:  # untouched
    assert table.step == 4
    np.testing.assert_array_equal(table.pull(np.arange(10)), rows)
  start_from_it = dataclasses.replace(config, init_from_table=True)
  ctr.train(start_from_it, tiny_source(start_from_it))
  with embedding.open_table(table_dir) as table:
    assert table.step == 8  # the table's own steps go on: this run pushed 4 more
  with pytest.raises(ValueError, match="no table in table_dir"):
    ctr.train(
      dataclasses.replace(start_from_it, table_dir=str(tmp_path / "empty")),
      tiny_source(config),
    )


# -- item 8: divergence -------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_diverging_run_stops_naming_the_step_and_records_it(tmp_path, capsys):
  """Regression: with --lr 1e4 --sparse-lr 1e6 the loss reached 1e25 and the run exited 0
  with AUC 0.50 and only a NumPy overflow warning. That overflow (the embedding rows'
  gradients, huge from the exploding dense layers, overflow the sparse optimizer's second
  moment in float32) is divergence by itself now (issue 17 item 3), at step 2."""
  from experiments import train_ctr

  out = tmp_path / "out"
  args = ["--lr", "1e4", "--steps", "40", "--batch-size", "16"]
  args += ["--optimizer", "sync_adam"]
  args += ["--table-rows", "16384", "--eval-every", "0", "--checkpoint-every", "5"]
  with pytest.raises(SystemExit) as exit_info:
    train_ctr.main([*args, "--out", str(out), "--no-progress"])
  assert exit_info.value.code == train_ctr.DIVERGED_EXIT_STATUS
  summary = json.loads((out / "summary.json").read_text())
  step = summary["diverged_at_step"]
  assert summary["status"] == "diverged" and summary["reason"] == "nonfinite"
  assert f"training diverged at step {step}" in capsys.readouterr().err
  assert step == 2 and "embedding rows is not finite in float32" in summary["message"]
  record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["kind"] == "diverged" and record["step"] == step
  # The loss left its range before the first checkpoint was due: none holds a bad state.
  assert _checkpoint.latest_checkpoint(str(out / "checkpoints")) is None
  assert summary["checkpoint_step"] is None
  with pytest.raises(SystemExit):  # resuming would only diverge again
    train_ctr.main([*args, "--out", str(out), "--no-progress", "--resume"])


class _PoisonedSource:
  """Synthetic data whose global batch at ``poisoned_step`` (1-based) has a NaN feature."""

  def __init__(self, source, poisoned_step):
    self.source = source
    train_from = self.source.train_from

    def poisoned(epoch, global_batch, start):
      for batch, position in train_from(epoch, global_batch, start):
        if position == poisoned_step:
          batch = batch._replace(dense_BxI=np.where(np.eye(*batch.dense_BxI.shape), np.nan, 1.0))
        yield batch, position

    self.source = dataclasses.replace(self.source, train_from=poisoned)


def test_a_nonfinite_step_stops_the_run_and_the_checkpoint_keeps_the_last_good_state(
  tmp_path, config, tiny_source
):
  config = dataclasses.replace(config, steps=8, checkpoint_every=2)
  source = _PoisonedSource(tiny_source(config), poisoned_step=5).source
  with pytest.raises(
    ctr.DivergenceError, match="diverged at step 5: the loss is not finite"
  ) as info:
    ctr.train(config, source, str(tmp_path / "out"))
  assert (info.value.step, info.value.reason, info.value.checkpoint_step) == (5, "nonfinite", 4)
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["diverged_at_step"] == 5 and summary["loss"] is None  # NaN: strict JSON
  latest = _checkpoint.latest_checkpoint(str(tmp_path / "out" / "checkpoints"))
  with embedding.open_table(tmp_path / "out" / "table") as table:
    assert latest.step == table.step == 4  # the table was flushed only by that checkpoint


def test_skipping_nonfinite_steps_changes_nothing_but_the_step_count(tmp_path, config, tiny_source):
  config = dataclasses.replace(config, steps=8, on_nonfinite="skip", sparse_mode="exact")
  source = _PoisonedSource(tiny_source(config), poisoned_step=5).source
  summary, state = ctr.train(config, source, str(tmp_path / "out"), return_state=True)
  assert summary["status"] == "completed" and summary["skipped_steps"] == [5]
  assert summary["steps"] == 8 and "1 steps had non-finite values" in summary["warnings"][-1]
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params_W"]))
  assert np.isfinite(state["rows"]).all() and np.isfinite(summary["test_logloss"])
  records = [
    json.loads(line)
    for line in (tmp_path / "out" / "metrics.jsonl").read_text().split("\n")
    if line
  ]
  step6 = next(r for r in records if r.get("step") == 6 and r["kind"] == "train")
  assert step6["skipped"] == 1 and np.isfinite(step6["loss"])


def test_exploding_is_a_loss_above_a_multiple_of_the_first_for_enough_steps(config):
  config = dataclasses.replace(config, divergence_factor=10.0, divergence_steps=3)
  monitor = DivergenceMonitor(config)
  losses = [0.7, 8.0, 6.0, 7.5, 8.0, 0.6, 7.1, 7.2]  # 10x 0.7 = 7: three above in a row
  for step, loss in enumerate(losses, start=1):
    assert not monitor.check(step, loss, finite=True)
  with pytest.raises(ctr.DivergenceError) as info:
    monitor.check(9, 7.3, finite=True)
  assert (info.value.step, info.value.reason) == (9, "exploding")
  resumed = DivergenceMonitor(config)
  resumed.restore(json.loads(json.dumps(monitor.state())))
  assert resumed.state() == monitor.state() and resumed.suspect
  off = DivergenceMonitor(dataclasses.replace(config, divergence_factor=0.0))
  for step in range(1, 100):
    off.check(step, 1e30 if step > 1 else 0.7, finite=True)
  with pytest.raises(ctr.DivergenceError, match="a gradient is not finite"):
    off.check(100, 0.7, finite=False)


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(divergence_factor=0.5), "divergence_factor must be 0 .off. or > 1"),
    (dict(divergence_steps=0), "divergence_steps must be an int >= 1"),
    (dict(checkpoint_every=-1), "checkpoint_every must be an int >= 0"),
    (dict(keep_checkpoints=0), "keep_checkpoints must be an int >= 1"),
    (dict(on_nonfinite="ignore"), "on_nonfinite must be one of"),
    (dict(init_from_table=True), "init_from_table needs table_dir"),
  ],
)
def test_new_config_fields_refuse_bad_values_naming_the_field(change, message, config):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(config, **change)


def test_checkpoints_need_an_output_directory(config, tiny_source):
  config = dataclasses.replace(config, checkpoint_every=2)
  with pytest.raises(ValueError, match="need an output directory"):
    ctr.train(config, tiny_source(config))


class _FailAt(ctr.Hook):
  def __init__(self, step):
    self.step = step

  def after_step(self, trainer, result):
    if result.step == self.step:
      raise RuntimeError(f"interrupted at step {result.step}")


def test_a_run_resumed_before_its_first_checkpoint_starts_over_from_its_tables_start(
  tmp_path, finished_run, monkeypatch, tiny_source
):
  """No checkpoint yet: the resumed run starts from step 0, with its table reverted to the
  version it started from (this one was flushed when the interrupted run closed)."""
  reference, reference_out = finished_run
  config = dataclasses.replace(reference, checkpoint_every=0, table_dir=str(tmp_path / "table"))
  out = tmp_path / "out"
  original_fit = ctr.Trainer.fit
  monkeypatch.setattr(
    ctr.Trainer, "fit", lambda self, hooks=(): original_fit(self, [*hooks, _FailAt(4)])
  )
  with pytest.raises(RuntimeError, match="interrupted at step 4"):
    ctr.train(config, tiny_source(config), str(out))
  monkeypatch.setattr(ctr.Trainer, "fit", original_fit)
  with embedding.open_table(tmp_path / "table") as table:
    assert table.step == 4
    table.close(flush=False)
  summary = ctr.train(config, tiny_source(config), str(out), resume=True)
  expected = json.loads((reference_out / "summary.json").read_text())
  for key in ("test_auc", "test_logloss", "steps", "evals", "sparse_bytes", "dense_bytes_by_axis"):
    assert summary[key] == expected[key], key
  with embedding.open_table(tmp_path / "table") as table:
    assert table.step == 6


# -- issue 17, items 2 and 3: no diverged run ends "completed", no non-finite state is stored ---
def _diverged_cli(args, out, capsys):
  """Runs the command line into ``out``; returns its summary once it exited as diverged."""
  from experiments import train_ctr

  common = ["--optimizer", "sync_adam", "--batch-size", "16", "--table-rows", "16384"]
  common += ["--eval-every", "0", "--no-progress", "--out", str(out)]
  with pytest.raises(SystemExit) as exit_info:
    train_ctr.main([*args, *common])
  assert exit_info.value.code == train_ctr.DIVERGED_EXIT_STATUS
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "diverged"
  assert f"training diverged at step {summary['diverged_at_step']}" in capsys.readouterr().err
  return summary


def test_a_run_that_ends_with_its_loss_above_the_limit_has_diverged(tmp_path, capsys):
  """Regression: --lr 1e4 --steps 8 ended with loss 8.6e23, AUC 0.5, status completed: the
  exploding rule needs 20 steps above the limit, and the run was over before. (At 1e4 the
  sparse moments now overflow first; at 1 the loss is above the limit from step 2 on.)"""
  summary = _diverged_cli(["--lr", "1", "--steps", "8"], tmp_path / "out", capsys)
  assert summary["reason"] == "exploding" and summary["diverged_at_step"] == 8
  assert "ended with its loss above" in summary["message"]


def test_a_run_whose_test_predictions_are_not_finite_has_diverged(
  tmp_path, capsys, config, tiny_source
):
  """Regression: a model with non-finite predictions on the test set (here dense parameters
  poisoned after the last step, as an overflow would leave them) ended "completed"."""
  config = dataclasses.replace(config, steps=2)
  original = ctr.Trainer.fit

  def fit_then_poison(trainer, hooks=()):
    original(trainer, hooks)
    trainer.params_W = jax.tree.map(lambda x: x * np.float32(np.inf), trainer.params_W)

  ctr.Trainer.fit = fit_then_poison
  try:
    with pytest.raises(ctr.DivergenceError, match="not finite") as info:
      ctr.train(config, tiny_source(config), str(tmp_path / "out"))
  finally:
    ctr.Trainer.fit = original
  assert info.value.reason == "nonfinite" and info.value.step == 2
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["status"] == "diverged"


def test_a_final_evaluation_with_a_nonfinite_prediction_is_divergence():
  record = eval_metrics(np.array([0.0, 1.0, 1.0]), np.array([0.1, np.nan, 0.9]))
  assert record["test_nonfinite_predictions"] == 1 and record["test_auc"] is None


def test_learning_rates_infinite_in_float32_are_refused_with_the_range(config):
  """Regression: 1e39 is finite in float64 and passed; in float32 it is inf."""
  for name in ("learning_rate", "sparse_learning_rate", "outer_learning_rate"):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number in \(0\.0, 3\.40"):
      dataclasses.replace(config, **{name: 1e39})
  dataclasses.replace(config, sparse_learning_rate=3e38)  # the largest float32 is allowed


def test_a_sparse_update_that_overflows_float32_is_divergence_and_nothing_is_stored(
  tmp_path, config, tiny_source
):
  """Regression: --lr 1e4 --steps 8 --table-dir T completed with ~52k inf values in the
  stored second moment (the float64 moment overflows in the cast to float32), and a diverged
  run still committed its table when it closed. Now the push that would store them is
  divergence, and the table keeps its last good commit (here: its start)."""
  table_dir = tmp_path / "table"
  config = dataclasses.replace(config, steps=8, learning_rate=1e4, table_dir=str(table_dir))
  with pytest.raises(ctr.DivergenceError, match="embedding rows is not finite") as info:
    ctr.train(config, tiny_source(config), str(tmp_path / "out"))
  assert info.value.reason == "nonfinite" and info.value.step == 2
  with embedding.open_table(table_dir) as table:
    assert table.step == 0
    rows = table.pull(np.arange(config.table_rows))
    table.close(flush=False)
  assert np.isfinite(rows).all()


def test_a_table_push_that_would_store_nonfinite_rows_stores_nothing(tmp_path):
  with embedding.open_table(
    tmp_path / "t", num_rows=64, dim=2, optimizer=embedding.SparseAdam(learning_rate=1.0)
  ) as table:
    before = table.pull(np.arange(64))
    with pytest.raises(embedding.NonFiniteRowsError, match=r"rows \[3\]"):
      table.push([3, 5], np.array([[1e30, 0.0], [1.0, 1.0]], np.float32))  # v = g**2: 1e60
    assert table.step == 0 and not table.failed
    np.testing.assert_array_equal(table.pull(np.arange(64)), before)


# -- issue 17, item 10: relative, spaced and symlinked output directories -----------------------
@pytest.mark.parametrize("kind", ["relative", "symlinked"])
def test_checkpoints_into_a_relative_or_symlinked_out_save_and_resume(
  tmp_path, monkeypatch, kind, config, tiny_source
):
  """Regression: --checkpoint-every with a relative --out (the README's own command, and every
  sweep's default) crashed in orbax: 'Checkpoint path should be absolute'."""
  monkeypatch.chdir(tmp_path)
  out = "runs/ckpt dir"  # relative, with a space
  if kind == "symlinked":
    os.makedirs("real place")
    os.symlink("real place", "link")
    out = os.path.join("link", out)
  config = dataclasses.replace(config, steps=4, checkpoint_every=2)
  summary = ctr.train(config, tiny_source(config), out)
  assert summary["status"] == "completed"
  assert [c.step for c in _checkpoint.complete_checkpoints(os.path.join(out, "checkpoints"))] == [
    2,
    4,
  ]
  os.unlink(os.path.join(out, "summary.json"))
  os.unlink(os.path.join(out, "checkpoints", "step_000000004", "manifest.json"))
  resumed = ctr.train(config, tiny_source(config), out, resume=True)  # from step 2
  assert resumed["test_auc"] == summary["test_auc"]


# -- issue 17, item 9: checkpoint files are checked against the manifest's checksums -----------
def test_a_flipped_byte_in_a_checkpoint_file_is_refused_naming_the_file(tmp_path, capsys):
  """Regression: one flipped byte in the dense checkpoint resumed with exit 0 and different
  results."""
  from experiments import train_ctr

  out = tmp_path / "out"
  args = ["--optimizer", "sync_adam", "--batch-size", "16", "--table-rows", "16384"]
  args += ["--steps", "4", "--checkpoint-every", "2", "--eval-every", "0", "--no-progress"]
  args += ["--out", str(out)]
  train_ctr.main(args)
  (out / "summary.json").unlink()
  step_4 = out / "checkpoints" / "step_000000004"
  (step_4 / "manifest.json").unlink()  # resume from step 2
  step_2 = out / "checkpoints" / "step_000000002"
  recorded = json.loads((step_2 / "manifest.json").read_text())["files"]
  assert "host.json" in recorded and any(name.startswith("dense/") for name in recorded)
  # The largest file of the dense state: its array data.
  name = max(
    (n for n in recorded if n.startswith("dense/")), key=lambda n: (step_2 / n).stat().st_size
  )
  data = bytearray((step_2 / name).read_bytes())
  data[len(data) // 2] ^= 0x01
  (step_2 / name).write_bytes(bytes(data))
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    train_ctr.main([*args, "--resume"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"checkpoint file {step_2 / name} changed since it was saved" in err
  assert len(err.strip().splitlines()) == 1


# -- issue 17, item 5: a changed byte anywhere the resumed run reads again is refused ----------
def test_a_data_file_changed_in_the_middle_is_refused_on_resume(tmp_path, monkeypatch, config):
  """Regression: the fingerprint covered the size and the first and last MiB, so flipping
  labels between 2 and 3 MB of a file after a kill was accepted on --resume. The fingerprint
  is cut to 1 KiB here to stand for a file larger than 2 MiB."""
  from kstep_adam.ctr.data import _sources

  fingerprint = _sources.file_fingerprint
  monkeypatch.setattr(_sources, "file_fingerprint", lambda p: fingerprint(p, sample_bytes=1024))
  data = tmp_path / "day.txt"
  ctr.SyntheticCTR(vocab_size=300, seed=4).write_criteo(str(data), 1300)
  config = dataclasses.replace(
    config, steps=None, epochs=2, checkpoint_every=4, eval_every=0, keep_checkpoints=9
  )

  def source():
    return ctr.file_source(str(data), block_bytes=4096)

  out = tmp_path / "out"
  ctr.train(config, source(), str(out))
  (out / "summary.json").unlink()
  for checkpoint in _checkpoint.complete_checkpoints(str(out / "checkpoints"))[1:]:
    os.unlink(os.path.join(checkpoint.path, "manifest.json"))  # resume from step 4
  # A label in the middle of the file's first part, read in the first pass before the
  # checkpoint and again in the second pass: same size, same first and last KiB.
  text = data.read_bytes()
  start = text.index(b"\n", len(text) // 8) + 1
  flipped = text[:start] + (b"1" if text[start : start + 1] == b"0" else b"0") + text[start + 1 :]
  data.write_bytes(flipped)
  assert _sources.file_fingerprint(str(data)) == fingerprint(str(data), sample_bytes=1024)
  with pytest.raises(ctr.CTRDataError, match=r"day\.txt: the block of lines at byte \d+ changed"):
    ctr.train(config, source(), str(out), resume=True)
