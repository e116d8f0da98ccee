"""Counting the bytes that cross between host and device memory.

Every copy the embedding tier or the CTR trainer makes between NumPy and device arrays goes
through one :class:`TransferMeter`, so a run can report its host-device traffic per step by
kind (rows, gradients, slot numbers, batch inputs). A copy to a sharding held by several
devices counts once per device: that is what crosses the links.
"""

from __future__ import annotations

import jax
import numpy as np


class TransferMeter:
  """Copies pytrees to and from devices and counts their bytes, by direction and kind.

  Examples:
    >>> meter = TransferMeter()
    >>> x = meter.put(np.zeros(4, np.float32), jax.devices()[0], "rows")
    >>> _ = meter.get(x, "rows")
    >>> meter.totals()
    {'to_device': {'rows': 16}, 'to_host': {'rows': 16}}
  """

  def __init__(self):
    self.to_device: dict[str, int] = {}
    self.to_host: dict[str, int] = {}

  def put(self, tree, sharding, kind: str):
    """``jax.device_put(tree, sharding)``, counting the bytes every device receives (all of a
    replicated leaf, its slice of a split one); leaves on devices already count nothing."""
    placed = jax.device_put(tree, sharding)
    nbytes = sum(
      sum(s.data.nbytes for s in out.addressable_shards)
      for x, out in zip(jax.tree.leaves(tree), jax.tree.leaves(placed), strict=True)
      if not isinstance(x, jax.Array)
    )
    self._add(self.to_device, kind, nbytes)
    return placed

  def lend(self, tree, sharding, kind: str):
    """Count the copy of NumPy ``tree`` to ``sharding`` that a jitted call taking it makes
    itself, and return ``tree`` as it is. The call's own transfer skips ``device_put``'s
    Python work per leaf (about 40 us a leaf on a 2-core CPU host); the bytes are those
    :meth:`put` counts. Only for a replicated ``sharding`` (a NumPy argument is taken as
    replicated) of a call whose program takes ``tree`` so."""
    if isinstance(sharding, jax.Device):
      sharding = jax.sharding.SingleDeviceSharding(sharding)
    devices = len(sharding.addressable_devices)
    nbytes = 0
    for x in jax.tree.leaves(tree):
      x = np.asarray(x)
      nbytes += int(np.prod(sharding.shard_shape(x.shape))) * x.dtype.itemsize * devices
    self._add(self.to_device, kind, nbytes)
    return tree

  def get(self, tree, kind: str):
    """``jax.device_get(tree)`` as NumPy, counting one copy of every leaf's bytes."""
    host = jax.device_get(tree)
    self.to_host[kind] = self.to_host.get(kind, 0) + sum(
      np.asarray(x).nbytes for x in jax.tree.leaves(host)
    )
    return jax.tree.map(np.asarray, host)

  def place(self, local_data: np.ndarray, sharding, global_shape: tuple, kind: str) -> jax.Array:
    """``jax.make_array_from_process_local_data``: this process's part of a global array,
    counting the bytes its devices receive (a part held by several devices once per device)."""
    array = jax.make_array_from_process_local_data(sharding, local_data, global_shape)
    self._add(self.to_device, kind, sum(s.data.nbytes for s in array.addressable_shards))
    return array

  def shards(self, array: jax.Array, kind: str) -> list[tuple[tuple, np.ndarray]]:
    """This process's shards of ``array`` as ``(index, NumPy data)``, counting their bytes."""
    shards = [(s.index, np.asarray(s.data)) for s in array.addressable_shards]
    self._add(self.to_host, kind, sum(data.nbytes for _, data in shards))
    return shards

  @staticmethod
  def _add(counts: dict[str, int], kind: str, nbytes: int) -> None:
    counts[kind] = counts.get(kind, 0) + int(nbytes)

  def totals(self) -> dict:
    """``{"to_device": {kind: bytes}, "to_host": {kind: bytes}}``."""
    return {"to_device": dict(self.to_device), "to_host": dict(self.to_host)}

  def total_bytes(self) -> int:
    return sum(self.to_device.values()) + sum(self.to_host.values())
