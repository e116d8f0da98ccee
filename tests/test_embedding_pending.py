"""The pending log on its own: newest records found from the ids file, in bounded pieces."""

import itertools

import numpy as np
import pytest

from kstep_adam.embedding import _pending

WIDTH = 3


def _log_with_history(directory, rng, num_rows=500, appends=40):
  """A log of random appends (ids unique within an append, repeated across them), some
  unindexed as a flush's are; returns it and each id's last position."""
  log = _pending.PendingLog(str(directory), WIDTH)
  newest = {}
  for i in range(appends):
    ids = rng.choice(num_rows, size=rng.integers(1, 30), replace=False)
    first = log.num_bytes // (4 * WIDTH)
    rows = np.arange(first, first + len(ids), dtype=np.float32)[:, None].repeat(WIDTH, axis=1)
    (log.append_unindexed if i % 3 == 0 else log.append)(ids, rows)
    newest.update(zip(ids.tolist(), range(first, first + len(ids))))
  return log, newest


@pytest.mark.parametrize("max_records", [1, 25, 10_000])
def test_newest_records_come_in_ascending_chunk_aligned_pieces(tmp_path, monkeypatch, max_records):
  monkeypatch.setattr(_pending, "_SCAN_IDS", 37)  # the ids file read in many blocks
  log, newest = _log_with_history(tmp_path, np.random.default_rng(0))
  unit = 8
  pieces = list(log.newest_records(unit, max_records))
  ids = np.concatenate([piece_ids for piece_ids, _ in pieces])
  positions = np.concatenate([piece_positions for _, piece_positions in pieces])
  np.testing.assert_array_equal(ids, sorted(newest))  # ascending, unique, every id
  np.testing.assert_array_equal(positions, [newest[i] for i in sorted(newest)])
  np.testing.assert_array_equal(log.read(positions)[:, 0], positions)  # record k holds k
  for (before, _), (after, _) in itertools.pairwise(pieces):
    assert before[-1] // unit < after[0] // unit  # no chunk split between pieces
  records = log.num_bytes // (4 * WIDTH)
  # Greedy cut: two neighbouring pieces hold more than max_records records together.
  assert len(pieces) <= 2 * records // max_records + 1
  if max_records == 1:
    assert len(pieces) > 10  # a piece per few chunks: memory follows max_records
  log.close()


def test_newest_records_of_an_empty_log_and_after_recovery(tmp_path):
  log = _pending.PendingLog(str(tmp_path), WIDTH)
  assert list(log.newest_records(4, 100)) == []
  log.close()
  log, newest = _log_with_history(tmp_path, np.random.default_rng(1))
  log.commit(step=9, first_part=3)
  log.close()
  recovered = _pending.PendingLog(str(tmp_path), WIDTH)  # what open does after a crash
  assert recovered.recover() == (9, 3)
  ((ids, positions),) = recovered.newest_records(4, 10_000)
  np.testing.assert_array_equal(ids, sorted(newest))
  np.testing.assert_array_equal(positions, [newest[i] for i in sorted(newest)])
  recovered.clear()
  assert list(recovered.newest_records(4, 100)) == [] and not recovered.recover()
  recovered.close()
