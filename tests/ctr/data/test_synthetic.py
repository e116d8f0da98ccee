"""The synthetic CTR generator: deterministic, sharded, and non-IID shards that differ."""

import numpy as np

from kstep_adam import ctr


def test_synthetic_is_deterministic_and_shards():
  make = lambda seed: ctr.SyntheticCTR(num_workers=4, sharding="non_iid", seed=seed)
  a, b, c = make(0), make(0), make(1)
  x, px = a.batch(step=3, worker=2, batch_size=64)
  y, py = b.batch(step=3, worker=2, batch_size=64)
  for u, v in zip(x, y):
    np.testing.assert_equal(u, v)
  np.testing.assert_equal(px, py)
  assert not np.array_equal(c.batch(3, 2, 64)[0].keys_BxF, x.keys_BxF)
  assert not np.array_equal(a.batch(3, 1, 64)[0].keys_BxF, x.keys_BxF)
  g = a.global_batch(step=3, batch_size=64)
  np.testing.assert_equal(g.keys_BxF[128:192], x.keys_BxF)
  assert (g.keys_BxF >= 0).all() and (g.keys_BxF < 2**40).all()
  t = a.teacher_auc(20_000)
  assert 0.7 < t < 0.95 and t == b.teacher_auc(20_000)


def test_non_iid_shards_have_different_hot_ids():
  def top_keys(data, worker):
    keys = np.concatenate([data.batch(s, worker, 512)[0].keys_BxF for s in range(4)])
    return np.array(
      [
        np.unique(col, return_counts=True)[0][np.unique(col, return_counts=True)[1].argmax()]
        for col in keys.T
      ]
    )

  iid = ctr.SyntheticCTR(num_workers=2, sharding="iid", vocab_size=2000)
  skew = ctr.SyntheticCTR(num_workers=2, sharding="non_iid", vocab_size=2000)
  same_iid = (top_keys(iid, 0) == top_keys(iid, 1)).sum()
  same_skew = (top_keys(skew, 0) == top_keys(skew, 1)).sum()
  assert same_iid == 26  # Zipf rank 0 dominates every field
  assert same_skew <= 26 - 26 // 4  # a quarter of the fields have per-shard hot ids
