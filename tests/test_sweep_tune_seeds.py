"""Two-stage tuning (``tune_seeds``): stage 1 runs every grid point at the tune seeds, the choice
per group is made on them alone, stage 2 runs only the choice at the other seeds; resumable,
sharded, and a sweep without ``tune_seeds`` is unchanged."""

import json
import os
import shutil
import textwrap

import numpy as np
import pytest

from experiments import sweep
from experiments.plot import __main__ as plot_main
from experiments.sweep_lib import select
from experiments.sweep_lib import spec as spec_lib
from experiments.sweep_lib import stages
from experiments.sweep_lib import worker
from tests.test_sweep import HAND_MADE
from tests.test_sweep import TINY
from tests.test_sweep import read_csv
from tests.test_sweep import starts
from tests.test_sweep import tiny_sweep

# Three groups (sync; sgd at k = 2 and k = 4), two learning rates each (local SGD at 100 blows
# up): 6 stage-1 runs at seed 0, then 3 groups x 2 seeds in stage 2, 12 runs instead of 18.
TWO_STAGE = textwrap.dedent(
  """
  name = "two_stage"
  task = "convergence"
  seeds = [0, 1, 2]
  tune_seeds = [0]
  tune = ["learning_rate"]
  reference = "sync"

  [base]
  problem = { kind = "separable", d = 4 }
  workers = 2
  steps = 8
  log_every = 4

  [[optimizers]]
  name = "sync"
  variant = "sync_adam"
  learning_rate = [0.03, 0.1]

  [[optimizers]]
  name = "sgd"
  variant = "local_sgd"
  k = [2, 4]
  learning_rate = [0.1, 100.0]
  """
)
STAGE1 = [
  "sync-lr0.03-s0",
  "sync-lr0.1-s0",
  "sgd-k2-lr0.1-s0",
  "sgd-k2-lr100.0-s0",
  "sgd-k4-lr0.1-s0",
  "sgd-k4-lr100.0-s0",
]


def _parse(text):
  import tomllib

  return spec_lib.parse(tomllib.loads(text), source="f.toml")


def _chosen_on_seed0(out):
  """The run id at seed 0 of each group's best candidate, chosen from seed 0's rows alone."""
  rows = [r for r in read_csv(os.path.join(out, "results.csv")) if r["seed"] == "0"]
  best = {}
  for row in rows:
    group = (row["name"], row["k"])
    gap = float(row["gap"]) if row["gap"] else np.inf
    if group not in best or gap < best[group][0]:
      best[group] = (gap, row["run_id"])
  return {g: run_id for g, (_, run_id) in best.items()}


# -- the spec --------------------------------------------------------------------------------
def test_stage_one_is_every_grid_point_at_the_tune_seeds():
  spec = _parse(TWO_STAGE)
  assert spec.two_stage and spec.tune_seeds == (0,) and spec.stage2_seeds == (1, 2)
  assert [r.run_id for r in spec.stage1_runs()] == STAGE1
  assert len(spec.runs()) == 18  # every run there could be, stage 2 picks among them
  assert spec_lib.SweepSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_without_tune_seeds_or_with_every_seed_nothing_changes():
  old = spec_lib.parse(__import__("tomllib").loads(TINY))
  assert old.tune_seeds is None and not old.two_stage
  assert old.stage1_runs() == old.runs()
  record = old.to_json()
  assert record["tune_seeds"] is None
  del record["tune_seeds"]  # a sweep.json written before tune_seeds existed
  assert spec_lib.SweepSpec.from_json(record) == old
  same = TWO_STAGE.replace("tune_seeds = [0]", "tune_seeds = [2, 0, 1]")
  every = _parse(same)
  assert not every.two_stage and every.stage1_runs() == every.runs()
  assert stages.plan("/nonexistent", every).runs == every.runs()


@pytest.mark.parametrize(
  "replace, message",
  [
    ("tune_seeds = 0", "tune_seeds must be a list of ints"),
    ('tune_seeds = ["0"]', "tune_seeds must be a list of ints"),
    ("tune_seeds = []", "tune_seeds must not be empty"),
    ("tune_seeds = [0, 0]", "tune_seeds has repeated seeds"),
    ("tune_seeds = [5]", r"tune_seeds must be a subset of the seeds \[0, 1, 2\]; \[5\] are not"),
  ],
)
def test_a_bad_tune_seeds_is_one_line_naming_the_file_and_the_field(replace, message):
  with pytest.raises(ValueError, match=message) as info:
    _parse(TWO_STAGE.replace("tune_seeds = [0]", replace))
  assert str(info.value).startswith("f.toml") and "\n" not in str(info.value)


def test_tune_seeds_without_tune_is_refused():
  with pytest.raises(ValueError, match=r"^f.toml: tune_seeds needs tune = \[...\]"):
    _parse(TWO_STAGE.replace('tune = ["learning_rate"]', ""))


def test_quick_sets_or_inherits_tune_seeds_within_its_seeds():
  quick = TWO_STAGE + "\n[quick]\nseeds = [0, 1]\n"
  spec = spec_lib.parse(__import__("tomllib").loads(quick), source="f.toml", quick=True)
  assert spec.tune_seeds == (0,) and spec.stage2_seeds == (1,)
  own = quick + "tune_seeds = [1]\n"
  spec = spec_lib.parse(__import__("tomllib").loads(own), source="f.toml", quick=True)
  assert spec.tune_seeds == (1,) and spec.stage2_seeds == (0,)
  outside = TWO_STAGE + "\n[quick]\nseeds = [3]\n"
  with pytest.raises(ValueError, match=r"f.toml: tune_seeds must be a subset of the seeds \[3\]"):
    spec_lib.parse(__import__("tomllib").loads(outside), source="f.toml", quick=True)


# -- selection on a hand-made table ------------------------------------------------------------
def test_selection_scores_on_the_tune_seeds_only_and_reports_over_every_seed():
  kwargs = dict(group_by=["k"], tune=["learning_rate"], metric="val_auc", report="test_auc")
  # On seed 0 alone, the reference's lr 0.1 (0.70) beats lr 0.3 (0.69); add a seed-1 row that
  # would flip the mean over seeds if it counted.
  rows = [r for r in HAND_MADE if r["seed"] == 0 or (r["name"], r["learning_rate"]) != ("ref", 0.3)]
  flip = dict(HAND_MADE[2], run_id="ref-lr0.3-s1", seed=1, val_auc=0.99)
  rows.append(flip)
  by_label = {s.label: s for s in select.select(rows, tune_seeds=[0], **kwargs)}
  assert by_label["ref"].tuned == {"learning_rate": 0.1}
  np.testing.assert_allclose(by_label["ref"].test, (0.695, np.std([0.69, 0.70], ddof=1)))
  assert by_label["ref"].seeds == (0, 1)
  # k = 4: lr 1.0 wins on seed 0 (0.80); its diverged seed 1 is not a tune seed.
  assert by_label["opt, k=4"].tuned == {"learning_rate": 1.0}
  # Scored on every seed, seed 1's row counts.
  assert {s.label: s for s in select.select(rows, **kwargs)}["ref"].tuned == {"learning_rate": 0.3}


# -- end to end: sharded, resumed, reported, drawn -------------------------------------------------
@pytest.fixture(scope="module")
def two_stage_done(tmp_path_factory):
  """The two-stage sweep run as two shards, then the first again (its stage 2 waited)."""
  config, out = tiny_sweep(tmp_path_factory.mktemp("two_stage"), TWO_STAGE)
  assert sweep.main([config, "--out", out, "--jobs", "2", "--shard", "0/2"]) == 0
  spec = spec_lib.load(config)
  plan = stages.plan(out, spec)
  assert not plan.stage1_done and not plan.stage2  # shard 1's slice of stage 1 is missing
  assert sweep.main([config, "--out", out, "--jobs", "2", "--shard", "1/2"]) == 0
  assert stages.plan(out, spec).stage1_done
  assert sweep.main([config, "--out", out, "--jobs", "2", "--shard", "0/2"]) == 0
  return config, out


def test_stage_two_runs_exactly_the_chosen_candidates_at_the_other_seeds(two_stage_done):
  _, out = two_stage_done
  chosen = _chosen_on_seed0(out)
  assert len(chosen) == 3
  expected = set(STAGE1) | {
    run_id[: -len("s0")] + f"s{seed}" for run_id in chosen.values() for seed in (1, 2)
  }
  rows = read_csv(os.path.join(out, "results.csv"))
  assert sorted(r["run_id"] for r in rows) == sorted(expected)
  on_disk = {d for d in os.listdir(os.path.join(out, "runs"))}
  assert on_disk == expected  # nothing else was ever run
  assert all(starts(out, run_id) == 1 for run_id in expected)
  assert "sgd-k2-lr100.0-s1" not in expected  # the blow-up is not chosen, so not repeated
  assert chosen[("sgd", "2")] == "sgd-k2-lr0.1-s0"


def test_the_report_is_over_every_seed_of_the_choice(two_stage_done):
  _, out = two_stage_done
  rows = {r["run_id"]: r for r in read_csv(os.path.join(out, "results.csv"))}
  selection = {(r["name"], r["k"]): r for r in read_csv(os.path.join(out, "selection.csv"))}
  for group, run_id in _chosen_on_seed0(out).items():
    row = selection[group]
    ids = [run_id[: -len("s0")] + f"s{s}" for s in (0, 1, 2)]
    assert row["run_ids"] == " ".join(ids) and row["seeds"] == "3"
    gaps = [float(rows[i]["gap"]) for i in ids]
    np.testing.assert_allclose(float(row["gap_mean"]), np.mean(gaps))
    np.testing.assert_allclose(float(row["gap_std"]), np.std(gaps, ddof=1))
    assert row["paired_seeds"] == "3"
    assert row["candidates"] == "2"


def test_status_table_only_dry_run_and_figures_on_a_two_stage_sweep(
  two_stage_done, tmp_path, capsys
):
  config, out = two_stage_done
  table = open(os.path.join(out, "table.md")).read()
  capsys.readouterr()
  assert sweep.main([config, "--out", out, "--status"]) == 0
  text = capsys.readouterr().out
  counts = dict(line.split(": ")[:2] for line in text.splitlines())
  assert int(counts["completed"]) + int(counts["diverged"]) == 12
  assert counts["pending"] == counts["failed"] == counts["stage 2 unknown"] == "0"
  assert sweep.main([config, "--out", out, "--table-only"]) == 0
  assert "12 of 12 runs finished" in capsys.readouterr().out
  assert open(os.path.join(out, "table.md")).read() == table
  assert sweep.main([config, "--out", str(tmp_path / "fresh"), "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[:-1] == STAGE1 and lines[-1].startswith("# stage 2:")
  assert "3 groups depends on the selection" in lines[-1]
  assert sweep.main([config, "--out", out, "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 13 and lines[6:12] == [r["run_id"] for r in stage2_rows(out)]
  paths = plot_main.draw(out, str(tmp_path / "figs"))
  assert {os.path.basename(p) for p in paths} == {
    "sweep_two_stage_curves_steps.png",
    "sweep_two_stage_final_vs_k.png",
    "sweep_two_stage_lr_sensitivity.png",
  }


def stage2_rows(out):
  return [r for r in read_csv(os.path.join(out, "results.csv")) if r["seed"] != "0"]


def test_resume_redoes_only_missing_stage_two_runs_and_a_moved_choice_is_not_counted(
  two_stage_done, tmp_path
):
  config, done = two_stage_done
  out = str(tmp_path / "copy")
  shutil.copytree(done, out)
  # A partial stage 2: one stage-2 run never finished.
  gone = stage2_rows(out)[0]["run_id"]
  shutil.rmtree(worker.run_dir(out, gone))
  for kind in ("json", "log"):
    os.remove(worker.job_file(out, gone, kind))
  assert sweep.main([config, "--out", out, "--jobs", "2"]) == 0
  ids = sorted(r["run_id"] for r in read_csv(os.path.join(out, "results.csv")))
  assert len(ids) == 12 and gone in ids
  assert all(starts(out, r) == 1 for r in ids)  # the others were skipped, not redone
  # The choice of sync moves (its other stage-1 candidate now scores better): the old choice's
  # stage-2 runs drop out of the results, the new choice's are run.
  old = _chosen_on_seed0(out)[("sync", "")]
  new = next(r for r in ("sync-lr0.03-s0", "sync-lr0.1-s0") if r != old)
  path = os.path.join(worker.run_dir(out, new), "summary.json")
  summary = json.load(open(path))
  summary["gap"] = 0.0
  json.dump(summary, open(path, "w"))
  assert sweep.main([config, "--out", out, "--jobs", "2"]) == 0
  ids = {r["run_id"] for r in read_csv(os.path.join(out, "results.csv"))}
  assert {new[:-2] + "s1", new[:-2] + "s2"} <= ids
  assert not {old[:-2] + "s1", old[:-2] + "s2"} & ids
  assert len(ids) == 12
  selection = {r["name"]: r for r in read_csv(os.path.join(out, "selection.csv"))}
  assert selection["sync"]["run_ids"] == " ".join(new[:-2] + f"s{s}" for s in (0, 1, 2))


def test_a_sweep_without_tune_seeds_runs_every_seed_as_before(tmp_path, capsys):
  config, out = tiny_sweep(tmp_path, TINY)
  assert sweep.main([config, "--out", out, "--dry-run"]) == 0
  ids = capsys.readouterr().out.split()
  assert ids == [r.run_id for r in spec_lib.load(config).runs()] and len(ids) == 8
  assert not any(line.startswith("#") for line in ids)
