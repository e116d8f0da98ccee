"""The sharded tier's exchange plan: who owns which rows, how many slots, what it costs.

Pure functions and a record of one exchange, shared by the sharded tier (:mod:`._sharded_tier`,
whose module docstring describes the exchange) and the accounting (:mod:`._meters`); the checks
that refuse a table directory or a device cache a multi-process run cannot use.
"""

from __future__ import annotations

import glob
import os
import re
from typing import NamedTuple

import numpy as np

from kstep_adam._comm import CommCost
from kstep_adam.ctr.train._tier import bucket_size

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
