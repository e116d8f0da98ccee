"""The paper-reproduction experiment: its config and command line, and its --quick grid end to
end."""

import dataclasses
import os
import subprocess

import pytest

from experiments import reproduce_paper
from experiments.paper import config
from experiments.paper import run
from experiments.paper import summary
from experiments.plot import paper as paper_figures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_status() -> str | None:
  """``git status`` of the checkout the tests run from (None outside a git checkout)."""
  try:
    result = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=all"],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True,
    )
  except (OSError, subprocess.CalledProcessError):
    return None
  return result.stdout


def test_reproduce_paper_quick_writes_results_table_and_figures(tmp_path, monkeypatch):
  status_before = _git_status()
  monkeypatch.chdir(tmp_path)  # the default paths are relative: they land in tmp_path
  table = reproduce_paper.main(["--quick"])
  assert os.listdir(tmp_path) == ["runs"]  # no results/, no figures/
  out = tmp_path / "runs" / "reproduce_paper_quick"
  runs = run.read_runs(str(out))
  assert len(runs) == 1 + len(config.QUICK.ks)  # sync Adam + k-step Adam per k, one seed
  assert run.recorded_config(str(out)) == config.QUICK
  by_k = {r["k"]: r for r in runs if r["optimizer"] == "kstep_adam"}
  # inter-node dense traffic falls as 1/k (k divides the step count here up to rounding)
  steps = config.QUICK.steps
  node = {k: r["dense_bytes_by_axis"]["node"] for k, r in by_k.items()}
  assert node[8] == node[1] * (steps // 8) / steps
  assert node[64] == node[1] * (steps // 64) / steps
  assert all(0.55 < r["test_auc"] < r["teacher_auc"] for r in runs)
  assert "sync Adam (DDP)" in table and "| 64 |" in table
  for name in ("paper_auc_vs_k.png", "paper_traffic_vs_k.png", "paper_loss_curves.png"):
    path = out / "figures" / name
    assert path.stat().st_size > 10_000
    os.remove(path)
  # --plot-only rebuilds table and figures from the files, without training
  assert reproduce_paper.main(["--quick", "--plot-only"]) == table
  assert (out / "figures" / "paper_auc_vs_k.png").exists()
  rows = summary.summarize(runs)
  assert summary.largest_safe_k(rows, "params") in (None, *config.QUICK.ks)
  assert os.listdir(tmp_path) == ["runs"]
  assert _git_status() == status_before  # nothing in the checkout changed


def test_command_line_is_generated_from_the_config():
  assert reproduce_paper.parse_args([])[1] == config.FULL
  assert reproduce_paper.parse_args(["--quick"])[1] == config.QUICK
  _, cfg = reproduce_paper.parse_args(["--quick", "--ks", "2", "4", "--seeds", "2", "--steps", "7"])
  assert cfg == dataclasses.replace(config.QUICK, ks=(2, 4), num_seeds=2, steps=7)
  assert cfg.seeds == (0, 1)
  with pytest.raises(SystemExit):  # argparse reports the config's ValueError and exits
    reproduce_paper.parse_args(["--ks", "0", "8"])


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(ks=()), "ks must be a non-empty tuple"),
    (dict(ks=(1, 8, 8)), "ks must be a non-empty tuple without repeats"),
    (dict(ks=(1, 0)), "ks must be an int >= 1, got 0"),
    (dict(variants=("grads",)), "variants must be one of"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(model="mlp"), "model must be one of"),
    (dict(slow_inter_node_gbps=0.0), "slow_inter_node_gbps must be a finite number in (0.0"),
  ],
)
def test_config_refuses_bad_values_naming_the_field(change, message):
  with pytest.raises(ValueError) as error:
    dataclasses.replace(config.FULL, **change)
  assert message in str(error.value)


def test_resuming_with_a_different_run_config_is_refused(tmp_path):
  config.write(config.QUICK, str(tmp_path / "config.json"))
  with pytest.raises(ValueError, match=r"config.json: .* steps=96, .* steps=10; pass another"):
    run.run_grid(dataclasses.replace(config.QUICK, steps=10), str(tmp_path))
  with pytest.raises(SystemExit, match=r"reproduce_paper: .*config.json: .* steps=96"):
    reproduce_paper.main(["--quick", "--steps", "10", "--out", str(tmp_path)])
  # More seeds or values of k only grow the grid: allowed (checked before any training here).
  assert config.run_fields_differ(config.QUICK, dataclasses.replace(config.QUICK, ks=(2,))) == []


def test_recorded_config_that_is_not_one_names_the_file(tmp_path):
  (tmp_path / "config.json").write_text('{"ks": [1], "steps": -1}')
  with pytest.raises(ValueError, match=r"config.json: not a paper-experiment config \(steps"):
    run.recorded_config(str(tmp_path))


def test_figures_of_a_directory_without_runs_name_the_missing_file(tmp_path):
  with pytest.raises(ValueError, match=r"runs.jsonl: no runs to plot"):
    paper_figures.make_figures(str(tmp_path), str(tmp_path / "figures"))
  assert not (tmp_path / "figures").exists()
