"""A vectorized open-addressing hash map from int64 row ids to int32 cache slots.

A Python dict costs about 100 ns per id; at 50k ids per step that is several ms per
lookup. This map probes all ids of a batch at once with NumPy: linear probing over a
table of ``slots_per_entry`` slots per entry of the maximum entry count (3: live entries
fill at most a third), Fibonacci hashing with a multiply-shift range reduction,
tombstones for deletions, and a rebuild once live entries plus tombstones pass three
quarters of the table (every ~(0.75 * slots_per_entry - 1) * max_entries deletions, so
rebuilds cost O(1) amortized). Memory: 12 bytes per slot (16 with int64 values); a
rebuild frees the old table before it allocates the new one, so it adds only a compact
copy of the live entries, not a second table. Fewer slots per entry trade longer probes
and more frequent rebuilds for memory: the host cache's map (an entry per cached row,
constant churn) keeps 3, the pending log's index (an entry per row evicted since the last
flush, which can reach tens of millions) takes 2.
"""

import numpy as np

_EMPTY = -1
_TOMBSTONE = -2
_FIBONACCI_U64 = np.uint64(0x9E3779B97F4A7C15)
_REBUILD_BLOCK = 1 << 20  # entries re-inserted per call by a rebuild


class IdSlotMap:
  """Maps non-negative int64 ids to int values; all operations take whole arrays.

  Values are int32 (cache slots) unless ``value_dtype`` says otherwise (int64 for record
  positions of a log that may pass 2**31 records). ``slots_per_entry`` (>= 2) sizes the
  table against ``max_entries`` (see the module docstring).
  """

  def __init__(self, max_entries: int, value_dtype=np.int32, slots_per_entry: int = 3):
    self._max_entries = max_entries
    self._slots_per_entry = slots_per_entry
    self._keys = np.full(max(16, slots_per_entry * max_entries), _EMPTY, np.int64)
    self._values = np.zeros(len(self._keys), value_dtype)
    self._num_live = 0
    self._num_tombstones = 0

  def __len__(self) -> int:
    return self._num_live

  def _home(self, ids: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
      h = (ids.astype(np.uint64) * _FIBONACCI_U64) >> np.uint64(32)
      return ((h * np.uint64(len(self._keys))) >> np.uint64(32)).astype(np.int64)

  def _find(self, ids: np.ndarray) -> np.ndarray:
    """Table positions of ``ids``, or -1 where absent."""
    size = len(self._keys)
    pos = self._home(ids)
    found = np.full(len(ids), -1, np.int64)
    active = np.arange(len(ids))
    while active.size:
      p = pos[active]
      k = self._keys[p]
      hit = k == ids[active]
      found[active[hit]] = p[hit]
      keep = ~(hit | (k == _EMPTY))
      active = active[keep]
      pos[active] = (p[keep] + 1) % size
    return found

  def lookup(self, ids: np.ndarray) -> np.ndarray:
    """Values of ``ids``, or -1 where an id is absent."""
    pos = self._find(ids)
    return np.where(pos >= 0, self._values[np.maximum(pos, 0)], -1)

  def insert(self, ids: np.ndarray, values: np.ndarray) -> None:
    """Inserts unique ``ids`` that are not yet present."""
    if self._num_live + self._num_tombstones + len(ids) > 3 * len(self._keys) // 4:
      self._rebuild(extra=len(ids))
    size = len(self._keys)
    pos = self._home(ids)
    pending = np.arange(len(ids))
    while pending.size:
      p = pos[pending]
      k = self._keys[p]
      free = (k == _EMPTY) | (k == _TOMBSTONE)
      cand, cand_pos = pending[free], p[free]
      was_tombstone = k[free] == _TOMBSTONE
      # Several ids may probe the same free position: one write lands (NumPy keeps the
      # last of duplicate-index assignments), and the others see a taken slot and probe on.
      self._keys[cand_pos] = ids[cand]
      won = self._keys[cand_pos] == ids[cand]
      self._values[cand_pos[won]] = values[cand[won]]
      self._num_tombstones -= int(np.count_nonzero(was_tombstone & won))
      placed = np.zeros(len(ids), bool)
      placed[cand[won]] = True
      pending = pending[~placed[pending]]
      pos[pending] = (pos[pending] + 1) % size
    self._num_live += len(ids)

  def delete(self, ids: np.ndarray) -> None:
    """Removes ``ids``, which must all be present."""
    pos = self._find(ids)
    if np.any(pos < 0):
      raise KeyError("IdSlotMap.delete: some ids are absent")
    self._keys[pos] = _TOMBSTONE
    self._num_live -= len(ids)
    self._num_tombstones += len(ids)

  def items(self):
    """All live ``(keys, values)``, in table order."""
    live = self._keys >= 0
    return self._keys[live], self._values[live].astype(np.int64)

  def _rebuild(self, extra: int) -> None:
    live = self._keys >= 0
    keys, values = self._keys[live], self._values[live]
    value_dtype = self._values.dtype
    self._keys = self._values = live = None  # freed before the new table is allocated
    self._max_entries = max(self._max_entries, len(keys) + extra)
    self._keys = np.full(max(16, self._slots_per_entry * self._max_entries), _EMPTY, np.int64)
    self._values = np.zeros(len(self._keys), value_dtype)
    self._num_live = 0
    self._num_tombstones = 0
    # In blocks: an insert holds several temporaries the size of its input.
    for lo in range(0, len(keys), _REBUILD_BLOCK):
      self.insert(keys[lo : lo + _REBUILD_BLOCK], values[lo : lo + _REBUILD_BLOCK])


class DenseIdMap:
  """``IdSlotMap``'s interface over ids in ``[0, num_ids)`` as one direct array: a lookup,
  insert or delete is a single gather or scatter, with no probing and no rebuilds.

  Memory is ``num_ids`` values (4 or 8 bytes each) however few entries are live, so the
  table uses it only when the whole id range is small next to its host cache
  (``_table.dense_id_maps``), and the hash map otherwise.
  """

  def __init__(self, num_ids: int, value_dtype=np.int32):
    self._values = np.full(num_ids, -1, value_dtype)
    self._num_live = 0

  def __len__(self) -> int:
    return self._num_live

  def lookup(self, ids: np.ndarray) -> np.ndarray:
    """Values of ``ids``, or -1 where an id is absent."""
    return self._values[ids]

  def insert(self, ids: np.ndarray, values: np.ndarray) -> None:
    """Inserts unique ``ids`` that are not yet present."""
    self._values[ids] = values
    self._num_live += len(ids)

  def delete(self, ids: np.ndarray) -> None:
    """Removes ``ids``, which must all be present."""
    if len(ids) and np.any(self._values[ids] < 0):
      raise KeyError("DenseIdMap.delete: some ids are absent")
    self._values[ids] = -1
    self._num_live -= len(ids)

  def items(self):
    """All live ``(keys, values)``, keys ascending."""
    keys = np.flatnonzero(self._values >= 0)
    return keys, self._values[keys].astype(np.int64)
