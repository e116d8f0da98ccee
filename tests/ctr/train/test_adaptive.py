"""``k = 'auto'`` through the CTR workflow: the command line, metrics.jsonl's merge records, the
bytes counted per actual merge, and a run resumed mid-way deciding as the uninterrupted one."""

import dataclasses
import itertools
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import kstep_adam
from kstep_adam import ctr
from kstep_adam.ctr.train import _adaptive

REPO = str(pathlib.Path(__file__).resolve().parents[3])  # tests/ctr/train/ -> the repository


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_k_auto_on_the_command_line(tmp_path):
  out = tmp_path / "out"
  args = ["--k", "auto", "--k-budget", "0.002", "--steps", "24", "--batch-size", "16"]
  args += ["--nodes", "2", "--devices-per-node", "2", "--synthetic-steps", "24"]
  args += ["--table-rows", "65536", "--out", str(out), "--no-progress", "--eval-every", "0"]
  # Its own process: 2 x 2 devices, while this one's JAX backend may already hold 8.
  root = REPO
  subprocess.run([sys.executable, "-m", "experiments.train_ctr", *args], check=True, cwd=root)
  with open(out / "summary.json") as f:
    summary = json.load(f)
  assert summary["config"]["k"] == "auto"
  merges = [r for r in _records(out / "metrics.jsonl") if r["kind"] == "merge"]
  full = [r for r in merges if r["level"] == 1]
  assert full and merges[0]["step"] == 8 and merges[0]["period"] == [8, 8]  # k_init = 8
  assert all(len(r["drift"]) == 2 and r["drift"][1] > 0 for r in full)
  for before, after in itertools.pairwise(merges):  # a full merge sets the next periods
    assert after["period"] == before["next_period"]
  # Bytes: what the merges that ran send, each counted at its level.
  fields = {f.name for f in dataclasses.fields(ctr.TrainConfig)}
  recorded = {key: value for key, value in summary["config"].items() if key in fields}
  config = ctr.TrainConfig(**{**recorded, "top_mlp": tuple(recorded["top_mlp"])})
  _, schedule = ctr.make_optimizer(config)
  per_level = summary["dense_messages_by_axis"]
  # A full merge: 2 ring steps on 'node' for the parameters and 2 (4-1) for the drift's
  # all-reduce of 3 scalars (a flat ring over the 4 workers); an inner merge none on 'node'.
  assert per_level["node"] == len(full) * (2 + 6)
  assert schedule.adaptive.budget == 0.002
  # The figure: k over time beside the loss, from metrics.jsonl.
  from experiments.plot import __main__ as plot_main

  assert plot_main.main([str(out), "--out", str(tmp_path / "figs")]) == 0
  assert (tmp_path / "figs" / "adaptive_out.png").stat().st_size > 0


def test_k_auto_is_refused_where_it_has_no_meaning():
  with pytest.raises(ValueError, match="k='auto' is for optimizer kstep_adam or local_sgd"):
    ctr.TrainConfig(k="auto", optimizer="diloco")
  with pytest.raises(ValueError, match="merge='global'"):
    ctr.TrainConfig(k="auto", merge="node")
  with pytest.raises(ValueError, match="positive int or 'auto'"):
    ctr.TrainConfig(k="often")


class _StopAt(ctr.Hook):
  def __init__(self, step):
    self.step = step

  def after_step(self, trainer, result):
    if result.step == self.step:
      raise KeyboardInterrupt  # a run stopped mid-way, after its checkpoint at step 8


def test_resumed_run_decides_as_the_uninterrupted_one(tmp_path, monkeypatch):
  # Y stays unmeasured (C / Y = 1): wall-clock measurements differ between two runs, and
  # this test compares two runs; what it checks is that the checkpoint carries the rule.
  monkeypatch.setattr(_adaptive, "CALIBRATION_STEPS", 10**9)
  config = ctr.TrainConfig(
    k="auto",
    k_budget=0.002,
    steps=24,
    batch_size=16,
    nodes=2,
    devices_per_node=2,
    synthetic_steps=24,
    table_rows=1 << 16,
    host_cache_rows=1 << 12,
    checkpoint_every=8,
    eval_every=0,
  )
  data = ctr.DataConfig()

  def source():
    return ctr.make_source(data, config)

  whole = ctr.train(config, source(), str(tmp_path / "a"))
  b = tmp_path / "b"
  optimizer = ctr.make_optimizer(config)
  with pytest.raises(KeyboardInterrupt), ctr.Trainer(config, source(), optimizer, str(b)) as t:
    t.fit([_StopAt(13)])
  resumed = ctr.train(config, source(), str(tmp_path / "b"), resume=True)
  want = [r for r in _records(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "merge"]
  got = [r for r in _records(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "merge"]
  assert got == want and len({r["level"] for r in want}) == 2
  assert resumed["dense_bytes_by_axis"] == whole["dense_bytes_by_axis"]


def test_network_model_sets_the_merge_times():
  config = ctr.TrainConfig(k="auto", nodes=2, devices_per_node=2)
  _, schedule = ctr.make_optimizer(config)
  assert isinstance(schedule, kstep_adam.MergeSchedule) and schedule.adaptive is not None


def test_a_given_cost_ratio_replaces_the_estimated_and_measured_times():
  # The link experiment prices one run's trajectory with another run's step times, so its
  # decisions must not hang on the machine: C / Y is given, never measured.
  config = ctr.TrainConfig(k="auto", nodes=2, devices_per_node=2, k_cost_ratio=4.0)
  _, schedule = ctr.make_optimizer(config)
  params = {"w": np.zeros(1000, np.float32), "b": np.zeros(3, np.float32)}
  step_fn = types.SimpleNamespace(adaptive=None, last_level=0)
  run = _adaptive.AdaptiveRun(config, params, schedule, {"node": 2, "local": 2}, step_fn, False)
  assert step_fn.adaptive is run.controller
  for _ in range(2 * _adaptive.CALIBRATION_STEPS):
    run.after_step(123.0, log=lambda record: None)
  state = run.controller.state
  assert state.local_seconds == 1.0 and max(state.merge_seconds) == pytest.approx(4.0)
  assert max(run.controller.cost_ratios()) == pytest.approx(4.0)
  with pytest.raises(ValueError, match="k_cost_ratio"):
    ctr.TrainConfig(k="auto", k_cost_ratio=0.0)


def test_a_node_of_one_device_never_merges_inside_itself():
  config = ctr.TrainConfig(k="auto", nodes=2, devices_per_node=1, k_cost_ratio=4.0)
  _, schedule = ctr.make_optimizer(config)
  params = {"w": np.zeros(1000, np.float32)}
  step_fn = types.SimpleNamespace(adaptive=None, last_level=0)
  run = _adaptive.AdaptiveRun(config, params, schedule, {"node": 2, "local": 1}, step_fn, False)
  ctl = run.controller
  assert ctl.axis_sizes == (2, 1)
  levels = []
  for step in range(1, 41):  # the inner axis's period is k_min = 1 once c = 0 is measured
    levels.append(ctl.decide(step))
    ctl.observe(levels[-1], (1e-3, 1e-9) if levels[-1] == 1 else None)
  assert ctl.state.periods[1] == 1 and set(levels) == {0, 1}


def _sweep_file(tmp_path):
  data = tmp_path / "day.txt"
  ctr.SyntheticCTR(vocab_size=200, seed=1).write_criteo(str(data), 2000)
  config = tmp_path / "adaptive.toml"
  config.write_text(
    f"""
name = "ctr_adaptive"
task = "ctr"
[base]
data = "criteo:{data}"
val_fraction = 0.15
nodes = 2
devices_per_node = 1
batch_size = 16
steps = 16
eval_every = 0
top_mlp = [16]
table_rows = 4096
host_cache_rows = 1024
[[optimizers]]
name = "kstep"
optimizer = "kstep_adam"
k = [4, "auto"]
learning_rate = 1e-3
"""
  )
  return config


def test_k_auto_in_a_sweep_file_expands_and_validates(tmp_path):
  from experiments.sweep_lib import spec as spec_lib

  spec = spec_lib.load(str(_sweep_file(tmp_path)))
  runs = {run.run_id: run for run in spec.runs()}
  assert sorted(runs) == ["kstep-k4-s0", "kstep-kauto-s0"]
  assert runs["kstep-kauto-s0"].params["k"] == "auto"
  bad = (tmp_path / "adaptive.toml").read_text().replace('"kstep_adam"', '"diloco"')
  (tmp_path / "bad.toml").write_text(bad)
  with pytest.raises(ValueError, match="k='auto' is for optimizer"):
    spec_lib.load(str(tmp_path / "bad.toml")).runs()


@pytest.mark.slow
def test_k_auto_in_a_sweep_file_runs_and_plots(tmp_path):
  from experiments import sweep
  from experiments.sweep_lib import worker

  config = _sweep_file(tmp_path)
  out = str(tmp_path / "out")
  assert sweep.main([str(config), "--out", out, "--jobs", "1"]) == 0
  summaries = {k: worker.read_summary(out, f"kstep-k{k}-s0") for k in (4, "auto")}
  assert summaries["auto"]["status"] == "completed"
  records = _records(os.path.join(out, "runs", "kstep-kauto-s0", "metrics.jsonl"))
  merges = [r for r in records if r["kind"] == "merge"]
  assert merges and all(r["level"] == 1 for r in merges)  # 1 device per node: nothing inside
  assert summaries["auto"]["config"]["k"] == "auto" and summaries[4]["config"]["k"] == 4
  table = open(os.path.join(out, "table.md")).read()
  assert "auto" in table
  from experiments.plot import __main__ as plot_main

  assert plot_main.main([out, "--out", str(tmp_path / "figs")]) == 0  # k = 'auto' beside k = 4


@pytest.mark.slow
def test_k_auto_on_two_processes(tmp_path):
  """Two processes (one per node) run --k auto: they agree on Y and on every decision, or the
  collectives of their programs would not match and the run would hang or fail."""
  import subprocess
  import sys

  root = REPO
  out = tmp_path / "out"
  train = [sys.executable, "-m", "experiments.train_ctr", "--k", "auto", "--k-budget", "0.002"]
  train += ["--nodes", "2", "--devices-per-node", "2", "--steps", "24", "--batch-size", "16"]
  train += ["--table-rows", "65536", "--eval-every", "0", "--out", str(out), "--no-progress"]
  done = subprocess.run(
    [sys.executable, "-m", "kstep_adam.launch", "--num-processes", "2", "--", *train],
    cwd=root,
    env=dict(os.environ, PYTHONPATH=root),
    capture_output=True,
    text=True,
    timeout=400,
    check=False,
  )
  assert done.returncode == 0, done.stdout[-3000:]
  merges = [r for r in _records(out / "metrics.jsonl") if r["kind"] == "merge"]
  assert merges[0]["step"] == 8 and all(r["level"] in (1, 2) for r in merges)


def test_k_max_caps_the_adaptive_period():
  _, schedule = ctr.make_optimizer(ctr.TrainConfig(k="auto", nodes=2, k_max=64))
  assert schedule.adaptive.k_max == 64 and schedule.adaptive.k_init == 8
  with pytest.raises(ValueError, match="k_max"):
    ctr.TrainConfig(k="auto", k_max=4)
