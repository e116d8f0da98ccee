"""An emulated cluster on one machine: one Linux network namespace per process, joined by a
rate-limited link (``python -m kstep_adam.launch --link-gbps RATE``).

Each process runs in its own network namespace (``ip netns``). Two namespaces are joined by
one veth pair; more than two by a bridge in the root namespace with one veth pair per node.
Every veth end's egress is shaped with the token-bucket qdisc ``tbf`` to the rate, so both
directions of every node's link carry at most RATE (a full-duplex NIC): a node sends at RATE
and receives at RATE at the same time.

Addresses are private (``10.213.0.0/24``, node ``i`` at ``10.213.0.(i+1)``) and exist only
inside the run's namespaces; the root namespace gets none (the bridge only switches). JAX
creates gloo's TCP device from the address the host name resolves to, so each namespace gets
an ``/etc/netns/NAME/hosts`` (which ``ip netns exec`` mounts over ``/etc/hosts``) mapping the
host name to that namespace's address: the collectives then cross the shaped link.

What the link does not have: a propagation delay. ``tc``'s ``netem`` (delay, loss) is absent
from the kernels this was written on, and ``tbf``'s ``latency`` parameter is not a delay
either: it only bounds how long a packet may wait in the token bucket's queue before it is
dropped (the queue's length). The link's round trip is the veth's own, tens of microseconds.

Everything a run creates is named ``ksal<RUN>...``, ``RUN`` six hex digits of its own: the
namespaces ``ksal<RUN>n<i>``, their ends ``ksal<RUN>e<i>``, the root namespace's ends
``ksal<RUN>h<i>`` and bridge ``ksal<RUN>br``, and ``/etc/netns/ksal<RUN>n<i>``. A run holds a
lock while it lives; it refuses to start while another holds it, or over anything named
``ksal...`` that is left over from a run that did not end cleanly (killed with SIGKILL: no
code runs then), and names what to remove, rather than removing what it did not create.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable
from collections.abc import Sequence

PREFIX = "ksal"
NETNS_DIR = "/etc/netns"
LOCK_PATH = "/run/lock/kstep_adam-link.lock"
SUBNET = "10.213.0"
MAX_NODES = 250
# The token bucket: bursts up to this long at the line rate, never below 64 KiB (one GSO
# segment); packets wait at most _QUEUE_MS in the queue before tbf drops them.
_BURST_SECONDS = 1e-3
_MIN_BURST_BYTES = 64 * 1024
_QUEUE_MS = 100

Run = Callable[[Sequence[str]], subprocess.CompletedProcess]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess:
  return subprocess.run(list(argv), capture_output=True, text=True, check=False)


class LinkError(RuntimeError):
  """The shaped link cannot be set up (missing tools, no root, leftovers, a failed command)."""


def missing_requirements(
  *, euid: Callable[[], int] = os.geteuid, which: Callable[[str], str | None] = shutil.which
) -> list[str]:
  """What this machine lacks for a shaped link: root, ``ip`` and ``tc`` (iproute2).

  Examples:
    >>> missing_requirements(euid=lambda: 1000, which=lambda name: None)
    ['root (running as uid 1000)', '`ip` (iproute2)', '`tc` (iproute2)']
  """
  missing = []
  uid = euid()
  if uid != 0:
    missing.append(f"root (running as uid {uid})")
  missing += [f"`{tool}` (iproute2)" for tool in ("ip", "tc") if which(tool) is None]
  return missing


def existing_names(run: Run = _run, netns_dir: str = NETNS_DIR) -> list[str]:
  """Everything named ``ksal...``: namespaces, root-namespace links, ``/etc/netns`` entries."""
  names = []
  done = run(["ip", "netns", "list"])
  names += [f"namespace {line.split()[0]}" for line in done.stdout.splitlines() if line.strip()]
  done = run(["ip", "-o", "link", "show"])
  for line in done.stdout.splitlines():  # "7: name@peer: <...> ..."
    match = re.match(r"\d+:\s*([^:@\s]+)", line)
    if match:
      names.append(f"link {match.group(1)}")
  if os.path.isdir(netns_dir):
    names += [f"file {os.path.join(netns_dir, n)}" for n in sorted(os.listdir(netns_dir))]
  return [n for n in names if n.split(" ", 1)[1].rsplit("/", 1)[-1].startswith(PREFIX)]


def removal_commands(names: Sequence[str]) -> list[str]:
  """Shell commands that remove what :func:`existing_names` listed."""
  verbs = {"namespace": "ip netns del {}", "link": "ip link del {}", "file": "rm -r {}"}
  return [verbs[kind].format(name) for kind, name in (n.split(" ", 1) for n in names)]


def rate_text(gbps: float) -> str:
  return f"{gbps:g} Gbit/s"


class ShapedLink:
  """A context that creates the namespaces and the shaped link, and removes them on exit.

  Args:
    num_nodes: namespaces (one per process), 2 to 250.
    gbps: the link rate per direction, Gbit/s.
    run: runs one command (argv) and returns its ``CompletedProcess`` (injectable for tests).
    netns_dir: where ``ip netns exec`` finds the per-namespace files (``/etc/netns``).
    lock_path: the lock a live run holds.
  """

  def __init__(
    self,
    num_nodes: int,
    gbps: float,
    *,
    run: Run = _run,
    netns_dir: str = NETNS_DIR,
    lock_path: str = LOCK_PATH,
  ):
    if not 2 <= num_nodes <= MAX_NODES:
      raise ValueError(f"a shaped link joins 2 to {MAX_NODES} processes, got {num_nodes}")
    if not gbps > 0:
      raise ValueError(f"the link rate must be > 0 Gbit/s, got {gbps}")
    self.num_nodes, self.gbps = num_nodes, float(gbps)
    self._run, self._netns_dir, self._lock_path = run, netns_dir, lock_path
    self.run_id = secrets.token_hex(3)
    self._lock = None
    self._made_netns_dir = False  # whether this run created /etc/netns itself
    self._created: list[str] = []  # what exists now, in the order created (names as listed)

  # -- names ------------------------------------------------------------------------------
  def namespace(self, rank: int) -> str:
    return f"{PREFIX}{self.run_id}n{rank}"

  def address(self, rank: int) -> str:
    return f"{SUBNET}.{rank + 1}"

  def _inner(self, rank: int) -> str:
    return f"{PREFIX}{self.run_id}e{rank}"

  def _outer(self, rank: int) -> str:
    return f"{PREFIX}{self.run_id}h{rank}"

  @property
  def _bridge(self) -> str:
    return f"{PREFIX}{self.run_id}br"

  def command(self, rank: int, command: Sequence[str]) -> list[str]:
    """``command`` run in rank ``rank``'s namespace (``ip netns exec`` execs it: same pid)."""
    return ["ip", "netns", "exec", self.namespace(rank), *command]

  def environment(self) -> dict[str, str]:
    """What the processes are told about the link (for their reports)."""
    return {"KSTEP_ADAM_LINK_GBPS": f"{self.gbps:g}"}

  # -- setup and teardown -----------------------------------------------------------------
  def __enter__(self) -> ShapedLink:
    os.makedirs(os.path.dirname(self._lock_path), exist_ok=True)
    self._lock = open(self._lock_path, "a")  # held for the run's life
    try:
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._lock.close()
      self._lock = None
      raise LinkError(
        f"another run holds the shaped link's lock {self._lock_path}; wait for it to end"
      ) from None
    try:
      found = existing_names(self._run, self._netns_dir)
      if found:
        raise LinkError(
          "left over from another run (not removed: this run did not create them): "
          + ", ".join(found)
          + "; if no run is using them, remove them with: "
          + "; ".join(removal_commands(found))
        )
      self._create()
    except BaseException:
      self.close()
      raise
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _do(self, *argv: str) -> None:
    done = self._run(argv)
    if done.returncode != 0:
      raise LinkError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()}")

  def _create(self) -> None:
    hostname = socket.gethostname()
    rate_bits = int(self.gbps * 1e9)
    burst = max(_MIN_BURST_BYTES, int(self.gbps * 1e9 / 8 * _BURST_SECONDS))
    tbf = ["tbf", "rate", f"{rate_bits}bit", "burst", str(burst), "latency", f"{_QUEUE_MS}ms"]
    bridged = self.num_nodes > 2
    if not os.path.isdir(self._netns_dir):
      os.makedirs(self._netns_dir)
      self._made_netns_dir = True
    if bridged:
      self._do("ip", "link", "add", self._bridge, "type", "bridge")
      self._created.append(f"link {self._bridge}")
      self._do("ip", "link", "set", self._bridge, "up")
    for rank in range(self.num_nodes):
      ns = self.namespace(rank)
      self._do("ip", "netns", "add", ns)
      self._created.append(f"namespace {ns}")
      directory = os.path.join(self._netns_dir, ns)
      os.makedirs(directory)
      self._created.append(f"file {directory}")
      with open(os.path.join(directory, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost\n{self.address(rank)} {hostname}\n")
      self._do("ip", "-n", ns, "link", "set", "lo", "up")
    if bridged:
      for rank in range(self.num_nodes):
        inner, outer = self._inner(rank), self._outer(rank)
        self._do("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self._created.append(f"link {outer}")
        self._do("ip", "link", "set", inner, "netns", self.namespace(rank))
        self._do("ip", "link", "set", outer, "master", self._bridge)
        self._do("tc", "qdisc", "add", "dev", outer, "root", *tbf)  # towards the node
        self._do("ip", "link", "set", outer, "up")
    else:
      self._do("ip", "link", "add", self._inner(0), "type", "veth", "peer", "name", self._inner(1))
      self._created.append(f"link {self._inner(0)}")
      for rank in range(2):
        self._do("ip", "link", "set", self._inner(rank), "netns", self.namespace(rank))
    for rank in range(self.num_nodes):
      ns, inner = self.namespace(rank), self._inner(rank)
      self._do("ip", "-n", ns, "addr", "add", f"{self.address(rank)}/24", "dev", inner)
      self._do("tc", "-n", ns, "qdisc", "add", "dev", inner, "root", *tbf)  # from the node
      self._do("ip", "-n", ns, "link", "set", inner, "up")

  def close(self) -> list[str]:
    """Remove everything this run created (its qdiscs go with their links); safe to call
    twice. Returns what could not be removed (also raised as :class:`LinkError`)."""
    for name in reversed(self._created):
      kind, what = name.split(" ", 1)
      if kind == "namespace":  # its ends (and their qdiscs) go with it
        self._run(["ip", "netns", "del", what])
      elif kind == "link":  # a veth's peer goes with it
        self._run(["ip", "link", "del", what])
      else:
        shutil.rmtree(what, ignore_errors=True)
    self._created = []
    if self._made_netns_dir:
      with contextlib.suppress(OSError):  # only if empty: another tool may have put files there
        os.rmdir(self._netns_dir)
      self._made_netns_dir = False
    left = []
    if self._lock is not None:
      left = [n for n in existing_names(self._run, self._netns_dir) if self.run_id in n]
      self._lock.close()  # releases the lock
      self._lock = None
    if left:
      raise LinkError(f"could not remove {', '.join(left)}: {'; '.join(removal_commands(left))}")
    return left
