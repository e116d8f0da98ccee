"""RowDeduplicator: np.unique's answer from a scratch array of slots, for every table size."""

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


@pytest.mark.parametrize("direct", [True, False], ids=["scratch slots", "sort"])
def test_batches_deduplicate_as_np_unique_batch_after_batch(direct, monkeypatch):
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
