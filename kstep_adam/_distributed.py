"""Multi-process runs: JAX's distributed runtime, set up from the environment.

A run of ``P`` processes has one process per mesh ``'node'``; each process drives its own
devices (the ``'local'`` axis). Every process runs the same program, and every collective is
issued by all of them in the same order. How a process learns its place:

* ``python -m kstep_adam.launch`` (:mod:`kstep_adam.launch`) starts the processes and sets
  ``KSTEP_ADAM_COORDINATOR`` (``host:port`` of process 0's coordinator),
  ``KSTEP_ADAM_NUM_PROCESSES`` and ``KSTEP_ADAM_PROCESS_ID``;
* under SLURM (``srun``, one task per process) JAX reads SLURM's own variables;
* otherwise the program is a single process and nothing is initialized.

On CPU the processes talk over gloo (TCP). A process that dies is noticed by the others at
their next collective (gloo fails on the closed connection), or else by the coordinator's
heartbeat within ``heartbeat_timeout_seconds``; :func:`exit_on_error` then ends each survivor
with its error, instead of letting it wait at JAX's exit barrier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Iterator
from collections.abc import Mapping

import numpy as np

ENV_COORDINATOR = "KSTEP_ADAM_COORDINATOR"
ENV_NUM_PROCESSES = "KSTEP_ADAM_NUM_PROCESSES"
ENV_PROCESS_ID = "KSTEP_ADAM_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "KSTEP_ADAM_HEARTBEAT_TIMEOUT"

# A dead peer that gloo does not report (a lost host rather than a killed process) is
# declared dead after this long without heartbeats; JAX's own default is 100 s.
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class Processes:
  """Where this process stands in a run.

  Attributes:
    index: this process's rank in ``[0, count)``; rank 0 writes the run's files.
    count: processes in the run (1: a single-process run).
    coordinator: ``host:port`` of the coordinator (None: single process, or found by JAX's
      cluster detection).
    source: where the settings came from: ``'launch'`` (the environment variables of
      :mod:`kstep_adam.launch`), ``'slurm'`` or ``'single'``.
  """

  index: int = 0
  count: int = 1
  coordinator: str | None = None
  source: str = "single"

  @property
  def is_main(self) -> bool:
    """Whether this process writes the run's outputs (rank 0)."""
    return self.index == 0


def _env_int(environ: Mapping[str, str], name: str, *, minimum: int) -> int:
  text = environ.get(name, "")
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise ValueError(f"environment variable {name} must be an int >= {minimum}, got {text!r}")
  return value


def processes_from_env(environ: Mapping[str, str] | None = None) -> Processes:
  """Read this process's place in the run from the environment (see the module docstring).

  Raises:
    ValueError: the launcher's variables are incomplete or out of range.

  Examples:
    >>> processes_from_env({})
    Processes(index=0, count=1, coordinator=None, source='single')
    >>> env = {ENV_COORDINATOR: '127.0.0.1:1234', ENV_NUM_PROCESSES: '2', ENV_PROCESS_ID: '1'}
    >>> processes_from_env(env).index
    1
  """
  environ = os.environ if environ is None else environ
  launch_vars = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  present = [name for name in launch_vars if name in environ]
  if present:
    missing = [name for name in launch_vars if name not in environ]
    if missing:
      raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} missing")
    coordinator = environ[ENV_COORDINATOR]
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"{ENV_COORDINATOR} must be HOST:PORT, got {coordinator!r}")
    count = _env_int(environ, ENV_NUM_PROCESSES, minimum=1)
    index = _env_int(environ, ENV_PROCESS_ID, minimum=0)
    if index >= count:
      raise ValueError(f"{ENV_PROCESS_ID}={index} must be below {ENV_NUM_PROCESSES}={count}")
    return Processes(index, count, coordinator, "launch")
  # srun sets SLURM_PROCID per task; a batch script's own shell (one task) is a single process.
  if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    count = _env_int(environ, "SLURM_NTASKS", minimum=1)
    return Processes(_env_int(environ, "SLURM_PROCID", minimum=0), count, None, "slurm")
  return Processes()


def initialize(environ: Mapping[str, str] | None = None) -> Processes:
  """Join the run the environment describes; call before anything starts JAX's backend.

  A single process returns at once. Otherwise the CPU collectives go over gloo and
  ``jax.distributed.initialize`` connects to the coordinator (process 0 starts it), with a
  heartbeat timeout of ``KSTEP_ADAM_HEARTBEAT_TIMEOUT`` seconds (default 30), so a process
  that vanishes is declared dead within that time.

  Returns:
    This process's :class:`Processes`.
  """
  environ = os.environ if environ is None else environ
  processes = processes_from_env(environ)
  if processes.count == 1:
    return processes
  import jax

  heartbeat = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
  if ENV_HEARTBEAT_TIMEOUT in environ:
    heartbeat = _env_int(environ, ENV_HEARTBEAT_TIMEOUT, minimum=1)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = dict(heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=2 * heartbeat)
  if processes.source == "launch":
    jax.distributed.initialize(
      processes.coordinator,
      num_processes=processes.count,
      process_id=processes.index,
      **timeouts,
    )
  else:  # JAX's cluster detection reads SLURM's variables
    jax.distributed.initialize(**timeouts)
  return processes


@contextlib.contextmanager
def exit_on_error(processes: Processes, *, debug: bool = True) -> Iterator[None]:
  """In a multi-process run, end this process promptly when the body raises.

  The error and its traceback go to stderr, prefixed with the rank, and the process exits
  with status 1 at once; without ``debug`` a user error (OSError, ValueError: a missing or
  corrupt file, a full disk) is only its line, without the traceback. A normal exit would first wait at JAX's shutdown barrier for the
  other processes, which never come when one of them has died. The others see this process
  go at their next collective and fail in turn. In a single process the error propagates.
  """
  try:
    yield
  except (Exception, KeyboardInterrupt) as error:
    if processes.count == 1:
      raise
    if debug or not isinstance(error, (OSError, ValueError)):
      traceback.print_exc()
    print(
      f"process {processes.index} of {processes.count} failed: {type(error).__name__}: {error}",
      file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def process_major_devices(devices=None) -> list:
  """All devices ordered by process, then id: mesh rows (``'node'``) are then processes."""
  import jax

  devices = jax.devices() if devices is None else devices
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def allgather_concat(values_N: np.ndarray) -> np.ndarray:
  """Concatenate every process's 1-D array, in rank order, on every process.

  The arrays may differ in length. A single process gets its own array back. Collective:
  every process must call it.
  """
  return np.concatenate(_allgather_1d(np.asarray(values_N)))


def allgather_json(value) -> list:
  """Every process's JSON-serializable ``value`` (e.g. a dict of counters), in rank order.

  Sent as JSON text, so 64-bit counters arrive exact (JAX's integers are 32-bit here).
  Collective: every process must call it.
  """
  text_N = np.frombuffer(json.dumps(value).encode(), np.uint8)
  return [json.loads(part.tobytes()) for part in _allgather_1d(text_N)]


def _allgather_1d(values_N: np.ndarray) -> list[np.ndarray]:
  """Every process's 1-D array, in rank order (each padded to the longest for the exchange)."""
  import jax

  if jax.process_count() == 1:
    return [values_N]
  from jax.experimental import multihost_utils

  lengths_P = np.asarray(multihost_utils.process_allgather(np.int32(len(values_N)))).reshape(-1)
  padded_N = np.zeros(int(lengths_P.max()), values_N.dtype)
  padded_N[: len(values_N)] = values_N
  gathered_PxN = np.asarray(multihost_utils.process_allgather(padded_N))
  return [gathered_PxN[p, :n] for p, n in enumerate(lengths_P)]
