"""Two processes of two simulated CPU devices train the CTR model as one process does.

Each test starts ``python -m kstep_adam.launch --num-processes 2`` on
``tests/ctr/run/_processes_worker.py``, so it covers the launcher, the distributed setup from
its environment, the per-process data, the table sharded by ``row % 2`` and exchanged with
all-to-alls, and the rank-0 outputs, against the one-process run of the same flags in this
process (its mesh is the first four of the suite's eight devices).
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import train_ctr
from experiments._common import read_jsonl
from kstep_adam import _distributed
from kstep_adam import _faults
from kstep_adam import ctr

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = str(pathlib.Path(HERE).parents[2])  # the repository

# Small, but with every mechanism in play: merges at steps 4, 8, 12 (the hierarchical route
# over processes), an evaluation mid-run, several hundred rows per owner per step.
BASE = dict(
  nodes=2,
  devices_per_node=2,
  batch_size=64,
  steps=12,
  k=4,
  table_rows=1 << 14,
  embed_dim=8,
  log_every=4,
  eval_every=6,
  test_examples=2000,
)
# In CI: the global merge (the hierarchical route over both axes), the second moment merged
# too, exact sparse Adam (rows caught up on every pull), rows prefetched.
RUN = dict(BASE, sync="params+nu", sparse_mode="exact")
# Slow: node-local merges every step and across processes every k, lazy sparse Adam, no
# prefetch.
SLOW_RUN = dict(BASE, merge="node", prefetch=False)


def launch(
  out_dir, runs: dict, *, timeout: float = 600, fault: str | None = None, cwd: str = ROOT
) -> subprocess.CompletedProcess:
  """``fault``: a kill at a named point (``KSTEP_ADAM_FAULT``, :mod:`kstep_adam._faults`);
  ``cwd``: the directory a relative ``out_dir`` is in."""
  command = [
    sys.executable,
    "-m",
    "kstep_adam.launch",
    "--num-processes",
    "2",
    "--grace-seconds",
    "60",
    "--",
    sys.executable,
    os.path.join(HERE, "_processes_worker.py"),
    str(out_dir),
    *(f"{name}={json.dumps(fields)}" for name, fields in runs.items()),
  ]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop(_faults.ENV, None)
  if fault is not None:
    env[_faults.ENV] = fault
  return subprocess.run(
    command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
  )


def one_process_run(fields: dict, out_dir):
  data_names = {f.name for f in dataclasses.fields(ctr.DataConfig)}
  data = ctr.DataConfig(**{k: v for k, v in fields.items() if k in data_names})
  config = ctr.TrainConfig(**{k: v for k, v in fields.items() if k not in data_names})
  return ctr.train(config, ctr.make_source(data, config), str(out_dir), return_state=True)


def test_two_processes_match_one(tmp_path):
  """Same files, same parameters to float32 rounding: the two runs add the same terms in
  another order (a row's gradient is a psum over each process's devices and then a sum of
  the processes' shares on its owner, instead of one pmean; the dense merges' all-reduce goes
  over gloo), and Adam's m / sqrt(v) keeps such differences at rounding size, not at the
  size of a step."""
  check_twins(tmp_path, "run", RUN)


@pytest.mark.slow
def test_two_processes_match_one_with_node_merges_lazy_adam_and_no_prefetch(tmp_path):
  check_twins(tmp_path, "slow_run", SLOW_RUN)


def check_twins(tmp_path, name: str, fields: dict) -> None:
  done = launch(tmp_path / "two", {name: fields})
  assert done.returncode == 0, done.stdout[-4000:]
  stdout, run_dir = done.stdout, tmp_path / "two" / name
  summary, state = one_process_run(fields, tmp_path / "one")
  # Rank 0 wrote the same files as the one-process run; rank 1 wrote nothing there.
  written = sorted(p for p in os.listdir(run_dir) if not p.startswith("state-"))
  assert written == sorted(os.listdir(tmp_path / "one")) and "summary.json" in written
  assert f"[rank 0] {name}: done" in stdout and f"[rank 1] {name}: done" in stdout
  got = json.loads((run_dir / "summary.json").read_text())
  assert got["processes"] == 2 and summary["processes"] == 1
  assert set(got) == set(summary)
  np.testing.assert_allclose(got["test_auc"], summary["test_auc"], rtol=1e-5)
  np.testing.assert_allclose(got["test_logloss"], summary["test_logloss"], rtol=1e-5)
  assert got["dense_bytes_by_axis"] == summary["dense_bytes_by_axis"]
  assert got["test_examples"] == summary["test_examples"]
  assert got["sparse_transport"] == "all_to_all"
  # Process 0's host-device copies: the exchange's ids and rows in, the gradients out, and
  # its share of the batches; the evaluations' apart.
  traffic = got["host_device_bytes"]
  assert {"counts", "ids", "rows", "batch", "read"} <= set(traffic["to_device"])
  assert {"counts", "ids", "grads", "read"} <= set(traffic["to_host"])
  per_step = got["host_device_bytes_per_step"]
  assert per_step["embedding"] > 0 and per_step["batch"] > 0
  # Its batch share is half the one-process run's batch inputs.
  assert per_step["batch"] == summary["host_device_bytes_per_step"]["batch"] / 2
  records = read_jsonl(run_dir / "metrics.jsonl")
  reference = read_jsonl(tmp_path / "one" / "metrics.jsonl")
  assert [(r["kind"], r["step"]) for r in records] == [(r["kind"], r["step"]) for r in reference]
  np.testing.assert_allclose(
    [r.get("loss", r.get("test_logloss")) for r in records],
    [r.get("loss", r.get("test_logloss")) for r in reference],
    rtol=1e-5,
  )
  # The table: every row the one process pushed was pushed by its owner, and holds the same.
  shards = [np.load(run_dir / f"state-{rank}.npz") for rank in (0, 1)]
  for rank, shard in enumerate(shards):
    assert np.all(shard["row_ids"] % 2 == rank)
  row_ids = np.concatenate([s["row_ids"] for s in shards])
  order = np.argsort(row_ids)
  np.testing.assert_array_equal(row_ids[order], state["row_ids"])
  rows = np.concatenate([s["rows"] for s in shards])[order]
  # A row with a tiny second moment magnifies last-digit differences the most (largest:
  # 7.7e-6, and 1.3e-5 once the pair interaction's Gram matrices were padded from 27 to 28
  # vectors, which rounds differently); a sparse Adam step moves a row by about 2e-2.
  np.testing.assert_allclose(rows, state["rows"], rtol=1e-5, atol=5e-5)
  # Every worker's dense replica.
  np.testing.assert_array_equal(np.concatenate([s["workers"] for s in shards]), np.arange(4))
  for path, value in jax.tree_util.tree_flatten_with_path(state["params_W"])[0]:
    key = f"param{jax.tree_util.keystr(path)}"
    got_W = np.concatenate([s[key] for s in shards])
    np.testing.assert_allclose(got_W, np.asarray(value), rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_a_killed_process_ends_the_run_with_its_rank_named_and_the_run_resumes_exactly(tmp_path):
  """Rank 1 SIGKILLs itself after step 6 (a checkpoint was taken at step 4); rank 0 fails at
  its next collective and says so, and the launcher names rank 1 and the signal (the
  subprocess timeout bounds the wait). Resumed, the run ends as one that never stopped: every
  process reopened its shard at the checkpoint's version for it."""
  fields = dict(BASE, checkpoint_every=4)
  done = launch(tmp_path, {"whole": fields}, timeout=400)
  assert done.returncode == 0, done.stdout[-4000:]
  done = launch(tmp_path, {"cut": dict(fields, kill_at=[1, 6])}, timeout=400)
  assert done.returncode == 128 + 9, done.stdout[-4000:]
  assert "[rank 1] killing myself after step 6" in done.stdout
  assert "[launch] rank 1 failed first: was killed by signal SIGKILL" in done.stdout
  assert "[rank 0] process 0 of 2 failed:" in done.stdout  # found by rank 0 itself
  assert "rank 0 exited with status 1" in done.stdout
  assert "the run went on" not in done.stdout
  manifests = sorted((tmp_path / "cut" / "checkpoints").glob("*/manifest.json"))
  assert [json.loads(m.read_text())["step"] for m in manifests] == [4]
  done = launch(tmp_path, {"cut": dict(fields, resume=True)}, timeout=400)
  assert done.returncode == 0, done.stdout[-4000:]
  _assert_same_run(tmp_path / "cut", tmp_path / "whole")


@pytest.mark.slow
def test_a_kill_inside_a_shards_table_flush_resumes_exactly(tmp_path):
  """Rank 1 is SIGKILLed at its shard's flush commit point in the second checkpoint (step 8)
  (issue 17 item 1): resumed, rank 1's shard redoes that flush on reopening and reverts it to
  the step-4 checkpoint's version, and the run ends as one that never stopped, bit for bit.
  The output directory is relative, with a space (issue 17 item 10)."""
  fields = dict(BASE, checkpoint_every=4)
  out = "out dir"  # relative to the processes' working directory, tmp_path
  # One process runs both: "whole" flushes 4 times (steps 4, 8, 12, and when the worker reads
  # its shard), so the 6th is "cut"'s 2nd.
  runs = {"whole": fields, "cut": fields}
  done = launch(out, runs, timeout=400, fault="flush.committed@6:1", cwd=str(tmp_path))
  assert done.returncode != 0, done.stdout[-4000:]
  assert "[rank 1] whole: done" in done.stdout and "cut: done" not in done.stdout
  root = tmp_path / out
  manifests = sorted((root / "cut" / "checkpoints").glob("*/manifest.json"))
  assert [json.loads(m.read_text())["step"] for m in manifests] == [4]
  done = launch(out, {"cut": dict(fields, resume=True)}, timeout=400, cwd=str(tmp_path))
  assert done.returncode == 0, done.stdout[-4000:]
  _assert_same_run(root / "cut", root / "whole")


def _assert_same_run(cut, whole) -> None:
  """The resumed run ``cut`` ended as the uninterrupted ``whole``: test AUC, losses, every
  dense replica and every row of both shards, bit for bit."""
  same = ("test_auc", "test_logloss", "steps", "dense_bytes_by_axis", "sparse_bytes_by_axis")
  got, want = (json.loads((d / "summary.json").read_text()) for d in (cut, whole))
  assert {k: got[k] for k in same} == {k: want[k] for k in same}
  records, reference = read_jsonl(cut / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl")
  assert [r.get("loss", r.get("test_auc")) for r in records] == [
    r.get("loss", r.get("test_auc")) for r in reference
  ]
  for rank in (0, 1):
    resumed, uninterrupted = (np.load(d / f"state-{rank}.npz") for d in (cut, whole))
    assert resumed["all_rows"].size
    for key in uninterrupted.files:
      if key.startswith("param") or key == "all_rows":
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


def test_train_ctr_refuses_a_node_count_other_than_the_processes(monkeypatch, capsys):
  monkeypatch.setenv(_distributed.ENV_COORDINATOR, "127.0.0.1:1")
  monkeypatch.setenv(_distributed.ENV_NUM_PROCESSES, "2")
  monkeypatch.setenv(_distributed.ENV_PROCESS_ID, "0")
  with pytest.raises(SystemExit):  # before anything connects or starts JAX
    train_ctr.main(["--nodes", "1", "--devices-per-node", "2"])
  assert (
    "--nodes 1 with 2 processes: the 'node' axis spans the processes" in capsys.readouterr().err
  )


def test_train_ctr_refuses_the_device_tier_with_several_processes(monkeypatch, capsys):
  monkeypatch.setenv(_distributed.ENV_COORDINATOR, "127.0.0.1:1")
  monkeypatch.setenv(_distributed.ENV_NUM_PROCESSES, "2")
  monkeypatch.setenv(_distributed.ENV_PROCESS_ID, "0")
  with pytest.raises(SystemExit):  # before anything connects or starts JAX
    train_ctr.main(["--nodes", "2", "--devices-per-node", "2", "--device-cache-rows", "4096"])
  assert "device_cache_rows=4096 with processes=2" in capsys.readouterr().err
