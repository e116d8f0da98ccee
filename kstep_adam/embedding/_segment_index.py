"""The in-memory index of a table's segments: which rows they hold, and where, in about 1.5
bytes a row.

A flush writes the rows it changed as segments (``_store``): parts of at most 16 MiB of
rows, each one OCDBT commit, with ascending, disjoint id ranges. The index keeps one *group*
a flush: its parts' names, the position in the group where each part starts, and the sorted
ids of all of them as one ``CompactIds``. A lookup searches one group a flush, newest last,
and the newest group holding a row wins.

Why compact: a merge of segments into the zarr chunks rewrites every chunk that holds a
merged row, which for hashed ids is every chunk of the table, so a table merges rarely only
if many flushes' rows wait in segments at once. At 2^28 rows, a quarter of the table in
segments is 67M ids: 268 MB as uint32, about 100 MB here (1 byte of low bits an id and 4
bytes a bucket of 256 ids), which is what lets a 2^28-row table with a 2 GiB cache merge once
every several flushes and stay under 4 GiB.

Groups only grow at the end (a flush's new parts) and only leave from the front (a merge
takes every group there is when it starts, and deletes them when done), so group numbers
below a merge's count stay those it merges while newer flushes add groups.
"""

import numpy as np

_SHIFTS = (8, 16)  # the bucket widths CompactIds chooses from: low bits kept as uint8, uint16
_END = np.iinfo(np.int64).max  # past every id


class CompactIds:
  """Sorted unique non-negative ids, read-only.

  Each id is split into a bucket (its high bits) and its low 8 or 16 bits; ``starts[b]`` is
  the position of bucket ``b``'s first id. Whichever of the two widths, or plain uint32 (int64
  for ids of 2^32 and more) for ids too sparse for buckets to pay, takes the fewest bytes.
  A search is a vectorized binary search inside the buckets (at most 9 or 17 steps).
  """

  __slots__ = ("_base", "_low", "_plain", "_shift", "_starts", "first", "last", "size")

  def __init__(self, ids_N: np.ndarray):
    """``ids_N``: sorted unique int64 ids."""
    ids_N = np.asarray(ids_N, np.int64)
    n = len(ids_N)
    self._encode(n, int(ids_N[0]) if n else 0, int(ids_N[-1]) if n else -1, lambda: [ids_N])

  @classmethod
  def concatenate(cls, parts: list["CompactIds"]) -> "CompactIds":
    """The ids of ``parts``, each starting after the one before, decoded one at a time (a
    flush's parts become one without an int64 copy of them all)."""
    parts = [part for part in parts if part.size]
    out = cls.__new__(cls)
    n = sum(part.size for part in parts)
    first, last = (parts[0].first, parts[-1].last) if n else (0, -1)
    out._encode(n, first, last, lambda: (part.decode() for part in parts))
    return out

  def _encode(self, n: int, first: int, last: int, arrays) -> None:
    self.size, self.first, self.last = n, first, last
    plain_dtype = np.dtype(np.uint32 if last < 1 << 32 else np.int64)
    cost, self._shift = n * plain_dtype.itemsize, None
    for shift in _SHIFTS if 0 < n < 1 << 32 else ():
      shift_cost = n * shift // 8 + 4 * ((last >> shift) - (first >> shift) + 2)
      if shift_cost < cost:
        cost, self._shift = shift_cost, shift
    if self._shift is None:
      self._plain = np.empty(n, plain_dtype)
      at = 0
      for ids in arrays():
        self._plain[at : at + len(ids)] = ids
        at += len(ids)
      return
    shift = self._shift
    self._base = first >> shift
    buckets = (last >> shift) - self._base + 1
    counts = np.zeros(buckets, np.int64)
    self._low = np.empty(n, np.uint8 if shift == 8 else np.uint16)
    at = 0
    for ids in arrays():
      self._low[at : at + len(ids)] = ids & ((1 << shift) - 1)
      counts += np.bincount((ids >> shift) - self._base, minlength=buckets)
      at += len(ids)
    self._starts = np.zeros(buckets + 1, np.uint32)
    np.cumsum(counts, out=self._starts[1:])

  def __len__(self) -> int:
    return self.size

  @property
  def nbytes(self) -> int:
    if self._shift is None:
      return self._plain.nbytes
    return self._low.nbytes + self._starts.nbytes

  def lower_bound(self, ids_M: np.ndarray) -> np.ndarray:
    """For ids (any order): the position of the first stored id not below each."""
    ids_M = np.asarray(ids_M, np.int64)
    if self._shift is None:
      top = np.iinfo(self._plain.dtype).max
      pos = np.searchsorted(self._plain, np.clip(ids_M, 0, top).astype(self._plain.dtype))
      return np.where(ids_M > top, self.size, pos).astype(np.int64)
    buckets = len(self._starts) - 1
    bucket = (ids_M >> self._shift) - self._base
    inside = (bucket >= 0) & (bucket < buckets)
    clipped = np.clip(bucket, 0, buckets - 1)
    lo = np.where(bucket < 0, 0, np.where(inside, self._starts[clipped], self.size))
    lo = lo.astype(np.int64)
    hi = np.where(inside, self._starts[clipped + 1], lo).astype(np.int64)
    target = (ids_M & ((1 << self._shift) - 1)).astype(self._low.dtype)
    active = np.flatnonzero(lo < hi)
    while len(active):  # in each bucket, the first position whose low bits reach the target
      mid = (lo[active] + hi[active]) >> 1
      less = self._low[mid] < target[active]
      lo[active[less]] = mid[less] + 1
      hi[active[~less]] = mid[~less]
      active = active[lo[active] < hi[active]]
    return lo

  def search(self, ids_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ids: whether each is stored, and its position where it is."""
    ids_M = np.asarray(ids_M, np.int64)
    pos = self.lower_bound(ids_M)
    found = pos < self.size
    found[found] = self.decode_at(pos[found]) == ids_M[found]
    return found, pos

  def decode(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """The ids at positions ``[lo, hi)``, as int64."""
    hi = self.size if hi is None else min(hi, self.size)
    if hi <= lo:
      return np.zeros(0, np.int64)
    if self._shift is None:
      return self._plain[lo:hi].astype(np.int64)
    first = int(np.searchsorted(self._starts, lo, side="right")) - 1
    last = int(np.searchsorted(self._starts, hi - 1, side="right")) - 1
    bounds = np.clip(self._starts[first : last + 2].astype(np.int64), lo, hi)
    high = np.repeat(np.arange(first, last + 1, dtype=np.int64), np.diff(bounds))
    return ((high + self._base) << self._shift) | self._low[lo:hi]

  def decode_at(self, positions: np.ndarray) -> np.ndarray:
    """The ids at given positions, as int64."""
    positions = np.asarray(positions, np.int64)
    if self._shift is None:
      return self._plain[positions].astype(np.int64)
    bucket = np.searchsorted(self._starts, positions, side="right").astype(np.int64) - 1
    return ((bucket + self._base) << self._shift) | self._low[positions]


class _Group:
  """One flush's parts: their names, where each starts in the group, and their ids, as one
  ``CompactIds`` once sealed (one a part while the flush writes them)."""

  __slots__ = ("_piece_starts", "_pieces", "names", "part_starts", "sealed")

  def __init__(self):
    self.sealed = False  # its flush has written every part
    self.names: list[bytes] = []
    self.part_starts = np.zeros(1, np.int64)
    self._pieces: list[CompactIds] = []
    self._piece_starts = [0]

  @property
  def size(self) -> int:
    return int(self.part_starts[-1])

  @property
  def nbytes(self) -> int:
    return sum(piece.nbytes for piece in self._pieces)

  def append(self, name: bytes, ids_N: np.ndarray) -> None:
    self.sealed = False
    self.names.append(name)
    self.part_starts = np.append(self.part_starts, self.size + len(ids_N))
    self._pieces.append(CompactIds(ids_N))
    self._piece_starts.append(self.size)

  def seal(self) -> None:
    self.sealed = True
    if len(self._pieces) > 1:
      self._pieces = [CompactIds.concatenate(self._pieces)]
      self._piece_starts = [0, self.size]

  def _overlapping(self, low: int, high: int):
    """``(piece, its first position)`` of the pieces holding ids in ``[low, high)``."""
    for piece, start in zip(self._pieces, self._piece_starts):
      if piece.first < high and piece.last >= low:
        yield piece, start

  def search(self, ids_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted ids: whether each is in the group, and its position there."""
    found, pos = np.zeros(len(ids_M), bool), np.zeros(len(ids_M), np.int64)
    for piece, start in zip(self._pieces, self._piece_starts):
      lo, hi = np.searchsorted(ids_M, [piece.first, piece.last + 1])
      if lo < hi:
        found[lo:hi], pos[lo:hi] = piece.search(ids_M[lo:hi])
        pos[lo:hi] += start
    return found, pos

  def range(self, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids in ``[low, high)`` and their positions in the group."""
    ids, positions = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for piece, start in self._overlapping(low, high):
      lo, hi = piece.lower_bound(np.array([low, high]))
      ids.append(piece.decode(int(lo), int(hi)))
      positions.append(np.arange(start + lo, start + hi))
    return np.concatenate(ids), np.concatenate(positions)

  def first_at_least(self, low: int) -> int | None:
    for piece, _ in self._overlapping(low, _END):
      pos = int(piece.lower_bound(np.array([low]))[0])
      if pos < piece.size:
        return int(piece.decode_at(np.array([pos]))[0])
    return None

  def part_ids(self, part: int) -> np.ndarray:
    """The ids of one part."""
    lo, hi = int(self.part_starts[part]), int(self.part_starts[part + 1])
    ids = []
    for piece, start in zip(self._pieces, self._piece_starts):  # the pieces overlapping it
      if start < hi and start + piece.size > lo:
        ids.append(piece.decode(max(lo - start, 0), hi - start))
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)

  def ids(self) -> np.ndarray:
    return self.range(0, _END)[0]


class SegmentIndex:
  """The groups of a table's segments, oldest first (see the module docstring). Not
  thread-safe: the store guards it with a lock that readers share."""

  def __init__(self):
    self._groups: list[_Group] = []

  def __len__(self) -> int:
    """The number of groups."""
    return len(self._groups)

  def names(self, groups: int | None = None) -> list[bytes]:
    """The names of the parts of the oldest ``groups`` groups (default: all), oldest first."""
    return [name for group in self._groups[:groups] for name in group.names]

  def sealed_groups(self) -> int:
    """The number of groups, oldest first, whose flush has written every part (a merge takes
    no group a flush is still writing)."""
    return next((no for no, group in enumerate(self._groups) if not group.sealed), len(self))

  def records(self, groups: int | None = None) -> int:
    """Rows the oldest ``groups`` groups hold (superseded ones included)."""
    return sum(group.size for group in self._groups[:groups])

  @property
  def nbytes(self) -> int:
    return sum(group.nbytes for group in self._groups)

  def add(self, name: bytes, ids_N: np.ndarray, new_group: bool) -> None:
    """Adds a part newer than every other (sorted unique int64 ids), starting a group or
    continuing the newest one (its ids then come after the group's). A part that is there
    already is what a redone flush writes again: it must hold the same ids."""
    for group in self._groups:
      if name in group.names:
        if not np.array_equal(group.part_ids(group.names.index(name)), ids_N):
          raise RuntimeError(f"segment {name!r} was rewritten with other rows")
        return
    if new_group or not self._groups:
      self._groups.append(_Group())
    self._groups[-1].append(name, ids_N)

  def seal(self) -> None:
    """Encodes the newest group whole, once its flush has written every part."""
    if self._groups:
      self._groups[-1].seal()

  def drop(self, groups: int) -> None:
    """Forgets the oldest ``groups`` groups (merged, and deleted from the database)."""
    del self._groups[:groups]

  def lookup(self, ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted unique ids: the number of the newest group holding each (-1: none) and the
    row's position there."""
    group_no = np.full(len(ids_N), -1, np.int32)
    pos = np.zeros(len(ids_N), np.int64)
    for no, group in enumerate(self._groups):  # oldest first: newer ones overwrite
      found, at = group.search(ids_N)
      group_no[found], pos[found] = no, at[found]
    return group_no, pos

  def where(self, group_no: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """For positions in one group: the part each lies in (an index into the returned names
    of the group's parts) and its row in that part."""
    group = self._groups[group_no]
    part = np.searchsorted(group.part_starts, pos, side="right") - 1
    return part, pos - group.part_starts[part], group.names

  def newest_in(self, low: int, high: int, groups: int):
    """The ids in ``[low, high)`` whose newest record is in one of the oldest ``groups``
    groups: ``(ids, group numbers, positions)``, ids ascending."""
    found = [group.range(low, high) for group in self._groups]
    ids = np.concatenate([ids for ids, _ in found] or [np.zeros(0, np.int64)])
    if not len(ids):
      return ids, np.zeros(0, np.int32), np.zeros(0, np.int64)
    group_no = np.repeat(np.arange(len(found), dtype=np.int32), [len(i) for i, _ in found])
    pos = np.concatenate([pos for _, pos in found])
    order = np.argsort(ids, kind="stable")  # equal ids: oldest group first
    ids, group_no, pos = ids[order], group_no[order], pos[order]
    newest = np.append(ids[1:] != ids[:-1], True)  # the last of each run of equal ids
    keep = newest & (group_no < groups)
    return ids[keep], group_no[keep], pos[keep]

  def first_at_least(self, low: int, groups: int) -> int | None:
    """The smallest id not below ``low`` in the oldest ``groups`` groups (None: none)."""
    found = [group.first_at_least(low) for group in self._groups[:groups]]
    found = [i for i in found if i is not None]
    return min(found) if found else None

  def ids(self) -> np.ndarray:
    """The sorted unique ids of every group."""
    return np.unique(np.concatenate([np.zeros(0, np.int64)] + [g.ids() for g in self._groups]))
