"""The launcher and the distributed setup it hands its processes (no JAX in the children)."""

import io
import os
import sys
import textwrap

import pytest

from kstep_adam import _distributed
from kstep_adam import launch


def run(script: str, *, num_processes=2, grace_seconds=30.0):
  """Launch ``python -c script`` as every rank; return (exit status, output lines)."""
  out = io.BytesIO()
  code = launch.launch(
    [sys.executable, "-c", textwrap.dedent(script)],
    num_processes=num_processes,
    grace_seconds=grace_seconds,
    out=out,
  )
  return code, out.getvalue().decode().split("\n")


RANK = "import os, sys, time; rank = int(os.environ['KSTEP_ADAM_PROCESS_ID'])\n"


def test_every_rank_gets_its_place_and_its_output_is_prefixed():
  code, lines = run(
    RANK
    + """
env = os.environ
print(rank, env['KSTEP_ADAM_NUM_PROCESSES'], env['KSTEP_ADAM_COORDINATOR'].split(':')[0])
print('half a line', end='', flush=True); print(' and the rest')
print('50%\\r100%', file=sys.stderr)
"""
  )
  assert code == 0
  for rank in (0, 1):
    assert f"[rank {rank}] {rank} 2 127.0.0.1" in lines
    assert f"[rank {rank}] half a line and the rest" in lines
    # A progress bar's carriage returns start prefixed updates too: its line is the update
    # and, unless another rank's output came between them, the next one.
    updates = [part for line in lines for part in line.split("\r")]
    assert f"[rank {rank}] 50%" in updates and f"[rank {rank}] 100%" in updates
  assert all(
    part.startswith("[rank ") for line in lines if line for part in line.split("\r") if part
  )
  assert not any(line.startswith("[launch]") for line in lines)


def test_another_ranks_output_ends_an_open_progress_line_first():
  out = io.BytesIO()
  terminal = launch._Terminal(out)
  rank0, rank1 = object(), object()
  terminal.write(rank0, b"[rank 0] 50%\r")
  terminal.write(rank0, b"[rank 0] 60%\r")  # the same bar redraws in place
  terminal.write(rank1, b"[rank 1] hello\n")  # on a line of its own, not over the bar
  terminal.write(rank0, b"[rank 0] 100%\n")
  assert out.getvalue() == b"[rank 0] 50%\r[rank 0] 60%\r\n[rank 1] hello\n[rank 0] 100%\n"


def test_a_failed_rank_is_named_with_its_status_and_last_words():
  code, lines = run(
    RANK
    + """
if rank == 1:
  print('cannot go on', file=sys.stderr)
  sys.exit(3)
"""
  )
  assert code == 3
  assert "[launch] rank 1 failed first: exited with status 3" in lines
  assert "[launch]   its last output: cannot go on" in lines
  assert "[launch] rank 0 exited normally" in lines


def test_a_killed_rank_is_named_and_a_hanging_one_is_stopped_after_the_grace():
  code, lines = run(
    RANK
    + """
import signal
if rank == 0:
  os.kill(os.getpid(), signal.SIGKILL)
time.sleep(600)  # rank 1 would wait forever
""",
    grace_seconds=0.5,
  )
  assert code == 128 + 9
  assert "[launch] rank 0 failed first: was killed by signal SIGKILL" in lines
  assert "[launch] stopping rank(s) 1 after 0.5 s" in lines
  assert "[launch] rank 1 was stopped by the launcher" in lines


def test_a_stopped_rank_is_named_not_the_healthy_one_that_aborted_after_it(tmp_path):
  # Rank 1 stops (SIGSTOP) and rank 0 then aborts, as JAX aborts a healthy process when
  # another stops sending heartbeats: the launcher names rank 1, and stops it at once.
  code, lines = run(
    RANK
    + f"""
import signal
pid_file = {str(tmp_path / "pid")!r}
if rank == 1:
  with open(pid_file + '.tmp', 'w') as f:
    f.write(str(os.getpid()))
  os.rename(pid_file + '.tmp', pid_file)
  os.kill(os.getpid(), signal.SIGSTOP)
  sys.exit(0)
while not os.path.exists(pid_file):
  time.sleep(0.01)
pid = open(pid_file).read()
while open(f'/proc/{{pid}}/stat').read().rsplit(')', 1)[1].split()[0] != 'T':
  time.sleep(0.01)
os.abort()
""",
    grace_seconds=60,
  )
  assert code == 128 + 6
  assert (
    "[launch] rank 1 stopped responding first: its process is stopped (e.g. by SIGSTOP or a "
    "debugger)" in lines
  )
  assert (
    "[launch] rank 0 was killed by signal SIGABRT after that (JAX ends the others when a "
    "process stops responding)" in lines
  )
  assert "[launch] stopping rank(s) 1 (they are stopped: they cannot end on their own)" in lines
  assert not any("failed first" in line for line in lines)


def test_a_rank_that_jax_reports_silent_is_named():
  # A lost host is not a stopped process here: rank 0's coordinator names it (JAX's words).
  code, lines = run(
    RANK
    + """
if rank == 0:
  print('F1206 client.h:80] Terminating process because the JAX distributed service detected '
        'fatal errors. UNAVAILABLE: The following tasks are unhealthy (stopped sending '
        'heartbeats):\\n1\\nThe tasks have crashed.', file=sys.stderr, flush=True)
  os.abort()
time.sleep(600)
""",
    grace_seconds=0.5,
  )
  assert code == 128 + 6, lines
  assert (
    "[launch] rank 1 stopped responding first: it stopped sending heartbeats (reported by "
    "rank 0)" in lines
  )
  assert "[launch] rank 1 was stopped by the launcher" in lines


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--num-processes", "2"], "give the program to run after --"),
    (["--num-processes", "0", "--", "true"], "--num-processes must be an int >= 1, got 0"),
    (["--num-processes", "2", "--process-id", "2", "--", "true"], "--process-id must be in"),
    (["--num-processes", "2", "--process-id", "1", "--", "true"], "needs --coordinator"),
    (["--num-processes", "2", "--coordinator", "nohost", "--", "true"], "must be HOST:PORT"),
  ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    launch.main(argv)
  assert message in capsys.readouterr().err


def test_one_rank_per_host_runs_only_that_rank(capsysbinary):
  # The form a cluster uses; here rank 1 of 2 alone, which just prints its place.
  code = launch.main(
    [
      "--num-processes",
      "2",
      "--process-id",
      "1",
      "--coordinator",
      "10.0.0.1:1234",
      "--",
      sys.executable,
      "-c",
      "import os; print(os.environ['KSTEP_ADAM_PROCESS_ID'], os.environ['KSTEP_ADAM_COORDINATOR'])",
    ]
  )
  assert code == 0
  assert capsysbinary.readouterr().out.decode() == "[rank 1] 1 10.0.0.1:1234\n"


def test_processes_from_env():
  env = {
    _distributed.ENV_COORDINATOR: "10.0.0.1:99",
    _distributed.ENV_NUM_PROCESSES: "4",
    _distributed.ENV_PROCESS_ID: "3",
  }
  assert _distributed.processes_from_env(env) == _distributed.Processes(
    3, 4, "10.0.0.1:99", "launch"
  )
  assert not _distributed.processes_from_env(env).is_main
  slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}
  assert _distributed.processes_from_env(slurm) == _distributed.Processes(2, 4, None, "slurm")
  one_task = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}
  assert _distributed.processes_from_env(one_task) == _distributed.Processes()
  assert _distributed.processes_from_env({}).count == 1


@pytest.mark.parametrize(
  "change, message",
  [
    ({_distributed.ENV_PROCESS_ID: None}, "KSTEP_ADAM_PROCESS_ID missing"),
    ({_distributed.ENV_PROCESS_ID: "4"}, "KSTEP_ADAM_PROCESS_ID=4 must be below"),
    ({_distributed.ENV_NUM_PROCESSES: "two"}, "KSTEP_ADAM_NUM_PROCESSES must be an int >= 1"),
    ({_distributed.ENV_COORDINATOR: "10.0.0.1"}, "must be HOST:PORT"),
  ],
)
def test_bad_environments_are_refused(change, message):
  env = {
    _distributed.ENV_COORDINATOR: "10.0.0.1:99",
    _distributed.ENV_NUM_PROCESSES: "4",
    _distributed.ENV_PROCESS_ID: "3",
  }
  for key, value in change.items():
    if value is None:
      del env[key]
    else:
      env[key] = value
  with pytest.raises(ValueError, match=message):
    _distributed.processes_from_env(env)


def test_a_single_process_initializes_nothing_and_raises_as_usual():
  assert _distributed.initialize({}) == _distributed.Processes()
  with pytest.raises(KeyError), _distributed.exit_on_error(_distributed.Processes()):
    raise KeyError("seen by the caller")
  assert os.environ.get(_distributed.ENV_PROCESS_ID) is None
