"""The sparse tier of a multi-process run: process ``p`` owns the table rows ``row % P == p``.

With ``P`` processes (the mesh's ``'node'`` axis; ``L`` devices each on ``'local'``), every
process keeps its shard of the embedding table in its own tier (host cache and disk, under
``table_dir/shard-{p}-of-{P}``) and reads its own share of every batch. A training step moves
rows between them over the mesh's collectives, the padded all-to-all exchange of TPU
embedding and TorchRec, issued by every process in the same order:

1. **Counts.** Each process hashes its batch's keys to rows, deduplicates them, and counts them
   per owner. A ``psum`` over ``'node'`` gives every process the ``P x P`` counts, from which
   all agree on ``S``, the slots of each (requester, owner) buffer: the largest count rounded
   up to a power of two (never shrinking, so the programs compile once per high-water mark)
   and to a multiple of ``L``.
2. **Ids.** An ``all_to_all`` over ``'node'`` hands each owner the ids it must serve,
   ``[P, S]`` padded with ``-1``.
3. **Rows.** The owner pulls them from its table (a row asked for by several processes is
   read once) and answers ``[P, S, D]``; inside the training step an ``all_to_all`` brings every
   process its rows, which its devices gather over ``'local'``.
4. **Gradients.** The step's ``psum_scatter`` over ``'local'`` sums the process's workers'
   row gradients, the reverse ``all_to_all`` returns them to the owners, and each owner pushes
   its rows once (the table sums a row's contributions from several processes).

Every device carries ``1/L`` of each buffer along the slot axis, so the inter-node traffic
leaves through all ``L`` devices' links, and the fast ``'local'`` links assemble and split it.
The row gradient is that of the global-mean loss, as in the one-process step: each process
sends the sum of its workers' gradients divided by the number of workers ``N``.

Shapes: ``P`` processes (owners and requesters), ``S`` slots per pair, ``L`` local devices,
``D`` the embedding width, ``U`` a process's unique rows, ``G`` its examples, ``F`` fields.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kstep_adam import embedding
from kstep_adam import parallel
from kstep_adam._comm import CommCost
from kstep_adam.ctr import _step
from kstep_adam.ctr._config import TrainConfig
from kstep_adam.ctr._tier import bucket_size

ID_BYTES = 8  # an int64 row id, sent as two int32 words (JAX's integers are 32-bit here)
_SHARD_DIR = re.compile(r"shard-(\d+)-of-(\d+)$")


def shard_dir(table_dir: str, index: int, count: int) -> str:
  """The directory of process ``index``'s shard: ``table_dir/shard-{index}-of-{count}``."""
  return os.path.join(table_dir, f"shard-{index}-of-{count}")


def shard_rows(num_rows: int, index: int, count: int) -> int:
  """Rows ``r < num_rows`` with ``r % count == index``.

  Examples:
    >>> [shard_rows(10, p, 3) for p in range(3)]
    [4, 3, 3]
  """
  return (num_rows - index + count - 1) // count


def exchange_slots(largest: int, num_processes: int, local_devices: int, previous: int = 0) -> int:
  """Slots ``S`` of every (requester, owner) buffer for the largest per-pair count.

  A power of two, at least ``1024 / P`` (so ``P * S`` is at least the one-process bucket) and
  never below ``previous``, then rounded up to a multiple of ``L`` (each device carries
  ``S / L``).

  Examples:
    >>> exchange_slots(700, 2, 2), exchange_slots(10, 2, 2, previous=1024), exchange_slots(5, 2, 3)
    (1024, 1024, 513)
  """
  slots = max(previous, bucket_size(largest, minimum=max(1, 1024 // num_processes)))
  return -(-slots // local_devices) * local_devices


class Exchange(NamedTuple):
  """Who asks whom for which rows in one step, as every process agreed."""

  slots: int  # S, the slots of every (requester, owner) buffer
  position_U: np.ndarray  # int32 [U], where row u sits among this process's P * S rows
  requested_PxS: np.ndarray  # int64 [P, S], the rows each process asks of this one (-1: none)
  cost: CommCost  # bytes each device sends per axis, and messages, for a training step


class ShardedRows(NamedTuple):
  """A batch's rows in a multi-process step (the sharded :class:`~._tier.BatchRows`).

  ``rows[inverse_GxF]`` is the ``[G, F, D]`` embedding of this process's ``G`` examples,
  where ``rows`` is the ``[P * S, D]`` owner-major layout of its unique rows.
  """

  row_ids_U: np.ndarray  # int64 [U], this process's batch rows, sorted, each once
  rows: jax.Array | np.ndarray  # training: the owners' answers, a global [P * P, S, D]
  # array (the step's all_to_all delivers them); evaluation: this process's rows [P * S, D]
  inverse_GxF: np.ndarray  # int32 [G, F], the position of every key among the P * S rows
  exchange: Exchange

  @property
  def num_unique(self) -> int:
    """U, this process's unique rows."""
    return int(self.row_ids_U.shape[0])


class ShardedSparseTier:
  """This process's shard of the embedding table and its side of the exchange.

  The same interface as :class:`~._tier.SparseTier` where the trainer uses it (``index``,
  ``prefetch``, ``pull``, ``stats``, ``hit_rate``, ``close``); :meth:`push` takes the step's
  output and returns the rows this shard updated. Every method but ``index``, ``stats``,
  ``hit_rate`` and ``close`` is collective: all processes call it, in the same order.

  Args:
    config: the run's configuration (rows, caches, sparse learning rate, seed).
    table_dir: directory holding every process's shard directory.
    mesh: the run's ``('node', 'local')`` mesh, one process per node.
    temporary: the directory is scratch space and ``close`` skips the final flush.
    flush_on_close: override that (a run that saves checkpoints flushes only in them).
    version: open this process's shard at this earlier flush (``embedding.TableVersion``).
  """

  def __init__(
    self,
    config: TrainConfig,
    table_dir: str,
    mesh: Mesh,
    *,
    temporary: bool = False,
    flush_on_close: bool | None = None,
    version: embedding.TableVersion | None = None,
  ):
    self.num_shards, self.index_in_run = jax.process_count(), jax.process_index()
    count, index = self.num_shards, self.index_in_run
    if mesh.shape["node"] != count:
      raise ValueError(
        f"the mesh's 'node' axis ({mesh.shape['node']}) must span the {count} processes"
      )
    if config.device_cache_rows:
      raise ValueError(sharded_device_cache_error(config.device_cache_rows, count))
    if config.table_rows < count:
      raise ValueError(
        f"table_rows={config.table_rows} gives no rows to some of the {count} processes' shards"
      )
    check_table_dir(table_dir, count)
    self.num_rows, self.dim, self._salt = config.table_rows, config.embed_dim, config.seed
    self.path = shard_dir(table_dir, index, count)
    self.table = embedding.open_table(
      self.path,
      num_rows=shard_rows(config.table_rows, index, count),
      dim=config.embed_dim,
      optimizer=embedding.SparseAdam(
        learning_rate=config.sparse_learning_rate, mode=config.sparse_mode, eps=config.sparse_eps
      ),
      host_cache_rows=config.host_cache_rows,
      seed=config.seed,
      init_scale=config.init_scale,
      shard_index=index,
      num_shards=count,
      version=version,
    )
    self._flush_on_close = not temporary if flush_on_close is None else flush_on_close
    self._local = mesh.shape["local"]
    self.meter = embedding.TransferMeter()
    self._collectives = _Collectives(mesh, self.meter)
    self._slots = {"train": 0, "eval": 0}  # S per kind of batch; never shrinks
    self._staged: tuple[np.ndarray, Exchange] | None = None  # from prefetch, for the next pull

  def index(self, keys_GxF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash feature keys into table rows and deduplicate them (pure NumPy; any thread):
    ``(row_ids_U sorted, inverse_GxF int32)``, as the one-process tier does."""
    rows_GxF = embedding.hash_keys_to_rows(keys_GxF, self.num_rows, salt=self._salt)
    row_ids_U, inverse = np.unique(rows_GxF, return_inverse=True)
    return row_ids_U, inverse.astype(np.int32).reshape(rows_GxF.shape)

  # -- the exchange ------------------------------------------------------------------------
  def _exchange(self, row_ids_U: np.ndarray, kind: str) -> Exchange:
    """Steps 1 and 2: agree on ``S`` and send every owner the ids it must serve."""
    count = self.num_shards
    owner_U = row_ids_U % count
    counts_P = np.bincount(owner_U, minlength=count)
    # Evaluations' copies count as "read": left out of the per-step figures, as the
    # one-process tier's evaluation reads are.
    train = kind == "train"
    counts_PxP = self._collectives.gather_counts(
      counts_P, self.index_in_run, "counts" if train else "read"
    )
    slots = self._slots[kind] = exchange_slots(
      int(counts_PxP.max()), count, self._local, self._slots[kind]
    )
    # The rows are sorted, so each owner's come in order; slot = rank among its owner's rows.
    order_U = np.argsort(owner_U, kind="stable")
    first_P = np.concatenate([[0], np.cumsum(counts_P)[:-1]])
    slot_U = np.empty_like(owner_U)
    slot_U[order_U] = np.arange(len(row_ids_U)) - first_P[owner_U[order_U]]
    send_PxS = np.full((count, slots), -1, np.int64)
    send_PxS[owner_U, slot_U] = row_ids_U
    requested_PxS = self._collectives.send_ids(send_PxS, "ids" if train else "read")
    return Exchange(
      slots,
      (owner_U * slots + slot_U).astype(np.int32),
      requested_PxS,
      exchange_cost(count, self._local, slots, self.dim),
    )

  def _answer(self, requested_PxS: np.ndarray) -> np.ndarray:
    """Step 3 on the owner: the requested rows, ``[P, S, D]`` (zeros in empty slots)."""
    answer_PxSxD = np.zeros((*requested_PxS.shape, self.dim), np.float32)
    asked = requested_PxS >= 0
    if asked.any():
      answer_PxSxD[asked] = self.table.pull(requested_PxS[asked] // self.num_shards)
    return answer_PxSxD

  def prefetch(self, row_ids_U: np.ndarray) -> None:
    """Exchange the ids of the next training batch now and start staging the rows this
    process will serve (asynchronous); the next :meth:`pull` of these rows reuses it."""
    exchange = self._exchange(row_ids_U, "train")
    self._staged = (row_ids_U, exchange)
    asked = exchange.requested_PxS[exchange.requested_PxS >= 0]
    self.table.prefetch(np.unique(asked) // self.num_shards)

  def pull(
    self, row_ids_U: np.ndarray, inverse_GxF: np.ndarray, *, kind: str = "train"
  ) -> ShardedRows:
    """Fetch a batch's rows from their owners (steps 1 to 3).

    For training the owners' answers stay on the devices for the step's ``all_to_all``;
    for evaluation an ``all_to_all`` here brings this process its rows, ``[P * S, D]``.
    """
    staged = self._staged if kind == "train" else None  # evaluations leave it staged
    if staged is not None and staged[0] is row_ids_U:
      exchange, self._staged = staged[1], None
    else:
      exchange = self._exchange(row_ids_U, kind)
    answer_PxSxD = self._answer(exchange.requested_PxS)
    inverse_GxF = exchange.position_U[inverse_GxF]
    if kind == "train":
      rows = self._collectives.place_blocks(answer_PxSxD, "rows")
    else:
      rows = self._collectives.deliver(answer_PxSxD, "read").reshape(-1, self.dim)
    return ShardedRows(row_ids_U, rows, inverse_GxF, exchange)

  def push(self, rows: ShardedRows, grads_to_owners: jax.Array) -> np.ndarray:
    """Step 4 on the owner: one sparse optimizer step on the rows it served.

    Args:
      rows: the step's rows, from :meth:`pull`.
      grads_to_owners: the step's gradient output, a global ``[P * P, S, D]`` array whose
        blocks on this process hold, per requester and slot, the gradient of the row it asked
        for (summed over the requester's workers and divided by all workers).

    Returns:
      The rows this shard updated (logical ids, sorted, each once).
    """
    grads_PxSxD = self._collectives.local_blocks(grads_to_owners, "grads")
    requested_PxS = rows.exchange.requested_PxS
    asked = requested_PxS >= 0
    self.table.push(requested_PxS[asked] // self.num_shards, grads_PxSxD[asked])
    return np.unique(requested_PxS[asked])

  # -- state -------------------------------------------------------------------------------
  def rows(self, row_ids: np.ndarray) -> np.ndarray:
    """Current values of rows this shard owns (logical ids), ``[len(row_ids), D]``."""
    row_ids = np.asarray(row_ids, np.int64)
    foreign = row_ids[row_ids % self.num_shards != self.index_in_run]
    if foreign.size:
      raise ValueError(
        f"rows {foreign[:5].tolist()} are not in shard {self.index_in_run} of "
        f"{self.num_shards} (it holds the rows r with r % {self.num_shards} == "
        f"{self.index_in_run})"
      )
    return self.table.pull(row_ids // self.num_shards)

  def stats(self) -> dict:
    """This shard's table counters (hits, misses, hit rate, evictions, bytes read/written)."""
    return self.table.stats()

  def hit_rate(self) -> float:
    """Share of this shard's row reads its host tier served from memory so far."""
    return float(self.table.stats()["hit_rate"])

  def flush(self) -> embedding.TableVersion:
    """Commit this shard at its current step; return the version committed."""
    self.table.flush()
    return self.table.committed

  def transfer_bytes(self) -> dict:
    """Host-device bytes this process copied so far, by direction and kind: the exchange's
    ``counts``, ``ids``, ``rows`` and ``grads``, the trainer's ``batch`` inputs, and the
    evaluations' traffic as ``read``."""
    return self.meter.totals()

  def keep_committed(self) -> None:
    """Close without flushing: the run diverged, and its table's last commit (a checkpoint's,
    or its start) is the last good state."""
    self._flush_on_close = False

  def close(self) -> None:
    self.table.close(flush=self._flush_on_close)


def sharded_device_cache_error(device_cache_rows: int, processes: int) -> str:
  """Why a multi-process run refuses a device tier (the trainer and the tier both check)."""
  return (
    f"device_cache_rows={device_cache_rows} with processes={processes}: the device-resident "
    "sparse optimizer runs on one process's whole table, and a multi-process run's rows "
    "travel between their owners' host tiers in the step's all-to-all; use "
    "device_cache_rows=0 with several processes (or one process for the device tier)"
  )


def check_table_dir(table_dir: str, count: int) -> None:
  """Refuse a directory that holds a table of another layout: nothing is mixed.

  Internal helper: :class:`ShardedSparseTier` calls it before it opens its shard.
  """
  if os.path.exists(os.path.join(table_dir, "table.json")):
    raise ValueError(
      f"table_dir {table_dir!r} holds a one-process table; a {count}-process run keeps one "
      f"shard per process in {shard_dir(table_dir, 0, count)!r} and so on: use another directory"
    )
  others = set()
  for path in glob.glob(os.path.join(glob.escape(table_dir), "shard-*-of-*")):
    match = _SHARD_DIR.search(path)
    if match and int(match.group(2)) != count:
      others.add(int(match.group(2)))
  if others:
    raise ValueError(
      f"table_dir {table_dir!r} holds the shards of a {sorted(others)[0]}-process run; "
      f"this run has {count} processes: use the same number of processes or another directory"
    )


def exchange_cost(num_processes: int, local_devices: int, slots: int, dim: int) -> CommCost:
  """Bytes each device sends per axis, and messages, in one training step's exchange.

  Per device, with ``B = S / L`` slots of each buffer: the counts' ``psum`` over ``'node'``
  (a ring all-reduce of ``P * P`` int32), the ids' ``all_to_all`` (``(P-1) B`` ids), the
  rows' and the gradients' ``all_to_all`` (``(P-1) B D`` float32 each), all on ``'node'``; on
  ``'local'``, the rows' ``all_gather`` and the gradients' ``psum_scatter`` of the process's
  ``P S D`` floats (``(L-1)/L`` of them each). Padding is counted: it is sent.

  Examples:
    >>> exchange_cost(2, 2, 1024, 16).bytes_by_axis
    {'node': 69648.0, 'local': 131072.0}
  """
  count, local = num_processes, local_devices
  per_device = slots // local
  counts = 2 * (count - 1) / count * count * count * 4
  node = counts + (count - 1) * per_device * (ID_BYTES + 2 * 4 * dim)
  rows_bytes = count * slots * dim * 4
  local_bytes = 2 * (local - 1) / local * rows_bytes
  return CommCost(
    {"node": float(node), "local": float(local_bytes)},
    {"node": 2 * (count - 1) + 3 * (count - 1), "local": 2 * (local - 1)},
  )


class _Collectives:
  """The exchange's own programs over the mesh, and the seam between host and global arrays.

  Buffers are global ``[P * P, S, ...]`` arrays sharded ``P('node', 'local')``: process ``p``
  holds rows ``[p * P, (p + 1) * P)`` (one per peer) and each of its devices ``S / L`` slots.
  Every copy between host and devices goes through ``meter``, under the kind the caller names.
  """

  def __init__(self, mesh: Mesh, meter: embedding.TransferMeter):
    self._mesh = mesh
    self._meter = meter
    self._count = mesh.shape["node"]
    self._blocks = NamedSharding(mesh, P("node", "local"))
    self._per_node = NamedSharding(mesh, P("node"))
    self._swap = jax.jit(
      jax.shard_map(
        lambda x: jax.lax.all_to_all(x, "node", 0, 0, tiled=True),
        mesh=mesh,
        in_specs=P("node", "local"),
        out_specs=P("node", "local"),
      )
    )
    self._sum_over_nodes = jax.jit(
      jax.shard_map(lambda x: jax.lax.psum(x, "node"), mesh=mesh, in_specs=P("node"), out_specs=P())
    )

  def gather_counts(self, counts_P: np.ndarray, index: int, kind: str) -> np.ndarray:
    """Every process's counts per owner, ``[requester, owner]``, on every process."""
    mine_1xPxP = np.zeros((1, self._count, self._count), np.int32)
    mine_1xPxP[0, index] = counts_P
    shape = (self._count, self._count, self._count)
    placed = self._meter.place(mine_1xPxP, self._per_node, shape, kind)
    return self._meter.get(self._sum_over_nodes(placed), kind)[0]

  def send_ids(self, send_PxS: np.ndarray, kind: str) -> np.ndarray:
    """All-to-all of int64 ids (as int32 pairs): ``[owner, S]`` out, ``[requester, S]`` in."""
    words_PxSx2 = np.ascontiguousarray(send_PxS).view(np.int32).reshape(*send_PxS.shape, 2)
    received = self.local_blocks(self._swap(self.place_blocks(words_PxSx2, kind)), kind)
    return np.ascontiguousarray(received).view(np.int64).reshape(send_PxS.shape)

  def deliver(self, answer_PxSxD: np.ndarray, kind: str) -> np.ndarray:
    """All-to-all of the owners' answers: this process's rows, ``[owner, S, D]``."""
    return self.local_blocks(self._swap(self.place_blocks(answer_PxSxD, kind)), kind)

  def place_blocks(self, local_PxSx_: np.ndarray, kind: str) -> jax.Array:
    """This process's ``[P, S, ...]`` buffer as its part of a global ``[P * P, S, ...]``."""
    shape = (self._count * local_PxSx_.shape[0], *local_PxSx_.shape[1:])
    return self._meter.place(local_PxSx_, self._blocks, shape, kind)

  def local_blocks(self, array: jax.Array, kind: str) -> np.ndarray:
    """This process's ``[P, S, ...]`` part of a global buffer, joined from its devices."""
    shards = sorted(self._meter.shards(array, kind), key=lambda s: s[0][1].start or 0)
    return np.concatenate([data for _, data in shards], axis=1)


def make_sharded_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  skip_nonfinite: bool = False,
) -> parallel.DispatchedStep:
  """Build ``step(params_W, opt_state_W, answers, inverse_GxF, dense_GxI, label_G)``.

  The multi-process twin of :func:`kstep_adam.ctr._step.make_ctr_train_step`: the same
  per-worker forward and backward and the same dense optimizer, but the rows arrive from
  their owners and their gradients return to them (steps 3 and 4 of the module docstring).

  Args:
    graphdef: the nnx graph definition of the model.
    tx: the dense optimizer (merging over ``('node', 'local')`` on its own schedule).
    mesh: the ``('node', 'local')`` mesh, one process per node.
    skip_nonfinite: a step where any worker's loss or gradients are not finite changes no
      parameter or optimizer moment on any worker; the owners skip their push too.

  Returns:
    A :class:`kstep_adam.parallel.DispatchedStep` returning ``(params_W, opt_state_W,
    grads_to_owners, loss, finite)``: ``answers`` and ``grads_to_owners`` are global
    ``[P * P, S, D]`` buffers sharded ``P('node', 'local')`` (see :class:`ShardedSparseTier`);
    ``inverse_GxF`` indexes each process's ``P * S`` rows; ``loss`` is the global-mean loss
    and ``finite`` whether every worker's loss and gradients were finite (the same on every
    process, so all of them take the same decision on it).
  """
  axes = tuple(mesh.axis_names)
  worker, blocks = P(axes), P("node", "local")
  num_workers = mesh.size

  def per_worker(params_W, opt_state_W, answers_PxBxD, inverse_BxF, dense_BxI, label_B):
    params, opt_state = jax.tree.map(lambda x: x[0], (params_W, opt_state_W))
    mine_PxBxD = jax.lax.all_to_all(answers_PxBxD, "node", 0, 0, tiled=True)
    rows_PxSxD = jax.lax.all_gather(mine_PxBxD, "local", axis=1, tiled=True)
    num_owners, slots, dim = rows_PxSxD.shape
    rows_RxD = rows_PxSxD.reshape(num_owners * slots, dim)
    batch = (inverse_BxF, dense_BxI, label_B)
    loss, (grads, grad_rows_RxD) = _step.worker_value_and_grad(
      graphdef, params, rows_RxD, batch, chunks=1
    )
    finite = _step.all_finite(loss, grads, grad_rows_RxD)  # this worker's
    # One all-reduce for both: the global-mean loss, and the share of workers that were not
    # finite (zero when all were).
    loss, not_finite = jax.lax.pmean(jnp.stack([loss, 1.0 - finite.astype(loss.dtype)]), axes)
    # This worker's share of the global-mean loss's gradient; the owners add the shares up.
    grad_PxSxD = grad_rows_RxD.reshape(num_owners, slots, dim) / num_workers
    grad_PxBxD = jax.lax.psum_scatter(grad_PxSxD, "local", scatter_dimension=1, tiled=True)
    grads_to_owners = jax.lax.all_to_all(grad_PxBxD, "node", 0, 0, tiled=True)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    all_finite = not_finite == 0
    if skip_nonfinite:  # every worker skips, or none does
      new_params = _step.keep_unless(all_finite, new_params, params)
      new_opt_state = _step.keep_unless(all_finite, new_opt_state, opt_state, keep_counters=True)
    params_W, opt_state_W = jax.tree.map(lambda x: x[None], (new_params, new_opt_state))
    return params_W, opt_state_W, grads_to_owners, loss, all_finite

  def build(body: Callable):
    return jax.jit(
      jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(worker, worker, blocks, worker, worker, worker),
        out_specs=(worker, worker, blocks, P(), P()),
      ),
      donate_argnums=(0, 1),
    )

  return parallel.DispatchedStep(build, per_worker)
