"""Sweeps: the spec, fair selection, resumability under a kill, divergence, the shipped quick
sweep end to end, and the figures drawn from a sweep directory."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from experiments import sweep
from experiments.plot import __main__ as plot_main
from experiments.sweep_lib import results
from experiments.sweep_lib import select
from experiments.sweep_lib import spec as spec_lib
from experiments.sweep_lib import worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A sweep of tiny convergence runs (one device, a second or two each, mostly process start):
# 8 runs (two seeds), two of which diverge (local SGD at a step size of 100 blows up on this problem).
TINY = textwrap.dedent(
  """
  name = "tiny"
  task = "convergence"
  seeds = [0, 1]
  reference = "sync"

  [base]
  problem = { kind = "separable", d = 4 }
  workers = 2
  steps = 16
  log_every = 4

  [[optimizers]]
  name = "sync"
  variant = "sync_adam"
  learning_rate = [0.03, 0.1]

  [[optimizers]]
  name = "sgd"
  variant = "local_sgd"
  k = 4
  learning_rate = [0.1]

  [[optimizers]]
  name = "sgd_blowup"
  variant = "local_sgd"
  k = 4
  learning_rate = 100.0
  """
)


def checkpointed_ctr_sweep(name: str, learning_rate: str) -> str:
  """A two-device CTR sweep of k-step Adam that checkpoints every 4 of its 10 steps."""
  return textwrap.dedent(
    f"""
    name = "{name}"
    task = "ctr"
    [base]
    nodes = 1
    devices_per_node = 2
    batch_size = 16
    steps = 10
    log_every = 2
    eval_every = 0
    checkpoint_every = 4
    top_mlp = [16]
    table_rows = 4096
    host_cache_rows = 1024
    val_examples = 512
    test_examples = 512
    [[optimizers]]
    name = "kstep"
    optimizer = "kstep_adam"
    k = 2
    learning_rate = {learning_rate}
    """
  )


def tiny_sweep(tmp_path, text=TINY):
  path = tmp_path / "tiny.toml"
  path.write_text(text)
  return str(path), str(tmp_path / "out")


def starts(out_dir, run_id) -> int:
  """How many times a worker started the run (each attempt's log begins with 'start')."""
  path = worker.job_file(out_dir, run_id, "log")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(line.startswith("start ") for line in f)


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


# -- the spec ------------------------------------------------------------------------------
def test_grids_expand_seed_by_seed_with_stable_unique_ids():
  document = {
    "name": "s",
    "task": "ctr",
    "seeds": [0, 1],
    "base": {"steps": 5, "val_examples": 100, "top_mlp": [32, 16]},
    "optimizers": [
      {"name": "sync", "optimizer": "sync_adam", "learning_rate": [1e-3, 3e-3]},
      {"name": "ks", "optimizer": "kstep_adam", "k": [4, 16], "top_mlp": [[8], [64, 32]]},
    ],
    "quick": {"seeds": [3], "optimizers": ["ks"], "base": {"steps": 2}},
  }
  spec = spec_lib.parse(document)
  ids = [run.run_id for run in spec.runs()]
  assert ids[:6] == [
    "sync-lr0.001-s0",
    "sync-lr0.003-s0",
    "ks-k4-top_mlp8-s0",
    "ks-k4-top_mlp64x32-s0",
    "ks-k16-top_mlp8-s0",
    "ks-k16-top_mlp64x32-s0",
  ]
  assert len(ids) == len(set(ids)) == 12
  runs = {run.run_id: run for run in spec.runs()}
  assert runs["sync-lr0.003-s1"].params["top_mlp"] == (32, 16)  # a flat list is a value
  assert runs["ks-k16-top_mlp8-s1"].params["top_mlp"] == (8,)  # a list of lists a grid
  assert spec.group_fields() == ("k", "top_mlp")
  quick = spec_lib.parse(document, quick=True)
  assert quick.runs()[0].run_id == "ks-k4-top_mlp8-s3"
  assert all(run.params["steps"] == 2 for run in quick.runs())


@pytest.mark.parametrize(
  "text, message",
  [
    (
      'name = "s"\ntask = "ctr"\n[[optimizers]]\nname = "a"\nlernrate = 1',
      "'lernrate' is not a field",
    ),
    ('name = "s"\ntask = "nope"\n[[optimizers]]\nname = "a"', "task must be one of"),
    ('name = "s"\ntask = "ctr"\n[[optimizers]]\nname = "a"\n[[optimizers]]\nname = "a"', "unique"),
    ('name = "s"\ntask = "ctr"\nreference = "b"\n[[optimizers]]\nname = "a"', "reference 'b'"),
    ('name = "s"\ntask = "ctr"\n[[optimizers]]\nname = "a"\nk = []', "non-empty"),
    ('name = "s"\ntask = "ctr"\n[[optimizers]]\nname = "a"\nk = 0', "k must be"),
    ('name = "s"\ntask = "ctr"\n[[optimizers]]\nname = "a"', "validation set"),
    ('name = "s"\ntask = = "ctr"', "not valid TOML"),
  ],
)
def test_a_bad_sweep_file_is_refused_naming_the_file_and_the_problem(tmp_path, text, message):
  path = tmp_path / "bad.toml"
  path.write_text(text)
  with pytest.raises(ValueError, match=message) as info:
    spec_lib.load(str(path)).runs()
  assert str(path) in str(info.value)


def test_shipped_sweep_compares_every_optimizer_and_its_quick_part_at_least_four():
  full = spec_lib.load(sweep.resolve("ctr_optimizers"))
  runs = full.runs()
  optimizers = {run.params["optimizer"] for run in runs}
  assert optimizers == {
    "sync_adam",
    "kstep_adam",
    "local_sgd",
    "diloco",
    "onebit_adam",
    "topk_ef",
  }
  syncs = {run.params.get("sync") for run in runs if run.params["optimizer"] == "kstep_adam"}
  assert syncs == {"params", "params+nu", "params+moments", "desloc"}
  assert any(run.params.get("form") == "local_adam" for run in runs)
  assert len(full.seeds) >= 3 and full.reference == "sync_adam"
  assert all(run.params["nodes"] == 2 and run.params["devices_per_node"] == 4 for run in runs)
  quick = spec_lib.load(sweep.resolve("ctr_optimizers"), quick=True)
  assert len({run.params["optimizer"] for run in quick.runs()}) >= 4


# -- fair selection on a hand-made table ---------------------------------------------------
def _row(name, lr, seed, val, test, k=None, status="completed"):
  return dict(
    run_id=f"{name}-k{k}-lr{lr}-s{seed}",
    name=name,
    seed=seed,
    status=status,
    k=k,
    learning_rate=lr,
    val_auc=val,
    test_auc=test,
  )


HAND_MADE = [
  # The reference: lr 0.1 wins on validation although lr 0.3 has the better test AUC.
  _row("ref", 0.1, 0, 0.70, 0.690),
  _row("ref", 0.1, 1, 0.72, 0.700),
  _row("ref", 0.3, 0, 0.69, 0.750),
  _row("ref", 0.3, 1, 0.69, 0.760),
  # k = 4: lr 1.0 has the best single seed but diverged on the other, so lr 0.3 wins.
  _row("opt", 0.3, 0, 0.71, 0.695, k=4),
  _row("opt", 0.3, 1, 0.71, 0.705, k=4),
  _row("opt", 0.3, 2, 0.71, 0.715, k=4),  # a seed the reference lacks: not paired
  _row("opt", 1.0, 0, 0.80, 0.80, k=4),
  _row("opt", 1.0, 1, None, None, k=4, status="diverged"),
  # k = 16: its own group.
  _row("opt", 0.3, 0, 0.60, 0.60, k=16),
  _row("opt", 0.3, 1, 0.62, 0.61, k=16),
]


def test_best_lr_is_chosen_on_validation_per_group_and_reported_on_test_over_seeds():
  chosen = select.select(
    HAND_MADE,
    group_by=["k"],
    tune=["learning_rate"],
    metric="val_auc",
    report="test_auc",
    reference="ref",
  )
  by_label = {s.label: s for s in chosen}
  assert list(by_label) == ["ref", "opt, k=4", "opt, k=16"]
  ref, k4, k16 = by_label["ref"], by_label["opt, k=4"], by_label["opt, k=16"]
  assert ref.tuned == {"learning_rate": 0.1}  # not 0.3, whose *test* AUC is higher
  np.testing.assert_allclose(ref.test, (0.695, np.std([0.69, 0.70], ddof=1)))
  assert k4.tuned == {"learning_rate": 0.3} and k4.seeds == (0, 1, 2)
  assert [c.diverged for c in k4.candidates] == [(), (1,)]
  np.testing.assert_allclose(k4.test, (0.705, 0.01))
  # Paired against the reference's own choice, on the seeds both have (0 and 1).
  assert k4.paired_seeds == (0, 1)
  np.testing.assert_allclose(k4.paired, (0.005, 0.0), atol=1e-12)
  np.testing.assert_allclose(k16.paired, (-0.09, np.std([-0.09, -0.09], ddof=1)), atol=1e-12)
  np.testing.assert_allclose(ref.paired, (0.0, 0.0))


def test_selection_refuses_a_repeated_run_and_an_ambiguous_reference():
  kwargs = dict(group_by=["k"], tune=["learning_rate"], metric="val_auc", report="test_auc")
  with pytest.raises(ValueError, match="same group, tuned values and seed"):
    select.select([*HAND_MADE, dict(HAND_MADE[0], run_id="again")], **kwargs)
  with pytest.raises(ValueError, match="exactly one group"):
    select.select(HAND_MADE, reference="opt", **kwargs)


def test_results_csv_round_trips():
  rows = [dict(run_id="a-s0", seed=0, learning_rate=0.003, test_auc=None, top_mlp=[8, 4])]
  path_text = results.csv_text(rows)
  assert path_text.splitlines()[1] == 'a-s0,0,0.003,,"[8, 4]"'


# -- resumable, parallel, sharded ----------------------------------------------------------
def test_a_sweep_killed_halfway_and_rerun_has_every_run_exactly_once(tmp_path):
  config, out = tiny_sweep(tmp_path)
  spec = spec_lib.load(config)
  run_ids = [run.run_id for run in spec.runs()]
  command = [sys.executable, "-m", "experiments.sweep", config, "--out", out, "--jobs", "2"]
  process = subprocess.Popen(
    command,
    cwd=REPO,
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:
    done = [r for r in run_ids if worker.read_summary(out, r) is not None]
    if len(done) >= 2:
      break
    assert process.poll() is None, "the sweep ended before it could be killed"
    time.sleep(0.05)
  os.killpg(process.pid, signal.SIGKILL)  # the sweep and its workers, at once
  process.wait()
  before = {r: worker.read_summary(out, r) for r in run_ids}
  finished_before = [r for r, s in before.items() if s is not None]
  assert 2 <= len(finished_before) < len(run_ids)
  # A run that died halfway: its directory has partial output and no summary.
  halfway = next(r for r in run_ids if before[r] is None)
  os.makedirs(worker.run_dir(out, halfway), exist_ok=True)
  with open(os.path.join(worker.run_dir(out, halfway), "metrics.jsonl"), "a") as f:
    f.write('{"kind": "train", "step": 4, "loss": 1.0}\n{"kind": "tra')  # cut mid-record
  assert sweep.main([config, "--out", out, "--jobs", "2"]) == 0
  rows = read_csv(os.path.join(out, "results.csv"))
  assert sorted(r["run_id"] for r in rows) == sorted(run_ids)  # each run exactly once
  for run_id in finished_before:  # kept, not redone
    assert worker.read_summary(out, run_id) == before[run_id]
    assert starts(out, run_id) == 1
  assert worker.read_summary(out, halfway) is not None
  # A third invocation finds nothing to do and changes nothing.
  summaries = {r: worker.read_summary(out, r) for r in run_ids}
  attempts = {r: starts(out, r) for r in run_ids}
  assert sweep.main([config, "--out", out]) == 0
  assert {r: worker.read_summary(out, r) for r in run_ids} == summaries
  assert {r: starts(out, r) for r in run_ids} == attempts


@pytest.fixture(scope="module")
def tiny_done(tmp_path_factory):
  """The tiny sweep, run as two shards one after the other (as two array jobs would)."""
  config, out = tiny_sweep(tmp_path_factory.mktemp("tiny"))
  assert sweep.main([config, "--out", out, "--jobs", "2", "--shard", "0/2"]) == 0
  assert sweep.main([config, "--out", out, "--jobs", "2", "--shard", "1/2"]) == 0
  return out


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tiny_done):
  out = tiny_done
  rows = {r["run_id"]: r for r in read_csv(os.path.join(out, "results.csv"))}
  assert len(rows) == 8
  for seed in (0, 1):
    blowup = rows[f"sgd_blowup-s{seed}"]
    assert blowup["status"] == "diverged" and int(blowup["diverged_at_step"]) >= 1
    assert blowup["gap"] == ""
  assert {r["status"] for k, r in rows.items() if "blowup" not in k} == {"completed"}
  # Each shard ran its own slice: every run started exactly once over the two.
  assert all(starts(out, run_id) == 1 for run_id in rows)
  table = open(os.path.join(out, "table.md")).read()
  assert "| sgd_blowup | 100 | – | – | 2 (1 of 1 candidates diverged) |" in table


def test_a_ctr_run_on_file_data_that_diverges_is_stopped_and_recorded(tmp_path):
  # Local SGD at a step size of 1e4 sends the dense tower to inf within a few steps; the
  # trainer stops the run at the first non-finite loss or gradient. The data is a
  # Criteo-format file, its validation set carved from the bytes before the test part.
  from kstep_adam import ctr

  data = tmp_path / "day.txt"
  ctr.SyntheticCTR(vocab_size=200, seed=1).write_criteo(str(data), 2000)
  config, out = tiny_sweep(
    tmp_path,
    textwrap.dedent(
      f"""
      name = "ctr_blowup"
      task = "ctr"
      [base]
      data = "criteo:{data}"
      val_fraction = 0.15
      nodes = 1
      devices_per_node = 2
      batch_size = 16
      steps = 12
      log_every = 2
      eval_every = 0
      top_mlp = [16]
      table_rows = 4096
      host_cache_rows = 1024
      [[optimizers]]
      name = "sgd"
      optimizer = "local_sgd"
      k = 2
      learning_rate = [1e-2, 1e4]
      """
    ),
  )
  assert sweep.main([config, "--out", out, "--jobs", "2"]) == 0
  rows = {r["run_id"]: r for r in read_csv(os.path.join(out, "results.csv"))}
  assert rows["sgd-lr0.01-s0"]["status"] == "completed"
  # A dozen steps on a small file: the metrics exist, their values are noise.
  assert 0 < float(rows["sgd-lr0.01-s0"]["test_auc"]) < 1
  assert 0 < float(rows["sgd-lr0.01-s0"]["val_auc"]) < 1
  summary = worker.read_summary(out, "sgd-lr0.01-s0")
  assert summary["val_examples"] + summary["test_examples"] < 2000 * 0.3
  diverged = worker.read_summary(out, "sgd-lr10000.0-s0")
  assert diverged["status"] == "diverged" and "not finite" in diverged["message"]
  assert 1 <= diverged["diverged_at_step"] <= 12
  assert rows["sgd-lr10000.0-s0"]["diverged_at_step"] == str(diverged["diverged_at_step"])


def test_killed_ctr_runs_resume_from_their_checkpoint_or_start_over(tmp_path):
  # Two ways a CTR run dies halfway. One was killed after its checkpoint at step 8: its
  # summary is gone and the checkpoint at step 10 lacks the manifest that commits it, so the
  # rerun resumes the run at step 8 (from the same dense state, table version and data
  # position). The other was killed before it recorded run.json: only a cut metrics.jsonl
  # is left, of no run, and the rerun starts it over. Both end as the uninterrupted runs did.
  from kstep_adam.ctr.run._checkpoint import step_dir

  config, out = tiny_sweep(
    tmp_path,
    checkpointed_ctr_sweep("ctr_resume", "[3e-3, 1e-2]"),
  )
  assert sweep.main([config, "--out", out, "--jobs", "2"]) == 0
  checkpointed, unrecorded = "kstep-lr0.003-s0", "kstep-lr0.01-s0"
  before = {r: worker.read_summary(out, r) for r in (checkpointed, unrecorded)}
  metrics = {}
  for run_id in before:
    with open(os.path.join(worker.run_dir(out, run_id), "metrics.jsonl")) as f:
      metrics[run_id] = [json.loads(line) for line in f]
  directory = worker.run_dir(out, checkpointed)
  os.unlink(os.path.join(directory, "summary.json"))
  checkpoints = os.path.join(directory, "checkpoints")
  os.unlink(os.path.join(step_dir(checkpoints, 10), "manifest.json"))
  resumed_from = os.stat(os.path.join(step_dir(checkpoints, 8), "manifest.json")).st_mtime_ns
  directory = worker.run_dir(out, unrecorded)
  shutil.rmtree(directory)
  os.makedirs(directory)
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    f.write('{"kind": "train", "step": 2, "loss": 0.7}\n{"kind": "tra')  # cut mid-record

  assert sweep.main([config, "--out", out, "--jobs", "2"]) == 0
  for run_id, summary in before.items():
    after = worker.read_summary(out, run_id)
    assert after["status"] == "completed" and starts(out, run_id) == 2
    for key in ("val_auc", "test_auc", "test_logloss", "steps", "dense_bytes_by_axis"):
      assert after[key] == summary[key], (run_id, key)
    with open(os.path.join(worker.run_dir(out, run_id), "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [r["step"] for r in metrics[run_id]]
  # Resumed, not redone: the checkpoint it resumed from is the one written the first time.
  manifest = os.path.join(step_dir(checkpoints, 8), "manifest.json")
  assert os.stat(manifest).st_mtime_ns == resumed_from
  rows = read_csv(os.path.join(out, "results.csv"))
  assert sorted(r["run_id"] for r in rows) == sorted(before)


def test_an_edited_config_is_refused_instead_of_mixing_two_experiments(tmp_path):
  config, out = tiny_sweep(tmp_path)
  spec = spec_lib.load(config)
  run = spec.runs()[0]
  os.makedirs(os.path.join(out, "jobs"))
  record = results.run_record(run, spec.task)
  record["params"]["steps"] = 999
  with open(worker.job_file(out, run.run_id, "json"), "w") as f:
    json.dump(record, f)
  with pytest.raises(SystemExit, match=f"{run.run_id} was made with other fields"):
    sweep.main([config, "--out", out])


# -- the shipped quick sweep, end to end, and its figures ----------------------------------
@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("quick") / "sweep")
  assert sweep.main(["ctr_optimizers", "--quick", "--out", out, "--jobs", "2"]) == 0
  return out


# The shipped quick sweep takes 45-70 s: on demand (`-m slow`); the tiny sweeps here run every
# mechanism it uses, and the plot test below draws every figure kind from a tiny CTR sweep.
@pytest.mark.slow
def test_quick_shipped_sweep_runs_every_optimizer_it_names(quick_sweep):
  spec = results.read_spec(quick_sweep)
  rows = results.read_results(os.path.join(quick_sweep, "results.csv"))
  assert len(rows) == len(spec.runs())
  assert len({r["optimizer"] for r in rows}) >= 4
  assert {r["status"] for r in rows} == {"completed"}
  for row in rows:
    assert 0.5 < row["val_auc"] < 1 and 0.5 < row["test_auc"] < 1
    assert row["measured_compute_seconds"] > 0 and row["compute_seconds_per_step"] > 0
  # Modelled wall time charges every run the sweep's median compute per step, plus its comm.
  per_step = float(np.median([r["compute_seconds_per_step"] for r in rows]))
  for row in rows:
    assert row["common_compute_seconds_per_step"] == pytest.approx(per_step)
    modelled = row["steps"] * per_step + row["estimated_comm_seconds"]
    assert row["modelled_seconds"] == pytest.approx(modelled)
  by_optimizer = {r["optimizer"]: r for r in rows}
  sync, kstep = by_optimizer["sync_adam"], by_optimizer["kstep_adam"]
  assert kstep["dense_inter_node_bytes"] < sync["dense_inter_node_bytes"]
  selection = read_csv(os.path.join(quick_sweep, "selection.csv"))
  assert len(selection) == len({r["name"] for r in rows})
  assert selection[0]["name"] == "sync_adam" and selection[0]["best_learning_rate"]


# A CTR sweep as small as the sweep's figures allow: two optimizers, one of them over k.
TINY_CTR_FIGURES = textwrap.dedent(
  """
  name = "ctr_optimizers"
  task = "ctr"
  reference = "sync_adam"
  [base]
  nodes = 2
  devices_per_node = 1
  batch_size = 16
  steps = 8
  log_every = 2
  eval_every = 4
  top_mlp = [16]
  table_rows = 4096
  host_cache_rows = 1024
  val_examples = 256
  test_examples = 256
  [[optimizers]]
  name = "sync_adam"
  optimizer = "sync_adam"
  learning_rate = [3e-3]
  [[optimizers]]
  name = "kstep_adam"
  optimizer = "kstep_adam"
  k = [2, 4]
  learning_rate = [3e-3]
  """
)


def test_plot_writes_every_sweep_figure_from_the_directory(tmp_path, capsys):
  config, out = tiny_sweep(tmp_path, TINY_CTR_FIGURES)
  assert sweep.main([config, "--out", out]) == 0
  capsys.readouterr()  # the sweep's own lines
  assert plot_main.main([out, "--out", str(tmp_path)]) == 0
  kinds = (
    "curves_steps",
    "curves_bytes",
    "curves_time",
    "final_vs_k",
    "lr_sensitivity",
    "time_to_target",
  )
  for kind in kinds:
    path = tmp_path / f"sweep_ctr_optimizers_{kind}.png"
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000, kind
  assert capsys.readouterr().out.count("wrote ") == len(kinds)


def test_plot_draws_a_convergence_sweep_and_the_committed_experiments(tiny_done, tmp_path):
  figures = tmp_path / "figures"
  paths = plot_main.draw(tiny_done, str(figures))
  # No grid over k here, so no figure against k; no bytes or wall time in this task.
  assert {os.path.basename(p) for p in paths} == {
    "sweep_tiny_curves_steps.png",
    "sweep_tiny_lr_sensitivity.png",
  }
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC
  # The committed paper and convergence figures come out of the same module unchanged.
  for results_dir in ("results/reproduce_paper", "results/convergence_rate"):
    for path in plot_main.draw(os.path.join(REPO, results_dir), str(figures)):
      with (
        open(path, "rb") as new,
        open(os.path.join(REPO, "figures", os.path.basename(path)), "rb") as old,
      ):
        assert new.read() == old.read(), path
  with pytest.raises(ValueError, match="not a results directory"):
    plot_main.kind_of(str(tmp_path))


@pytest.mark.slow
def test_a_ctr_run_killed_inside_its_table_flush_resumes_exactly_in_the_rerun(
  tmp_path, monkeypatch
):
  """Issue 17 item 1: the run is SIGKILLed at its table flush's commit point in its second
  checkpoint (step 8); the rerun of the sweep resumes it from step 4, and it ends with the
  uninterrupted sweep's test AUC, losses and table rows, bit for bit."""
  from kstep_adam import _faults
  from kstep_adam import embedding

  text = checkpointed_ctr_sweep("ctr_flush_kill", "3e-3")
  config, out = tiny_sweep(tmp_path, text)
  reference = str(tmp_path / "reference")
  monkeypatch.delenv(_faults.ENV, raising=False)
  assert sweep.main([config, "--out", reference]) == 0
  monkeypatch.setenv(_faults.ENV, "flush.committed@2")
  assert sweep.main([config, "--out", out]) != 0
  monkeypatch.delenv(_faults.ENV)
  assert sweep.main([config, "--out", out]) == 0
  run_id = "kstep-s0"
  got, want = (worker.read_summary(d, run_id) for d in (out, reference))
  assert got["status"] == "completed" and starts(out, run_id) == 2
  for key in ("val_auc", "test_auc", "test_logloss", "steps"):
    assert got[key] == want[key], key
  records = []
  for directory in (out, reference):
    with open(os.path.join(worker.run_dir(directory, run_id), "metrics.jsonl")) as f:
      records.append([(r["step"], r.get("loss")) for r in map(json.loads, f)])
  assert records[0] == records[1]
  rows = []
  for directory in (out, reference):
    with embedding.open_table(os.path.join(worker.run_dir(directory, run_id), "table")) as table:
      rows.append(table.pull(np.arange(4096)))
      table.close(flush=False)
  np.testing.assert_array_equal(rows[0], rows[1])
