"""The device tier: hot rows and their Adam state updated on the device, bit for bit the host's.

Every test drives a table with a device tier and one without through the same calls and
compares the rows' float32 bits: the device-resident optimizer must equal the host optimizer
exactly, in exact and lazy mode, through catch-ups of rows absent for many steps, evictions
to the host and disk tiers and back, flushes and reopening.
"""

import functools

import jax
import numpy as np
import pytest

from kstep_adam import embedding
from kstep_adam.embedding import _device_cache

NUM_ROWS, DIM = 400, 4


def _open(path, mode, device_rows, **kwargs):
  # b1 = 0.5 keeps the exact catch-up short (K = 28 terms), so short runs cross it.
  opt = embedding.SparseAdam(learning_rate=0.05, b1=0.5, b2=0.9, mode=mode)
  return embedding.open_table(
    path,
    num_rows=NUM_ROWS,
    dim=DIM,
    optimizer=opt,
    host_cache_rows=48,
    device_cache_rows=device_rows,
    seed=3,
    init_scale=0.1,
    **kwargs,
  )


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


def _drive(table, steps: int, seed: int = 0) -> list[np.ndarray]:
  """Pushes of hot, warm and cold rows, some read without a push, periodic flushes; returns
  what every read saw."""
  rng = np.random.default_rng(seed)
  seen = []
  for step in range(steps):
    hot = np.arange(8)  # every step
    warm = 100 + np.arange(4) * (step // 10 % 3 + 1)  # back after ~10-30 idle steps
    rare = [200 + step // 40] if step % 40 == 0 else []  # then idle for 40 (> K) steps
    cold = rng.integers(0, NUM_ROWS, 12)  # mostly misses
    ids = np.unique(np.concatenate([hot, warm, rare, cold])).astype(np.int64)
    if step % 4 == 3:
      seen.append(table.pull(np.r_[np.arange(0, NUM_ROWS, 9), 200]))  # read, no push
    if step % 5 == 1:
      ws = table.working_set(np.r_[ids, ids[:3]], pad_to=64)
      seen.append(ws.rows[: len(ws.unique_ids)][ws.inverse])
    if step % 23 == 22:
      table.flush()
    table.push(np.r_[ids, ids[:2]], rng.standard_normal((len(ids) + 2, DIM)).astype(np.float32))
  seen.append(table.pull(np.arange(NUM_ROWS)))
  return seen


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_device_tier_gives_the_host_tiers_bits(tmp_path, mode, monkeypatch):
  # A short window (K + 7 steps) sends the rare rows back to the host tier for their catch-up.
  monkeypatch.setattr(_device_cache, "DEFAULT_WINDOW", 35)
  with _open(tmp_path / "host", mode, 0) as host, _open(tmp_path / "dev", mode, 40) as dev:
    expected, got = _drive(host, 100), _drive(dev, 100)
    stats = dev.stats()
  for want, have in zip(expected, got, strict=True):
    np.testing.assert_array_equal(_bits(have), _bits(want))
  # Every path was taken: hits, misses, evictions down to the host tier and disk.
  assert stats["device_hits"] > 0 and stats["device_misses"] > 0
  assert stats["device_evictions"] > 0 and stats["device_downloaded_rows"] > 0
  assert stats["evictions"] > 0 and stats["step"] == 100
  # Reopened, the flushed table (device rows copied down by close) is the host path's.
  with _open(tmp_path / "host", mode, 0) as host, _open(tmp_path / "dev", mode, 0) as dev:
    np.testing.assert_array_equal(
      _bits(dev.pull(np.arange(NUM_ROWS))), _bits(host.pull(np.arange(NUM_ROWS)))
    )


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_a_jitted_step_on_the_device_rows_equals_host_pushes(tmp_path, mode):
  opt = embedding.SparseAdam(learning_rate=0.05, b1=0.5, b2=0.9, mode=mode)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(rows, batch, grads_PxD):
    rows, rows_PxD = embedding.gather_rows(opt, rows, batch)
    return embedding.apply_grads(opt, rows, batch, grads_PxD), rows_PxD

  rng = np.random.default_rng(1)
  with _open(tmp_path / "host", mode, 0) as host, _open(tmp_path / "dev", mode, 64) as dev:
    for index in range(30):
      ids = np.unique(np.r_[np.arange(10), rng.integers(0, 60, 20), 300 + index % 3])
      grads_UxD = rng.standard_normal((len(ids), DIM)).astype(np.float32)
      expected_rows = host.working_set(ids).rows
      host.push(ids, grads_UxD)
      inputs = dev.begin_device_step(ids, pad_to=64)
      grads_PxD = np.zeros((64, DIM), np.float32)
      grads_PxD[: len(ids)] = grads_UxD
      rows, rows_PxD = step(inputs.rows, inputs.batch, jax.device_put(grads_PxD))
      dev.end_device_step(rows)
      np.testing.assert_array_equal(_bits(rows_PxD[: len(ids)]), _bits(expected_rows))
      np.testing.assert_array_equal(_bits(rows_PxD[len(ids) :]), 0)
    assert dev.step == host.step == 30
    np.testing.assert_array_equal(
      _bits(dev.pull(np.arange(NUM_ROWS))), _bits(host.pull(np.arange(NUM_ROWS)))
    )


def test_resident_rows_do_not_cross_the_link(tmp_path):
  with _open(tmp_path / "t", "lazy", 64) as table:
    ids = np.arange(20)
    table.push(ids, np.ones((20, DIM), np.float32))
    before = table.stats()
    for _ in range(5):
      table.push(ids, np.ones((20, DIM), np.float32))
    after = table.stats()
  assert after["device_uploaded_rows"] == before["device_uploaded_rows"] == 20
  assert after["device_downloaded_rows"] == before["device_downloaded_rows"] == 0
  assert after["device_hits"] - before["device_hits"] == 5 * 20


def test_a_call_between_begin_and_end_fails_the_table(tmp_path):
  table = _open(tmp_path / "t", "lazy", 64)
  table.begin_device_step(np.arange(5), pad_to=8)
  table.prefetch(np.arange(10, 20)).result()  # staging host rows is harmless
  with pytest.raises(embedding.TableFailedError, match="begin_device_step"):
    table.pull([1])
  table.close(flush=False)


def test_a_batch_larger_than_the_device_tier(tmp_path):
  with _open(tmp_path / "host", "exact", 0) as host, _open(tmp_path / "dev", "exact", 16) as dev:
    with pytest.raises(ValueError, match="device_cache_rows=16"):
      dev.begin_device_step(np.arange(17), pad_to=32)
    for table in (host, dev):  # push falls back to the host optimizer, same numbers
      table.push(np.arange(10), np.ones((10, DIM), np.float32))
      table.push(np.arange(40), np.full((40, DIM), 0.5, np.float32))
      table.push(np.arange(5, 12), np.ones((7, DIM), np.float32))
    np.testing.assert_array_equal(_bits(dev.pull(np.arange(50))), _bits(host.pull(np.arange(50))))


def test_the_device_tier_refuses_an_optimizer_it_cannot_run(tmp_path):
  with pytest.raises(ValueError, match="SparseAdam"):
    embedding.open_table(
      tmp_path / "t",
      num_rows=10,
      dim=2,
      optimizer=embedding.RowwiseAdagrad(),
      device_cache_rows=4,
    )


def test_working_set_pad_to_without_device_cache(tmp_path):
  with embedding.open_table(tmp_path / "t", num_rows=50, dim=3) as table:
    ws = table.working_set([4, 4, 9], pad_to=8)
    assert isinstance(ws.rows, np.ndarray) and ws.rows.shape == (8, 3)
    np.testing.assert_equal(ws.rows[:2][ws.inverse], table.pull([4, 4, 9]))
    with pytest.raises(ValueError, match="pad_to"):
      table.working_set([1, 2, 3], pad_to=2)
