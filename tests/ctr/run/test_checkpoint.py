"""Checkpoint and exact resume of a CTR run (issue 9, part 1).

A run killed with SIGKILL (a real one, of a separate process) and resumed from its latest
checkpoint ends with exactly the uninterrupted run's dense parameters, table rows, metric
records and summary, bit for bit: all but the fields that describe the processes (times,
compilations, cache counters), listed below. A kill in the middle of writing a checkpoint
leaves the previous one loadable, also when the table was already flushed past it.
"""

import dataclasses
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_parallel import _diverging_step
from test_parallel import _spread

import kstep_adam
from kstep_adam import _faults
from kstep_adam import ctr
from kstep_adam import embedding
from kstep_adam import parallel
from kstep_adam._dispatch import optimizer_step
from kstep_adam.ctr.run import _checkpoint
from kstep_adam.ctr.train._optimizer import sparse_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))

# What differs by nature between a resumed run and an uninterrupted one: wall time (and
# throughput), programs each process compiles again, and the counters of each process's
# cache. Every other field must be equal.
PROCESS_SUMMARY_FIELDS = {
  "examples_per_sec",
  "train_seconds",
  "compile_steps",
  "compile_step_seconds",
  "time_breakdown_seconds",
  "measured_compute_seconds",
  "table_stats",
  "host_device_bytes",
  "host_device_bytes_per_step",
  "step_seconds_by_kind",
}
PROCESS_METRICS_FIELDS = {
  "examples_per_sec",
  "seconds",
  "hit_rate",
  "measured_compute_seconds",
  "step_seconds_by_kind",
}

CONFIG = dict(
  batch_size=16,
  k=4,  # merges at 4, 8, ...: checkpoints every 3 steps fall between and on them
  table_rows=1 << 14,
  host_cache_rows=1 << 12,
  log_every=2,
  eval_every=5,
  checkpoint_every=3,
)
SYNTHETIC = {"vocab_size": 300, "test_examples": 512}


def _file_data(path, lines=1300):
  """A Criteo file with a known teacher and two bad lines (skipped and counted)."""
  ctr.SyntheticCTR(vocab_size=300, seed=4).write_criteo(str(path), lines)
  text = path.read_text().splitlines(keepends=True)
  for i in (40, 700):
    text[i] = "1\tnot enough fields\n"
  path.write_text("".join(text))
  return str(path)


def _run(out, config_kwargs, data, cache, *, kill=None, fault=None, resume=False, timeout=300):
  """A run in its own process (``_resume_worker.py``), to its end or killed as ``kill``
  says, or at the fault point ``fault`` (``POINT@N``, :mod:`kstep_adam._faults`); the
  processes share a compilation cache, so only the first compiles."""
  spec = {
    "out": str(out),
    "config": config_kwargs,
    "data": data,
    "kill": kill,
    "resume": resume,
    "cache": str(cache),
  }
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(HERE).parents[2]))
  env.pop(_faults.ENV, None)
  if fault is not None:
    env[_faults.ENV] = fault
  proc = subprocess.Popen(
    [sys.executable, os.path.join(HERE, "_resume_worker.py"), json.dumps(spec)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  if kill is not None and kill["at"] == "step":  # it waits at that step: kill it there
    deadline = time.monotonic() + timeout
    while not os.path.exists(str(out) + ".paused") and proc.poll() is None:
      assert time.monotonic() < deadline, "the worker never reached its step"
      time.sleep(0.05)
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
  output, _ = proc.communicate(timeout=timeout)
  expected = 0 if kill is None and fault is None else -signal.SIGKILL
  assert proc.returncode == expected, output.decode()[-3000:]


def _result(out):
  """What a finished run left: summary, metric records, dense parameters, table rows."""
  out = str(out)
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(out, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  with np.load(out + ".params.npz") as params:
    leaves = [params[f"arr_{i}"] for i in range(len(params.files))]
  config = ctr.TrainConfig(
    **{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()}
  )
  # The run's sparse Adam: a table made with a learning-rate schedule needs it given again.
  table = embedding.open_table(os.path.join(out, "table"), optimizer=sparse_optimizer(config))
  try:
    table_step, rows = table.step, table.pull(np.arange(summary["config"]["table_rows"]))
  finally:
    table.close(flush=False)
  return summary, records, leaves, table_step, rows


def _assert_same_run(got, want):
  """Everything but the process fields is equal, bit for bit."""
  (summary, records, leaves, table_step, rows) = got
  (ref_summary, ref_records, ref_leaves, ref_table_step, ref_rows) = want
  assert set(summary) == set(ref_summary)
  for key in set(ref_summary) - PROCESS_SUMMARY_FIELDS - {"config"}:
    assert summary[key] == ref_summary[key], key
  # Each run has its own table in its own directory; the rest of the config is the same.
  assert {**summary["config"], "table_dir": None} == {**ref_summary["config"], "table_dir": None}
  assert len(records) == len(ref_records)
  for record, ref_record in zip(records, ref_records):
    assert set(record) == set(ref_record)
    for key in set(ref_record) - PROCESS_METRICS_FIELDS:
      assert record[key] == ref_record[key], (record["kind"], record["step"], key)
  assert len(leaves) == len(ref_leaves)
  for leaf, ref_leaf in zip(leaves, ref_leaves):
    np.testing.assert_array_equal(leaf, ref_leaf)
  assert table_step == ref_table_step == summary["steps"]
  np.testing.assert_array_equal(rows, ref_rows)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """JAX's compilation cache, shared by every process of this module: one compiles."""
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, cache):
  """An uninterrupted run over two passes of a file, read in small blocks."""
  root = tmp_path_factory.mktemp("file_run")
  data = {"file": _file_data(root / "day.txt"), "block_bytes": 4096}
  config_kwargs = dict(CONFIG, steps=None, epochs=2)
  _run(root / "reference", config_kwargs, data, cache)
  reference = _result(root / "reference")
  # Two whole passes: epochs counts passes, whatever the estimate said before the first ended.
  source = ctr.file_source(data["file"], skip_bad_lines=True, block_bytes=data["block_bytes"])
  list(source.train_epoch(0, 128))
  assert reference[0]["steps"] == 2 * source.steps_per_epoch(128)
  return config_kwargs, data, reference


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, cache):
  """An uninterrupted run on synthetic data, its learning rates on a cosine schedule (whose
  step counts the checkpoints must restore too)."""
  root = tmp_path_factory.mktemp("synthetic_run")
  data = {"synthetic": SYNTHETIC}
  config_kwargs = dict(CONFIG, steps=11, lr_schedule="cosine")
  _run(root / "reference", config_kwargs, data, cache)
  return config_kwargs, data, _result(root / "reference")


# A kill at a random step: the tests below inject it at every point of a checkpoint instead,
# so this one runs on demand (`-m slow`), as a check from outside the fault-injection points.
@pytest.mark.slow
def test_a_run_killed_at_a_random_step_resumes_to_exactly_the_same_result(
  tmp_path, cache, file_run
):
  config_kwargs, data, reference = file_run
  ref_summary = reference[0]
  assert ref_summary["data"]["lines_skipped"] == 2
  kill_step = random.Random().randint(CONFIG["checkpoint_every"] + 1, ref_summary["steps"] - 1)
  out = tmp_path / "run"
  _run(out, config_kwargs, data, cache, kill={"at": "step", "step": kill_step})
  latest = _checkpoint.latest_checkpoint(str(out / "checkpoints"))
  # The pause comes after the step's hooks, before its own checkpoint.
  assert latest.step == (kill_step - 1) // 3 * 3, kill_step
  _run(out, config_kwargs, data, cache, resume=True)
  _assert_same_run(_result(out), reference)


# Where a kill at each point of the second checkpoint (step 6) leaves the latest complete
# checkpoint; the points up to the manifest keep the one at step 3. Every point of the table
# flush after its commit point leaves the table ahead of that checkpoint: the resumed run
# redoes the flush's copy on reopening, then reverts it to the checkpoint's version.
KILL_POINTS = {point: 3 for point in _faults.POINTS} | {
  "checkpoint.manifest": 6,
  "checkpoint.pruned": 6,
}
FAST_KILL_POINTS = {"flush.committed", "checkpoint.manifest"}


@pytest.mark.parametrize(
  "point",
  [p if p in FAST_KILL_POINTS else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS],
)
def test_a_kill_at_any_point_of_a_checkpoint_resumes_exactly(tmp_path, cache, synthetic_run, point):
  """SIGKILL at each named point of the checkpoint sequence (dense, host state, the table
  flush's log append, commit point, copy, step, clear, manifest, pruning): the resumed run
  ends with the uninterrupted run's test AUC, losses, dense state and table rows, bit for bit."""
  config_kwargs, data, reference = synthetic_run
  out = tmp_path / "run"
  _run(out, config_kwargs, data, cache, fault=f"{point}@2")
  checkpoints = out / "checkpoints"
  assert _checkpoint.latest_checkpoint(str(checkpoints)).step == KILL_POINTS[point]
  _run(out, config_kwargs, data, cache, resume=True)
  _assert_same_run(_result(out), reference)
  assert not os.path.exists(checkpoints / "step_000000003")  # kept: the newest two


@pytest.fixture(scope="module")
def merging_run(tmp_path_factory, cache):
  """An uninterrupted run whose table is large enough that the checkpoints' flushes keep
  their rows in segments, merged into the chunks in the background beside training."""
  root = tmp_path_factory.mktemp("merging_run")
  config_kwargs = dict(CONFIG, steps=11, table_rows=1 << 15)
  data = {"synthetic": SYNTHETIC}
  _run(root / "reference", config_kwargs, data, cache)
  reference = _result(root / "reference")
  assert reference[0]["table_stats"]["background_merges"] >= 1  # what is killed below
  return config_kwargs, data, reference


@pytest.mark.parametrize("point", _faults.MERGE_POINTS)
def test_a_kill_inside_a_background_merge_of_the_table_resumes_exactly(
  tmp_path, cache, merging_run, point
):
  """SIGKILL at each point of the table's background merge: the resumed run ends as the
  uninterrupted one, bit for bit."""
  config_kwargs, data, reference = merging_run
  out = tmp_path / "run"
  _run(out, config_kwargs, data, cache, fault=f"{point}@1")
  _run(out, config_kwargs, data, cache, resume=True)
  _assert_same_run(_result(out), reference)


def test_the_step_counter_of_a_restored_checkpoint_decides_the_next_merge(tmp_path):
  """The optimizer state owns the step count (issue 9): a state restored from a checkpoint
  after 2 steps (k=3) merges on its 3rd step in a new process's step function, which has
  counted nothing itself."""
  mesh = parallel.make_mesh(1, 4)
  tx = kstep_adam.kstep_adam(0.1, 3, axis_name=("node", "local"))
  params_W, state_W = parallel.init_replicas({"w": np.zeros(3, np.float32)}, tx, mesh)
  step = _diverging_step(mesh, tx)
  for _ in range(2):
    params_W, state_W = step(params_W, state_W, jnp.float32(1.0))
  dense = {"params_W": params_W, "opt_state_W": state_W}
  version = embedding.TableVersion(step=2, database="db", generation=1)
  checkpoint = _checkpoint.save_checkpoint(
    str(tmp_path), 2, dense, {"step": 2}, lambda: version, keep=1
  )
  assert _checkpoint.latest_checkpoint(str(tmp_path)) == checkpoint
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), dense
  )
  restored, host = _checkpoint.load_checkpoint(checkpoint, abstract)
  assert host == {"step": 2} and optimizer_step(restored["opt_state_W"]) == 2
  assert _spread(restored["params_W"]) > 0.01
  fresh = _diverging_step(mesh, tx)
  merged, _ = fresh(restored["params_W"], restored["opt_state_W"], jnp.float32(1.0))
  assert fresh.step == 3 and _spread(merged) < 1e-6  # the count-3 merge ran


def test_a_saved_host_state_round_trips_through_run_state(tmp_path, tiny_config, tiny_source):
  """host.json -> RunState (+ its parts) -> host.json is the identity, and a key that is
  missing is named with the file."""
  from kstep_adam.ctr.run._state import RunState

  config = dataclasses.replace(tiny_config, checkpoint_every=3)
  ctr.train(config, tiny_source(config), str(tmp_path / "out"))
  checkpoint = _checkpoint.latest_checkpoint(str(tmp_path / "out" / "checkpoints"))
  with open(os.path.join(checkpoint.path, _checkpoint.HOST_STATE)) as f:
    host = json.load(f)

  class Part:
    def restore(self, state):
      self.value = state

    def state(self):
      return self.value

  parts = {name: Part() for name in ("meter", "monitor", "timer", "adaptive")}
  run_state = RunState.from_json(host, parts, where="host.json")
  assert json.dumps(run_state.to_json(host["step"], host["table_step"], parts)) == json.dumps(host)
  with pytest.raises(ValueError, match=r"host\.json has no 'evals'"):
    RunState.from_json({k: v for k, v in host.items() if k != "evals"}, parts, where="host.json")
