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
    """``jax.device_put(tree, sharding)``, counting the bytes of every leaf per device."""
    copies = len(sharding.device_set) if hasattr(sharding, "device_set") else 1
    nbytes = sum(
      np.asarray(x).nbytes for x in jax.tree.leaves(tree) if not isinstance(x, jax.Array)
    )
    self.to_device[kind] = self.to_device.get(kind, 0) + nbytes * copies
    return jax.device_put(tree, sharding)

  def get(self, tree, kind: str):
    """``jax.device_get(tree)`` as NumPy, counting one copy of every leaf's bytes."""
    host = jax.device_get(tree)
    self.to_host[kind] = self.to_host.get(kind, 0) + sum(
      np.asarray(x).nbytes for x in jax.tree.leaves(host)
    )
    return jax.tree.map(np.asarray, host)

  def totals(self) -> dict:
    """``{"to_device": {kind: bytes}, "to_host": {kind: bytes}}``."""
    return {"to_device": dict(self.to_device), "to_host": dict(self.to_host)}

  def total_bytes(self) -> int:
    return sum(self.to_device.values()) + sum(self.to_host.values())
