"""CTR data files for the reader tests, and the check that both reader engines agree."""

import numpy as np

from kstep_adam import ctr


def criteo_line(label, dense, cats):
  return "\t".join([str(label), *dense, *cats]) + "\n"


def good_lines(n, seed=0):
  rng = np.random.default_rng(seed)
  lines = []
  for i in range(n):
    dense = [str(int(x)) for x in rng.integers(-1, 50, 13)]
    cats = [f"{int(x):08x}" for x in rng.integers(0, 2**32, 26)]
    if i % 3 == 0:  # empty fields are allowed in Criteo
      dense[2], cats[5] = "", ""
    lines.append(criteo_line(i % 2, dense, cats))
  return lines


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for u, v in zip(x, y):
      assert u.dtype == v.dtype and u.shape == v.shape
      np.testing.assert_array_equal(u, v)


def read_both(path, *, batch_size=4, **kwargs):
  """Read ``path`` with the columnar and the line engine; assert the same batches, the same
  counts and the same error; return the columnar reader, its batches and the error text."""
  results = []
  for engine in ("columnar", "lines"):
    reader = ctr.CTRFileReader(str(path), engine=engine, **kwargs)
    try:
      results.append((reader, list(reader.batches(batch_size)), None))
    except ctr.CTRDataError as error:
      results.append((reader, None, str(error)))
  (reader, batches, error), (line_reader, line_batches, line_error) = results
  assert error == line_error
  if batches is not None:
    assert_same_batches(batches, line_batches)
  assert reader.stats == line_reader.stats
  return reader, batches, error
