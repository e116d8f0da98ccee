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

from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kstep_adam import _distributed
from kstep_adam import embedding
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._exchange import Exchange
from kstep_adam.ctr.train._exchange import check_table_dir
from kstep_adam.ctr.train._exchange import exchange_cost
from kstep_adam.ctr.train._exchange import exchange_slots
from kstep_adam.ctr.train._exchange import shard_dir
from kstep_adam.ctr.train._exchange import shard_rows
from kstep_adam.ctr.train._exchange import sharded_device_cache_error
from kstep_adam.ctr.train._optimizer import sparse_optimizer
from kstep_adam.ctr.train._tier import TableTier


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


class ShardedSparseTier(TableTier):
  """This process's shard of the embedding table and its side of the exchange.

  A :class:`~._tier.Tier` like :class:`~._local_tier.SparseTier`; :meth:`push` takes the
  step's output and returns the rows this shard updated. Every method but ``index``,
  ``stats``, ``hit_rate`` and ``close`` is collective: all processes call it, in the same
  order.

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
      optimizer=sparse_optimizer(config),
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

  def eval_rows(
    self, row_ids_U: np.ndarray, inverse_GxF: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray]:
    """A held-out batch's rows ``[P * S, D]`` (from their owners; collective) and where each
    key's row is among them."""
    rows = self.pull(row_ids_U, inverse_GxF, kind="eval")
    return rows.rows, rows.inverse_GxF

  def run_stats(self) -> dict:
    """The shards' counters summed (hit rate over all their reads), each shard's own under
    ``shards``. Collective."""
    shards = _distributed.allgather_json(self.stats())
    total = {
      key: sum(s[key] for s in shards)
      for key, value in shards[0].items()
      if isinstance(value, int) and key != "step"
    }
    lookups = total["hits"] + total["misses"]
    return {
      **total,
      "hit_rate": total["hits"] / lookups if lookups else 0.0,
      "step": shards[0]["step"],
      "shards": shards,
    }

  def transfer_bytes(self) -> dict:
    """Host-device bytes this process copied so far, by direction and kind: the exchange's
    ``counts``, ``ids``, ``rows`` and ``grads``, the trainer's ``batch`` inputs, and the
    evaluations' traffic as ``read``."""
    return self.meter.totals()


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
