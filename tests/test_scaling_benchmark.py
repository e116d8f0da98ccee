"""The scaling benchmark: its commands, its report, and (slow) a quick run end to end."""

import json
import sys

import pytest

from experiments.benchmarks import scaling


def test_the_two_process_run_is_the_one_process_command_under_the_launcher():
  config = scaling.ScalingConfig(steps=5)
  one, two = scaling.command(config, 1, "o1"), scaling.command(config, 2, "o2")
  assert one[:3] == [sys.executable, "-m", "experiments.train_ctr"]
  assert two[:6] == [sys.executable, "-m", "kstep_adam.launch", "--num-processes", "2", "--"]
  assert two[6:-1] == one[:-1] and (one[-1], two[-1]) == ("o1", "o2")
  assert scaling.parse_args([]).out is None  # prints only, writes nothing by default


def _measured(examples_per_sec, sparse_node):
  return {
    "examples_per_sec": examples_per_sec,
    "seconds_per_step": {"compute": 0.01},
    "dense_bytes_per_step_by_axis": {"node": 100.0, "local": 200.0},
    "sparse_bytes_per_step_by_axis": {"node": sparse_node, "local": 0.0},
    "sparse_transport": "x",
    "test_auc": 0.7,
  }


def test_report_gives_medians_and_ratios_of_two_processes_to_one():
  runs = {1: [_measured(100.0, 10.0), _measured(300.0, 10.0)], 2: [_measured(50.0, 40.0)] * 2}
  result = scaling.report(runs)
  assert result["processes"]["1"]["examples_per_sec"] == 200.0
  ratios = result["two_over_one"]
  assert ratios["examples_per_sec"] == 0.25
  assert ratios["paired_examples_per_sec"] == [0.5, 50.0 / 300.0]
  assert ratios["dense_bytes_by_axis"] == {"node": 1.0, "local": 1.0}
  assert ratios["sparse_bytes_by_axis"] == {"node": 4.0, "local": None}  # nothing to divide by


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
  out = tmp_path / "scaling.json"
  scaling.main(["--quick", "--out", str(out)])
  result = json.loads(out.read_text())
  one, two = result["processes"]["1"], result["processes"]["2"]
  assert (one["sparse_transport"], two["sparse_transport"]) == (
    "parameter_server_model",
    "all_to_all",
  )
  assert one["dense_bytes_per_step_by_axis"] == two["dense_bytes_per_step_by_axis"]
  assert two["sparse_bytes_per_step_by_axis"]["local"] > 0
  assert one["test_auc"] == pytest.approx(two["test_auc"], rel=1e-4)
  assert result["two_over_one"]["examples_per_sec"] > 0
