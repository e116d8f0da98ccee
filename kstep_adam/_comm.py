"""Communication accounting: bytes and messages per mesh axis, and a network time model.

Counts come from the same :class:`MergeSchedule` the optimizers execute, so what is counted is
what runs. The cost model (per device, i.e. what each device sends; all devices send in
parallel):

* all-reduce of ``S`` bytes over ``n`` devices (ring): ``2 (n-1)/n * S`` bytes, ``2 (n-1)``
  messages;
* reduce-scatter and all-gather: ``(n-1)/n * S`` bytes and ``n-1`` messages each;
* a *hierarchical* merge over ``outer + (inner,)`` (``L`` = size of ``inner``, ``N`` = product of
  the outer sizes): reduce-scatter + all-gather on ``inner`` = ``2 (L-1)/L * S``, plus an
  all-reduce of the own shard ``S/L`` across the outer axes = ``2 (N-1)/N * S/L``. ``S`` is
  padded to a multiple of ``L`` elements per dtype, as the implementation pads;
* a *flat* all-reduce spanning several axes is one ring over ``n = N*L`` devices; its bytes and
  messages are charged to the outermost axis, whose links bound the ring.

A schedule with a :class:`~kstep_adam.Compression` exchanges every step, counted per message
format (see its docstring): its first ``warmup_steps`` steps are full-precision all-reduces of
the gradients, as above; then

* ``'onebit'``: an all-to-all and an all-gather of rows of ``R = sum_leaves(chunk/8 + 4)``
  bytes (packed signs plus a float32 scale per leaf): ``2 (n-1) R`` bytes, ``2 (n-1)`` messages;
* ``'topk'``: an all-gather of rows of ``R = sum_leaves(k * (itemsize + 4))`` bytes (values
  plus int32 indices): ``(n-1) R`` bytes, ``n-1`` messages;
* ``'randk'``: an all-reduce of the ``k`` values per leaf along the schedule's route.

The all-to-all and all-gathers span all the schedule's axes as one group (``n`` devices) and
are charged, as a flat ring is, to the outermost axis.

Bytes and messages are counted on the axis whose links carry them: ``'local'`` (intra-node,
e.g. NVLink) or ``'node'`` (inter-node network). A :class:`NetworkModel` turns them into
seconds; the named networks every experiment uses are defined once, in :data:`NETWORKS`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import types
from collections.abc import Mapping

import jax
import numpy as np

from kstep_adam._schedule import Compression
from kstep_adam._schedule import MergeSchedule
from kstep_adam._validation import check_float
from kstep_adam._validation import check_int


@dataclasses.dataclass(frozen=True)
class CommCost:
  """Bytes sent per device and sequential messages, per mesh axis."""

  bytes_by_axis: Mapping[str, float]  # bytes each device sends over this axis's links.
  messages_by_axis: Mapping[str, int]  # sequential message steps (latency terms).

  @property
  def total_bytes(self) -> float:
    return float(sum(self.bytes_by_axis.values()))

  def __add__(self, other: CommCost) -> CommCost:
    axes = list(dict.fromkeys([*self.bytes_by_axis, *other.bytes_by_axis]))
    return CommCost(
      {a: self.bytes_by_axis.get(a, 0.0) + other.bytes_by_axis.get(a, 0.0) for a in axes},
      {a: self.messages_by_axis.get(a, 0) + other.messages_by_axis.get(a, 0) for a in axes},
    )

  def scaled(self, times: int) -> CommCost:
    return CommCost(
      {a: b * times for a, b in self.bytes_by_axis.items()},
      {a: m * times for a, m in self.messages_by_axis.items()},
    )


def _axis_sizes(axis_sizes) -> dict[str, int]:
  shape = getattr(axis_sizes, "shape", axis_sizes)  # a jax Mesh has .shape: name -> size.
  return {str(a): check_int(n, f"axis_sizes[{a!r}]") for a, n in dict(shape).items()}


def checked_axis_sizes(schedule: MergeSchedule, axis_sizes) -> dict[str, int]:
  sizes = _axis_sizes(axis_sizes)
  missing = [a for a in schedule.axis_names if a not in sizes]
  if missing:
    raise ValueError(f"axis_sizes has no size for axes {missing!r}; it has {sorted(sizes)!r}")
  return sizes


def _leaf_specs(params) -> tuple:
  """``(shape, dtype)`` of every leaf: all the accounting needs of ``params``, hashable."""
  return tuple((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(params))


def _elements_by_dtype(leaf_specs, state: str, schedule: MergeSchedule) -> dict[str, int]:
  out: dict[str, int] = {}
  for shape, dtype in leaf_specs:
    dtype = np.dtype(schedule.mu_dtype if state == "mu" and schedule.mu_dtype else dtype)
    out[dtype.name] = out.get(dtype.name, 0) + math.prod(shape)
  return out


@functools.lru_cache(maxsize=64)
def _merge_costs(
  leaf_specs, schedule: MergeSchedule, sizes: tuple[tuple[str, int], ...]
) -> dict[tuple[str, int], CommCost]:
  """Cost of one merge of each state at each live level, computed once per parameter shapes,
  schedule and mesh: a trainer asks for the bytes of every step. Callers must not mutate it."""
  costs = {}
  for state in schedule.states():
    elements = _elements_by_dtype(leaf_specs, state, schedule)
    for level in schedule.live_levels(state):
      costs[state, level] = _level_cost(elements, schedule, level, dict(sizes))
  return costs


@functools.lru_cache(maxsize=64)
def _compressed_costs(
  leaf_specs, schedule: MergeSchedule, sizes: tuple[tuple[str, int], ...]
) -> tuple[CommCost, CommCost]:
  """Cost of one warm-up step (full-precision gradients) and of one compressed step."""
  sizes = dict(sizes)
  warmup = _level_cost(_elements_by_dtype(leaf_specs, "grads", schedule), schedule, 1, sizes)
  compression = schedule.compression
  leaves = [(math.prod(shape), np.dtype(dtype)) for shape, dtype in leaf_specs]
  leaves = [(size, dtype) for size, dtype in leaves if size]
  if compression.method == "randk":
    values: dict[str, int] = {}
    for size, dtype in leaves:
      values[dtype.name] = values.get(dtype.name, 0) + compression.values_per_leaf(size)
    return warmup, _level_cost(values, schedule, 1, sizes)
  n = math.prod(sizes[a] for a in schedule.axis_names)
  if compression.method == "onebit":
    row = sum(Compression.chunk_size(size, n) // 8 + 4 for size, _ in leaves)
    phases = 2  # all-to-all to the chunks' servers, all-gather of the servers' chunks
  else:
    row = sum(compression.values_per_leaf(size) * (dtype.itemsize + 4) for size, dtype in leaves)
    phases = 1  # all-gather
  cost = _zero(schedule)
  cost.bytes_by_axis[schedule.axis_names[0]] = float(phases * (n - 1) * row)
  cost.messages_by_axis[schedule.axis_names[0]] = phases * (n - 1)
  return warmup, cost


def _zero(schedule: MergeSchedule) -> CommCost:
  return CommCost({a: 0.0 for a in schedule.axis_names}, {a: 0 for a in schedule.axis_names})


def _level_cost(
  elements_by_dtype: Mapping[str, int],
  schedule: MergeSchedule,
  level: int,
  sizes: Mapping[str, int],
) -> CommCost:
  """Cost of one mean over ``schedule.axis_names[level-1:]`` of a tree of these elements."""
  axes = schedule.axis_names[level - 1 :]
  cost = dict.fromkeys(schedule.axis_names, 0.0)
  msgs = dict.fromkeys(schedule.axis_names, 0)
  if len(axes) == 1 or schedule.route == "flat":
    n = math.prod(sizes[a] for a in axes)
    size_bytes = sum(c * np.dtype(d).itemsize for d, c in elements_by_dtype.items())
    cost[axes[0]] += 2 * (n - 1) / n * size_bytes
    msgs[axes[0]] += 2 * (n - 1) * len(elements_by_dtype)
    return CommCost(cost, msgs)
  inner = axes[-1]
  n_inner = sizes[inner]
  n_outer = math.prod(sizes[a] for a in axes[:-1])
  for dtype, count in elements_by_dtype.items():
    padded_bytes = -(-count // n_inner) * n_inner * np.dtype(dtype).itemsize
    cost[inner] += 2 * (n_inner - 1) / n_inner * padded_bytes
    msgs[inner] += 2 * (n_inner - 1)
    cost[axes[0]] += 2 * (n_outer - 1) / n_outer * padded_bytes / n_inner
    msgs[axes[0]] += 2 * (n_outer - 1)
  return CommCost(cost, msgs)


# What an adaptive schedule's merge over every axis adds: one all-reduce of 3 float32 scalars
# over all its axes (see kstep_adam._merge.mean_with_drift).
DRIFT_SCALARS = 3


def _drift_cost(schedule: MergeSchedule, sizes: Mapping[str, int]) -> CommCost:
  flat = dataclasses.replace(schedule, route="flat")
  return _level_cost({"float32": DRIFT_SCALARS}, flat, 1, sizes)


def merge_bytes(
  params, schedule: MergeSchedule, axis_sizes, *, step: int, level: int | None = None
) -> CommCost:
  """Bytes and messages per mesh axis that each device sends at 1-based ``step``.

  Args:
    params: the model's parameter pytree (arrays or ``jax.ShapeDtypeStruct`` objects, unreplicated).
    schedule: the optimizer's merge schedule (``kstep_adam.merge_schedule(...)``).
    axis_sizes: a ``jax.sharding.Mesh`` or a mapping axis name -> size.
    step: 1-based step number.
    level: the merge level the host declared at this step, for an adaptive schedule (whose
      merge steps the step number does not tell): 0 local, ``i`` a merge over
      ``axis_names[i-1:]``; a merge over every axis (1) also counts the drift's all-reduce of
      3 float32. Must be None for a fixed schedule.

  Returns:
    A :class:`CommCost`; all zeros on a step that does not merge.

  Examples:
    >>> import numpy as np, kstep_adam
    >>> s = kstep_adam.merge_schedule(4, axis_name='w')
    >>> kstep_adam.merge_bytes({'w': np.zeros(10, np.float32)}, s, {'w': 2}, step=4).bytes_by_axis
    {'w': 40.0}
  """
  check_int(step, "step (1-based)")
  sizes = checked_axis_sizes(schedule, axis_sizes)
  if (level is None) != (schedule.adaptive is None):
    raise ValueError(
      "merge_bytes needs level= (the merge level the host declared) for an adaptive schedule, "
      f"and only for one; got level={level!r} for a schedule with adaptive={schedule.adaptive!r}"
    )
  if level is not None:
    check_int(level, "level", minimum=0, maximum=len(schedule.axis_names))
    total = _zero(schedule)
    if level:
      costs = _merge_costs(_leaf_specs(params), schedule, tuple(sorted(sizes.items())))
      for state in schedule.states():
        total = total + costs[state, level]
      if level == 1:
        total = total + _drift_cost(schedule, sizes)
    return total
  if schedule.compression is not None:
    if not schedule.axis_names:
      return _zero(schedule)
    warmup, compressed = _compressed_costs(
      _leaf_specs(params), schedule, tuple(sorted(sizes.items()))
    )
    cost = warmup if step <= schedule.compression.warmup_steps else compressed
    return cost + _zero(schedule)  # a copy: the cached cost is shared
  merging = [(s, schedule.level_at(s, int(step))) for s in schedule.states()]
  merging = [(state, level) for state, level in merging if level]
  total = _zero(schedule)
  if merging:  # only a merge step looks at the parameters
    costs = _merge_costs(_leaf_specs(params), schedule, tuple(sorted(sizes.items())))
    for state_level in merging:
      total = total + costs[state_level]
  return total


def comm_bytes(params, schedule: MergeSchedule, axis_sizes, num_steps: int) -> CommCost:
  """Total bytes and messages per mesh axis over steps ``1..num_steps`` (per device).

  Args:
    params: the model's parameter pytree (unreplicated).
    schedule: the optimizer's merge schedule.
    axis_sizes: a ``jax.sharding.Mesh`` or a mapping axis name -> size.
    num_steps: number of steps T.

  Returns:
    A :class:`CommCost` summed over the T steps.
  """
  check_int(num_steps, "num_steps", minimum=0)
  sizes = checked_axis_sizes(schedule, axis_sizes)
  if schedule.adaptive is not None:
    raise ValueError(
      "an adaptive schedule's merges are decided while training: count them per actual merge "
      "with merge_bytes(..., level=level) (kstep_adam.AdaptiveState.merges counts them per level)"
    )
  if schedule.compression is not None:
    if not schedule.axis_names:
      return _zero(schedule)
    warmup, compressed = _compressed_costs(
      _leaf_specs(params), schedule, tuple(sorted(sizes.items()))
    )
    warmup_steps = min(int(num_steps), schedule.compression.warmup_steps)
    return warmup.scaled(warmup_steps) + compressed.scaled(int(num_steps) - warmup_steps)
  costs = _merge_costs(_leaf_specs(params), schedule, tuple(sorted(sizes.items())))
  total = _zero(schedule)
  for (state, level), cost in costs.items():
    count = _steps_at_level(schedule.periods(state), level, int(num_steps))
    if count:
      total = total + cost.scaled(count)
  return total


def _steps_at_level(periods: tuple[int, ...], level: int, num_steps: int) -> int:
  """Steps t in 1..T that merge at ``level``: divisible by its period and by no outer one.

  Inclusion-exclusion over the outer periods, so the cost does not grow with T or the lcm.
  """
  own, outer = periods[level - 1], periods[: level - 1]
  count = 0
  for r in range(len(outer) + 1):
    for subset in itertools.combinations(outer, r):
      count += (-1) ** r * (num_steps // math.lcm(own, *subset))
  return count


@dataclasses.dataclass(frozen=True)
class NetworkModel:
  """A network described by bandwidth and latency per mesh axis.

  Time of a :class:`CommCost` = sum over axes of ``bytes / bandwidth + messages * latency``
  (phases of a merge run one after another; every device sends in parallel).

  Attributes:
    bandwidth_bytes_per_s: per-device link bandwidth per axis, e.g.
      ``{'local': 150e9, 'node': 12.5e9}`` (NVLink vs 100 Gb/s NIC).
    latency_s: per-message latency per axis, e.g. ``{'local': 5e-6, 'node': 20e-6}``.
  """

  bandwidth_bytes_per_s: Mapping[str, float]
  latency_s: Mapping[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name, value in self.bandwidth_bytes_per_s.items():
      check_float(value, f"bandwidth_bytes_per_s[{name!r}]", low=0.0, low_open=True)
    for name, value in self.latency_s.items():
      check_float(value, f"latency_s[{name!r}]", low=0.0)

  def seconds_by_axis(self, cost: CommCost) -> dict[str, float]:
    """Estimated seconds spent on each axis."""
    out = {}
    for axis, nbytes in cost.bytes_by_axis.items():
      if nbytes and axis not in self.bandwidth_bytes_per_s:
        raise ValueError(
          f"NetworkModel has no bandwidth for axis {axis!r}; it has "
          f"{sorted(self.bandwidth_bytes_per_s)!r}"
        )
      seconds = nbytes / self.bandwidth_bytes_per_s[axis] if nbytes else 0.0
      out[axis] = seconds + cost.messages_by_axis.get(axis, 0) * self.latency_s.get(axis, 0.0)
    return out

  def seconds(self, cost: CommCost) -> float:
    """Estimated seconds for ``cost`` (sum over axes)."""
    return float(sum(self.seconds_by_axis(cost).values()))


def node_local_network(
  *,
  intra_node_gbps: float,
  inter_node_gbps: float,
  intra_node_latency_us: float,
  inter_node_latency_us: float,
) -> NetworkModel:
  """Build a two-level network over the ``('node', 'local')`` mesh, in the units of link specs.

  Args:
    intra_node_gbps: per-device bandwidth of the intra-node (``'local'``) links, Gbit/s.
    inter_node_gbps: per-device bandwidth of the inter-node (``'node'``) links, Gbit/s.
    intra_node_latency_us: latency per intra-node message, microseconds.
    inter_node_latency_us: latency per inter-node message, microseconds.

  Returns:
    A :class:`NetworkModel` with bandwidths in bytes/s and latencies in seconds.

  Examples:
    >>> net = node_local_network(
    ...   intra_node_gbps=800, inter_node_gbps=80, intra_node_latency_us=1, inter_node_latency_us=10
    ... )
    >>> net.bandwidth_bytes_per_s["node"], net.latency_s["node"]
    (10000000000.0, 1e-05)
  """
  return NetworkModel(
    bandwidth_bytes_per_s={"local": intra_node_gbps * 1e9 / 8, "node": inter_node_gbps * 1e9 / 8},
    latency_s={"local": intra_node_latency_us / 1e6, "node": inter_node_latency_us / 1e6},
  )


# Named networks, defined once: demo, benchmarks and the CTR trainer's defaults use these.
NETWORKS: Mapping[str, NetworkModel] = types.MappingProxyType(
  {
    # A V100-era GPU node like those of the paper's system: NVLink 2 gives each GPU
    # 6 links x 25 GB/s = 150 GB/s (1200 Gbit/s) per direction, and each GPU has its own
    # 100 Gbit/s NIC (InfiniBand EDR / RoCE), as on DGX-class machines. The latencies are
    # per ring step of a collective, not the wire alone: a few microseconds of kernel launch
    # and synchronization inside a node, plus NIC, switch and proxy-thread hops across nodes.
    # Illustrative orders of magnitude for the time model, not a measurement.
    "nvlink+100g": node_local_network(
      intra_node_gbps=1200.0,
      inter_node_gbps=100.0,
      intra_node_latency_us=5.0,
      inter_node_latency_us=20.0,
    ),
  }
)


@dataclasses.dataclass(frozen=True)
class GlooTcpLink:
  """Seconds of gloo's collectives (JAX's CPU collectives) between processes joined by one
  TCP link of ``gbps`` per direction, as measured on the shaped link of
  ``python -m kstep_adam.launch --link-gbps`` (``experiments/benchmarks/link_model.py``).

  It refines bytes / rate in three ways, each seen in the measurements:

  * **host ceiling**: the bytes move no faster than ``host_gbps``, what the machine's cores
    sustain through gloo and the kernel's TCP stack (on a shared 2-core machine, a few
    Gbit/s: a 10 Gbit/s link is then not the bottleneck);
  * **per message**: each of a collective's sequential messages costs ``message_seconds``
    (thread hand-offs, gloo's rendezvous; milliseconds on a loaded machine);
  * **all-to-all is half duplex past the socket buffers**: XLA's gloo all-to-all posts a send
    and a receive per peer on one TCP connection; a message of ``m`` bytes goes both ways at
    once only for its first ``overlap_bytes`` (what the kernel's socket buffers take without
    the writer blocking), the rest takes turns: ``max(m, 2 m - overlap_bytes)`` per peer. The
    all-reduce (gloo's ring, in segments) keeps both directions busy.

  Attributes:
    gbps: the link's rate per direction, Gbit/s.
    host_gbps: the machine's own ceiling, Gbit/s (inf: none).
    message_seconds: cost of each sequential message.
    overlap_bytes: bytes of an all-to-all message that overlap with the reverse direction.
  """

  gbps: float
  host_gbps: float = math.inf
  message_seconds: float = 0.0
  overlap_bytes: float = 64 * 1024

  @property
  def bytes_per_second(self) -> float:
    return min(self.gbps, self.host_gbps) * 1e9 / 8

  def network(self) -> NetworkModel:
    """The ``'node'`` axis as a :class:`NetworkModel` (bandwidth and per-message cost)."""
    return NetworkModel({"node": self.bytes_per_second}, {"node": self.message_seconds})

  def all_reduce_seconds(self, size_bytes: float, num_processes: int) -> float:
    """A ring all-reduce of ``size_bytes`` per process: ``2 (n-1)`` steps of ``S / n``."""
    n = num_processes
    return 2 * (n - 1) * (size_bytes / n / self.bytes_per_second + self.message_seconds)

  def all_to_all_seconds(self, size_bytes: float, num_processes: int) -> float:
    """An all-to-all of ``size_bytes`` per process (``S / n`` to each peer)."""
    n = num_processes
    m = size_bytes / n
    per_peer = max(m, 2 * m - self.overlap_bytes) / self.bytes_per_second
    return (n - 1) * (per_peer + self.message_seconds)
