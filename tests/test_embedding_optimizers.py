"""Sparse optimizers through the tiered table vs. dense NumPy references over the whole table.

The host cache is far smaller than the set of touched rows, so rows make round trips
through the pending area and the committed disk tier between steps.
"""

import numpy as np
import optax
import pytest

from kstep_adam import embedding
from kstep_adam.embedding import _optimizers

NUM_ROWS, DIM = 300, 4


def _table_and_dense_init(tmp_path, opt, seed: int):
  """A NUM_ROWS x DIM table with a 40-row host cache, and its initial rows in float64
  (same seed and scale) for a dense reference."""
  table = embedding.open_table(
    tmp_path / "t",
    num_rows=NUM_ROWS,
    dim=DIM,
    optimizer=opt,
    host_cache_rows=40,
    seed=seed,
    init_scale=0.1,
  )
  p = embedding.init_rows(np.arange(NUM_ROWS), DIM, seed=seed, scale=0.1).astype(np.float64)
  return table, p


def _dense_adam(p, m, v, g, count, lr, b1, b2, eps, lazy_rows=None):
  """One dense Adam step (optax.adam's form), or TF LazyAdam on ``lazy_rows`` only."""
  if lazy_rows is None:
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    p -= lr * (m / (1 - b1**count)) / (np.sqrt(v / (1 - b2**count)) + eps)
  else:
    r = lazy_rows
    m[r] = b1 * m[r] + (1 - b1) * g[r]
    v[r] = b2 * v[r] + (1 - b2) * g[r] ** 2
    p[r] -= lr * np.sqrt(1 - b2**count) / (1 - b1**count) * m[r] / (np.sqrt(v[r]) + eps)


def _random_batch(rng, step):
  ids = rng.integers(0, NUM_ROWS, size=rng.integers(5, 40))
  ids = np.concatenate([ids, ids[:3]])  # repeated ids
  if step % 7 == 3:
    ids = np.concatenate([ids, rng.integers(0, 20, 10)])  # a hot range
  grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
  return ids, grads


def _scatter_sum(ids, grads):
  g = np.zeros((NUM_ROWS, DIM))
  np.add.at(g, ids, grads.astype(np.float64))
  return g


@pytest.mark.parametrize("flush_every", [0, 5])
def test_exact_adam_matches_dense_adam_over_whole_table(tmp_path, flush_every):
  lr, b1, b2, eps = 0.02, 0.9, 0.99, 1e-6
  opt = embedding.SparseAdam(learning_rate=lr, b1=b1, b2=b2, eps=eps, mode="exact")
  table, p = _table_and_dense_init(tmp_path, opt, seed=3)
  m, v = np.zeros((NUM_ROWS, DIM)), np.zeros((NUM_ROWS, DIM))
  rng = np.random.default_rng(0)
  for step in range(1, 61):
    ids, grads = _random_batch(rng, step)
    table.push(ids, grads)
    _dense_adam(p, m, v, _scatter_sum(ids, grads), step, lr, b1, b2, eps)
    if flush_every and step % flush_every == 0:
      table.flush()
    if step % 20 == 0:  # pull the whole table: every row caught up to this step
      np.testing.assert_allclose(table.pull(np.arange(NUM_ROWS)), p, rtol=1e-6, atol=1e-7)
  stats = table.stats()
  assert stats["dirty_evictions"] > 100  # rows really went to disk and came back
  table.close()
  reopened = embedding.open_table(tmp_path / "t", host_cache_rows=16)
  np.testing.assert_allclose(reopened.pull(np.arange(NUM_ROWS)), p, rtol=1e-6, atol=1e-7)
  reopened.close()


def test_exact_adam_matches_optax_adam(tmp_path):
  lr = 0.05
  opt = embedding.SparseAdam(learning_rate=lr, mode="exact")
  table = embedding.open_table(
    tmp_path / "t", num_rows=50, dim=3, optimizer=opt, host_cache_rows=10, init_scale=0.5
  )
  params = embedding.init_rows(np.arange(50), 3, seed=0, scale=0.5)
  tx = optax.adam(lr)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  for _ in range(30):
    ids = rng.integers(0, 50, 8)
    grads = rng.standard_normal((8, 3)).astype(np.float32)
    table.push(ids, grads)
    dense_g = np.zeros((50, 3), np.float32)
    np.add.at(dense_g, ids, grads)
    updates, state = tx.update(dense_g, state)
    params = optax.apply_updates(params, updates)
  # optax runs in float32 (the tight 1e-6 check is against the float64 reference above).
  np.testing.assert_allclose(table.pull(np.arange(50)), np.asarray(params), rtol=1e-5, atol=1e-5)
  table.close()


def test_exact_catch_up_long_gap_uses_truncated_sum(tmp_path):
  """A row idle for far more than K steps still matches dense Adam (truncation bound)."""
  lr, b1, b2 = 0.01, 0.9, 0.999
  opt = embedding.SparseAdam(learning_rate=lr, b1=b1, b2=b2, mode="exact")
  assert opt.catch_up_terms == 199
  table = embedding.open_table(
    tmp_path / "t", num_rows=4, dim=2, optimizer=opt, host_cache_rows=2, init_scale=0.1
  )
  p = embedding.init_rows(np.arange(4), 2, seed=0, scale=0.1).astype(np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  g_row0 = np.array([[1.0, -2.0]], np.float32)
  for step in range(1, 501):
    ids = np.array([0]) if step <= 3 else np.array([1])
    grads = g_row0 if step <= 3 else np.full((1, 2), 0.5, np.float32)
    table.push(ids, grads)
    g = np.zeros((4, 2))
    g[ids] = grads
    _dense_adam(p, m, v, g, step, lr, b1, b2, 1e-8)
  np.testing.assert_allclose(table.pull(np.arange(4)), p, rtol=1e-6, atol=1e-8)
  table.close()


def test_lazy_adam_matches_lazy_reference(tmp_path):
  lr, b1, b2, eps = 0.02, 0.9, 0.999, 1e-7
  opt = embedding.SparseAdam(learning_rate=lr, b1=b1, b2=b2, eps=eps, mode="lazy")
  table, p = _table_and_dense_init(tmp_path, opt, seed=5)
  m, v = np.zeros((NUM_ROWS, DIM)), np.zeros((NUM_ROWS, DIM))
  rng = np.random.default_rng(2)
  for step in range(1, 41):
    ids, grads = _random_batch(rng, step)
    table.push(ids, grads)
    _dense_adam(p, m, v, _scatter_sum(ids, grads), step, lr, b1, b2, eps, lazy_rows=np.unique(ids))
  np.testing.assert_allclose(table.pull(np.arange(NUM_ROWS)), p, rtol=1e-6, atol=1e-7)
  table.close()


def test_rowwise_adagrad_matches_reference(tmp_path):
  lr, eps, acc0 = 0.1, 1e-8, 0.1
  opt = embedding.RowwiseAdagrad(learning_rate=lr, eps=eps, initial_accumulator_value=acc0)
  table, p = _table_and_dense_init(tmp_path, opt, seed=7)
  acc = np.full(NUM_ROWS, acc0)
  rng = np.random.default_rng(3)
  for _ in range(40):
    ids, grads = _random_batch(rng, 0)
    table.push(ids, grads)
    g = _scatter_sum(ids, grads)
    acc += np.mean(g * g, axis=1)  # a zero row adds nothing: dense == sparse
    p -= lr * g / (np.sqrt(acc)[:, None] + eps)
  np.testing.assert_allclose(table.pull(np.arange(NUM_ROWS)), p, rtol=1e-6, atol=1e-7)
  table.close()


def test_learning_rate_schedule_is_followed_in_catch_up(tmp_path):
  schedule = optax.linear_schedule(0.05, 0.01, transition_steps=30)
  opt = embedding.SparseAdam(learning_rate=schedule, b2=0.99, mode="exact")
  table = embedding.open_table(
    tmp_path / "t", num_rows=20, dim=2, optimizer=opt, host_cache_rows=5, init_scale=0.1
  )
  p = embedding.init_rows(np.arange(20), 2, seed=0, scale=0.1).astype(np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  rng = np.random.default_rng(4)
  for step in range(1, 41):
    ids = rng.integers(0, 20, 3)
    grads = rng.standard_normal((3, 2)).astype(np.float32)
    table.push(ids, grads)
    g = np.zeros((20, 2))
    np.add.at(g, ids, grads)
    _dense_adam(p, m, v, g, step, float(schedule(step - 1)), 0.9, 0.99, 1e-8)
  np.testing.assert_allclose(table.pull(np.arange(20)), p, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="schedule"):
    table.close()
    embedding.open_table(tmp_path / "t")


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_the_adam_kernel_gives_the_numpy_forms_bits(mode, monkeypatch):
  # Rows laid out as a table's block holds them ([last step, params, m, v] per row), with
  # zeros of both signs, tiny and huge values; several steps, so every step scalar varies.
  dim, n = 16, 1037
  rng = np.random.default_rng(0)
  block = rng.standard_normal((n, 1 + 3 * dim)).astype(np.float32)
  block[:, 1 + 2 * dim :] = np.abs(block[:, 1 + 2 * dim :])  # v >= 0
  block[:5, 1:] = 0.0
  block[5:10, 1 : 1 + 2 * dim] = -0.0
  block[10:20, 1:] *= np.float32(1e-30)
  block[20:30, 1 : 1 + dim] *= np.float32(1e30)
  grads = rng.standard_normal((n, dim)).astype(np.float32)
  grads[:3] = 0.0
  grads[30:40] *= np.float32(1e-20)
  opt = embedding.SparseAdam(learning_rate=lambda c: 1e-2 / (1 + c), mode=mode, eps=1e-8)
  results = {}
  for switch in ("1", "0"):  # the kernel, then the NumPy form
    monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", switch)
    rows = block.copy()
    kernel = _optimizers._adam_kernel(rows[:, 1 : 1 + dim], rows[:, 1 + dim :], grads)
    assert (kernel is not None) == (switch == "1")
    for step in (1, 2, 7, 1000):
      opt.apply(rows[:, 1 : 1 + dim], rows[:, 1 + dim :], grads * step, step)
    results[switch] = rows
  assert results["1"].tobytes() == results["0"].tobytes()
  assert not np.array_equal(results["1"], block)  # the step did change the rows


def test_the_adam_kernel_takes_separate_arrays_and_leaves_other_gradients_to_numpy(monkeypatch):
  # The in-RAM baseline's layout (params and slots in arrays of their own) fits the kernel;
  # float64 or broadcast gradients go to the NumPy form, which takes them as they are.
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "1")
  rng = np.random.default_rng(1)
  params = rng.standard_normal((50, 4)).astype(np.float32)
  slots = np.abs(rng.standard_normal((50, 8))).astype(np.float32)
  grads = rng.standard_normal((50, 4)).astype(np.float32)
  assert _optimizers._adam_kernel(params, slots, grads) is not None
  assert _optimizers._adam_kernel(params, slots, grads.astype(np.float64)) is None
  assert _optimizers._adam_kernel(params, slots, grads[:1]) is None
  opt = embedding.SparseAdam(learning_rate=1e-2, mode="lazy")
  ours = params.copy(), slots.copy()
  opt.apply(*ours, grads, 5)
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "0")
  numpy_form = params.copy(), slots.copy()
  opt.apply(*numpy_form, grads, 5)
  for a, b in zip(ours, numpy_form, strict=True):
    assert a.tobytes() == b.tobytes()
  with pytest.raises(ValueError):  # a gradient of the wrong length is refused, not read past
    opt.apply(params.copy(), slots.copy(), grads[:10], 5)
