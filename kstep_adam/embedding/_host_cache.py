"""The host tier: a bounded write-back cache of table rows in RAM, with CLOCK eviction.

Rows live in one preallocated float32 block ``rows_CxW`` (C = capacity, W = the row
layout's width, see ``_store``). An ``IdSlotMap`` (or, for a small id range, a
``DenseIdMap``) maps row ids to slots. Eviction is
CLOCK (second chance): every access sets a slot's reference bit; the hand sweeps the
slots, clearing set bits and evicting the first unpinned slot whose bit is already
clear. CLOCK approximates LRU at O(1) bookkeeping per access, and it is vectorized here
by sweeping a window of slots per NumPy call.

A slot is *pinned* while an operation uses it (its pin count is > 0) and while its row
is being read from disk (``loading``); pinned slots are never evicted. A *dirty* slot
holds a row newer than the disk; evicting it hands the row to the caller's write-back
first, and a failed write-back leaves the cache unchanged. This class does no I/O and no
locking; the table does both.
"""

import numpy as np

from kstep_adam.embedding._id_map import DenseIdMap
from kstep_adam.embedding._id_map import IdSlotMap


class HostCache:
  """A fixed-capacity row cache. Not thread-safe: the table holds its lock around calls."""

  def __init__(self, capacity_rows: int, width: int, dense_ids: int | None = None):
    self.capacity = capacity_rows
    self.rows_CxW = np.zeros((capacity_rows, width), np.float32)
    self.ids_C = np.full(capacity_rows, -1, np.int64)  # -1: free slot
    self.dirty_C = np.zeros(capacity_rows, bool)
    self.ref_C = np.zeros(capacity_rows, bool)
    self.pins_C = np.zeros(capacity_rows, np.int32)
    self.loading_C = np.zeros(capacity_rows, bool)
    # ids below dense_ids map through a direct array (see _id_map.DenseIdMap), else hashed
    self._map = IdSlotMap(capacity_rows) if dense_ids is None else DenseIdMap(dense_ids)
    self._free_slots = np.arange(capacity_rows - 1, -1, -1, dtype=np.int64)
    self._num_free = capacity_rows
    self._hand = 0
    self._num_pinned = 0  # slots with pins_C > 0
    self.evictions = 0
    self.dirty_evictions = 0

  def __len__(self) -> int:
    return len(self._map)

  def lookup(self, ids_U: np.ndarray) -> np.ndarray:
    """Slots of ``ids_U`` (-1 where absent); sets the reference bit of every hit."""
    slots_U = self._map.lookup(ids_U)
    self.ref_C[slots_U[slots_U >= 0]] = True
    return slots_U

  def peek(self, ids_U: np.ndarray) -> np.ndarray:
    """Slots of ``ids_U`` (-1 where absent) without touching reference bits."""
    return self._map.lookup(ids_U)

  def abort(self, slots_M: np.ndarray) -> None:
    """Frees reserved slots whose load failed."""
    self.free(slots_M)

  def free(self, slots_M: np.ndarray) -> None:
    """Forgets the rows in ``slots_M`` (pinned or not) and frees the slots; no write-back."""
    self._map.delete(self.ids_C[slots_M])
    self.ids_C[slots_M] = -1
    self.loading_C[slots_M] = False
    self._num_pinned -= int(np.count_nonzero(self.pins_C[slots_M] > 0))
    self.pins_C[slots_M] = 0
    self._free_slots[self._num_free : self._num_free + len(slots_M)] = slots_M
    self._num_free += len(slots_M)

  def pin(self, slots: np.ndarray) -> None:
    # slots are unique: they come from unique ids
    self._num_pinned += int(np.count_nonzero(self.pins_C[slots] == 0))
    self.pins_C[slots] += 1

  def unpin(self, slots: np.ndarray) -> None:
    self.pins_C[slots] -= 1
    self._num_pinned -= int(np.count_nonzero(self.pins_C[slots] == 0))

  def num_evictable(self) -> int:
    """Slots that are free or hold an unpinned row."""
    return self.capacity - self._num_pinned

  def reserve(self, ids_M: np.ndarray, write_back=None) -> np.ndarray:
    """Assigns slots to absent unique ``ids_M``, evicting as needed; returns the slots.

    The new slots are registered, pinned once and marked ``loading`` until ``fill``. The
    *dirty* rows that eviction displaces are handed to ``write_back(ids_V, rows_VxW)``
    first, before the cache changes: if it raises, the cache is left as it was (only
    CLOCK reference bits moved) and the exception propagates, so a failed write-back never
    loses a row. ``write_back`` may be None only for a cache whose rows have no payload
    (the device cache's slot map).
    """
    m = len(ids_M)
    take = min(m, self._num_free)
    free = self._free_slots[self._num_free - take : self._num_free][::-1]
    victims = self._choose_victims(m - take) if take < m else np.zeros(0, np.int64)
    dirty = self.dirty_C[victims]
    if write_back is not None:
      try:
        write_back(self.ids_C[victims[dirty]], self.rows_CxW[victims[dirty]])
      except BaseException:
        self.unpin(victims)  # _choose_victims pinned them; nothing else has changed
        raise
    # The write-back is safe: now evict and assign.
    self._num_free -= take
    self._num_pinned += take
    self._map.delete(self.ids_C[victims])
    self.evictions += len(victims)
    self.dirty_evictions += int(np.count_nonzero(dirty))
    slots_M = np.concatenate([free, victims])
    self.ids_C[slots_M] = ids_M
    self.dirty_C[slots_M] = False
    self.ref_C[slots_M] = True
    self.loading_C[slots_M] = True
    self.pins_C[slots_M] = 1
    self._map.insert(ids_M, slots_M)
    return slots_M

  def fill(self, slots_M: np.ndarray, rows_MxW: np.ndarray) -> None:
    """Stores rows read from disk into reserved slots and clears their ``loading`` flag."""
    self.rows_CxW[slots_M] = rows_MxW
    self.loading_C[slots_M] = False

  def _choose_victims(self, n: int) -> np.ndarray:
    """Runs the CLOCK hand until it has ``n`` unpinned victims (pins them)."""
    capacity = self.capacity
    chosen = []
    scanned = 0
    while n > 0:
      if scanned > 2 * capacity + 1:
        raise RuntimeError("host cache: every slot is pinned")
      window = min(capacity, max(2 * n, 4096))
      idx = (self._hand + np.arange(window)) % capacity
      evictable = (self.pins_C[idx] == 0) & (self.ids_C[idx] >= 0)
      pos = np.flatnonzero(evictable & ~self.ref_C[idx])
      if len(pos) >= n:
        last = int(pos[n - 1])
        victims = idx[pos[:n]]
        self.ref_C[idx[: last + 1]] = False
        self._hand = (self._hand + last + 1) % capacity
      else:
        victims = idx[pos]
        self.ref_C[idx] = False
        self._hand = (self._hand + window) % capacity
      self.pins_C[victims] += 1
      self._num_pinned += len(victims)
      chosen.append(victims)
      n -= len(victims)
      scanned += window
    return np.concatenate(chosen)
