"""The link experiment's composition: a trajectory's wall clock priced at step times measured
on a link, its report and figure, on a tiny CTR sweep (the link runs themselves are
``tests/test_link.py``'s)."""

import json
import os
import shutil
import textwrap

import numpy as np
import pytest

from experiments import link_experiment
from experiments import sweep
from experiments.plot import __main__ as plot_main
from experiments.sweep_lib import link

TINY_CTR = textwrap.dedent(
  """
  name = "tiny_link"
  task = "ctr"
  seeds = [0]
  tune = ["learning_rate"]
  reference = "sync_adam"

  [base]
  top_mlp = [16]
  nodes = 2
  devices_per_node = 1
  batch_size = 16
  steps = 24
  log_every = 4
  eval_every = 8
  val_examples = 512
  test_examples = 512
  table_rows = 4096
  host_cache_rows = 4096

  [[optimizers]]
  name = "sync_adam"
  optimizer = "sync_adam"
  learning_rate = [3e-3]

  [[optimizers]]
  name = "kstep_adam"
  optimizer = "kstep_adam"
  k = 4
  learning_rate = [3e-3]
  """
)


def test_compose_prices_each_kind_at_its_mean_and_refuses_an_untimed_kind():
  trajectory = {
    "local": {"steps": 6, "dense_bytes": 0.0},
    "merge": {"steps": 2, "dense_bytes": 100.0},
  }
  timing = {
    "merge": {"dense_bytes": 100.0, "steps": 4, "measured_total": 2.0},
    "local": {"dense_bytes": 0.0, "steps": 5, "measured_total": 0.5},
  }
  assert link.compose_seconds(trajectory, timing) == pytest.approx(6 * 0.1 + 2 * 0.5)
  # Records of before kinds carried their bytes: by name, while the timing has one size.
  legacy = {"local": {"steps": 6}, "merge": {"steps": 2}}
  assert link.compose_seconds(legacy, timing) == pytest.approx(6 * 0.1 + 2 * 0.5)
  # 1-bit Adam's compressed steps are their own kind: a timing without them cannot price them.
  trajectory["synchronous.2"] = {"steps": 3, "dense_bytes": 7.0}
  with pytest.raises(ValueError, match=r"7 dense bytes.*never timed"):
    link.compose_seconds(trajectory, timing)
  timing["synchronous.2"] = {"dense_bytes": 7.0, "steps": 1, "measured_total": 0.2}
  with pytest.raises(ValueError, match="2 sizes of merge"):
    link.compose_seconds(legacy, timing)


def test_convergence_rule_and_first_reaching():
  curve = {
    "step": np.arange(1.0, 11.0),
    "val_auc": np.array([0.6, 0.7, 0.75, 0.78, 0.785, 0.787, 0.788, 0.789, 0.7893, 0.7899]),
    "composed": np.arange(10.0, 110.0, 10.0),
  }
  ok, gain = link.converged(curve)  # the last fifth: steps 8 to 10
  assert ok and gain == pytest.approx(0.7899 - 0.789)
  assert link.first_reaching(curve, 0.7885, "composed") == 80.0
  assert link.first_reaching(curve, 0.8, "composed") is None
  curve["val_auc"][-1] = 0.80
  assert link.converged(curve)[0] is False


@pytest.fixture(scope="module")
def tiny_link_sweep(tmp_path_factory):
  """A finished tiny sweep whose link directory holds timing and end-to-end runs made by
  copying its own runs (each run's steps timed as if on the link)."""
  root = tmp_path_factory.mktemp("link")
  config = root / "tiny_link.toml"
  config.write_text(TINY_CTR)
  out = str(root / "sweep dir")  # a space, as users type paths
  assert sweep.main([str(config), "--out", out, "--jobs", "2"]) == 0
  for run_id in sorted(os.listdir(os.path.join(out, "runs"))):
    row = run_id.rsplit("-s", 1)[0]
    source = os.path.join(out, "runs", run_id)
    for phase in ("timing", "e2e"):
      shutil.copytree(source, os.path.join(out, "link", phase, f"{row}@0.1G"))
  return out


def test_report_composes_each_row_from_its_link_timing(tiny_link_sweep, capsys):
  out = tiny_link_sweep
  assert link_experiment.main([out, "--phase", "report", "--rates", "0.1"]) == 0
  assert "| kstep_adam |" in capsys.readouterr().out
  with open(os.path.join(out, "link", "link.json"), encoding="utf-8") as f:
    data = json.load(f)
  rows = {r["row"]: r for r in data["rows"]}
  assert set(rows) == {"sync_adam-lr0.003", "kstep_adam-lr0.003"}
  kstep = rows["kstep_adam-lr0.003"]
  kinds = kstep["timing"]["0.1G"]
  assert set(kinds) == {"local", "merge"}
  # By hand: the trajectory's steps of each kind at each evaluation, at the timed means.
  records = [
    json.loads(line)
    for line in open(os.path.join(out, "runs", "kstep_adam-lr0.003-s0", "metrics.jsonl"))
  ]
  by_step = {r["step"]: r for r in records if r["kind"] == "train"}
  curve = kstep["curves"]["0"]
  for step, seconds in zip(curve["step"], curve["seconds@0.1G"]):
    counts = by_step[step]["step_seconds_by_kind"]
    expected = sum(
      counts[name]["steps"] * kinds[name]["measured_total"] / kinds[name]["steps"]
      for name in ("local", "merge")
    )
    assert seconds == pytest.approx(expected)
  # The end-to-end run (here the same run) is measured by its own step totals.
  e2e = kstep["e2e"]
  final = by_step[curve["step"][-1]]["step_seconds_by_kind"]
  assert e2e["measured"][-1] == pytest.approx(sum(k["measured_total"] for k in final.values()))
  assert e2e["max_val_auc_gap"] == 0.0
  target = data["target"]
  assert target == pytest.approx(rows["sync_adam-lr0.003"]["curves"]["0"]["val_auc"][-1] - 1e-3)
  sync_time = rows["sync_adam-lr0.003"]["to_target"]["0"]["seconds@0.1G"]
  assert sync_time is not None and rows["sync_adam-lr0.003"]["speedup"]["0.1G"] == 1.0
  assert rows["sync_adam-lr0.003"]["median_to_target"]["0.1G"] == sync_time  # one seed
  assert rows["sync_adam-lr0.003"]["median_speedup"]["0.1G"] == 1.0
  with open(os.path.join(out, "link", "table.md"), encoding="utf-8") as f:
    assert "converged" in f.read()


def test_figure_and_refusals(tiny_link_sweep, tmp_path, monkeypatch):
  out = tiny_link_sweep
  assert link_experiment.main([out, "--phase", "report", "--rates", "0.1"]) == 0
  assert plot_main.main([out, "--out", str(tmp_path)]) == 0
  png = tmp_path / "sweep_tiny_link_time_to_accuracy.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(SystemExit) as info:
    link_experiment.main([out, "--rows", "nope"])
  assert info.value.code != 0
  monkeypatch.setattr(os, "geteuid", lambda: 1000)
  with pytest.raises(SystemExit) as info:
    link_experiment.main([out, "--phase", "timing"])
  assert info.value.code != 0
