"""End-to-end tests of the CTR workflow on 8 simulated CPU devices (2 nodes x 4)."""

import json
import os

import jax
import numpy as np
import pytest

from kstep_adam import ctr

# A shrunken run: the end-to-end test below asserts AUC within this margin of the teacher.
TEACHER_MARGIN = 0.12


def _source(num_workers, batch_size, seed=0, test_examples=4096, **data_kwargs):
  data = ctr.SyntheticCTR(num_workers=num_workers, vocab_size=2000, seed=seed, **data_kwargs)
  return ctr.synthetic_source(data, batch_size=batch_size, test_examples=test_examples)


def _config(**overrides):
  base = dict(
    batch_size=32,
    steps=20,
    log_every=5,
    table_rows=1 << 16,
    host_cache_rows=1 << 14,
    nodes=2,
    devices_per_node=4,
    k=4,
  )
  return ctr.TrainConfig(**{**base, **overrides})


def test_end_to_end_learns_close_to_teacher(tmp_path):
  config = _config(steps=200, batch_size=64, eval_every=100, optimizer="kstep_adam", k=8)
  summary = ctr.train(config, _source(8, 64, test_examples=8192), str(tmp_path))
  assert summary["test_auc"] > 0.65
  assert summary["test_auc"] > summary["teacher_auc"] - TEACHER_MARGIN
  assert summary["test_auc"] < summary["teacher_auc"] + 0.01  # nobody beats Bayes
  for key in (
    "test_logloss",
    "examples_per_sec",
    "dense_bytes_by_axis",
    "sparse_bytes",
    "estimated_comm_seconds",
    "teacher_auc",
    "config",
    "time_breakdown_seconds",
  ):
    assert key in summary
  # k-step Adam, global merge every 8 steps: 200 // 8 = 25 inter-node merges
  assert summary["dense_messages_by_axis"]["node"] == 25 * 2
  assert summary["sparse_bytes"] > 0 and summary["estimated_comm_seconds"] > 0
  # Step times by kind, compiled steps left out: 25 merges (one of them may have compiled).
  kinds = summary["step_seconds_by_kind"]
  assert set(kinds) == {"merge", "local"}
  assert kinds["merge"]["steps"] + kinds["local"]["steps"] == 200 - summary["compile_steps"]
  assert 24 <= kinds["merge"]["steps"] <= 25
  assert kinds["merge"]["modelled_comm_per_step"] > kinds["local"]["modelled_comm_per_step"] > 0
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["config"]["k"] == 8
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [100, 200]
  assert len([r for r in records if r["kind"] == "train"]) == 200 // 5


def test_same_seed_same_metrics_with_and_without_prefetch(tmp_path):
  runs = []
  for prefetch in (True, True, False):
    summary, state = ctr.train(_config(prefetch=prefetch), _source(8, 32), return_state=True)
    runs.append((summary, state))
  (a, sa), (b, sb), (c, sc) = runs
  for other, state in ((b, sb), (c, sc)):
    assert other["test_auc"] == a["test_auc"] and other["test_logloss"] == a["test_logloss"]
    np.testing.assert_array_equal(state["rows"], sa["rows"])
    jax.tree.map(np.testing.assert_array_equal, state["params_W"], sa["params_W"])
  d = ctr.train(_config(seed=1), _source(8, 32, seed=1))
  assert d["test_auc"] != a["test_auc"]


def test_sync_sparse_and_sync_adam_equal_one_worker_on_global_batch():
  # 8 workers x 16 examples vs 1 worker x 128 examples, the same global batches.
  source = _source(8, 16)
  multi = dict(optimizer="sync_adam", steps=6, batch_size=16, sparse_mode="exact")
  s8, state8 = ctr.train(_config(**multi), source, return_state=True)
  s1, state1 = ctr.train(
    _config(**{**multi, "batch_size": 128, "nodes": 1, "devices_per_node": 1}),
    source,
    return_state=True,
  )
  np.testing.assert_array_equal(state8["row_ids"], state1["row_ids"])
  # Adam divides by sqrt(v): rows whose gradient is ~eps amplify float rounding, hence
  # atol 1e-4, 0.5% of one step at lr 2e-2. That still tells averaging from summing the
  # workers' row gradients (8x too large), which fails it.
  np.testing.assert_allclose(state8["rows"], state1["rows"], rtol=0, atol=1e-4)
  one = jax.tree.map(lambda x: x[0], state1["params_W"])
  for w in range(8):
    jax.tree.map(
      lambda x, y, w=w: np.testing.assert_allclose(x[w], y, rtol=1e-4, atol=1e-5),
      state8["params_W"],
      one,
    )
  assert s8["test_auc"] == pytest.approx(s1["test_auc"], abs=1e-4)
  assert s8["dense_bytes_by_axis"]["node"] > 0 and s1["dense_bytes_by_axis"]["node"] == 0
  assert set(s8["step_seconds_by_kind"]) == {"synchronous"}  # every step merges


def test_train_ctr_on_a_criteo_file_with_bad_lines(tmp_path):
  from experiments import train_ctr

  path = tmp_path / "day.txt"
  ctr.SyntheticCTR(vocab_size=500).write_criteo(str(path), 3000)
  with open(path, "a") as f:
    f.write("1\tnot enough fields\n")
  out = tmp_path / "out"
  args = [
    "--data",
    f"criteo:{path}",
    "--batch-size",
    "32",
    "--out",
    str(out),
    "--no-progress",
    "--table-rows",
    "65536",
    "--eval-every",
    "0",
  ]
  with pytest.raises(ctr.CTRDataError, match=r"day\.txt:3001: expected 40 fields"):
    train_ctr.main([*args, "--debug"])  # without --debug: one line (ctr/run/test_fault_messages.py)
  summary = train_ctr.main(args + ["--skip-bad-lines"])
  # 3001 lines; the lines that start in the last 10% of the bytes are held out (a time
  # split), and the bad line is the last test line
  text = path.read_bytes()
  train_lines = 1 + text[: int(0.9 * len(text)) - 1].count(b"\n")
  assert summary["data"]["lines_skipped"] == 1
  assert summary["steps"] == train_lines // 256  # one pass of full global batches of 8 x 32
  assert summary["test_examples"] == 3000 - train_lines
  assert summary["teacher_auc"] is None and 0.0 < summary["test_auc"] < 1.0
  assert np.isfinite(summary["test_logloss"])
  assert os.path.exists(out / "metrics.jsonl") and os.path.exists(out / "summary.json")


def test_bad_config_names_the_parameter():
  with pytest.raises(ValueError, match="optimizer must be one of"):
    ctr.TrainConfig(optimizer="sgd")
  with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
    ctr.TrainConfig(k=0)
  with pytest.raises(ValueError, match="learning_rate must be a finite number in"):
    ctr.TrainConfig(learning_rate=float("nan"))
  with pytest.raises(ValueError, match="exceeds the 8 devices"):
    ctr.train(_config(nodes=4, devices_per_node=4), _source(16, 32))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(data="parquet:x"), "data must be 'synthetic', 'criteo:PATH' or 'csv:PATH'"),
    (dict(data="criteo:"), "names no file"),
    (dict(test_data="criteo:t.txt"), "test_data needs file data"),
    (dict(data="csv:a.csv", test_data="criteo:b.txt"), "differs from the data format 'csv'"),
    (dict(data="criteo:a.txt", label_column="y"), "label_column applies to csv data only"),
    (dict(sharding="skewed"), "sharding must be one of"),
    (dict(test_fraction=1.0), "test_fraction must be a finite number in"),
  ],
)
def test_bad_data_config_names_the_parameter(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ctr.DataConfig(**kwargs)


def test_data_config_reads_the_spec():
  data = ctr.DataConfig(data="csv:dir/a:b.csv", test_data="t.csv")
  assert (data.format, data.path, data.test_path) == ("csv", "dir/a:b.csv", "t.csv")
  assert ctr.DataConfig().path is None


def test_command_line_defaults_are_the_config_defaults():
  """The CLI is generated from the dataclasses: no flags gives exactly their defaults."""
  from experiments import train_ctr

  parser = train_ctr.make_parser()
  config, data = train_ctr.build(parser.parse_args([]))
  assert config == ctr.TrainConfig() and data == ctr.DataConfig()
  config, data = train_ctr.build(
    parser.parse_args(["--lr", "0.01", "--sparse-lr", "0.1", "--steps", "none", "--k", "4"])
  )
  assert (config.learning_rate, config.sparse_learning_rate, config.k) == (0.01, 0.1, 4)
  assert config.steps is None
  with pytest.raises(SystemExit):
    train_ctr.main(["--k", "0"])  # the dataclass's check, reported as a usage error


def _strict_json(path):
  """Parse a JSON file, refusing the bare NaN / Infinity that Python's json writes."""

  def refuse(name):
    raise AssertionError(f"{path} holds a bare {name}")

  with open(path) as f:
    text = f.read()
  if str(path).endswith(".jsonl"):
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
  return json.loads(text, parse_constant=refuse)


def test_a_single_class_test_set_reports_no_auc_and_says_why(tmp_path, capsys):
  from experiments import train_ctr

  path = tmp_path / "day.txt"
  ctr.SyntheticCTR(vocab_size=500).write_criteo(str(path), 2200)
  with open(path) as f:
    lines = f.read().splitlines()
  for i in range(1900, 2200):  # beyond the held-out last 10% of the bytes: all labelled 0
    lines[i] = "0" + lines[i][1:]
  path.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  args = ["--data", f"criteo:{path}", "--batch-size", "32", "--out", str(out), "--no-progress"]
  summary = train_ctr.main(args + ["--table-rows", "65536", "--eval-every", "4"])
  assert summary["test_auc"] is None and summary["test_positives"] == 0
  assert 200 < summary["test_examples"] < 240
  assert (
    f"single class ({summary['test_examples']} examples, all labelled 0)" in summary["test_note"]
  )
  assert any("AUC is undefined" in w for w in summary["warnings"])
  assert "warning: final evaluation: the test set has a single class" in capsys.readouterr().err
  on_disk = _strict_json(out / "summary.json")
  assert on_disk["test_auc"] is None and on_disk["warnings"] == summary["warnings"]
  evals = [r for r in _strict_json(out / "metrics.jsonl") if r["kind"] == "eval"]
  assert [r["test_auc"] for r in evals] == [None, None]  # steps 4 and 7 (the last)
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # written atomically


def test_undefined_metrics_are_none_with_a_reason():
  from kstep_adam.ctr._metrics import eval_metrics

  diverged = eval_metrics(np.array([0.0, 1.0, 1.0]), np.array([0.1, np.nan, 0.9]))
  assert diverged["test_auc"] is None and diverged["test_logloss"] is None
  assert diverged["test_note"] == "1 of 3 predictions are not finite (the model diverged)"
  fine = eval_metrics(np.array([0.0, 1.0]), np.array([0.1, 0.9]))
  assert fine["test_auc"] == 1.0 and "test_note" not in fine


def test_results_are_strict_json(tmp_path):
  from kstep_adam._jsonio import dumps
  from kstep_adam._jsonio import write_json

  record = {"loss": float("nan"), "auc": np.float32("inf"), "n": [np.int64(3), np.float64(0.5)]}
  assert dumps(record) == '{"loss": null, "auc": null, "n": [3, 0.5]}'
  write_json(str(tmp_path / "s.json"), record)
  assert _strict_json(tmp_path / "s.json") == {"loss": None, "auc": None, "n": [3, 0.5]}
