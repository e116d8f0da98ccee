"""Every class of bad CTR input is named (file, line, field), counted once under
``skip_bad_lines``, and found before training; the columnar reader agrees with the line parser
on all of it."""

import gzip
import random
import re

import numpy as np
import pytest
from _ctr_files import criteo_line
from _ctr_files import good_lines
from _ctr_files import read_both

from kstep_adam import ctr
from kstep_adam.ctr.data import _line_parser


def _file_with(tmp_path, bad_line, *, name="day.txt", at=3, total=6):
  lines = good_lines(total)
  lines.insert(at, bad_line)
  path = tmp_path / name
  path.write_bytes(
    "".join(lines).encode()
    if isinstance(bad_line, str)
    else b"".join(line.encode() if isinstance(line, str) else line for line in lines)
  )
  return path


def _criteo_bytes(label, dense, cats) -> bytes:
  return b"\t".join([label, *dense, *cats]) + b"\n"


GOOD_DENSE, GOOD_CATS = [b"1"] * 13, [b"0a"] * 26


@pytest.mark.parametrize(
  "dense_or_cats, value, what",
  [
    ("dense", b"inf", r"field 2 \(I1, dense\) is not finite: 'inf'"),
    ("dense", b"nan", r"field 2 \(I1, dense\) is not finite: 'nan'"),
    ("dense", b"-Infinity", r"field 2 \(I1, dense\) is not finite"),
    ("dense", b"9" * 400, r"field 2 \(I1, dense\) is not finite: '9{40}\.\.\.'"),
    ("dense", b"1e300", r"field 2 \(I1, dense\) is outside \[-2\*\*53, 2\*\*53\]: '1e300'"),
    ("dense", b"-1e17", r"field 2 \(I1, dense\) is outside"),
    ("cats", b"1" + b"0" * 16, r"field 15 \(C1, categorical\) has more than 16 hex digits"),
    ("cats", b"-1a", r"field 15 \(C1, categorical\) is not hex: '-1a'"),
    ("cats", b"0x1a", r"field 15 \(C1, categorical\) is not hex"),
    ("cats", b"1a\xff", r"field 15 \(C1, categorical\) is not hex: '1a\\\\xff'"),
    ("dense", b"\xc3\xa9", r"field 2 \(I1, dense\) is not a number: 'é'"),
  ],
)
def test_bad_values_are_named_bad_lines(tmp_path, dense_or_cats, value, what):
  dense, cats = list(GOOD_DENSE), list(GOOD_CATS)
  (dense if dense_or_cats == "dense" else cats)[0] = value
  path = _file_with(tmp_path, _criteo_bytes(b"1", dense, cats))
  _, _, error = read_both(path)
  assert re.search(rf"day\.txt:4: {what}", error), error
  reader, batches, _ = read_both(path, skip_bad_lines=True)
  assert reader.stats.lines_skipped == 1 and reader.stats.lines_read == 6
  assert all(np.isfinite(b.dense_BxI).all() for b in batches)


def test_accepted_dense_range_is_inclusive_and_the_transform_bounds_it(tmp_path):
  dense = [b"9007199254740992", b"-9007199254740992", b"1e-400", b"-0"] + [b"1"] * 9
  path = _file_with(tmp_path, _criteo_bytes(b"0", dense, GOOD_CATS))
  batch = ctr.concat_batches(read_both(path)[1])
  np.testing.assert_allclose(batch.dense_BxI[3, :4], [np.log1p(2.0**53), 0, 0, 0], rtol=1e-6)
  assert batch.dense_BxI.max() < 36.8


def test_invalid_utf8_in_a_csv_field_is_a_named_bad_line(tmp_path):
  path = tmp_path / "a.csv"
  path.write_bytes(b"click,site,app\n1,x,y\n0,ab\xffc,y\n1,x,z\n")
  _, _, error = read_both(path, format="csv")
  assert re.search(r"a\.csv:3: field 2 \(site\) is not valid UTF-8: 'ab\\\\xffc'", error), error
  reader, batches, _ = read_both(path, format="csv", skip_bad_lines=True)
  assert reader.stats.lines_skipped == 1 and ctr.concat_batches(batches).size == 2
  path.write_bytes(b"id,click,site\n1,1,x\n\xff2,0,y\n")  # in a dropped column: no matter
  assert ctr.concat_batches(read_both(path, format="csv")[1]).size == 2


def test_a_utf8_bom_does_not_rename_the_first_column(tmp_path):
  path = tmp_path / "bom.csv"
  path.write_bytes(b"\xef\xbb\xbfid,click,site\n7,1,a\n8,0,b\n")
  reader, _, _ = read_both(path, format="csv")
  assert reader.categorical_columns == ["site"]  # 'id' is still recognized and ignored
  criteo = _file_with(tmp_path, criteo_line(1, ["1"] * 13, ["0a"] * 26), at=0, name="c.txt")
  criteo.write_bytes(b"\xef\xbb\xbf" + criteo.read_bytes())
  assert ctr.concat_batches(read_both(criteo)[1]).size == 7


def _truncated_gzip(tmp_path, lines=3000):
  path = tmp_path / "day.gz"
  path.write_bytes(gzip.compress("".join(good_lines(lines)).encode())[:-300])
  return path


@pytest.mark.parametrize("skip", [False, True])
def test_a_truncated_gzip_names_the_file_and_the_last_line_read(tmp_path, skip):
  path = _truncated_gzip(tmp_path)
  for engine in ("columnar", "lines"):
    reader = ctr.CTRFileReader(str(path), skip_bad_lines=skip, engine=engine, block_bytes=4096)
    with pytest.raises(ctr.CTRDataError, match=r"day\.gz: the gzip data ends .* after line (\d+)"):
      for _ in reader.batches(64):
        pass
  # the lines before the damage were read, and "the last line read" is one of them
  with pytest.raises(ctr.CTRDataError) as raised:
    list(reader.batches(64))
  last = int(re.search(r"after line (\d+)", str(raised.value)).group(1))
  assert 2000 < last < 3000 and reader.stats.lines_read >= last - 64


def test_corrupt_gzip_data_is_an_error_naming_the_file(tmp_path):
  data = bytearray(gzip.compress("".join(good_lines(2000)).encode()))
  data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
  path = tmp_path / "day.gz"
  path.write_bytes(bytes(data))
  with pytest.raises(ctr.CTRDataError, match=r"day\.gz: corrupt gzip data after line \d+"):
    list(ctr.CTRFileReader(str(path), skip_bad_lines=True).batches(64))


def test_a_binary_file_is_not_read_as_one_huge_line(tmp_path, monkeypatch):
  monkeypatch.setattr("kstep_adam.ctr.data._textfile.MAX_LINE_BYTES", 1 << 16)
  path = tmp_path / "blob.bin"
  path.write_bytes(bytes(range(1, 10)) * 20000)  # no newline
  with pytest.raises(ctr.CTRDataError, match=r"blob\.bin:1: a line longer than"):
    list(ctr.CTRFileReader(str(path)).batches(8))


# -- silent wrong metrics (issue 13, item 2) ------------------------------------------------------
def _csv(path, header, rows):
  path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
  return str(path)


def test_a_csv_test_file_is_matched_to_the_training_columns_by_name(tmp_path):
  rng = np.random.default_rng(0)
  header = ["id", "click", "a", "b", "c", "n"]
  rows = [[i, i % 2, *rng.integers(0, 9, 3), int(rng.integers(0, 99))] for i in range(40)]
  train = _csv(tmp_path / "train.csv", header, rows)
  order = [5, 3, 1, 0, 4, 2]  # the same data, columns shuffled
  test = _csv(
    tmp_path / "test.csv", [header[i] for i in order], [[r[i] for i in order] for r in rows]
  )
  source = ctr.file_source(train, format="csv", test_path=test, dense_columns=["n"])
  same = ctr.concat_batches(list(source.train_epoch(0, 40)))
  shuffled = ctr.concat_batches(list(source.test_batches()))
  for x, y in zip(same, shuffled):
    np.testing.assert_array_equal(x, y)
  missing = _csv(tmp_path / "missing.csv", header[:-2], [r[:-2] for r in rows])
  with pytest.raises(ctr.CTRDataError, match=r"missing\.csv differ .* missing \['n', 'c'\]"):
    ctr.file_source(train, format="csv", test_path=missing, dense_columns=["n"])
  extra = _csv(tmp_path / "extra.csv", [*header, "d"], [[*r, 1] for r in rows])
  with pytest.raises(ctr.CTRDataError, match=r"extra\.csv differ .* unexpected \['d'\]"):
    ctr.file_source(train, format="csv", test_path=extra, dense_columns=["n"])
  # The training file's own columns are free; an ignored column may be absent from the test.
  no_id = _csv(tmp_path / "no_id.csv", header[1:], [r[1:] for r in rows])
  ctr.file_source(train, format="csv", test_path=no_id, dense_columns=["n"])


def test_inf_only_in_the_test_lines_fails_before_training(tmp_path):
  lines = good_lines(200)
  lines[195] = criteo_line(1, ["inf"] + ["1"] * 12, ["0a"] * 26)
  path = tmp_path / "day.txt"
  path.write_text("".join(lines))
  with pytest.raises(ctr.CTRDataError, match=r"day\.txt:196: field 2 \(I1, dense\) is not finite"):
    ctr.file_source(str(path))  # the test part's first block is read here
  source = ctr.file_source(str(path), skip_bad_lines=True)
  assert ctr.concat_batches(list(source.test_batches())).size == sum(
    s.lines_read for s in source.read_stats[1:]
  )
  assert np.isfinite(ctr.concat_batches(list(source.test_batches())).dense_BxI).all()


def _half_bad(tmp_path, lines=4500):
  text = good_lines(lines)
  for i in range(0, lines, 2):
    text[i] = "1\tnot enough fields\n"
  path = tmp_path / "day.txt"
  path.write_text("".join(text))
  return path


def test_an_epoch_is_one_pass_and_each_bad_line_is_counted_once(tmp_path):
  path = _half_bad(tmp_path, lines=9000)  # more than one block: the steps are estimated
  source = ctr.file_source(str(path), skip_bad_lines=True)
  train, test = source.read_stats
  steps = [sum(1 for _ in source.train_epoch(epoch, 64)) for epoch in range(3)]
  assert steps[0] == steps[1] == steps[2] == source.steps_per_epoch(64)  # exact after a pass
  assert abs(steps[0] - 4050 // 64) <= 2  # the first block's estimate was close
  list(source.test_batches())
  list(source.test_batches())
  assert train.passes == 3 and test.passes == 2
  assert train.lines_skipped + test.lines_skipped == 4500
  assert train.lines_read + test.lines_read == 4500
  assert len(train.messages) == 10  # the first bad lines, not repeated per pass


def test_one_epoch_with_half_the_lines_bad_trains_one_pass(tmp_path):
  from experiments import train_ctr

  path = _half_bad(tmp_path)  # one block: the steps of a pass are known before training
  args = ["--data", f"criteo:{path}", "--batch-size", "32", "--epochs", "1", "--out"]
  args += [str(tmp_path / "out"), "--no-progress", "--table-rows", "65536", "--eval-every", "0"]
  summary = train_ctr.main([*args, "--skip-bad-lines"])
  source = ctr.file_source(str(path), skip_bad_lines=True)
  train_lines = source.read_stats[0].lines_read  # the first block is the whole training part
  assert summary["steps"] == train_lines // 256  # global batch 8 x 32
  assert summary["data"]["lines_skipped"] == 2250


# -- everything is opened before the first step (issue 13, item 3) ---------------------------------
def test_file_source_fails_in_seconds_on_any_bad_input(tmp_path):
  good = tmp_path / "good.txt"
  good.write_text("".join(good_lines(50)))
  with pytest.raises(FileNotFoundError, match=r"not found: .*nope\.txt"):
    ctr.file_source(str(good), test_path=str(tmp_path / "nope.txt"))
  bad_first = _file_with(tmp_path, "1\t2\n", at=0, name="bad_first.txt")
  with pytest.raises(ctr.CTRDataError, match=r"bad_first\.txt:1: expected 40 fields"):
    ctr.file_source(str(good), test_path=str(bad_first))
  truncated = _truncated_gzip(tmp_path, lines=200)
  with pytest.raises(ctr.CTRDataError, match=r"day\.gz: the gzip data ends"):
    ctr.file_source(str(good), test_path=str(truncated))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(ctr.CTRDataError, match=r"empty\.txt: no data lines in the first block"):
    ctr.file_source(str(good), test_path=str(empty))
  csv_as_criteo = tmp_path / "a.csv"
  _csv(csv_as_criteo, ["click", "a"], [[1, 2]] * 5)
  with pytest.raises(ctr.CTRDataError, match=r"none of the first 6 lines .* format='criteo'"):
    ctr.file_source(str(good), test_path=str(csv_as_criteo), skip_bad_lines=True)
  no_header = tmp_path / "no_header.csv"
  no_header.write_text("")
  with pytest.raises(ctr.CTRDataError, match=r"no_header\.csv:1: csv format needs a header"):
    ctr.file_source(str(no_header), format="csv")
  one_line = tmp_path / "one.txt"
  one_line.write_text(good_lines(1)[0])
  with pytest.raises(ctr.CTRDataError, match=r"one\.txt: no data lines in the part 0\.9-1"):
    ctr.file_source(str(one_line))


# -- the columnar reader against the line parser --------------------------------------------------
DENSE_TOKENS = [
  *["", "0", "1", "-1", "7", "123456", "00012", "-0", " 2", "3 "] * 6,
  *["+1", "1.5", "1e3", "1E3", ".5", "5.", "1e-400", "9007199254740993", "\x0b4"],
  *["inf", "-inf", "nan", "NaN", "Infinity", "1_0", "0x10", "1e300", "9" * 30, "1d", "é"],
]
LABEL_TOKENS = [*["0", "1"] * 20, "1.0", "-0", " 1", "2", "x", "", "0x1", "nan", "1e0"]
HEX_TOKENS = [
  *["", "0a", "0000000a", "1a2b3c4d", "ffffffff", "0000000A", "89abcdef"] * 10,
  *["abc", "1", "ffffffffffffffff", "0123456789abcdef0", " 1a", "1a ", "-1a", "+1a", "0x1a"],
  *["1_a", "zz", "é", "1a2b3c4g", "1a2b3c4:"],
]


def _fuzz_lines(rng, n):
  lines = []
  for _ in range(n):
    kind = rng.random()
    if kind < 0.03:
      lines.append(rng.choice(["", "  ", "\r", "1\t2", "\t" * 39]))
      continue
    fields = [rng.choice(LABEL_TOKENS if rng.random() < 0.3 else ["0", "1"])]
    fields += [
      rng.choice(DENSE_TOKENS if rng.random() < 0.1 else ["1", "", "42"]) for _ in range(13)
    ]
    fields += [
      rng.choice(HEX_TOKENS if rng.random() < 0.02 else ["0a0b0c0d", ""]) for _ in range(26)
    ]
    lines.append("\t".join(fields) + rng.choice(["\n"] * 8 + ["\r\n", "\r\r\n"]))
  return lines


@pytest.mark.parametrize("seed", range(3))
def test_columnar_reader_equals_line_reader_on_tricky_criteo_lines(tmp_path, seed):
  rng = random.Random(seed)
  lines = _fuzz_lines(rng, 3000)
  clean = good_lines(3000, seed=seed)  # mostly clean blocks take the columnar path
  path = tmp_path / "fuzz.txt"
  path.write_text("".join(clean[:1500] + lines + clean[1500:]), newline="")
  reader, _, error = read_both(path, skip_bad_lines=True, block_bytes=1 << 15)
  assert error is None and 3000 < reader.stats.lines_read < 6000
  assert reader.stats.lines_skipped > 100
  _, _, error = read_both(path, block_bytes=1 << 15)
  assert error is not None


def _csv_fuzz_value(rng):
  return rng.choice(["a", "b", "", " a", "a ", "x y", '"q"', '"c,d"', '"e""f"', "é", "\t", "ß"])


@pytest.mark.parametrize("seed", range(2))
def test_columnar_reader_equals_line_reader_on_tricky_csv_lines(tmp_path, seed):
  rng = random.Random(seed)
  rows = ["id,click,n,a,b"]
  for i in range(3000):
    if rng.random() < 0.95:
      rows.append(f"{i},{i % 2},{i % 7},v{i % 13},w{i % 5}")
    else:
      label = rng.choice(["0", "1", "2", ""])
      dense = rng.choice(["1", "", "inf", "1e3", " 5", "x"])
      rows.append(f"{i},{label},{dense},{_csv_fuzz_value(rng)},{_csv_fuzz_value(rng)}")
  rows.insert(1500, '7,1,"2,3",a')
  path = tmp_path / "fuzz.csv"
  path.write_bytes(("\n".join(rows) + "\n").encode())
  kwargs = dict(format="csv", dense_columns=["n"], block_bytes=1 << 13)
  reader, _, error = read_both(path, skip_bad_lines=True, **kwargs)
  assert error is None and 2800 < reader.stats.lines_read < 3000
  read_both(path, **kwargs)


def test_clean_blocks_take_the_columnar_path(tmp_path, monkeypatch):
  path = tmp_path / "day.txt"
  path.write_text("".join(good_lines(500)))
  csv_path = tmp_path / "a.csv"
  _csv(csv_path, ["click", "a", "b"], [[i % 2, f" x{i % 3}", i] for i in range(500)])
  monkeypatch.setattr(
    _line_parser.LineParser, "parse", lambda *a: pytest.fail("the line parser was used")
  )
  assert ctr.concat_batches(list(ctr.CTRFileReader(str(path)).batches(64))).size == 500
  reader = ctr.CTRFileReader(str(csv_path), format="csv")
  assert ctr.concat_batches(list(reader.batches(64))).size == 500


def test_columnar_and_line_parsers_read_decimals_to_the_same_bits(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  mantissas = rng.integers(0, 10**12, 4000)
  exponents = rng.integers(-20, 4, 4000)  # within 2**53
  texts = [
    f"{m}e{e}" if i % 3 else f"{m / 10**6:.9f}"
    for i, (m, e) in enumerate(zip(mantissas, exponents))
  ]
  lines = [
    criteo_line(i % 2, texts[13 * (i % 300) : 13 * (i % 300) + 13], ["0a0b0c0d"] * 26)
    for i in range(300)
  ]
  path = tmp_path / "decimals.txt"
  path.write_text("".join(lines))
  reader, _, error = read_both(path, batch_size=64)
  assert error is None and reader.stats.lines_read == 300
  monkeypatch.setattr(_line_parser.LineParser, "parse", lambda *a: pytest.fail("not columnar"))
  assert sum(b.size for b in ctr.CTRFileReader(str(path)).batches(64)) == 300
