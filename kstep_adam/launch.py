r"""Start a multi-process run: ``python -m kstep_adam.launch --num-processes P -- COMMAND ...``.

On one machine it starts ``P`` copies of ``COMMAND``, each told its rank and the coordinator
(``127.0.0.1`` and a free port) through the environment that
:func:`kstep_adam._distributed.initialize` reads, and prints their output line by line,
each line prefixed with ``[rank r]``. If a process fails, the launcher says which one and how
(its exit status or signal, and its last line of output), lets the others end on their own
(they notice at their next collective) for up to ``--grace-seconds``, stops any that remain,
and exits non-zero. The launcher itself starts no JAX backend and holds no device.

Two processes of two simulated CPU devices each, the twin of the one-process run with the
same flags::

  python -m kstep_adam.launch --num-processes 2 -- \
    python -m experiments.train_ctr --nodes 2 --devices-per-node 2 --out runs/p2

On a cluster, start one launcher per host with the same coordinator (the address of the host
of rank 0) and the host's rank, e.g. for 4 hosts::

  python -m kstep_adam.launch --coordinator 10.0.0.1:9876 --num-processes 4 --process-id 2 \
    -- python -m experiments.train_ctr --nodes 4 ...

Under SLURM no launcher is needed: ``srun --ntasks 4 python -m experiments.train_ctr ...``
(JAX reads SLURM's variables).

An emulated cluster on one machine (root and iproute2): ``--link-gbps RATE`` runs each
process in its own network namespace, the namespaces joined by a link shaped to RATE Gbit/s in
each direction; the coordinator and gloo's collectives then cross that link as between hosts
(see :mod:`kstep_adam._link`)::

  sudo python -m kstep_adam.launch --num-processes 2 --link-gbps 1 -- \
    python -m experiments.train_ctr --nodes 2 --devices-per-node 2 --inter-node-gbps 1 ...
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from kstep_adam import _distributed
from kstep_adam import _link

_POLL_SECONDS = 0.05
_KILL_AFTER_TERM_SECONDS = 5.0


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that was free on ``host`` a moment ago (for the coordinator)."""
  with socket.socket() as sock:
    sock.bind((host, 0))
    return sock.getsockname()[1]


def describe_exit(returncode: int) -> str:
  """A process's exit status in words.

  Examples:
    >>> describe_exit(0), describe_exit(3), describe_exit(-9)
    ('exited normally', 'exited with status 3', 'was killed by signal SIGKILL')
  """
  if returncode == 0:
    return "exited normally"
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = str(-returncode)
    return f"was killed by signal {name}"
  return f"exited with status {returncode}"


@dataclasses.dataclass
class _Rank:
  """One started process and what the launcher knows of it."""

  rank: int
  process: subprocess.Popen
  last_line: str = ""
  recent: collections.deque = dataclasses.field(
    default_factory=lambda: collections.deque(maxlen=50)
  )
  stopped_by_launcher: bool = False
  reader: threading.Thread | None = None


_LAUNCHER = object()  # the source of the launcher's own messages


class _Terminal:
  """The launcher's output, shared by the ranks' relays and the launcher's own messages.

  A progress bar redraws itself with ``\r`` and no newline, so its line stays open. Whoever
  writes next from another source first ends that line: otherwise the terminal would draw the
  other rank's output over the bar, and a log would join the two into one line.
  """

  def __init__(self, out):
    self._out = out
    self._lock = threading.Lock()
    self._open_line_of: object = None  # the source whose last write ended in \r

  def write(self, source: object, text: bytes) -> None:
    with self._lock:
      if self._open_line_of is not None and self._open_line_of is not source:
        self._out.write(b"\n")
      self._out.write(text)
      self._out.flush()
      self._open_line_of = source if text.endswith(b"\r") else None


def _relay(rank: _Rank, terminal: _Terminal) -> None:
  """Copy a process's output to the terminal, every line (or progress-bar update) prefixed."""
  prefix = f"[rank {rank.rank}] ".encode()
  pending = b""
  stream = rank.process.stdout
  while chunk := stream.read1(1 << 16):
    pending += chunk
    while True:  # a line ends at \n, or at \r for a progress bar redrawing itself
      cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
      if cut < 0:
        break
      line, pending = pending[: cut + 1], pending[cut + 1 :]
      _emit(rank, prefix, line, terminal)
  if pending:
    _emit(rank, prefix, pending + b"\n", terminal)


def _emit(rank: _Rank, prefix: bytes, line: bytes, terminal: _Terminal) -> None:
  text = line.strip()
  if text:
    decoded = text.decode(errors="replace")
    rank.recent.append(decoded)
    if not _STACK_FRAME.match(decoded):  # a native stack trace's frames say little
      rank.last_line = decoded
  terminal.write(rank, prefix + line)


def launch(
  command: list[str],
  *,
  num_processes: int,
  process_ids: list[int] | None = None,
  coordinator: str | None = None,
  grace_seconds: float = 60.0,
  heartbeat_timeout: int | None = None,
  link: _link.ShapedLink | None = None,
  out=None,
) -> int:
  """Run ``command`` as processes ``process_ids`` of a ``num_processes``-process run.

  Args:
    command: the program and its arguments, the same for every process.
    num_processes: processes in the whole run.
    process_ids: the ranks to start here (default: all of them, on this machine).
    coordinator: ``host:port`` of rank 0's coordinator (default: 127.0.0.1 and a free port).
    grace_seconds: after a process fails, how long the others may take to end on their own
      before the launcher stops them (SIGTERM, then SIGKILL).
    heartbeat_timeout: seconds after which JAX's coordinator declares a silent process dead
      (default: :data:`kstep_adam._distributed.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS`).
    link: a :class:`kstep_adam._link.ShapedLink` already set up: each rank runs in its
      namespace, and the coordinator (by default) on rank 0's address there.
    out: binary stream for the prefixed output (default: standard output).

  Returns:
    0 if every process exited normally; otherwise the first failed process's exit status
    (128 + the signal number for a process killed by a signal). A process that stopped
    responding (e.g. stopped by SIGSTOP) while another failed is named as the cause.
  """
  out = sys.stdout.buffer if out is None else out
  process_ids = list(range(num_processes)) if process_ids is None else process_ids
  host = "127.0.0.1" if link is None else link.address(0)
  coordinator = coordinator or f"{host}:{free_port()}"
  terminal = _Terminal(out)
  ranks: list[_Rank] = []
  for rank in process_ids:
    env = dict(
      os.environ,
      PYTHONUNBUFFERED="1",  # lines reach the launcher as they are printed
      **{
        _distributed.ENV_COORDINATOR: coordinator,
        _distributed.ENV_NUM_PROCESSES: str(num_processes),
        _distributed.ENV_PROCESS_ID: str(rank),
      },
    )
    if heartbeat_timeout is not None:
      env[_distributed.ENV_HEARTBEAT_TIMEOUT] = str(heartbeat_timeout)
    argv = command
    if link is not None:
      env.update(link.environment())
      argv = link.command(rank, command)
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started = _Rank(rank, process)
    started.reader = threading.Thread(target=_relay, args=(started, terminal), daemon=True)
    started.reader.start()
    ranks.append(started)

  def say(message: str) -> None:
    terminal.write(_LAUNCHER, f"[launch] {message}\n".encode())

  first_failure: _Rank | None = None
  unresponsive: dict[int, str] = {}  # rank -> why, seen when the first failure came
  deadline = None
  try:
    while any(r.process.poll() is None for r in ranks):
      for r in ranks:
        code = r.process.poll()
        if code not in (None, 0) and first_failure is None:
          first_failure, deadline = r, time.monotonic() + grace_seconds
          unresponsive = _stopped_ranks(ranks, r)
          say(
            f"rank {r.rank} {describe_exit(code)}; waiting up to {grace_seconds:g} s for the "
            f"others to stop"
          )
      running = [r for r in ranks if r.process.poll() is None]
      if deadline is not None and running and all(_is_stopped(r) for r in running):
        _stop(running, say, "(they are stopped: they cannot end on their own)")
        break
      if deadline is not None and time.monotonic() > deadline:
        _stop(running, say, f"after {grace_seconds:g} s")
        break
      time.sleep(_POLL_SECONDS)
  except KeyboardInterrupt:
    _stop([r for r in ranks if r.process.poll() is None], say, "on interrupt")
    raise
  finally:
    for r in ranks:
      r.process.wait()
      r.reader.join()
  if first_failure is None:  # every process finished before the loop noticed
    first_failure = next((r for r in ranks if r.process.returncode != 0), None)
  if first_failure is None:
    return 0
  unresponsive = {**_silent_ranks(first_failure), **unresponsive}  # its output is all read now
  lines = [
    f"rank {rank} stopped responding first: {why}" for rank, why in sorted(unresponsive.items())
  ]
  if lines:
    lines.append(
      f"rank {first_failure.rank} {describe_exit(first_failure.process.returncode)} after "
      f"that (JAX ends the others when a process stops responding)"
    )
  else:
    lines.append(
      f"rank {first_failure.rank} failed first: {describe_exit(first_failure.process.returncode)}"
    )
  if first_failure.last_line:
    lines.append(f"  its last output: {first_failure.last_line}")
  for r in ranks:
    if r is not first_failure:
      how = (
        "was stopped by the launcher"
        if r.stopped_by_launcher
        else describe_exit(r.process.returncode)
      )
      lines.append(f"rank {r.rank} {how}")
  say("\n[launch] ".join(lines))
  code = first_failure.process.returncode
  return code if code > 0 else 128 + (-code)


_STACK_FRAME = re.compile(r"@\s+0x[0-9a-f]+\s|\*\*\* Check failure stack trace")
# JAX's coordination service, when a process stops sending heartbeats: "The following tasks
# are unhealthy (stopped sending heartbeats):" and the tasks (ranks) on the next line.
_NO_HEARTBEATS = "stopped sending heartbeats"
_TASK_LIST = re.compile(r"\s*\d+(\s*,\s*\d+)*\s*$")


def _process_state(pid: int) -> str | None:
  """The kernel's one-letter state of a process (``T``: stopped), or None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return None


def _is_stopped(rank: _Rank) -> bool:
  return _process_state(rank.process.pid) in ("T", "t")


def _stopped_ranks(ranks: list[_Rank], failed: _Rank) -> dict[int, str]:
  """The other ranks the kernel shows stopped (SIGSTOP, a debugger), when ``failed`` ended."""
  return {
    r.rank: "its process is stopped (e.g. by SIGSTOP or a debugger)"
    for r in ranks
    if r is not failed and r.process.poll() is None and _is_stopped(r)
  }


def _silent_ranks(failed: _Rank) -> dict[int, str]:
  """The ranks (here or on other hosts) that ``failed``'s last words, JAX's coordination
  service's, name as having stopped sending heartbeats."""
  found = {}
  for line, following in itertools.pairwise(list(failed.recent)):
    if _NO_HEARTBEATS in line and _TASK_LIST.match(following):
      for task in map(int, re.findall(r"\d+", following)):
        if task != failed.rank:
          found[task] = f"it stopped sending heartbeats (reported by rank {failed.rank})"
  return found


def _stop(ranks: list[_Rank], say, when: str) -> None:
  """SIGTERM the processes still running, then SIGKILL any left after a few seconds."""
  if not ranks:
    return
  say(f"stopping rank(s) {', '.join(str(r.rank) for r in ranks)} {when}")
  for r in ranks:
    r.stopped_by_launcher = True
    r.process.terminate()
    r.process.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM once continued
  deadline = time.monotonic() + _KILL_AFTER_TERM_SECONDS
  for r in ranks:
    try:
      r.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      r.process.kill()


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m kstep_adam.launch",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--num-processes", type=int, required=True, help="processes in the run")
  parser.add_argument(
    "--process-id",
    type=int,
    default=None,
    help="start only this rank (one launcher per host); default: start every rank here",
  )
  parser.add_argument(
    "--coordinator",
    default=None,
    help="HOST:PORT of rank 0's coordinator; default 127.0.0.1 and a free port (one machine)",
  )
  parser.add_argument(
    "--grace-seconds",
    type=float,
    default=60.0,
    help="after a process fails, how long the others may take to stop on their own",
  )
  parser.add_argument(
    "--heartbeat-timeout",
    type=int,
    default=_distributed.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
    help="seconds without heartbeats after which a process is declared dead",
  )
  parser.add_argument(
    "--link-gbps",
    type=float,
    default=None,
    help="emulate separate hosts on this machine: each process in its own network namespace, "
    "joined by a link shaped to this rate (Gbit/s, each direction); needs root and iproute2. "
    "The link has no added delay (this kernel has no netem)",
  )
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program to run")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the program to run after --, e.g. -- python -m experiments.train_ctr")
  if args.num_processes < 1:
    parser.error(f"--num-processes must be an int >= 1, got {args.num_processes}")
  if args.grace_seconds < 0:
    parser.error(f"--grace-seconds must be >= 0, got {args.grace_seconds}")
  if args.heartbeat_timeout < 1:
    parser.error(f"--heartbeat-timeout must be an int >= 1, got {args.heartbeat_timeout}")
  process_ids = None
  if args.process_id is not None:
    if not 0 <= args.process_id < args.num_processes:
      parser.error(
        f"--process-id must be in [0, {args.num_processes}) for --num-processes "
        f"{args.num_processes}, got {args.process_id}"
      )
    if args.coordinator is None:
      parser.error("--process-id needs --coordinator HOST:PORT (the address of rank 0's host)")
    process_ids = [args.process_id]
  if args.coordinator is not None:
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
      parser.error(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
  link = None
  if args.link_gbps is not None:
    if not args.link_gbps > 0:
      parser.error(f"--link-gbps must be > 0, got {args.link_gbps}")
    if process_ids is not None or args.coordinator is not None:
      parser.error(
        "--link-gbps emulates every host on this machine: leave out --process-id and --coordinator"
      )
    if args.num_processes < 2 or args.num_processes > _link.MAX_NODES:
      parser.error(
        f"--link-gbps joins 2 to {_link.MAX_NODES} processes, got --num-processes "
        f"{args.num_processes}"
      )
    missing = _link.missing_requirements()
    if missing:
      parser.error(f"--link-gbps needs {' and '.join(missing)}; nothing was started")
    link = _link.ShapedLink(args.num_processes, args.link_gbps)

  def interrupted(signum, frame):  # SIGTERM (e.g. a cancelled job): stop the ranks, then exit
    raise KeyboardInterrupt

  previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
  try:
    with contextlib.ExitStack() as stack:
      if link is not None:
        try:
          stack.enter_context(link)
        except _link.LinkError as error:
          print(f"[launch] {error}; nothing was started", file=sys.stderr)
          return 2
        print(
          f"[launch] {args.num_processes} network namespaces joined by a link of "
          f"{args.link_gbps:g} Gbit/s each way (run {link.run_id}); coordinator on "
          f"{link.address(0)}",
          file=sys.stderr,
        )
      return launch(
        command,
        num_processes=args.num_processes,
        process_ids=process_ids,
        coordinator=args.coordinator,
        grace_seconds=args.grace_seconds,
        heartbeat_timeout=args.heartbeat_timeout,
        link=link,
      )
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


if __name__ == "__main__":
  sys.exit(main())
