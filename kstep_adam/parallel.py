"""Data-parallel harness: a ('node', 'local') mesh, per-worker replicas and a shard_map step.

Every worker (device) holds its own replica of the parameters and optimizer state, stored as
arrays with a leading *worker* dimension sharded over ``('node', 'local')``: worker
``w = node * devices_per_node + local``. Replicas diverge between merges; the optimizer decides
when they are averaged. The same code runs on simulated CPU devices and on accelerators.

Example::

    mesh = parallel.make_mesh(2, 4)
    tx = kstep_adam.kstep_adam(1e-3, k=8, axis_name=('node', 'local'))
    params_W, opt_state_W = parallel.init_replicas(params, tx, mesh)
    train_step = parallel.make_train_step(loss_fn, tx, mesh)
    params_W, opt_state_W, metrics = train_step(params_W, opt_state_W, batch)
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kstep_adam._comm import NetworkModel
from kstep_adam._comm import comm_bytes
from kstep_adam._dispatch import DispatchedStep
from kstep_adam._schedule import MergeSchedule
from kstep_adam._validation import check_int

AXIS_NAMES = ("node", "local")


def make_mesh(
  num_nodes: int, devices_per_node: int, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Build a ``num_nodes x devices_per_node`` mesh with axes ``('node', 'local')``.

  Args:
    num_nodes: size of the ``'node'`` axis (slow, inter-node links).
    devices_per_node: size of the ``'local'`` axis (fast, intra-node links).
    devices: devices to use, node-major; default: the first ``num_nodes*devices_per_node``
      of ``jax.devices()``.

  Returns:
    A ``jax.sharding.Mesh`` with Explicit axis types (inputs to the step must be placed with
    ``NamedSharding``; :func:`replicate` and :func:`make_train_step` do it).
  """
  check_int(num_nodes, "num_nodes")
  check_int(devices_per_node, "devices_per_node")
  devices = list(jax.devices() if devices is None else devices)
  needed = num_nodes * devices_per_node
  if needed > len(devices):
    raise ValueError(
      f"num_nodes * devices_per_node = {needed} exceeds the {len(devices)} available devices"
    )
  devices_NxL = np.array(devices[:needed], dtype=object).reshape(num_nodes, devices_per_node)
  return Mesh(devices_NxL, AXIS_NAMES, axis_types=(AxisType.Explicit,) * 2)


def worker_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a rank-``ndim`` per-worker array: leading dimension split over all mesh axes.

  The trailing ``None``s match what ``shard_map`` outputs, so a step's outputs can be fed back
  without recompiling.
  """
  return NamedSharding(mesh, P(tuple(mesh.axis_names), *([None] * (ndim - 1))))


def replicate(tree, mesh: Mesh):
  """Give every worker its own copy: leaves get a leading worker dimension of size ``mesh.size``.

  Args:
    tree: pytree of arrays (one replica).
    mesh: the mesh from :func:`make_mesh`.

  Returns:
    The pytree with leaves of shape ``(num_workers, *leaf.shape)``, sharded by worker.
  """
  n = mesh.size

  def put(x):
    x = np.asarray(x)
    shape = (n,) + x.shape
    return jax.make_array_from_callback(
      shape, worker_sharding(mesh, len(shape)), lambda idx: np.broadcast_to(x[None], shape)[idx]
    )

  return jax.tree.map(put, tree)


def unreplicate(tree_W, worker: int = 0):
  """Fetch one worker's replica to the host (NumPy), reading only that worker's shard.

  Raises:
    ValueError: if that worker's shard lives in another process.
  """

  check_int(worker, "worker", minimum=0)

  def fetch(x):
    for shard in x.addressable_shards:
      start = shard.index[0].start or 0
      if start <= worker < start + shard.data.shape[0]:
        return np.asarray(shard.data)[worker - start]
    raise ValueError(
      f"worker {worker} is not addressable from this process (array of shape {x.shape})"
    )

  return jax.tree.map(fetch, tree_W)


def init_replicas(params, tx: optax.GradientTransformation, mesh: Mesh):
  """Replicate ``params`` and initialize ``tx``'s state on every worker.

  Returns:
    ``(params_W, opt_state_W)``, both with a leading worker dimension.
  """
  params_W = replicate(params, mesh)
  spec = P(tuple(mesh.axis_names))

  def init_one(params_W):
    state = tx.init(jax.tree.map(lambda x: x[0], params_W))
    return jax.tree.map(lambda x: x[None], state)

  init = jax.jit(jax.shard_map(init_one, mesh=mesh, in_specs=(spec,), out_specs=spec))
  return params_W, init(params_W)


def make_train_step(
  loss_fn: Callable[[Any, Any], jax.Array],
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  dispatch_local_steps: bool = True,
  start_step: int | None = None,
  donate: bool = True,
  adaptive=None,
) -> DispatchedStep:
  """Build the jitted ``shard_map`` step ``(params_W, opt_state_W, batch) -> (..., metrics)``.

  Each worker computes ``loss_fn(params, batch_shard)`` and its gradient on its slice of the
  global batch, then applies ``tx`` (which averages over mesh axes when it is told to). The
  step itself adds no collective: metrics stay per worker.

  With ``dispatch_local_steps`` (default) the step is a :class:`DispatchedStep`: on the first
  call it finds the merge schedules that ``tx`` gates with ``lax.switch`` and compiles a second,
  branch-free *local* program without any collective, which the host runs on every step where
  no schedule merges. Results equal the single-program step up to XLA fusion rounding.

  Args:
    loss_fn: ``(params, batch) -> scalar loss`` for one worker's replica and batch shard.
    tx: the optimizer; its ``axis_name`` must name axes of ``mesh``.
    mesh: the mesh from :func:`make_mesh`.
    dispatch_local_steps: compile and dispatch the local program as described above.
    start_step: steps already taken by ``opt_state``, checked against the optimizer's own
      ``count``; None (default) takes the step from the state (e.g. a restored checkpoint).
    donate: donate the params and state buffers (saves memory; inputs become invalid).
    adaptive: the :class:`kstep_adam.AdaptiveController` of ``tx``'s adaptive schedule, if it
      has one: it decides each step's merge level on the host.

  Returns:
    ``train_step(params_W, opt_state_W, batch)`` returning ``(params_W, opt_state_W, metrics)``
    where ``batch`` is a pytree with a leading global-batch dimension divisible by the number
    of workers, and ``metrics = {'loss': loss_W}``; see :class:`DispatchedStep` for its
    attributes (``jitted``, ``local_jitted``, ``schedules``, ``step``, ``prepare``).
  """
  spec = P(tuple(mesh.axis_names))
  num_workers = mesh.size

  def per_worker(params_W, opt_state_W, batch):
    params, opt_state = jax.tree.map(lambda x: x[0], (params_W, opt_state_W))
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params_W, opt_state_W = jax.tree.map(lambda x: x[None], (params, opt_state))
    return params_W, opt_state_W, {"loss": loss[None]}

  def build(body):
    return jax.jit(
      jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec, spec)),
      donate_argnums=(0, 1) if donate else (),
    )

  def place_args(params_W, opt_state_W, batch):
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(
        f"every batch leaf needs the same leading global-batch dimension, got "
        f"leading sizes {sorted(map(str, sizes))}"
      )
    (batch_size,) = sizes
    if batch_size % num_workers:
      raise ValueError(
        f"global batch size {batch_size} is not divisible by the number of "
        f"workers {num_workers} (mesh {dict(mesh.shape)})"
      )
    batch = jax.tree.map(lambda x: jax.device_put(x, worker_sharding(mesh, np.ndim(x))), batch)
    return params_W, opt_state_W, batch

  return DispatchedStep(
    build,
    per_worker,
    start_step=start_step,
    enabled=dispatch_local_steps,
    place_args=place_args,
    adaptive=adaptive,
  )


def comm_report(
  params, schedule: MergeSchedule, mesh: Mesh, num_steps: int, network: NetworkModel | None = None
) -> dict[str, Any]:
  """Bytes (per device) and messages per mesh axis over ``num_steps``, and estimated seconds.

  Args:
    params: one replica's parameters (or ``jax.ShapeDtypeStruct`` objects).
    schedule: the optimizer's merge schedule (``kstep_adam.merge_schedule``).
    mesh: the mesh (gives the axis sizes).
    num_steps: number of steps.
    network: optional network model; adds ``'seconds_by_axis'`` and ``'seconds'``.

  Returns:
    A dict with ``'bytes_by_axis'``, ``'messages_by_axis'``, ``'total_bytes'`` and, with a
    network model, the estimated communication time.
  """
  cost = comm_bytes(params, schedule, mesh, num_steps)
  report: dict[str, Any] = {
    "num_steps": num_steps,
    "bytes_by_axis": dict(cost.bytes_by_axis),
    "messages_by_axis": dict(cost.messages_by_axis),
    "total_bytes": cost.total_bytes,
  }
  if network is not None:
    report["seconds_by_axis"] = network.seconds_by_axis(cost)
    report["seconds"] = network.seconds(cost)
  return report
