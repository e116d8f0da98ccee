"""The segment index (``kstep_adam/embedding/_segment_index.py``) against NumPy's own searches:
every encoding ``CompactIds`` chooses, ids at the edges of its buckets and of the id range, and
the groups of a ``SegmentIndex`` as flushes and merges add and drop them."""

import numpy as np
import pytest

from kstep_adam import embedding
from kstep_adam.embedding import _table
from kstep_adam.embedding._segment_index import CompactIds
from kstep_adam.embedding._segment_index import SegmentIndex


def _ids(rng, universe, n):
  return np.unique(rng.integers(0, universe, n)).astype(np.int64)


@pytest.mark.parametrize(
  "universe,n,shift",
  [
    (1 << 20, 200_000, 8),  # dense: a byte an id and a bucket of 256
    (1 << 20, 1000, 16),  # sparser: two bytes an id and a bucket of 65536
    (1 << 34, 100, None),  # too sparse for buckets, and past 2^32: plain int64
    (1 << 20, 20, None),  # plain uint32
  ],
)
def test_compact_ids_search_like_numpy_in_every_encoding(universe, n, shift):
  rng = np.random.default_rng(n)
  ids = _ids(rng, universe, n)
  ids[-1] = universe - 1  # the last id of the range
  if shift:
    ids = np.unique(np.concatenate([ids, [255, 256, 65535, 65536]]))  # bucket edges
  compact = CompactIds(ids)
  assert compact._shift == shift and len(compact) == len(ids)
  assert compact.nbytes <= ids.size * (4 if universe <= 1 << 32 else 8)
  queries = np.unique(
    np.concatenate([rng.integers(0, universe, 3000), ids[::7], ids - 1, ids + 1, [0, universe]])
  )
  queries = queries[queries >= 0]
  np.testing.assert_array_equal(compact.lower_bound(queries), np.searchsorted(ids, queries))
  found, pos = compact.search(queries)
  np.testing.assert_array_equal(found, np.isin(queries, ids))
  np.testing.assert_array_equal(pos[found], np.searchsorted(ids, queries[found]))
  np.testing.assert_array_equal(compact.decode(), ids)
  for lo, hi in [(0, 1), (3, len(ids) // 2), (len(ids) - 2, len(ids) + 5), (5, 5)]:
    np.testing.assert_array_equal(compact.decode(lo, hi), ids[lo:hi])
  np.testing.assert_array_equal(compact.decode_at([0, len(ids) - 1]), ids[[0, -1]])
  parts = CompactIds.concatenate([CompactIds(part) for part in np.array_split(ids, 5)])
  np.testing.assert_array_equal(parts.decode(), ids)
  assert parts.nbytes == compact.nbytes


def test_a_2_28_row_flush_takes_under_two_bytes_a_row():
  """What the index is for: one flush of the 2^28-row benchmark (7.4M rows) in 1.6 bytes a
  row, where uint32 ids took 4."""
  gaps = np.random.default_rng(0).geometric(7_400_000 / (1 << 28), 7_400_000)
  ids = np.cumsum(gaps) - 1  # uniform random rows, sorted and unique, without a sort
  ids = ids[ids < 1 << 28]
  assert len(ids) > 7_000_000 and CompactIds(ids).nbytes < 1.6 * len(ids)


def test_segment_index_groups_lookups_and_merges_like_a_dictionary():
  """Flushes of 3 parts each: the newest group holding a row wins, a merge's range holds the
  rows whose newest record is in its groups, and a dropped group is forgotten."""
  rng = np.random.default_rng(1)
  index, newest, records = SegmentIndex(), {}, 0
  for flush in range(5):
    ids = _ids(rng, 5000, 900)
    records += len(ids)
    for part, part_ids in enumerate(np.array_split(ids, 3)):
      index.add(b"seg/%012d.%06d/" % (flush, part), part_ids, new_group=part == 0)
      if flush == 4 and part == 1:  # a flush under way: its group reads, no merge takes it
        group_no, _ = index.lookup(part_ids)
        assert (group_no == 4).all() and index.sealed_groups() == 4
    for i, at in zip(ids, range(len(ids))):
      newest[int(i)] = (flush, at)
    index.seal()
  assert len(index) == 5 and index.records() == records and len(index.names()) == 15
  assert index.sealed_groups() == 5
  everything = np.arange(5000)
  group_no, pos = index.lookup(everything)
  expected = np.array([newest.get(int(i), (-1, 0))[0] for i in everything])
  np.testing.assert_array_equal(group_no, expected)
  held = group_no >= 0
  np.testing.assert_array_equal(pos[held], [newest[int(i)][1] for i in everything[held]])
  part, offset, names = index.where(2, pos[group_no == 2])
  starts = index._groups[2].part_starts
  np.testing.assert_array_equal(offset + starts[part], pos[group_no == 2])
  assert names == index.names()[6:9]
  ids, merged_group, _ = index.newest_in(1000, 3000, 3)
  want = [i for i in range(1000, 3000) if i in newest and newest[i][0] < 3]
  np.testing.assert_array_equal(ids, want)
  assert (merged_group < 3).all()
  assert index.first_at_least(4990, 5) == min([i for i in newest if i >= 4990], default=None)
  index.add(b"seg/%012d.%06d/" % (4, 0), index._groups[4].part_ids(0), new_group=True)  # a redo
  assert len(index) == 5
  # A redo that goes on after the parts read at open: the sealed group takes a new part, and
  # every part's ids stay its own.
  before = [index._groups[4].part_ids(k) for k in range(3)]
  index.add(b"seg/%012d.%06d/" % (4, 3), np.array([6000, 6001]), new_group=False)
  assert index.sealed_groups() == 4
  for k, ids in enumerate(before + [np.array([6000, 6001])]):
    np.testing.assert_array_equal(index._groups[4].part_ids(k), ids)
    index.add(b"seg/%012d.%06d/" % (4, k), ids, new_group=False)  # the same again: no change
  index.seal()
  np.testing.assert_array_equal(index._groups[4].part_ids(3), [6000, 6001])
  with pytest.raises(RuntimeError, match="rewritten with other rows"):
    index.add(b"seg/%012d.%06d/" % (4, 0), np.array([1, 2]), new_group=True)
  index.drop(3)
  assert len(index) == 2 and index.names()[0] == b"seg/%012d.%06d/" % (3, 0)
  group_no, _ = index.lookup(everything)
  assert set(np.unique(group_no)) <= {-1, 0, 1}


def test_a_reopened_table_indexes_one_group_a_flush(tmp_path, monkeypatch):
  """Each flush's parts come back as one group at open, also a second flush at the same step
  whose parts overlap the first's."""
  monkeypatch.setattr(_table, "_FLUSH_BATCH_BYTES", 4 * 4 * (1 + 3 * 2))  # 4 rows a part
  monkeypatch.setattr(_table, "_BACKGROUND_MERGE_FRACTION", 0)
  path = str(tmp_path / "t")
  optimizer = embedding.SparseAdam(learning_rate=0.1, mode="exact")
  rng = np.random.default_rng(2)
  table = embedding.open_table(path, num_rows=1 << 16, dim=2, optimizer=optimizer)
  pushed = [np.unique(rng.integers(0, 1 << 16, 30)) for _ in range(3)]
  for ids in pushed:
    table.push(ids, rng.standard_normal((len(ids), 2)).astype(np.float32))
    table.flush()
  table.pull(pushed[0])  # rows of step 1, caught up to step 3: a second flush at step 3
  table.flush()
  assert len(table._store._index) == 4
  rows = table.pull(np.arange(1 << 16))
  table.close()  # the rows that pull caught up: a third flush at step 3
  assert len(table._store._index) == 5
  with embedding.open_table(path) as reopened:
    index = reopened._store._index
    assert len(index) == 5 and len(index.names()) > 5
    assert index.sealed_groups() == 5  # a merge may take every group read at open
    np.testing.assert_array_equal(reopened.pull(np.arange(1 << 16)), rows)
