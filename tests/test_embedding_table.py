"""EmbeddingTable behaviour: tiers, durability, concurrency, validation, lazy init."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest
import tensorstore as ts
from test_embedding_optimizers import _dense_adam

from kstep_adam import embedding
from kstep_adam.embedding import _store

DIM = 4


def _adam(**kw):
  return embedding.SparseAdam(learning_rate=0.02, b1=0.9, b2=0.99, eps=1e-6, **kw)


def _dense_replay(num_rows, batches, seed, scale):
  p = embedding.init_rows(np.arange(num_rows), DIM, seed=seed, scale=scale).astype(float)
  m, v = np.zeros_like(p), np.zeros_like(p)
  for step, (ids, grads) in enumerate(batches, start=1):
    g = np.zeros_like(p)
    np.add.at(g, ids, grads.astype(np.float64))
    _dense_adam(p, m, v, g, step, 0.02, 0.9, 0.99, 1e-6)
  return p


def _batches(num_rows, steps, seed=0, size=20):
  rng = np.random.default_rng(seed)
  return [
    (rng.integers(0, num_rows, size), rng.standard_normal((size, DIM)).astype(np.float32))
    for _ in range(steps)
  ]


def _du_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_flush_then_reopen_returns_exactly_what_was_pulled(tmp_path):
  table = embedding.open_table(
    tmp_path / "t", num_rows=200, dim=DIM, optimizer=_adam(), host_cache_rows=30
  )
  for ids, grads in _batches(200, 25):
    table.push(ids, grads)
  before = table.pull(np.arange(200))
  table.flush()
  table.close()
  with embedding.open_table(tmp_path / "t", host_cache_rows=7) as reopened:
    assert reopened.step == 25
    np.testing.assert_equal(reopened.pull(np.arange(200)), before)


def test_close_without_flush_loses_only_unflushed_steps(tmp_path):
  batches = _batches(100, 12)
  table = embedding.open_table(
    tmp_path / "t", num_rows=100, dim=DIM, optimizer=_adam(), host_cache_rows=10
  )
  for ids, grads in batches[:8]:
    table.push(ids, grads)
  table.flush()
  at_flush = table.pull(np.arange(100))
  for ids, grads in batches[8:]:
    table.push(ids, grads)  # evicts dirty rows into the pending area
  assert table.stats()["pending_rows"] > 0
  table.close(flush=False)
  with embedding.open_table(tmp_path / "t") as reopened:
    assert reopened.step == 8
    np.testing.assert_equal(reopened.pull(np.arange(100)), at_flush)


class _Crash(Exception):
  pass


def _crash_on_call(monkeypatch, owner, name, call_number):
  original = getattr(owner, name)
  calls = []

  def wrapper(*args, **kwargs):
    calls.append(1)
    if len(calls) == call_number:
      raise _Crash(name)
    return original(*args, **kwargs)

  monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("crash_point", ["before_commit_point", "during_copy"])
def test_interrupted_flush_is_all_or_nothing(tmp_path, monkeypatch, crash_point):
  from kstep_adam.embedding import _pending
  from kstep_adam.embedding import _table

  batches = _batches(300, 10, size=40)
  table = embedding.open_table(
    tmp_path / "t", num_rows=300, dim=DIM, optimizer=_adam(), host_cache_rows=50, chunk_rows=8
  )
  for ids, grads in batches[:4]:
    table.push(ids, grads)
  table.flush()
  at_first_flush = table.pull(np.arange(300))
  for ids, grads in batches[4:]:
    table.push(ids, grads)
  at_second_flush = table.pull(np.arange(300))
  monkeypatch.setattr(_table, "_FLUSH_BATCH_BYTES", 8 * 4 * 13 * 3)  # 3 chunks a batch
  monkeypatch.setattr(_table, "_FLUSH_PIECE_RECORDS", 16)  # the copy in several id ranges
  monkeypatch.setattr(_pending, "_SCAN_IDS", 7)  # each read of the ids file in blocks
  if crash_point == "before_commit_point":
    _crash_on_call(monkeypatch, _pending.PendingLog, "commit", 1)
  else:
    _crash_on_call(monkeypatch, _store.TableStore, "write_rows", 2)
  with pytest.raises(embedding.TableFailedError) as info:
    table.flush()
  assert isinstance(info.value.__cause__, _Crash)
  table.close(flush=False)
  monkeypatch.undo()
  with embedding.open_table(tmp_path / "t") as reopened:
    if crash_point == "before_commit_point":  # rolled back to the first flush
      assert reopened.step == 4
      np.testing.assert_equal(reopened.pull(np.arange(300)), at_first_flush)
    else:  # committed: the copy is redone at open
      assert reopened.step == 10
      np.testing.assert_equal(reopened.pull(np.arange(300)), at_second_flush)


def test_eviction_keeps_cache_bounded_and_counts(tmp_path):
  with embedding.open_table(
    tmp_path / "t", num_rows=1000, dim=DIM, optimizer=_adam(), host_cache_rows=50
  ) as table:
    for ids, grads in _batches(1000, 30, size=40):
      table.push(ids, grads)
      assert table.stats()["resident_rows"] <= 50
    stats = table.stats()
    assert stats["evictions"] > 0 and stats["dirty_evictions"] > 0
    assert stats["misses"] > 0 and 0.0 <= stats["hit_rate"] < 1.0
    table.pull(np.arange(40))
    hits = table.stats()["hits"]
    table.pull(np.arange(40))  # all resident now
    assert table.stats()["hits"] == hits + 40


def test_clock_keeps_hot_rows_resident(tmp_path):
  with embedding.open_table(
    tmp_path / "t", num_rows=10_000, dim=DIM, optimizer=_adam(), host_cache_rows=100
  ) as table:
    rng = np.random.default_rng(0)
    hot = np.arange(20)
    for _ in range(30):
      table.pull(np.concatenate([hot, rng.integers(100, 10_000, 60)]))
    misses = table.stats()["misses"]
    table.pull(hot)
    assert table.stats()["misses"] == misses


def test_kill_without_flush_reopens_at_a_flushed_step(tmp_path):
  path = tmp_path / "t"
  child = textwrap.dedent(f"""
      import sys, numpy as np
      from kstep_adam import embedding
      opt = embedding.SparseAdam(learning_rate=0.02, b1=0.9, b2=0.99, eps=1e-6)
      table = embedding.open_table({str(path)!r}, num_rows=150, dim={DIM}, optimizer=opt,
                                   host_cache_rows=12)
      rng = np.random.default_rng(0)
      step = 0
      while True:
        ids = rng.integers(0, 150, 20)
        grads = rng.standard_normal((20, {DIM})).astype(np.float32)
        table.push(ids, grads)
        step += 1
        if step % 4 == 0:
          table.flush()
          print(step, flush=True)
      """)
  proc = subprocess.Popen(
    [sys.executable, "-c", child],
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  flushed = [int(proc.stdout.readline()) for _ in range(5)]
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert flushed == [4, 8, 12, 16, 20]
  with embedding.open_table(path) as reopened:
    step = reopened.step
    assert step >= 20 and step % 4 == 0  # a flushed step, never a partial one
    expected = _dense_replay(150, _batches(150, step, size=20), seed=0, scale=0.5)
    np.testing.assert_allclose(reopened.pull(np.arange(150)), expected, rtol=1e-6, atol=1e-7)


def test_prefetch_loads_rows_into_the_host_tier(tmp_path):
  with embedding.open_table(
    tmp_path / "t", num_rows=5000, dim=DIM, optimizer=_adam(), host_cache_rows=500
  ) as table:
    table.push(np.arange(300), np.ones((300, DIM), np.float32))
    table.flush()
  with embedding.open_table(tmp_path / "t", host_cache_rows=500) as table:
    ids = np.arange(0, 600, 2)
    assert table.prefetch(ids).result() == 300
    before = table.stats()
    rows = table.pull(ids)
    after = table.stats()
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 300
    assert rows.shape == (300, DIM)


def test_prefetch_concurrent_with_push_matches_dense(tmp_path):
  batches = _batches(400, 40, seed=1, size=30)
  table = embedding.open_table(
    tmp_path / "t", num_rows=400, dim=DIM, optimizer=_adam(), host_cache_rows=60
  )
  stop = threading.Event()
  errors = []

  def prefetcher():
    rng = np.random.default_rng(9)
    try:
      while not stop.is_set():
        table.prefetch(rng.integers(0, 400, 25)).result()
    except Exception as e:
      errors.append(e)

  thread = threading.Thread(target=prefetcher)
  thread.start()
  for i, (ids, grads) in enumerate(batches):
    if i + 1 < len(batches):
      table.prefetch(batches[i + 1][0])  # the next batch's rows, while this one runs
    table.push(ids, grads)
  stop.set()
  thread.join()
  assert not errors
  assert table.stats()["prefetched_rows"] > 0
  expected = _dense_replay(400, batches, seed=0, scale=0.5)
  np.testing.assert_allclose(table.pull(np.arange(400)), expected, rtol=1e-6, atol=1e-7)
  table.close()


def test_working_set_round_trip_equals_push_of_raw_ids(tmp_path):
  ids = np.array([5, 3, 5, 9, 3, 3, 0])
  grads = np.random.default_rng(0).standard_normal((7, DIM)).astype(np.float32)
  a = embedding.open_table(tmp_path / "a", num_rows=10, dim=DIM, optimizer=_adam())
  b = embedding.open_table(tmp_path / "b", num_rows=10, dim=DIM, optimizer=_adam())
  ws = a.working_set(ids)
  np.testing.assert_equal(ws.unique_ids, [0, 3, 5, 9])
  np.testing.assert_equal(np.asarray(ws.rows)[ws.inverse], b.pull(ids))
  grads_U = np.zeros((4, DIM), np.float32)
  np.add.at(grads_U, ws.inverse, grads)
  a.push(ws.unique_ids, grads_U)
  b.push(ids, grads)
  np.testing.assert_allclose(a.pull(np.arange(10)), b.pull(np.arange(10)), rtol=1e-6)
  a.close()
  b.close()


def test_a_working_set_read_before_a_push_gets_the_pushs_bits_from_its_pending_push(tmp_path):
  """What a pipelined trainer relies on: the next batch's rows read before this batch's push,
  then that push applied to the shared rows in a jitted program, equal (bit for bit) the rows
  read after the push; rows the push does not touch stay as read; a skipped push changes
  none. The host cache is smaller than the rows, so some are read back from disk."""
  rng = np.random.default_rng(3)
  table = embedding.open_table(
    tmp_path / "t", num_rows=400, dim=DIM, optimizer=_adam(mode="lazy"), host_cache_rows=96
  )
  apply = jax.jit(embedding.apply_pending_push, static_argnums=0)
  for _ in range(3):
    table.push(rng.integers(0, 400, 40), rng.standard_normal((40, DIM)).astype(np.float32))
  pushing = np.unique(rng.integers(0, 400, 60))
  grads = rng.standard_normal((len(pushing), DIM)) * 10.0 ** rng.integers(-3, 2, (1, DIM))
  grads_GxD = np.zeros((128, DIM), np.float32)  # padded, as a step returns it
  grads_GxD[: len(pushing)] = grads
  nxt = np.concatenate([pushing[::2], rng.integers(0, 400, 50)])
  before, pending = table.working_set_before_push(nxt, pushing, pad_to=256)
  assert 0 < np.count_nonzero(pending.rows_Q < 256) < len(before.unique_ids)
  unchanged = np.asarray(apply(table.optimizer, before.rows, pending, grads_GxD, False))
  np.testing.assert_array_equal(unchanged.view(np.uint32), before.rows.view(np.uint32))
  ahead = np.asarray(apply(table.optimizer, before.rows, pending, grads_GxD, True))
  table.push(pushing, grads_GxD[: len(pushing)])
  after = table.working_set(nxt, pad_to=256)
  np.testing.assert_array_equal(after.unique_ids, before.unique_ids)
  np.testing.assert_array_equal(ahead.view(np.uint32), after.rows.view(np.uint32))
  assert not np.array_equal(ahead, before.rows)  # the push did move the shared rows
  with pytest.raises(ValueError, match="sorted and unique"):
    table.working_set_before_push(nxt, pushing[::-1])
  table.close()
  exact = embedding.open_table(tmp_path / "e", num_rows=10, dim=DIM, optimizer=_adam())
  with pytest.raises(ValueError, match="lazy SparseAdam"):
    exact.working_set_before_push([1, 2], [2, 3])
  exact.close()


def test_multiple_tables_in_one_process_are_independent(tmp_path):
  adam = embedding.open_table(
    tmp_path / "a", num_rows=300, dim=DIM, optimizer=_adam(), host_cache_rows=20
  )
  ada = embedding.open_table(
    tmp_path / "b",
    num_rows=50,
    dim=8,
    host_cache_rows=10,
    optimizer=embedding.RowwiseAdagrad(learning_rate=0.1),
    seed=1,
  )
  batches = _batches(300, 20)
  rng = np.random.default_rng(5)
  p_b = embedding.init_rows(np.arange(50), 8, seed=1, scale=8**-0.5).astype(float)
  acc = np.zeros(50)
  for ids, grads in batches:
    adam.push(ids, grads)
    ids_b = rng.integers(0, 50, 6)
    grads_b = rng.standard_normal((6, 8)).astype(np.float32)
    ada.push(ids_b, grads_b)
    g = np.zeros((50, 8))
    np.add.at(g, ids_b, grads_b.astype(float))
    acc += np.mean(g * g, axis=1)
    p_b -= 0.1 * g / (np.sqrt(acc)[:, None] + 1e-8)
  np.testing.assert_allclose(
    adam.pull(np.arange(300)), _dense_replay(300, batches, seed=0, scale=0.5), rtol=1e-6, atol=1e-7
  )
  np.testing.assert_allclose(ada.pull(np.arange(50)), p_b, rtol=1e-6, atol=1e-7)
  adam.close()
  ada.close()


def test_lazy_init_costs_no_disk_for_a_huge_table(tmp_path):
  path = tmp_path / "huge"
  with embedding.open_table(
    path, num_rows=2**28, dim=16, seed=4, init_scale=0.05, host_cache_rows=1000
  ) as table:
    assert _du_bytes(path) < 100_000
    ids = np.array([0, 7, 2**28 - 1, 123_456_789])
    np.testing.assert_equal(table.pull(ids), embedding.init_rows(ids, 16, seed=4, scale=0.05))
    table.push(ids[:2], np.ones((2, 16), np.float32))
  assert _du_bytes(path) < 1_000_000  # one chunk written, not 2**28 rows


def test_init_is_deterministic_per_row_and_seed():
  a = embedding.init_rows(np.array([3, 10, 3]), 5, seed=1, scale=0.1)
  np.testing.assert_equal(a[0], a[2])
  np.testing.assert_equal(a[1], embedding.init_rows(np.array([10]), 5, seed=1, scale=0.1)[0])
  assert not np.array_equal(a, embedding.init_rows(np.array([3, 10, 3]), 5, seed=2, scale=0.1))
  assert np.abs(a).max() <= 0.1
  normal = embedding.init_rows(np.arange(20_000), 4, seed=0, scale=2.0, distribution="normal")
  assert abs(normal.std() - 2.0) < 0.05 and abs(normal.mean()) < 0.05


def test_hash_keys_to_rows_is_explicit_and_salted():
  keys = np.array([1, 2**40 + 1, -5, 1])
  rows = embedding.hash_keys_to_rows(keys, 1000, salt=7)
  assert rows.dtype == np.int64 and ((rows >= 0) & (rows < 1000)).all()
  assert rows[0] == rows[3]
  assert not np.array_equal(rows, embedding.hash_keys_to_rows(keys, 1000, salt=8))
  counts = np.bincount(embedding.hash_keys_to_rows(np.arange(100_000), 10), minlength=10)
  assert counts.min() > 9_000
  with pytest.raises(ValueError, match="num_rows"):
    embedding.hash_keys_to_rows(keys, 0)


BAD_PUSHES = {
  "grads shape": (np.arange(3), np.zeros((3, DIM + 1), np.float32), "shape"),
  "grads rows": (np.arange(3), np.zeros((2, DIM), np.float32), "shape"),
  "grads dtype": (np.arange(3), np.zeros((3, DIM), np.int32), "floating"),
  "grads nan": (np.arange(3), np.full((3, DIM), np.nan, np.float32), "finite"),
  "id too large": (np.array([1, 50]), np.zeros((2, DIM), np.float32), "num_rows=50"),
  "id negative": (np.array([-1, 2]), np.zeros((2, DIM), np.float32), "num_rows=50"),
  "ids float": (np.array([1.0, 2.0]), np.zeros((2, DIM), np.float32), "integers"),
  "ids 2-D": (np.array([[1, 2]]), np.zeros((2, DIM), np.float32), "1-D"),
}


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_bad_push_raises_and_leaves_table_intact(tmp_path, case):
  ids, grads, match = BAD_PUSHES[case]
  with embedding.open_table(
    tmp_path / "t", num_rows=50, dim=DIM, optimizer=_adam(), host_cache_rows=10
  ) as table:
    for b_ids, b_grads in _batches(50, 5):
      table.push(b_ids, b_grads)
    before = table.pull(np.arange(50))
    with pytest.raises(ValueError, match=match):
      table.push(ids, grads)
    if "grads" not in case:
      with pytest.raises(ValueError, match=match):
        table.pull(ids)
    assert table.step == 5
    np.testing.assert_equal(table.pull(np.arange(50)), before)


def test_a_table_open_twice_is_refused(tmp_path):
  path = str(tmp_path / "t")
  with embedding.open_table(path, num_rows=10, dim=DIM) as table:
    table.push([1], np.ones((1, DIM), np.float32))
    with pytest.raises(embedding.TableLockedError, match="already open") as info:
      embedding.open_table(path)
    assert not isinstance(info.value, ValueError)  # not a bad argument: a busy table
    assert info.value.path == path and repr(path) in str(info.value)
    assert table.step == 1
  with embedding.open_table(path) as table:  # free again after close
    assert table.step == 1


def test_a_table_open_in_another_process_is_refused(tmp_path):
  path = str(tmp_path / "t")
  embedding.open_table(path, num_rows=10, dim=DIM).close()
  child = textwrap.dedent(f"""
      import sys
      from kstep_adam import embedding
      table = embedding.open_table({path!r})
      print("open", flush=True)
      sys.stdin.readline()  # hold the table until the parent has tried
      table.close()
      """)
  proc = subprocess.Popen(
    [sys.executable, "-c", child],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  try:
    assert proc.stdout.readline() == "open\n"
    with pytest.raises(embedding.TableLockedError, match="another process"):
      embedding.open_table(path)
  finally:
    proc.communicate("done\n", timeout=60)
  assert proc.returncode == 0
  embedding.open_table(path).close()  # free once the other process closed it


BAD_OPEN_ARGS = {
  "num_rows bool": (dict(num_rows=True), "num_rows must be an int"),
  "num_rows float": (dict(num_rows=10.0), "num_rows must be an int"),
  "num_rows huge": (dict(num_rows=2**62), "num_rows must be an int in \\[1, "),
  "dim bool": (dict(dim=True), "dim must be an int"),
  "dim zero": (dict(dim=0), "dim must be an int >= 1"),
  "chunk_rows bool": (dict(chunk_rows=True), "chunk_rows must be an int"),
  "seed bool": (dict(seed=False), "seed must be an int"),
  "seed float": (dict(seed=1.5), "seed must be an int"),
  "init_scale bool": (dict(init_scale=True), "init_scale must be a finite number"),
  "init_scale nan": (dict(init_scale=float("nan")), "init_scale must be a finite number"),
  "distribution": (dict(init_distribution="cauchy"), "init_distribution must be one of"),
  "compress int": (dict(compress=1), "compress must be a bool"),
  "host_cache_rows bool": (dict(host_cache_rows=True), "host_cache_rows must be an int"),
  "host_cache_bytes small": (dict(host_cache_bytes=4), "host_cache_bytes \\(at least one row"),
  "host_cache_bytes bool": (dict(host_cache_bytes=True), "host_cache_bytes"),
  "device_cache_rows bool": (dict(device_cache_rows=True), "device_cache_rows must be an int"),
  "device_cache_rows neg": (dict(device_cache_rows=-1), "device_cache_rows must be an int >= 0"),
  "ts_cache_bytes bool": (dict(ts_cache_bytes=False), "ts_cache_bytes must be an int"),
  "optimizer": (dict(optimizer="adam"), "optimizer must be embedding.SparseAdam"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPEN_ARGS))
def test_bad_open_arguments_are_refused_before_anything_is_created(tmp_path, case):
  kwargs, match = BAD_OPEN_ARGS[case]
  with pytest.raises(ValueError, match=match):
    embedding.open_table(tmp_path / "t", **{"num_rows": 10, "dim": DIM, **kwargs})
  assert not os.path.exists(tmp_path / "t")


def test_bool_counts_are_refused_on_reopen_and_in_working_set(tmp_path):
  with embedding.open_table(tmp_path / "t", num_rows=1, dim=DIM) as table:
    with pytest.raises(ValueError, match="pad_to"):
      table.working_set([0], pad_to=True)
    assert table.working_set([0], pad_to=np.int64(2)).rows.shape == (2, DIM)
  with pytest.raises(ValueError, match="num_rows must be an int"):
    embedding.open_table(tmp_path / "t", num_rows=True)  # True == 1, but not a count
  with embedding.open_table(tmp_path / "t", num_rows=1) as table:
    assert table.num_rows == 1


def test_grads_of_any_float_dtype_are_accepted(tmp_path):
  import ml_dtypes

  with embedding.open_table(tmp_path / "t", num_rows=10, dim=DIM, optimizer=_adam()) as t:
    for dtype in (np.float16, np.float64, ml_dtypes.bfloat16):
      t.push([1, 2], np.ones((2, DIM), dtype))
    assert t.step == 3


def test_bad_paths_and_conflicting_reopen(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    embedding.open_table(tmp_path / "file", num_rows=10, dim=DIM)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "data.csv").write_text("a,b")
  with pytest.raises(ValueError, match="not an embedding table"):
    embedding.open_table(tmp_path / "other", num_rows=10, dim=DIM)
  assert os.listdir(tmp_path / "other") == ["data.csv"]
  with pytest.raises(ValueError, match="needs num_rows and dim"):
    embedding.open_table(tmp_path / "new")
  with embedding.open_table(tmp_path / "t", num_rows=20, dim=DIM, optimizer=_adam()) as t:
    t.push([1, 2], np.ones((2, DIM), np.float32))
    before = t.pull(np.arange(20))
  with pytest.raises(ValueError, match="dim=8 conflicts"):
    embedding.open_table(tmp_path / "t", dim=8)
  with pytest.raises(ValueError, match="num_rows=21 conflicts"):
    embedding.open_table(tmp_path / "t", num_rows=21)
  with pytest.raises(ValueError, match="mode='lazy' conflicts"):
    embedding.open_table(tmp_path / "t", optimizer=_adam(mode="lazy"))
  with pytest.raises(ValueError, match="kind='rowwise_adagrad' conflicts"):
    embedding.open_table(tmp_path / "t", optimizer=embedding.RowwiseAdagrad())
  with embedding.open_table(tmp_path / "t", dim=DIM) as t:
    np.testing.assert_equal(t.pull(np.arange(20)), before)


def test_uncompressed_table_round_trips_and_keeps_its_setting(tmp_path):
  with embedding.open_table(
    tmp_path / "t", num_rows=100, dim=DIM, optimizer=_adam(), compress=False, host_cache_rows=10
  ) as table:
    for ids, grads in _batches(100, 6):
      table.push(ids, grads)
    before = table.pull(np.arange(100))
  with pytest.raises(ValueError, match="compress=True conflicts"):
    embedding.open_table(tmp_path / "t", compress=True)
  with embedding.open_table(tmp_path / "t", compress=False) as table:
    np.testing.assert_equal(table.pull(np.arange(100)), before)


def test_hash_keys_to_rows_follows_its_documented_formula():
  splitmix64 = embedding.splitmix64
  keys = np.array([0, 5, 2**63 - 1], np.int64)
  expected = splitmix64(keys.view(np.uint64) ^ splitmix64(np.uint64(3))) % np.uint64(97)
  np.testing.assert_equal(embedding.hash_keys_to_rows(keys, 97, salt=3), expected)


def test_bad_constructor_arguments():
  with pytest.raises(ValueError, match="mode"):
    embedding.SparseAdam(mode="dense")
  with pytest.raises(ValueError, match="b1\\*\\*2 < b2"):
    embedding.SparseAdam(b1=0.99, b2=0.9)
  with pytest.raises(ValueError, match="learning_rate"):
    embedding.RowwiseAdagrad(learning_rate=-1.0)


def test_compact_reclaims_old_versions_and_keeps_every_row(tmp_path):
  table = embedding.open_table(
    tmp_path / "t",
    num_rows=4000,
    dim=DIM,
    optimizer=_adam(),
    host_cache_rows=500,
    chunk_rows=64,
    compress=False,
  )
  for i, (ids, grads) in enumerate(_batches(4000, 12, size=300)):
    table.push(ids, grads)
    if i % 3 == 2:
      table.flush()  # each flush rewrites its chunks; OCDBT keeps the old versions
  before = table.pull(np.arange(4000))
  sizes = table.compact()
  assert sizes["bytes_after"] < sizes["bytes_before"] / 2
  np.testing.assert_equal(table.pull(np.arange(4000)), before)
  for ids, grads in _batches(4000, 2, seed=7, size=300):
    table.push(ids, grads)  # the table keeps working on the new database
  after = table.pull(np.arange(4000))
  table.close()
  assert sorted(p for p in os.listdir(tmp_path / "t") if p.startswith("db")) == ["db.1"]
  os.mkdir(tmp_path / "t" / "db.2")  # as if a second compact died before its switch
  with embedding.open_table(tmp_path / "t") as reopened:
    assert reopened.step == 14
    np.testing.assert_equal(reopened.pull(np.arange(4000)), after)
  assert not os.path.exists(tmp_path / "t" / "db.2")


def _btree_node_bytes(db_path) -> int:
  """The B+tree node size stored in an OCDBT database's manifest."""
  kvstore = ts.KvStore.open({"driver": "file", "path": f"{db_path}/"}).result()
  return ts.ocdbt.dump(kvstore).result()["config"]["max_decoded_node_bytes"]


def test_databases_are_created_with_small_btree_nodes_and_old_ones_still_work(tmp_path):
  config = embedding.TableConfig(num_rows=4000, dim=DIM, optimizer=_adam().config(), chunk_rows=16)
  old, new = tmp_path / "old", tmp_path / "new"
  _store.create(str(old), config, btree_node_bytes=None)  # the layout before small nodes
  _store.create(str(new), config)
  ocdbt_default = _btree_node_bytes(old / "db")
  assert ocdbt_default > _store.BTREE_NODE_BYTES == _btree_node_bytes(new / "db")
  batches = _batches(4000, 6, size=300)
  pulled = {}
  for path in (old, new):  # the same steps on either layout give the same rows
    with embedding.open_table(path, optimizer=_adam(), host_cache_rows=200) as table:
      for ids, grads in batches:
        table.push(ids, grads)
    with embedding.open_table(path) as table:  # reopened: the rows come from the database
      pulled[path] = table.pull(np.arange(4000))
      table.compact()  # the copy is a new database, with this package's node size
    assert _btree_node_bytes(path / "db.1") == _store.BTREE_NODE_BYTES
  np.testing.assert_equal(pulled[old], pulled[new])


# table.json exactly as format kstep_adam.embedding/1 writes it: kept literal, so a change
# that stops reading tables already on disk fails here.
_FORMAT_1_TABLE_JSON = """{
 "format": "kstep_adam.embedding/1",
 "num_rows": 300,
 "dim": 4,
 "width": 6,
 "chunk_rows": 16,
 "seed": 3,
 "init_scale": 0.5,
 "init_distribution": "uniform",
 "compress": true,
 "optimizer": {
  "kind": "rowwise_adagrad",
  "eps": 1e-08,
  "initial_accumulator_value": 0.0,
  "learning_rate": 0.1
 }
}"""


def test_table_config_reads_format_1_and_round_trips():
  config = embedding.TableConfig.from_json(_FORMAT_1_TABLE_JSON)
  assert config == embedding.TableConfig(
    num_rows=300,
    dim=4,
    optimizer=embedding.RowwiseAdagrad(learning_rate=0.1).config(),
    chunk_rows=16,
    seed=3,
    init_scale=0.5,
  )
  assert config.width == 6 and config.row_bytes == 24 and config.compress
  assert embedding.TableConfig.from_json(config.to_json()) == config
  with pytest.raises(TypeError):
    config.optimizer["eps"] = 1.0  # read-only, like the rest of the config
  older = _FORMAT_1_TABLE_JSON.replace(' "compress": true,\n', "")  # written before compress
  assert embedding.TableConfig.from_json(older).compress


def test_open_table_stores_and_exposes_its_config(tmp_path):
  with embedding.open_table(
    tmp_path / "t", num_rows=100, dim=DIM, optimizer=_adam(mode="lazy"), chunk_rows=1000, seed=5
  ) as table:
    config = table.config
  assert config == embedding.TableConfig.from_json((tmp_path / "t" / "table.json").read_text())
  assert (config.num_rows, config.dim, config.chunk_rows, config.seed) == (100, DIM, 100, 5)
  assert config.optimizer == _adam(mode="lazy").config() and config.width == 1 + 3 * DIM
  with embedding.open_table(tmp_path / "t", chunk_rows=100, init_scale=DIM**-0.5) as table:
    assert table.config == config and table.optimizer == _adam(mode="lazy")


BAD_TABLE_JSON = {
  "format": ('"kstep_adam.embedding/1"', '"other/2"', "format 'other/2'"),
  "unknown field": ('"seed": 3', '"seed": 3, "rows": 1', "unknown fields \\['rows'\\]"),
  "missing field": ('"seed": 3,', "", "missing fields \\['seed'\\]"),
  "bool count": ('"num_rows": 300', '"num_rows": true', "num_rows must be an int"),
  "bad chunk_rows": ('"chunk_rows": 16', '"chunk_rows": 0', "chunk_rows must be an int >= 1"),
  "bad scale": ('"init_scale": 0.5', '"init_scale": -1', "init_scale must be a finite"),
  "bad kind": ('"rowwise_adagrad"', '"sgd"', "optimizer kind must be one of"),
  "bad hyper": ('"eps": 1e-08', '"eps": 0', "eps must be a finite number in \\(0.0"),
  "width": ('"width": 6', '"width": 7', "width=7 does not match"),
  "not json": ("{", "[", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLE_JSON))
def test_a_bad_table_json_is_refused_naming_the_file(tmp_path, case):
  old, new, match = BAD_TABLE_JSON[case]
  assert old in _FORMAT_1_TABLE_JSON
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "table.json").write_text(_FORMAT_1_TABLE_JSON.replace(old, new, 1))
  with pytest.raises(ValueError, match=match) as info:
    embedding.open_table(tmp_path / "t")
  assert "table.json" in str(info.value)
  assert os.listdir(tmp_path / "t") == ["table.json"]  # nothing created or changed


def _push_reference(ids, grads):
  """What push reduced a batch to before its one-sort path: np.unique, then a stable
  argsort of the inverse and np.add.reduceat (the same summation order, by construction)."""
  unique, inverse = np.unique(ids, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
  return unique, np.add.reduceat(grads[order], starts, axis=0)


def test_sorted_unique_ids_skip_the_sort_with_the_same_results(tmp_path):
  rng = np.random.default_rng(3)
  raw = embedding.open_table(tmp_path / "raw", num_rows=300, dim=DIM, optimizer=_adam())
  reduced = embedding.open_table(tmp_path / "reduced", num_rows=300, dim=DIM, optimizer=_adam())
  for _ in range(15):
    ids = rng.integers(0, 300, 80)  # duplicates, unsorted: the sorting path
    grads = rng.standard_normal((80, DIM)).astype(np.float32)
    raw.push(ids, grads)
    unique, grads_U = _push_reference(ids, grads)
    reduced.push(unique, grads_U)  # sorted and unique: the O(N) path
    ws = reduced.working_set(unique)
    assert ws.unique_ids is not unique  # never the caller's array
    np.testing.assert_array_equal(ws.unique_ids, unique)
    np.testing.assert_array_equal(ws.inverse, np.arange(len(unique)))
    np.testing.assert_array_equal(ws.rows, raw.working_set(ids).rows[: len(unique)])
  np.testing.assert_array_equal(raw.pull(np.arange(300)), reduced.pull(np.arange(300)))
  shuffled = rng.permutation(300)  # unique but unsorted: sorted first
  np.testing.assert_array_equal(raw.pull(shuffled), reduced.pull(np.arange(300))[shuffled])
  raw.close()
  reduced.close()


def test_pending_log_stays_bounded_without_a_flush(tmp_path, monkeypatch):
  from kstep_adam.embedding import _pending

  num_rows, cache, steps = 400, 40, 160
  batches = _batches(num_rows, steps, seed=4, size=30)
  results = {}
  for name, min_bytes in (("capped", 0), ("uncapped", 1 << 40)):
    monkeypatch.setattr(_pending, "COMPACT_MIN_BYTES", min_bytes)
    table = embedding.open_table(
      tmp_path / name, num_rows=num_rows, dim=DIM, optimizer=_adam(), host_cache_rows=cache
    )
    row_bytes = table.config.row_bytes
    peak = 0
    for ids, grads in batches:  # never flushed: every dirty eviction appends to the log
      table.push(ids, grads)
      stats = table.stats()
      peak = max(peak, stats["pending_bytes"])
      if name == "capped":  # newest records at most twice over, plus one append
        assert stats["pending_bytes"] <= (2 * stats["pending_rows"] + cache) * row_bytes
    results[name] = (peak, table.stats()["dirty_evictions"], table.pull(np.arange(num_rows)))
    table.flush()
    table.close()
    with embedding.open_table(tmp_path / name) as reopened:
      np.testing.assert_array_equal(reopened.pull(np.arange(num_rows)), results[name][2])
  (capped_peak, evictions, capped_rows), (uncapped_peak, _, uncapped_rows) = results.values()
  assert uncapped_peak >= evictions * row_bytes  # one record per dirty eviction
  assert capped_peak < uncapped_peak / 3  # the cap held it well below that
  assert capped_peak <= (2 * num_rows + cache) * row_bytes
  np.testing.assert_array_equal(capped_rows, uncapped_rows)  # the same table, bit for bit


def test_a_prefetched_batch_dedups_once_with_the_same_results(tmp_path):
  rng = np.random.default_rng(4)
  plain = embedding.open_table(tmp_path / "plain", num_rows=300, dim=DIM, optimizer=_adam())
  ahead = embedding.open_table(tmp_path / "ahead", num_rows=300, dim=DIM, optimizer=_adam())
  for step in range(12):
    ids = rng.integers(0, 300, 80)
    if step % 3 == 1:
      ids = np.unique(ids)  # sorted and unique: the prefetch's key is a copy, not these
    ahead.prefetch(ids).result()
    batches = [ids, rng.integers(0, 300, 80)] if step % 3 == 2 else [ids]
    for batch in batches:  # the prefetched ids, then another batch of the same length
      ws, expected = ahead.working_set(batch), plain.working_set(batch)
      np.testing.assert_array_equal(ws.unique_ids, expected.unique_ids)
      np.testing.assert_array_equal(ws.inverse, expected.inverse)
      np.testing.assert_array_equal(ws.rows, expected.rows)
      ws.unique_ids[:] = 0  # the caller's arrays: changing them changes nothing in the table
      ws.inverse[:] = 0
    np.testing.assert_array_equal(ahead.pull(ids), plain.pull(ids))
    ids[:] = 0
    np.testing.assert_array_equal(ahead.pull(batches[0]), plain.pull(batches[0]))
    grads = rng.standard_normal((len(expected.unique_ids), DIM)).astype(np.float32)
    plain.push(expected.unique_ids, grads)
    ahead.push(expected.unique_ids, grads)
  np.testing.assert_array_equal(ahead.pull(np.arange(300)), plain.pull(np.arange(300)))
  plain.close()
  ahead.close()


def test_misses_in_chunks_never_written_skip_the_disk_with_the_same_rows(tmp_path, monkeypatch):
  read = []
  read_rows = _store.TableStore.read_rows
  monkeypatch.setattr(
    _store.TableStore, "read_rows", lambda store, ids: read.append(ids) or read_rows(store, ids)
  )

  def open_(name):
    return embedding.open_table(
      tmp_path / name, num_rows=600, dim=DIM, optimizer=_adam(), host_cache_rows=50, chunk_rows=8
    )

  known, reading = open_("known"), open_("reading")
  reading._written_chunks = None  # reads every miss, as a reopened table does
  rng = np.random.default_rng(5)
  for step in range(30):
    ids = rng.integers(0, 300 if step < 15 else 600, 40)  # new chunks after the flush
    grads = rng.standard_normal((40, DIM)).astype(np.float32)
    for table in (known, reading):
      table.push(ids, grads)
      if step == 14:
        table.flush()
    np.testing.assert_array_equal(known.pull(ids), reading.pull(ids))
  del read[:]
  known.pull(np.arange(600))
  chunks_read = np.unique(np.concatenate(read) // 8)
  written = np.flatnonzero(known._written_chunks)
  assert set(chunks_read) <= set(written) and len(written) < 600 // 8
  np.testing.assert_array_equal(known.pull(np.arange(600)), reading.pull(np.arange(600)))
  known.close()
  reading.close()
  with open_("known") as table, open_("reading") as other:  # reopened past step 0
    assert table._written_chunks is None  # reads every miss again
    np.testing.assert_array_equal(table.pull(np.arange(600)), other.pull(np.arange(600)))
