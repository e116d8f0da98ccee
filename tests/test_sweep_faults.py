"""Issue 17, item 13: a sweep never crashes on one run's damaged summary, never writes outside
its directory, and refuses a grid too large to run before building it."""

import json
import os
import textwrap

import pytest

from experiments import sweep
from experiments.sweep_lib import results
from experiments.sweep_lib import spec as spec_lib
from experiments.sweep_lib import worker

# Two tiny convergence runs (a second or two each, mostly process start).
TWO_RUNS = textwrap.dedent(
  """
  name = "two"
  task = "convergence"
  [base]
  problem = { kind = "separable", d = 4 }
  workers = 2
  steps = 8
  log_every = 4
  [[optimizers]]
  name = "sync"
  variant = "sync_adam"
  learning_rate = [0.03, 0.1]
  """
)


def _starts(out, run_id) -> int:
  with open(worker.job_file(out, run_id, "log")) as f:
    return sum(line.startswith("start ") for line in f)


def test_a_corrupt_or_incomplete_summary_is_redone_not_a_crash_of_the_sweep(tmp_path, capsys):
  """Regression: a cut summary.json ended the whole sweep ("not a JSON document"), and one
  without its config with KeyError: 'config' (an AttributeError for a config that is not a
  table)."""
  config = tmp_path / "two.toml"
  config.write_text(TWO_RUNS)
  out = str(tmp_path / "out")
  assert sweep.main([str(config), "--out", out, "--jobs", "2"]) == 0
  cut, incomplete = "sync-lr0.03-s0", "sync-lr0.1-s0"
  path = {r: os.path.join(worker.run_dir(out, r), "summary.json") for r in (cut, incomplete)}
  good = {r: json.loads(open(p).read()) for r, p in path.items()}
  with open(path[cut], "w") as f:
    f.write(json.dumps(good[cut])[:40])
  with open(path[incomplete], "w") as f:
    json.dump({**good[incomplete], "config": "?"}, f)
  assert worker.read_summary(out, cut) is None and worker.read_summary(out, incomplete) is None
  # Neither the table nor the status crashes on them.
  assert sweep.main([str(config), "--out", out, "--table-only"]) == 0
  assert sweep.main([str(config), "--out", out, "--status"]) == 0
  assert "pending: 2" in capsys.readouterr().out
  # A rerun redoes both.
  assert sweep.main([str(config), "--out", out, "--jobs", "2"]) == 0
  for run_id in (cut, incomplete):
    assert worker.read_summary(out, run_id)["gap"] == good[run_id]["gap"]
    assert _starts(out, run_id) == 2
  rows = results.read_results(os.path.join(out, "results.csv"))
  assert sorted(r["run_id"] for r in rows) == [cut, incomplete]


def test_a_ctr_run_whose_summary_is_corrupt_is_resumed_and_finished_again(tmp_path):
  """A CTR run's directory is continued, not removed: the worker deletes the unusable
  summary, and the run resumes from its last checkpoint to write it again."""
  document = {
    "name": "ctr",
    "task": "ctr",
    "base": {
      "batch_size": 16,
      "steps": 4,
      "log_every": 2,
      "eval_every": 0,
      "checkpoint_every": 2,
      "table_rows": 4096,
      "host_cache_rows": 1024,
      "val_examples": 256,
      "test_examples": 256,
      "vocab_size": 20,
    },
    "optimizers": [{"name": "sync", "optimizer": "sync_adam"}],
  }
  spec = spec_lib.parse(document)
  (run,) = spec.runs()
  out = str(tmp_path / "out")
  os.makedirs(os.path.join(out, worker.JOBS_DIR))
  with open(worker.job_file(out, run.run_id, "json"), "w") as f:
    json.dump(results.run_record(run, spec.task), f)
  assert worker.run(out, run.run_id) == 0
  summary = worker.read_summary(out, run.run_id)
  path = os.path.join(worker.run_dir(out, run.run_id), "summary.json")
  with open(path, "w") as f:
    f.write('{"status": "completed", "config": {"optimi')
  assert worker.read_summary(out, run.run_id) is None
  assert worker.run(out, run.run_id) == 0
  again = worker.read_summary(out, run.run_id)
  assert again["test_auc"] == summary["test_auc"] and again["steps"] == 4


@pytest.mark.parametrize("name", ["../../../../tmp/x", "a/b", "..", ".hidden", ""])
def test_the_sweep_name_is_checked_like_an_optimizer_name(tmp_path, name):
  """Regression: name = "../../../../tmp/x" wrote the sweep outside its directory."""
  document = {
    "name": name,
    "task": "convergence",
    "optimizers": [{"name": "a", "variant": "sync_adam", "learning_rate": 0.1}],
    "base": {"problem": {"kind": "separable", "d": 4}},
  }
  with pytest.raises(ValueError, match="name"):
    spec_lib.parse(document, source="s.toml")


def test_a_bad_sweep_name_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
  config = tmp_path / "s.toml"
  config.write_text(TWO_RUNS.replace('name = "two"', 'name = "../escaped"'))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    sweep.main([str(config)])  # the default --out is runs/sweeps/NAME
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and str(config) in err and "'../escaped'" in err
  assert sorted(os.listdir(tmp_path)) == ["s.toml"]


def test_a_grid_too_large_to_run_is_refused_with_its_size_before_it_is_built():
  """Regression: a grid of 8e8 points ended in MemoryError after 44 s."""
  values = [float(v) for v in range(1, 151)]  # 150 values in each of 4 fields
  document = {
    "name": "huge",
    "task": "convergence",
    "seeds": [0, 1],
    "base": {"problem": {"kind": "separable", "d": 4}},
    "optimizers": [
      {
        "name": "a",
        "variant": "sync_adam",
        "learning_rate": values,
        "beta2": [v / 1000 for v in values],
        "steps": [int(v) for v in values],
        "k": [int(v) for v in values],
      }
    ],
  }
  with pytest.raises(ValueError, match=r"s\.toml: the sweep has 1,012,500,000 runs"):
    spec_lib.parse(document, source="s.toml")
  document["optimizers"][0]["k"] = [1]  # 2 x 150^3 = 6.75 million: still too many
  with pytest.raises(ValueError, match=r"6,750,000 runs"):
    spec_lib.parse(document, source="s.toml")
  document["optimizers"][0].update(learning_rate=values[:3], beta2=0.999, steps=16)
  assert len(spec_lib.parse(document, source="s.toml").runs()) == 6  # fine
