"""Issue 17, items 6-8, 11 and 12: nothing stuck after a kill, nothing written before a
refusal, a signal stops a run at a step boundary, and every user error is one line."""

import errno
import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments import train_ctr
from kstep_adam import _jsonio
from kstep_adam import ctr
from kstep_adam.ctr.run import _checkpoint
from kstep_adam.ctr.run._rundir import RunDirectory
from kstep_adam.ctr.run._rundir import run_identity

REPO = str(pathlib.Path(__file__).resolve().parents[3])  # tests/ctr/run/ -> the repository
# A small run of the command line (one step program to compile: sync Adam).
FLAGS = ["--optimizer", "sync_adam", "--batch-size", "16", "--steps", "6", "--log-every", "2"]
FLAGS += ["--table-rows", "16384", "--host-cache-rows", "4096", "--eval-every", "0"]
FLAGS += ["--vocab-size", "20", "--test-examples", "512", "--checkpoint-every", "3"]
FLAGS += ["--no-progress"]


def _config_and_source():
  args = train_ctr.make_parser().parse_args(FLAGS)
  config, data = train_ctr.build(args)
  return config, ctr.make_source(data, config)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run of :data:`FLAGS` with checkpoints, and its summary."""
  out = tmp_path_factory.mktemp("finished") / "out"
  summary = train_ctr.main([*FLAGS, "--out", str(out)])
  return out, summary


@pytest.fixture
def copy(tmp_path, finished):
  out, _ = finished
  shutil.copytree(out, tmp_path / "out")
  return tmp_path / "out"


def _temporaries(out) -> list[str]:
  """What a kill inside each atomic write of the run leaves: a temporary file per output."""
  names = []
  for name in ("summary.json", "metrics.jsonl", "run.json"):  # as _jsonio.write_atomic names
    names.append(f".{name}.{secrets.token_hex(6)}.tmp")  # them
    (out / names[-1]).write_text('{"cut": ')
  return names


# -- item 6: a run's temporary files are its outputs ------------------------------------------
@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_temporary_files_of_killed_writes_neither_block_resume_nor_overwrite(copy, finished, flag):
  """Regression: a SIGKILL inside an atomic write left .summary.json.<hex>.tmp, and --resume
  and --overwrite both refused the directory ("files that are not a run's outputs")."""
  temporaries = _temporaries(copy)
  summary = train_ctr.main([*FLAGS, "--out", str(copy), flag])
  assert summary["test_auc"] == finished[1]["test_auc"]
  assert not set(temporaries) & set(os.listdir(copy))  # the run's own leftovers, removed


def test_a_sweep_run_with_temporary_files_is_continued(copy, finished):
  """The sweep's path into the trainer (resume when run.json is there) accepts them too."""
  from experiments.sweep_lib import tasks

  _temporaries(copy)
  config, source = _config_and_source()
  summary = tasks.train_with_status(config, source, str(copy))
  assert summary["status"] == "completed" and summary["test_auc"] == finished[1]["test_auc"]


def test_only_the_runs_own_temporary_names_are_accepted(copy):
  for name in (".summary.json.tmp", ".notes.txt.0123456789ab.tmp", ".run.json.XYZ.tmp"):
    (copy / name).write_text("mine")
    with pytest.raises(SystemExit):
      train_ctr.main([*FLAGS, "--out", str(copy), "--overwrite"])
    assert (copy / name).read_text() == "mine"
    (copy / name).unlink()


# -- item 7: a start killed before run.json ------------------------------------------------
def test_resume_starts_over_after_a_kill_between_the_table_and_run_json(
  tmp_path, finished, monkeypatch
):
  """Regression: a kill after the table was created and before run.json was written made
  --resume refuse and ask for --overwrite; a preemptible job always passes --resume."""
  out = tmp_path / "out"

  def killed(self, table):
    raise SystemExit("killed before run.json")

  monkeypatch.setattr(RunDirectory, "record", killed)
  with pytest.raises(SystemExit, match=r"killed before run\.json"):
    train_ctr.main([*FLAGS, "--out", str(out)])
  monkeypatch.undo()
  assert sorted(os.listdir(out)) == ["LOCK", "table"]
  summary = train_ctr.main([*FLAGS, "--out", str(out), "--resume"])
  assert summary["test_auc"] == finished[1]["test_auc"]
  assert summary["steps"] == 6


def test_resume_still_refuses_outputs_of_no_recorded_run(copy):
  (copy / "run.json").unlink()  # checkpoints, metrics and a summary, but no run.json
  with pytest.raises(ctr.RunDirectoryError, match=r"no run\.json"):
    RunDirectory(str(copy), {}, resume=True, overwrite=False)


# -- item 8: refused before anything is written ---------------------------------------------
@pytest.mark.parametrize("through_link", [False, True])
def test_an_out_holding_foreign_files_is_refused_before_the_lock_is_written(tmp_path, through_link):
  """Regression: --out / and --out pointing at a link to /etc were refused, but only after
  /LOCK and /etc/LOCK were created. A directory of someone's files stands in for them."""
  system = tmp_path / "etc"
  system.mkdir()
  (system / "passwd").write_text("root:x:0:0")
  out = system
  if through_link:
    out = tmp_path / "link"
    out.symlink_to(system, target_is_directory=True)
  config, source = _config_and_source()
  identity = run_identity(config, source)
  for resume, overwrite in ((False, False), (True, False), (False, True)):
    with pytest.raises(ctr.RunDirectoryError, match=r"not a run's outputs: \['passwd'\]"):
      RunDirectory(str(out), identity, resume=resume, overwrite=overwrite)
  assert sorted(os.listdir(system)) == ["passwd"]


def test_an_out_that_is_a_file_is_refused_and_left_alone(tmp_path):
  path = tmp_path / "out"
  path.write_text("mine")
  with pytest.raises(ctr.RunDirectoryError, match="is not a directory"):
    RunDirectory(str(path), {}, resume=False, overwrite=False)
  assert path.read_text() == "mine"


# -- item 11: SIGINT and SIGTERM stop at a step boundary ------------------------------------
class _SignalAt(ctr.Hook):
  """Sends this process ``signum`` in the middle of step ``step``'s hooks."""

  def __init__(self, step, signum):
    self.step, self.signum = step, signum

  def after_step(self, trainer, result):
    if result.step == self.step:
      os.kill(os.getpid(), self.signum)


def test_a_signal_stops_the_run_after_its_step_and_names_the_checkpoint(tmp_path, monkeypatch):
  """Regression: Ctrl-C raised KeyboardInterrupt wherever the run was (once inside JAX's gc
  callback, where it was swallowed and the run exited 0)."""
  config, source = _config_and_source()
  original_fit = ctr.Trainer.fit
  monkeypatch.setattr(
    ctr.Trainer,
    "fit",
    lambda self, hooks=(): original_fit(self, [*hooks, _SignalAt(4, signal.SIGINT)]),
  )
  handler = signal.getsignal(signal.SIGINT)
  with pytest.raises(ctr.RunInterrupted) as info:
    ctr.train(config, source, str(tmp_path / "out"))
  error = info.value
  assert error.step == 4 and error.signum == signal.SIGINT and error.exit_status == 130
  assert error.checkpoint_step == 3 and error.checkpoint.endswith("step_000000003")
  assert "stopped by SIGINT after step 4" in str(error)
  assert signal.getsignal(signal.SIGINT) is handler  # restored
  assert not (tmp_path / "out" / "summary.json").exists()  # not finished


def _wait_for(predicate, process, seconds=240):
  deadline = time.monotonic() + seconds
  while not predicate():
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline
    time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_command_stops_on_a_signal_says_how_to_resume_and_exits_nonzero(tmp_path, signum):
  out = tmp_path / "out"
  flags = [f if f != "6" else "100000" for f in FLAGS]  # --steps: far more than it will take
  command = [sys.executable, "-m", "experiments.train_ctr", *flags, "--out", str(out)]
  env = {**os.environ, "PYTHONPATH": REPO}
  process = subprocess.Popen(
    command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    _wait_for(lambda: _checkpoint.latest_checkpoint(str(out / "checkpoints")), process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 128 + signum, err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  stopped = [line for line in err.splitlines() if "stopped by" in line]
  assert len(stopped) == 1, err
  line = stopped[0]
  assert f"stopped by {signal.Signals(signum).name} after step" in line
  assert f"its last checkpoint is {out}/checkpoints/step_" in line
  assert line.endswith("--resume") and "--out " + str(out) in line
  assert not (out / "summary.json").exists()


# -- item 12: every user error is one line naming the file ---------------------------------
def _corrupt(path, text='{"step": '):
  with open(path, "w") as f:
    f.write(text)


def _last_checkpoint(out):
  return _checkpoint.latest_checkpoint(str(out / "checkpoints")).path


def _data_cases(tmp_path):
  directory = tmp_path / "dir"
  directory.mkdir()
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  loop = tmp_path / "loop"
  loop.symlink_to(loop)
  return {
    "missing": (str(tmp_path / "nope.txt"), "not found"),
    "directory": (str(directory), "is a directory"),
    "fifo": (str(fifo), "is a FIFO"),
    "dev_null": ("/dev/null", "is a device"),
    "symlink_loop": (str(loop), "symbolic links"),
  }


DATA_CASES = ("missing", "directory", "fifo", "dev_null", "symlink_loop")


def _one_line(capsys, exit_info, named: str, says: str) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert exit_info.value.code not in (0, None), err
  assert len(lines) == 1, err
  assert named in lines[0] and says in lines[0], lines[0]
  assert lines[0].startswith("train_ctr: error: ")
  return lines[0]


@pytest.mark.parametrize("case", DATA_CASES)
def test_a_bad_data_file_is_one_line_naming_it(tmp_path, capsys, case):
  """Regression: each was a traceback, and a directory, a FIFO or /dev/null was "not found"."""
  path, says = _data_cases(tmp_path)[case]
  argv = ["--data", f"criteo:{path}", "--out", str(tmp_path / "out"), "--no-progress"]
  with pytest.raises(SystemExit) as exit_info:
    train_ctr.main(argv)
  _one_line(capsys, exit_info, path, says)
  assert not (tmp_path / "out").exists()  # refused before anything was written
  with pytest.raises((OSError, ValueError)):  # --debug: the exception, with its traceback
    train_ctr.main([*argv, "--debug"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_data_file_is_one_line_naming_it(tmp_path, capsys):
  path = tmp_path / "day.txt"
  path.write_text("1\t2\n")
  path.chmod(0)
  with pytest.raises(SystemExit) as exit_info:
    train_ctr.main(["--data", f"criteo:{path}", "--out", str(tmp_path / "out")])
  _one_line(capsys, exit_info, str(path), "permission denied")


@pytest.mark.parametrize(
  "damaged, says, advice, error",
  [
    (lambda out: out / "run.json", "is corrupt", "--overwrite", _jsonio.CorruptFileError),
    (lambda out: out / "summary.json", "is corrupt", "delete it", _jsonio.CorruptFileError),
    (
      lambda out: os.path.join(_last_checkpoint(out), "manifest.json"),
      "is corrupt",
      "delete that checkpoint",
      _jsonio.CorruptFileError,
    ),
    # The manifest's checksum of host.json catches it before its JSON is parsed.
    (
      lambda out: os.path.join(_last_checkpoint(out), "host.json"),
      "changed since it was saved",
      "to resume from the one before it",
      _checkpoint.CheckpointCorruptError,
    ),
  ],
  ids=["run.json", "summary.json", "manifest.json", "host.json"],
)
def test_a_corrupt_run_file_is_one_line_naming_it(
  copy, capsys, monkeypatch, damaged, says, advice, error
):
  """Regression: a bare JSONDecodeError that named no file, with a traceback."""
  path = str(damaged(copy))
  _corrupt(path)
  with pytest.raises(SystemExit) as exit_info:
    train_ctr.main([*FLAGS, "--out", str(copy), "--resume"])
  line = _one_line(capsys, exit_info, path, says)
  assert advice in line
  monkeypatch.setenv("KSTEP_ADAM_DEBUG", "1")
  with pytest.raises(error):
    train_ctr.main([*FLAGS, "--out", str(copy), "--resume"])


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)  # every durable write: the table's, the run's
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exit_info:
    train_ctr.main([*FLAGS, "--out", str(out)])
  line = _one_line(capsys, exit_info, str(out), "No space left on device")
  assert "free space" in line and "--resume" in line
  # A results file names itself.
  with pytest.raises(OSError) as info:
    _jsonio.write_json(str(tmp_path / "summary.json"), {})
  assert info.value.filename == str(tmp_path / "summary.json")
  assert os.listdir(tmp_path) == ["out"]  # no temporary file left


def test_the_other_entry_points_report_a_user_error_in_one_line(tmp_path, capsys):
  from experiments import convergence_rate
  from experiments import sweep

  bad = tmp_path / "bad.toml"
  bad.write_text('name = "s"\ntask = = "ctr"')
  with pytest.raises(SystemExit) as exit_info:
    sweep.main([str(bad), "--out", str(tmp_path / "sweep")])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code not in (0, None) and str(bad) in err and "\n" not in err
  results = tmp_path / "conv" / "results.jsonl"
  results.parent.mkdir()
  results.write_text('{"config": "quick"}\n{"cut')
  with pytest.raises(SystemExit) as exit_info:
    convergence_rate.main(["--plot-only", "--out", str(results.parent)])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 1 and f"{results}:2" in err and "\n" not in err
  assert json.loads(results.read_text().splitlines()[0]) == {"config": "quick"}
