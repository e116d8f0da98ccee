"""RowDeduplicator and hash_keys_to_rows: np.unique's answer and the documented hash, from
the C++ kernels (row_index.cc) and from the NumPy forms, for every table size."""

import threading

import numpy as np
import pytest

from kstep_adam import embedding
from kstep_adam.embedding import _batch


def _assert_like_np_unique(dedup, rows):
  unique, inverse = dedup(rows)
  expected_unique, expected_inverse = np.unique(rows, return_inverse=True)
  np.testing.assert_array_equal(unique, expected_unique)
  np.testing.assert_array_equal(inverse, expected_inverse.reshape(rows.shape))
  assert unique.dtype == np.int64 and inverse.dtype == np.int32
  assert inverse.shape == rows.shape


@pytest.fixture(params=["1", "0"], ids=["kernel", "numpy"])
def kernels(request, monkeypatch):
  """Both forms: the kernels required (a failed build fails the test), and turned off."""
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", request.param)
  return request.param == "1"


@pytest.mark.parametrize("direct", [True, False], ids=["scratch slots", "sort"])
def test_batches_deduplicate_as_np_unique_batch_after_batch(direct, kernels, monkeypatch):
  num_rows = 5000
  if not direct:  # a table past the limit sorts instead
    monkeypatch.setattr(_batch, "DIRECT_DEDUP_MAX_ROWS", num_rows - 1)
  dedup = embedding.RowDeduplicator(num_rows)
  rng = np.random.default_rng(0)
  # Zipf-skewed batches (many repeats), then a batch of all-distinct rows, the edges of the
  # range, one key and no key: slots left from an earlier batch must not leak into a later.
  for _ in range(5):
    _assert_like_np_unique(dedup, np.minimum(rng.zipf(1.2, (64, 26)), num_rows) - 1)
  _assert_like_np_unique(dedup, rng.permutation(num_rows)[:300].reshape(30, 10))
  _assert_like_np_unique(dedup, np.array([[0, num_rows - 1, 0], [num_rows - 1, 0, 7]]))
  _assert_like_np_unique(dedup, np.array([[3]]))
  _assert_like_np_unique(dedup, np.zeros((0, 26), np.int64))


@pytest.mark.parametrize("num_rows", [1, 3, 2048, 5000, 1 << 22])
def test_every_table_size_and_repeated_batches(num_rows, kernels):
  dedup = embedding.RowDeduplicator(num_rows)
  rng = np.random.default_rng(num_rows)
  for shape in [(4096, 26), (1, 1), (7, 3)]:
    for _ in range(2):  # the scratch must be clean for the next batch
      _assert_like_np_unique(dedup, rng.integers(0, num_rows, shape))
  _assert_like_np_unique(dedup, np.arange(num_rows - 1, -1, -1).reshape(1, -1)[:, :5000])


@pytest.mark.parametrize("bad", [-1, 5000, 2**40])
def test_a_row_out_of_range_is_named_and_leaves_the_scratch_clean(bad, kernels):
  dedup = embedding.RowDeduplicator(5000)
  rows = np.arange(12).reshape(3, 4)
  rows[2, 1] = bad
  with pytest.raises(ValueError, match=f"num_rows=5000\\), got {bad}"):
    dedup(rows)
  _assert_like_np_unique(dedup, np.array([[4, 4, 9]]))


@pytest.mark.parametrize("num_rows", [1, 97, 1 << 20, 2**40 + 3, 2**63 - 1])
@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.uint8])
def test_hashed_rows_are_the_documented_formula_in_both_forms(num_rows, dtype, monkeypatch):
  rng = np.random.default_rng(0)
  info = np.iinfo(dtype)
  keys = rng.integers(info.min, info.max, (64, 26), dtype=dtype, endpoint=True)
  keys.flat[:2] = info.min, info.max
  forms = []
  for switch in ("1", "0"):
    monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", switch)
    forms.append(embedding.hash_keys_to_rows(keys, num_rows, salt=-3))
  splitmix64 = embedding.splitmix64
  bits = keys.astype(np.int64).view(np.uint64)
  expected = splitmix64(bits ^ splitmix64(np.uint64(2**64 - 3))) % np.uint64(num_rows)
  for rows in forms:
    assert rows.dtype == np.int64 and rows.shape == keys.shape
    np.testing.assert_array_equal(rows, expected.astype(np.int64))


def test_threads_sharing_one_deduplicator_each_get_their_own_answer():
  dedup = embedding.RowDeduplicator(1 << 16)
  batches = [np.random.default_rng(seed).integers(0, 1 << 16, (512, 26)) for seed in range(8)]
  errors = []

  def work(rows):
    try:
      for _ in range(20):
        _assert_like_np_unique(dedup, rows)
    except AssertionError as error:  # raised in the main thread below
      errors.append(error)

  threads = [threading.Thread(target=work, args=(rows,)) for rows in batches]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors, errors[0]
