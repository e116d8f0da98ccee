"""Reading resumes where it stopped: a pass started at any position a reader yielded gives
exactly the batches the whole pass gave after it (plain and gzip, a later part of the file,
blocks smaller and larger than a batch, bad lines skipped), and counts continue once."""

import gzip
import itertools

import numpy as np
import pytest
from _ctr_files import assert_same_batches
from _ctr_files import criteo_line
from _ctr_files import good_lines

from kstep_adam import ctr
from kstep_adam.ctr.data._schema import ReadPosition


def _file(tmp_path, *, compress, lines=600, bad_every=0):
  text = good_lines(lines, seed=3)
  for i in range(0, lines, bad_every or lines + 1):
    text[i] = criteo_line(1, ["x"] * 13, ["0a"] * 26)
  path = tmp_path / ("d.gz" if compress else "d.txt")
  data = "".join(text).encode()
  path.write_bytes(gzip.compress(data) if compress else data)
  return path


@pytest.mark.parametrize(
  "compress, span, block_bytes, batch_size",
  [
    (False, (0.0, 1.0), 4096, 16),  # several batches per block
    (False, (0.3, 0.9), 1024, 64),  # a later part; a batch spans several blocks
    (True, (0.0, 0.9), 2048, 24),
    (True, (0.5, 1.0), 1500, 7),  # a gzip part reached by decompressing the bytes before
  ],
)
def test_a_pass_resumed_at_any_position_continues_exactly(
  tmp_path, compress, span, block_bytes, batch_size
):
  path = _file(tmp_path, compress=compress, bad_every=37)
  make = lambda: ctr.CTRFileReader(
    str(path), span=span, block_bytes=block_bytes, skip_bad_lines=True
  )
  whole = list(make().positioned_batches(batch_size))
  assert len(whole) > 5
  batches = [b for b, _ in whole]
  for i, (_, position) in enumerate(whole):
    assert isinstance(position, ReadPosition)
    rest = list(make().batches(batch_size, start=ReadPosition(*list(position))))
    assert_same_batches(rest, batches[i + 1 :])
  assert whole[-1][1].skip == 0  # the last position is the part's end: nothing is left


def test_counts_continue_across_a_resume_without_counting_a_line_twice(tmp_path):
  path = _file(tmp_path, compress=False, bad_every=25)
  make = lambda: ctr.CTRFileReader(str(path), block_bytes=2048, skip_bad_lines=True)
  whole = make()
  list(whole.batches(32))
  first = make()
  stream = first.positioned_batches(32)
  _, position = list(itertools.islice(stream, 7))[-1]
  counts = first.count_state()  # may cover blocks past the position (read ahead)
  stream.close()
  second = make()
  second.restore_counts(counts)
  list(second.batches(32, start=position))
  assert second.stats.lines_read == whole.stats.lines_read
  assert second.stats.lines_skipped == whole.stats.lines_skipped == 24
  assert second.stats.messages == whole.stats.messages
  np.testing.assert_equal(
    second.count_state()["next_uncounted"], whole.count_state()["next_uncounted"]
  )
