"""Table versions: every flush's committed state can be restored later (what a checkpoint
names), also after the table was flushed again; a revert is exact, idempotent and survives
its own interruption."""

import numpy as np
import pytest

from kstep_adam import embedding

DIM = 4
ROWS = 3000


def _open(path, **kw):
  return embedding.open_table(
    path,
    num_rows=ROWS,
    dim=DIM,
    optimizer=embedding.SparseAdam(learning_rate=0.02, mode="exact"),
    host_cache_rows=200,
    chunk_rows=16,
    **kw,
  )


def _train(table, steps, seed):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    ids = rng.integers(0, ROWS, 150)
    table.push(ids, rng.standard_normal((150, DIM)).astype(np.float32))


def _two_flushes(path):
  """A table flushed at step 3 and again at step 8; the rows at both flushes."""
  table = _open(path)
  _train(table, 3, seed=0)
  table.flush()
  first = table.committed
  rows_first = table.pull(np.arange(ROWS))
  _train(table, 5, seed=1)  # touches chunks the first flush never wrote, too
  table.flush()
  second = table.committed
  rows_second = table.pull(np.arange(ROWS))
  table.close(flush=False)
  return first, rows_first, second, rows_second


def test_a_table_flushed_again_reopens_exactly_at_an_earlier_version(tmp_path):
  path = tmp_path / "t"
  first, rows_first, second, rows_second = _two_flushes(path)
  assert (first.step, second.step) == (3, 8) and second.generation > first.generation
  with embedding.open_table(path, version=first) as table:
    assert table.step == 3 and table.committed.step == 3
    np.testing.assert_array_equal(table.pull(np.arange(ROWS)), rows_first)
    # Training on from the restored version is training from step 3.
    _train(table, 5, seed=1)
    np.testing.assert_array_equal(table.pull(np.arange(ROWS)), rows_second)


def test_reverting_twice_to_the_same_version_rewrites_nothing(tmp_path):
  path = tmp_path / "t"
  first, rows_first, _, _ = _two_flushes(path)
  table = embedding.open_table(path, version=first)
  reverted = table.committed
  table.close(flush=False)
  table = embedding.open_table(path, version=first)
  assert table.committed == reverted  # no new commit: every value already equals `first`'s
  np.testing.assert_array_equal(table.pull(np.arange(ROWS)), rows_first)
  table.close(flush=False)


def test_an_interrupted_revert_is_done_again_at_the_next_open(tmp_path, monkeypatch):
  from kstep_adam.embedding import _store

  path = tmp_path / "t"
  first, rows_first, _, _ = _two_flushes(path)
  writes = []
  original = _store.TableStore.write_step

  def crash_before_the_step(self, step):  # the rows are reverted, the commit is not
    writes.append(step)
    raise OSError("crash before commit.json")

  monkeypatch.setattr(_store.TableStore, "write_step", crash_before_the_step)
  with pytest.raises(OSError, match=r"crash before commit\.json"):
    embedding.open_table(path, version=first)
  monkeypatch.setattr(_store.TableStore, "write_step", original)
  assert writes == [3]
  with embedding.open_table(path) as table:  # the later step still reads as it was
    assert table.step == 8
  with embedding.open_table(path, version=first) as table:
    assert table.step == 3
    np.testing.assert_array_equal(table.pull(np.arange(ROWS)), rows_first)


def test_a_version_the_table_cannot_return_to_is_refused(tmp_path):
  path = tmp_path / "t"
  first, _, second, _ = _two_flushes(path)
  with embedding.open_table(path, version=first):
    pass
  with pytest.raises(ValueError, match="to step 8: it is at step 3"):
    embedding.open_table(path, version=second)
  with embedding.open_table(path) as table:
    _train(table, 5, seed=2)
    table.compact()  # a new database: the history before it is gone
  with pytest.raises(ValueError, match="compacted since"):
    embedding.open_table(path, version=first)
