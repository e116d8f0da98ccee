"""Tests of the CTR data layer: readers, synthetic generator, feature keys and metrics."""

import gzip
import itertools

import numpy as np
import pytest

from kstep_adam import ctr


def _criteo_line(label, dense, cats):
  return "\t".join([str(label), *dense, *cats]) + "\n"


def _good_lines(n, seed=0):
  rng = np.random.default_rng(seed)
  lines = []
  for i in range(n):
    dense = [str(int(x)) for x in rng.integers(-1, 50, 13)]
    cats = [f"{int(x):08x}" for x in rng.integers(0, 2**32, 26)]
    if i % 3 == 0:  # empty fields are allowed in Criteo
      dense[2], cats[5] = "", ""
    lines.append(_criteo_line(i % 2, dense, cats))
  return lines


def _read_all(reader, batch_size=4):
  return ctr.concat_batches(list(reader.batches(batch_size)))


def test_criteo_well_formed_plain_and_gzip_agree(tmp_path):
  lines = _good_lines(10)
  plain, gz = tmp_path / "day.txt", tmp_path / "day.gz"
  plain.write_text("".join(lines))
  with gzip.open(gz, "wt") as f:
    f.write("".join(lines))
  a = _read_all(ctr.CTRFileReader(str(plain)))
  b = _read_all(ctr.CTRFileReader(str(gz)))
  for x, y in zip(a, b):
    np.testing.assert_equal(x, y)
  assert a.dense_BxI.shape == (10, 13) and a.keys_BxF.shape == (10, 26)
  np.testing.assert_equal(a.label_B, np.arange(10) % 2)
  first = lines[0].rstrip("\n").split("\t")
  expected = [np.log1p(max(float(s), 0.0)) if s else 0.0 for s in first[1:14]]
  np.testing.assert_allclose(a.dense_BxI[0], expected, rtol=1e-6)
  assert a.dense_BxI[0, 2] == 0.0  # empty dense field reads as 0
  assert (a.keys_BxF >= 0).all() and (a.keys_BxF < 2**40).all()
  assert ctr.count_lines(str(gz)) == 10


def test_empty_categorical_is_its_own_value_per_field(tmp_path):
  lines = _good_lines(6)
  path = tmp_path / "d.txt"
  path.write_text("".join(lines))
  batch = _read_all(ctr.CTRFileReader(str(path)))
  assert batch.keys_BxF[0, 5] == batch.keys_BxF[3, 5]  # both empty, same field
  assert batch.keys_BxF[0, 5] != batch.keys_BxF[1, 5]


@pytest.mark.parametrize(
  "bad, what",
  [
    ("1\t2\t3\n", "expected 40 fields, got 3"),
    (_criteo_line("x", ["1"] * 13, ["0a"] * 26), "label is not numeric"),
    (_criteo_line(1, ["1"] * 13, ["zz"] * 26), "not hex"),
    (_criteo_line(1, ["q"] + ["1"] * 12, ["0a"] * 26), "not a number"),
  ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, what):
  lines = _good_lines(5)
  lines.insert(3, bad)
  path = tmp_path / "bad.txt"
  path.write_text("".join(lines))
  with pytest.raises(ctr.CTRDataError, match=rf"bad\.txt:4: .*{what}"):
    _read_all(ctr.CTRFileReader(str(path)))
  reader = ctr.CTRFileReader(str(path), skip_bad_lines=True)
  batch = _read_all(reader)
  assert batch.size == 5
  assert reader.stats.lines_skipped == 1 and reader.stats.lines_read == 5
  assert "bad.txt:4:" in reader.stats.messages[0]


def test_start_stop_lines_split_the_file(tmp_path):
  path = tmp_path / "d.txt"
  path.write_text("".join(_good_lines(10)))
  whole = _read_all(ctr.CTRFileReader(str(path)))
  head = _read_all(ctr.CTRFileReader(str(path), stop_line=9))
  tail = _read_all(ctr.CTRFileReader(str(path), start_line=9))
  np.testing.assert_equal(np.concatenate([head.keys_BxF, tail.keys_BxF]), whole.keys_BxF)
  assert tail.size == 1


def test_avazu_style_csv_with_header(tmp_path):
  text = (
    "id,click,hour,site_id,banner_pos\n"
    "1000,0,14102100,1fbe01fe,0\n"
    "1001,1,14102100,,1\n"
    "1002,0,14102101,1fbe01fe,0\n"
  )
  path = tmp_path / "avazu.csv"
  path.write_text(text)
  reader = ctr.CTRFileReader(str(path), format="csv")
  batch = _read_all(reader)
  assert reader.categorical_columns == ["hour", "site_id", "banner_pos"]
  assert batch.dense_BxI.shape == (3, 0)
  np.testing.assert_equal(batch.label_B, [0, 1, 0])
  assert batch.keys_BxF[0, 1] == batch.keys_BxF[2, 1] != batch.keys_BxF[1, 1]
  dense = _read_all(ctr.CTRFileReader(str(path), format="csv", dense_columns=["banner_pos"]))
  np.testing.assert_allclose(dense.dense_BxI[:, 0], np.log1p([0, 1, 0]))
  with pytest.raises(ValueError, match="label_column"):
    ctr.CTRFileReader(str(path), format="csv", label_column="y")
  path.write_text(text + "1003,2,1,2,3\n")
  with pytest.raises(ctr.CTRDataError, match=r"avazu\.csv:5: label must be 0 or 1"):
    _read_all(ctr.CTRFileReader(str(path), format="csv"))


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


def test_auc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  scores = rng.integers(0, 10, 200).astype(float)  # many ties
  pos, neg = scores[labels == 1], scores[labels == 0]
  wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
  assert ctr.auc(labels, scores) == pytest.approx(wins / (len(pos) * len(neg)))
  assert ctr.auc(labels, -scores) == pytest.approx(1 - ctr.auc(labels, scores))
  assert np.isnan(ctr.auc(np.ones(3), np.arange(3)))
  assert ctr.logloss(np.array([1.0, 0.0]), np.array([0.8, 0.2])) == pytest.approx(-np.log(0.8))


def test_feature_keys_validate_and_separate_fields():
  keys = ctr.feature_keys(np.array([[5, 5, 5]]), key_bits=20)
  assert len(set(keys[0].tolist())) == 3 and (keys < 2**20).all()
  with pytest.raises(ValueError, match="key_bits"):
    ctr.feature_keys(np.array([[1]]), key_bits=64)


@pytest.mark.parametrize("name", ctr.MODELS)
@pytest.mark.parametrize("num_dense", [13, 0])
def test_models_take_embeddings_and_pass_gradients_back(name, num_dense):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  model = ctr.make_model(name, num_dense=num_dense, num_categorical=5, embed_dim=4)
  graphdef, params = nnx.split(model)
  emb = jax.random.normal(jax.random.key(0), (3, 5, 4)) * 0.1
  dense = jnp.ones((3, num_dense))
  logit_fn = lambda p, e: nnx.merge(graphdef, p)(e, dense).sum()
  assert jax.jit(lambda p, e: nnx.merge(graphdef, p)(e, dense))(params, emb).shape == (3,)
  g_params, g_emb = jax.jit(jax.grad(logit_fn, argnums=(0, 1)))(params, emb)
  assert g_emb.shape == emb.shape and float(jnp.abs(g_emb).min()) > 0  # every field matters
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g_params))
  with pytest.raises(ValueError, match="model must be one of"):
    ctr.make_model("fm", num_dense=1, num_categorical=2, embed_dim=2)
