"""The CTR file readers: Criteo TSV and CSV, plain and gzip, whole or a byte span of a file,
and the data reader benchmark."""

import gzip
import itertools
import re

import numpy as np
import pytest
from _ctr_files import assert_same_batches
from _ctr_files import criteo_line
from _ctr_files import good_lines
from _ctr_files import read_both

from kstep_adam import ctr
from kstep_adam.ctr.data import _schema


def _read_all(reader, batch_size=4):
  return ctr.concat_batches(list(reader.batches(batch_size)))


def test_criteo_well_formed_plain_and_gzip_agree(tmp_path):
  lines = good_lines(10)
  plain, gz = tmp_path / "day.txt", tmp_path / "day.gz"
  plain.write_text("".join(lines))
  with gzip.open(gz, "wt") as f:
    f.write("".join(lines))
  _, plain_batches, _ = read_both(plain)
  _, gz_batches, _ = read_both(gz)
  assert_same_batches(plain_batches, gz_batches)
  a = ctr.concat_batches(plain_batches)
  assert a.dense_BxI.shape == (10, 13) and a.keys_BxF.shape == (10, 26)
  np.testing.assert_equal(a.label_B, np.arange(10) % 2)
  first = lines[0].rstrip("\n").split("\t")
  expected = [np.log1p(max(float(s), 0.0)) if s else 0.0 for s in first[1:14]]
  np.testing.assert_allclose(a.dense_BxI[0], expected, rtol=1e-6)
  assert a.dense_BxI[0, 2] == 0.0  # empty dense field reads as 0
  values = [int(s, 16) if s else _schema.MISSING for s in first[14:]]
  np.testing.assert_array_equal(a.keys_BxF[0], ctr.feature_keys(np.array([values], np.uint64))[0])
  assert (a.keys_BxF >= 0).all() and (a.keys_BxF < 2**40).all()
  assert ctr.count_lines(str(gz)) == 10


def test_empty_categorical_is_its_own_value_per_field(tmp_path):
  lines = good_lines(6)
  path = tmp_path / "d.txt"
  path.write_text("".join(lines))
  batch = ctr.concat_batches(read_both(path)[1])
  assert batch.keys_BxF[0, 5] == batch.keys_BxF[3, 5]  # both empty, same field
  assert batch.keys_BxF[0, 5] != batch.keys_BxF[1, 5]


@pytest.mark.parametrize(
  "bad, what",
  [
    ("1\t2\t3\n", "expected 40 fields, got 3"),
    (criteo_line("x", ["1"] * 13, ["0a"] * 26), "label is not numeric"),
    (criteo_line(2, ["1"] * 13, ["0a"] * 26), "label must be 0 or 1"),
    (criteo_line(1, ["1"] * 13, ["zz"] * 26), r"field 15 \(C1, categorical\) is not hex"),
    (criteo_line(1, ["q"] + ["1"] * 12, ["0a"] * 26), r"field 2 \(I1, dense\) is not a number"),
  ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, what):
  lines = good_lines(5)
  lines.insert(3, bad)
  path = tmp_path / "bad.txt"
  path.write_text("".join(lines))
  _, _, error = read_both(path)
  assert re.search(rf"bad\.txt:4: {what}", error)
  reader, batches, _ = read_both(path, skip_bad_lines=True)
  assert ctr.concat_batches(batches).size == 5
  assert reader.stats.lines_skipped == 1 and reader.stats.lines_read == 5
  assert "bad.txt:4:" in reader.stats.messages[0]


@pytest.mark.parametrize("compress", [False, True])
def test_byte_spans_split_the_file_into_disjoint_complete_parts(tmp_path, compress):
  lines = good_lines(400, seed=1)
  path = tmp_path / ("d.gz" if compress else "d.txt")
  data = "".join(lines).encode()
  path.write_bytes(gzip.compress(data) if compress else data)
  whole = _read_all(ctr.CTRFileReader(str(path)), batch_size=1000)
  cuts = [0.0, 0.3, 0.3, 0.71, 0.9, 1.0]  # an empty part too
  parts = [
    ctr.CTRFileReader(str(path), span=(lo, hi), block_bytes=4096)
    for lo, hi in itertools.pairwise(cuts)
  ]
  for _ in range(2):  # a second pass resumes a later gzip part where the first found it
    keys = [b.keys_BxF for r in parts for b in r.batches(64)]
    np.testing.assert_array_equal(np.concatenate(keys), whole.keys_BxF)
  assert parts[1].stats.lines_read == 0 and parts[1].stats.passes == 2
  if not compress:  # the split falls where the bytes say: the line holding byte 0.9 * size
    start_of_line = np.cumsum([0] + [len(line) for line in lines])
    test_lines = int((start_of_line[:-1] >= int(0.9 * len(data))).sum())
    assert parts[-1].stats.lines_read == test_lines


def test_a_bad_line_in_a_later_part_is_named_by_its_line_in_the_file(tmp_path):
  lines = good_lines(300, seed=2)
  lines[290] = criteo_line(1, ["inf"] + ["1"] * 12, ["0a"] * 26)
  for name, write in (("d.txt", lambda p, t: p.write_text(t)), ("d.gz", _write_gzip)):
    path = tmp_path / name
    write(path, "".join(lines))
    for engine in ("columnar", "lines"):
      reader = ctr.CTRFileReader(str(path), span=(0.9, 1.0), block_bytes=2048, engine=engine)
      with pytest.raises(ctr.CTRDataError, match=rf"{name}:291: field 2 \(I1, dense\)"):
        _read_all(reader)


def _write_gzip(path, text):
  with gzip.open(path, "wt") as f:
    f.write(text)


def test_avazu_style_csv_with_header(tmp_path):
  text = (
    "id,click,hour,site_id,banner_pos\n"
    "1000,0,14102100,1fbe01fe,0\n"
    "1001,1,14102100,,1\n"
    "1002,0,14102101,1fbe01fe,0\n"
  )
  path = tmp_path / "avazu.csv"
  path.write_text(text)
  reader, batches, _ = read_both(path, format="csv")
  batch = ctr.concat_batches(batches)
  assert reader.categorical_columns == ["hour", "site_id", "banner_pos"]
  assert batch.dense_BxI.shape == (3, 0)
  np.testing.assert_equal(batch.label_B, [0, 1, 0])
  assert batch.keys_BxF[0, 1] == batch.keys_BxF[2, 1] != batch.keys_BxF[1, 1]
  dense = ctr.concat_batches(read_both(path, format="csv", dense_columns=["banner_pos"])[1])
  np.testing.assert_allclose(dense.dense_BxI[:, 0], np.log1p([0, 1, 0]))
  with pytest.raises(ValueError, match="label_column"):
    ctr.CTRFileReader(str(path), format="csv", label_column="y")
  path.write_text(text + "1003,2,1,2,3\n")
  _, _, error = read_both(path, format="csv")
  assert re.search(r"avazu\.csv:5: label must be 0 or 1", error)


@pytest.mark.parametrize("argv", [[], ["--format", "csv", "--gzip"]])
def test_data_reader_benchmark_runs_and_reports_ratios(argv):
  from experiments.benchmarks import data_reader

  result = data_reader.main(["--lines", "3000", "--repeats", "1", "--line-lines", "1000", *argv])
  rates = result["lines_per_sec"]
  assert set(rates) == {"raw", "columnar", "lines"} and min(rates.values()) > 0
  assert np.isclose(result["columnar_over_raw"], rates["columnar"] / rates["raw"], rtol=1e-2)
  assert np.isclose(result["columnar_over_lines"], rates["columnar"] / rates["lines"], rtol=1e-2)


def test_concatenated_gzip_members_and_zero_padding_read_as_one_file(tmp_path):
  lines = good_lines(600, seed=3)
  members = [gzip.compress("".join(lines[i : i + 150]).encode()) for i in range(0, 600, 150)]
  path = tmp_path / "d.gz"
  path.write_bytes(b"".join(members) + bytes(1024))
  plain = tmp_path / "d.txt"
  plain.write_text("".join(lines))
  whole = _read_all(ctr.CTRFileReader(str(plain)), batch_size=600)
  parts = [  # parsed on the reading thread, and on two workers
    ctr.CTRFileReader(str(path), span=span, block_bytes=8192, workers=workers)
    for span, workers in [((0, 0.5), 1), ((0.5, 1), 2)]
  ]
  for _ in range(2):
    keys = np.concatenate([b.keys_BxF for r in parts for b in r.batches(100)])
    np.testing.assert_array_equal(keys, whole.keys_BxF)


@pytest.mark.parametrize("compressed", [False, True])
def test_lines_appended_while_a_run_reads_enter_no_part(tmp_path, compressed):
  """Issue 17 item 4. Regression: lines appended to --data while a run read it entered the
  test split (2,000 -> 7,100 test examples, AUC 0.50 -> 0.95). A source reads the file as it
  was when it was opened."""
  path = tmp_path / ("day.gz" if compressed else "day.txt")
  write = (lambda p, text, mode: gzip.open(p, mode + "t").write(text)) if compressed else None
  lines = good_lines(400)
  if compressed:
    write(path, "".join(lines), "w")
  else:
    path.write_text("".join(lines))
  source = ctr.file_source(str(path), block_bytes=2048)

  def read(batches):
    return ctr.concat_batches(list(batches))

  test_before, train_before = read(source.test_batches()), read(source.train_epoch(0, 8))
  if compressed:  # a gzip log grows by members
    write(path, "".join(good_lines(300)), "a")
  else:
    with open(path, "a") as f:
      f.write("".join(good_lines(300)))
  for got, want in (
    (read(source.test_batches()), test_before),
    (read(source.train_epoch(1, 8)), train_before),
  ):
    assert got.size == want.size
    np.testing.assert_array_equal(got.keys_BxF, want.keys_BxF)
