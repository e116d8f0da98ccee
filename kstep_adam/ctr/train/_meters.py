"""Per-step accounting of a CTR run: communication (dense merges and sparse pulls/pushes) and
the wall time of each step's phases (:class:`Timer`).

Dense bytes come from the optimizer's own merge schedule (:func:`kstep_adam.merge_bytes`), so
what is counted is what runs. Sparse traffic is counted here, per step:

* pull: the ``U`` unique row ids go out (8 bytes each) and ``U`` rows of ``D`` float32 come
  back; push: ids and ``U x D`` gradients go out. ``sparse_bytes = 2 U (8 + 4 D)``.
* In a parameter server sharded over ``n`` nodes, a share ``(n-1)/n`` of those rows live on
  another node, so that share crosses the inter-node (``'node'``) links, one message for the
  pull and one for the push. Within a node the rows are spread over its devices by the fast
  links, which this model leaves out.

In a multi-process run the sparse traffic is not modelled but counted: each step's
all-to-all exchange (:func:`kstep_adam.ctr.train._exchange.exchange_cost`), per device and per
axis like the dense bytes, padding included.

A :class:`kstep_adam.NetworkModel` with one bandwidth and latency per axis turns both into
estimated seconds, reported beside the measured compute time.
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

from kstep_adam._comm import CommCost
from kstep_adam._comm import NetworkModel
from kstep_adam._comm import merge_bytes
from kstep_adam._comm import node_local_network
from kstep_adam.ctr.train._config import TrainConfig


def network_model(config: TrainConfig) -> NetworkModel:
  """The configured links: ``'local'`` (intra-node) and ``'node'`` (inter-node)."""
  return node_local_network(
    intra_node_gbps=config.intra_node_gbps,
    inter_node_gbps=config.inter_node_gbps,
    intra_node_latency_us=config.intra_node_latency_us,
    inter_node_latency_us=config.inter_node_latency_us,
  )


class CommMeter:
  """Accumulates dense and sparse communication and per-step compute time."""

  def __init__(self, config: TrainConfig, params, schedule, mesh):
    self._params = jax_shapes(params)
    self._schedule, self._mesh = schedule, mesh
    self._row_bytes = 8 + 4 * config.embed_dim
    self._nodes = config.nodes
    self._workers = config.num_workers
    self._exchange: CommCost | None = None  # the measured all-to-all, per device
    self._network = network_model(config)
    self._dense = None
    self._sparse_bytes = 0.0
    self._sparse_node_bytes = 0.0
    self._sparse_messages = 0
    self._compute = {True: [], False: []}  # per-step compute seconds, by "merged this step"
    # Per-step wall seconds and the model's communication seconds, by the dense bytes each
    # device sent that step (0: a local step), so that steps of different cost never share a
    # median (1-bit Adam's full-precision warm-up beside its compressed steps).
    self._wall: dict[float, list[float]] = {}
    self._modelled: dict[float, float] = {}

  def add_step(
    self,
    step: int,
    num_unique: int,
    compute_seconds: float | None,
    *,
    sparse_cost: CommCost | None = None,
    level: int | None = None,
    step_seconds: float | None = None,
  ) -> None:
    """Count step ``step`` (1-based); ``compute_seconds`` None for a step that compiled.

    ``level``: the merge level the host declared at this step (an adaptive schedule's; see
    :func:`kstep_adam.merge_bytes`), None for a fixed schedule.

    ``sparse_cost``: the bytes each device sent in the step's sparse exchange (a
    multi-process run); without it the sparse traffic is the parameter-server model above.
    ``step_seconds``: the step's wall time (with its data, pulls and pushes), for a step that
    did not compile.
    """
    cost = merge_bytes(self._params, self._schedule, self._mesh, step=step, level=level)
    self._dense = cost if self._dense is None else self._dense + cost
    merged = cost.total_bytes > 0
    if compute_seconds is not None:
      self._compute[merged].append(compute_seconds)
    if sparse_cost is None:
      nbytes = 2 * num_unique * self._row_bytes
      self._sparse_bytes += nbytes
      self._sparse_node_bytes += nbytes * (self._nodes - 1) / self._nodes
      self._sparse_messages += 2 if self._nodes > 1 else 0
      sparse_cost = CommCost(
        {"node": nbytes * (self._nodes - 1) / self._nodes / self._workers},
        {"node": 2 if self._nodes > 1 else 0},
      )
    else:
      self._exchange = sparse_cost if self._exchange is None else self._exchange + sparse_cost
    if step_seconds is not None and compute_seconds is not None:
      nbytes = float(cost.total_bytes)
      self._wall.setdefault(nbytes, []).append(step_seconds)
      self._modelled[nbytes] = self._modelled.get(nbytes, 0.0) + self._network.seconds(
        cost + sparse_cost
      )

  def state(self) -> dict:
    """Everything counted so far (JSON data), for a checkpoint."""
    dense, exchange = self._dense, self._exchange
    return {
      "dense": None if dense is None else [dict(dense.bytes_by_axis), dict(dense.messages_by_axis)],
      "sparse_exchange": None
      if exchange is None
      else [dict(exchange.bytes_by_axis), dict(exchange.messages_by_axis)],
      "sparse_bytes": self._sparse_bytes,
      "sparse_node_bytes": self._sparse_node_bytes,
      "sparse_messages": self._sparse_messages,
      "compute_merge_seconds": list(self._compute[True]),
      "compute_plain_seconds": list(self._compute[False]),
      "step_kinds": [
        [nbytes, list(times), self._modelled[nbytes]] for nbytes, times in self._wall.items()
      ],
    }

  def restore(self, state: dict) -> None:
    """Continue counting from :meth:`state`."""
    self._dense = None if state["dense"] is None else CommCost(*state["dense"])
    exchange = state.get("sparse_exchange")  # absent in a one-process checkpoint of before
    self._exchange = None if exchange is None else CommCost(*exchange)
    self._sparse_bytes = state["sparse_bytes"]
    self._sparse_node_bytes = state["sparse_node_bytes"]
    self._sparse_messages = state["sparse_messages"]
    self._compute = {True: state["compute_merge_seconds"], False: state["compute_plain_seconds"]}
    # Absent in a checkpoint of before: the step times then start here.
    kinds = state.get("step_kinds", [])
    self._wall = {float(nbytes): list(times) for nbytes, times, _ in kinds}
    self._modelled = {float(nbytes): float(modelled) for nbytes, _, modelled in kinds}

  def _sparse_cost(self) -> CommCost:
    if self._exchange is not None:
      return self._exchange
    return CommCost(
      {"node": self._sparse_node_bytes, "local": 0.0}, {"node": self._sparse_messages, "local": 0}
    )

  def _sparse_totals(self) -> dict:
    """The sparse keys of :meth:`totals`: all devices together, and per device by axis."""
    if self._exchange is not None:
      per_device = self._exchange.bytes_by_axis
      return {
        "sparse_transport": "all_to_all",
        "sparse_bytes": float(sum(per_device.values()) * self._workers),
        "sparse_inter_node_bytes": float(per_device["node"] * self._workers),
        "sparse_bytes_by_axis": dict(per_device),
        "sparse_messages_by_axis": dict(self._exchange.messages_by_axis),
      }
    return {
      "sparse_transport": "parameter_server_model",
      "sparse_bytes": self._sparse_bytes,
      "sparse_inter_node_bytes": self._sparse_node_bytes,
      # The model's traffic shared evenly: each worker pulls and pushes its part.
      "sparse_bytes_by_axis": {"node": self._sparse_node_bytes / self._workers, "local": 0.0},
      "sparse_messages_by_axis": {"node": self._sparse_messages, "local": 0},
    }

  def merge_seconds_estimate(self) -> float | None:
    """Measured extra compute time of merge steps over plain steps, times their number.

    None when every step merges (synchronous Adam: nothing to compare against)."""
    merged, plain = self._compute[True], self._compute[False]
    if not merged or not plain:
      return None
    return float(max(0.0, np.median(merged) - np.median(plain)) * len(merged))

  def step_seconds(self) -> dict:
    """Measured wall seconds of the steps by kind, beside the model's communication seconds
    for the bytes those steps sent (dense merges plus the sparse traffic; the
    ``NetworkModel`` of the config's link flags), steps that compiled left out.

    A kind is the dense bytes a device sent in the step. ``'local'``: none (the replicas did
    not merge); ``'merge'``: the largest merge of a run that also has local steps, and
    ``'synchronous'`` instead where every step sent dense bytes (synchronous Adam, or any
    exchange every step). A run with several sizes of merge (1-bit Adam's full-precision
    warm-up, then its compressed steps; a hierarchical schedule's inner merges) names the
    smaller ones ``'merge.2'``, ``'merge.3'`` ... by decreasing size. Per kind: ``steps``,
    ``dense_bytes`` (per device per step), ``measured_total``, ``measured_median`` (seconds
    per step) and ``modelled_comm_per_step`` (the model's mean). A run's wall clock at another
    step count composes as ``sum over kinds of steps x measured_total / steps`` (the mean: the
    median leaves out the slow tail a total includes).
    """
    sizes = sorted((b for b, times in self._wall.items() if times and b > 0), reverse=True)
    base = "merge" if self._wall.get(0.0) else "synchronous"
    names = {b: base if i == 0 else f"{base}.{i + 1}" for i, b in enumerate(sizes)}
    if self._wall.get(0.0):
      names[0.0] = "local"
    kinds = {}
    for nbytes in sorted(names, reverse=True):
      times = self._wall[nbytes]
      kinds[names[nbytes]] = {
        "steps": len(times),
        "dense_bytes": nbytes,
        "measured_total": float(sum(times)),
        "measured_median": float(np.median(times)),
        "modelled_comm_per_step": self._modelled[nbytes] / len(times),
      }
    return kinds

  def totals(self) -> dict:
    """Traffic and compute so far: ``dense_bytes_by_axis`` and ``dense_messages_by_axis``
    (per device); ``sparse_transport`` (``parameter_server_model`` in one process,
    ``all_to_all`` across processes), ``sparse_bytes`` and ``sparse_inter_node_bytes`` (all
    devices together), ``sparse_bytes_by_axis`` and ``sparse_messages_by_axis`` (per
    device); the estimated communication seconds and the measured compute seconds."""
    dense = self._dense
    dense_seconds = self._network.seconds_by_axis(dense) if dense is not None else {}
    sparse_seconds = self._network.seconds(self._sparse_cost())
    compute = sum(self._compute[True]) + sum(self._compute[False])
    return {
      "dense_bytes_by_axis": dict(dense.bytes_by_axis) if dense is not None else {},
      "dense_messages_by_axis": dict(dense.messages_by_axis) if dense is not None else {},
      **self._sparse_totals(),
      "estimated_comm_seconds": float(sum(dense_seconds.values()) + sparse_seconds),
      "estimated_comm_seconds_by_kind": {
        **{f"dense_{axis}": s for axis, s in dense_seconds.items()},
        "sparse": sparse_seconds,
      },
      "measured_compute_seconds": compute,
      "step_seconds_by_kind": self.step_seconds(),
    }


def jax_shapes(tree):
  """Shapes and dtypes of a pytree, all the byte accounting needs."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


class Timer:
  """Accumulates wall time per phase (``with timer('pull'): ...``), in total and per step."""

  def __init__(self):
    self._totals: dict[str, float] = {}
    self.step: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      elapsed = time.perf_counter() - start
      self._totals[name] = self._totals.get(name, 0.0) + elapsed
      self.step[name] = self.step.get(name, 0.0) + elapsed

  def new_step(self) -> None:
    self.step = {}

  def discard_step(self) -> float:
    """Move this step's phases out of the totals (a step that compiled); return its time."""
    for name, elapsed in self.step.items():
      self._totals[name] -= elapsed
    return sum(self.step.values())

  def state(self) -> dict[str, float]:
    """What a checkpoint keeps: the :meth:`totals`."""
    return self.totals()

  def restore(self, totals: dict[str, float]) -> None:
    """Continue from the :meth:`totals` of an earlier process (a resumed run)."""
    self._totals = dict(totals)

  def total(self, name: str) -> float:
    return self._totals.get(name, 0.0)

  def totals(self) -> dict[str, float]:
    return {name: round(value, 6) for name, value in self._totals.items()}
