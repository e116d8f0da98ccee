"""The device tier: a jax.Array mirror of hot rows that must always equal the host rows."""

import jax
import numpy as np
import pytest

from kstep_adam import embedding


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_device_rows_always_equal_pull(tmp_path, mode):
  opt = embedding.SparseAdam(learning_rate=0.05, b2=0.99, mode=mode)
  table = embedding.open_table(
    tmp_path / "t", num_rows=500, dim=4, optimizer=opt, host_cache_rows=100, device_cache_rows=48
  )
  rng = np.random.default_rng(0)
  hot = np.arange(8)
  for step in range(25):
    ids = np.concatenate([hot, rng.integers(0, 500, 30)])
    ws = table.working_set(ids, pad_to=64)
    assert isinstance(ws.rows, jax.Array) and ws.rows.shape == (64, 4)
    rows = np.asarray(ws.rows)
    u = len(ws.unique_ids)
    np.testing.assert_equal(rows[u:], 0.0)
    np.testing.assert_equal(rows[:u][ws.inverse], table.pull(ids))
    if step % 3 != 2:  # sometimes read without pushing: the mirror must stay valid
      table.push(ws.unique_ids, rng.standard_normal((u, 4)).astype(np.float32))
  stats = table.stats()
  assert stats["device_hits"] > 0 and stats["device_resident_rows"] <= 48
  table.close()


def test_working_set_pad_to_without_device_cache(tmp_path):
  with embedding.open_table(tmp_path / "t", num_rows=50, dim=3) as table:
    ws = table.working_set([4, 4, 9], pad_to=8)
    assert isinstance(ws.rows, np.ndarray) and ws.rows.shape == (8, 3)
    np.testing.assert_equal(ws.rows[:2][ws.inverse], table.pull([4, 4, 9]))
    with pytest.raises(ValueError, match="pad_to"):
      table.working_set([1, 2, 3], pad_to=2)
