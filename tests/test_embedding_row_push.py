"""The table's push through sparse_adam.cc's row push: the NumPy form's bits, all or nothing."""

import numpy as np
import pytest

from kstep_adam import embedding
from kstep_adam.embedding import _optimizers

DIM = 4
ROWS = 300


def _run(tmp_path, switch, mode, monkeypatch):
  """The same pulls and pushes on a fresh table: rows pulled and pushed, pushed without a
  pull (an exact step then catches them up first), repeated ids, more rows than the cache
  holds (two blocks), and evictions. Returns every row's bits and the table's counters."""
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", switch)
  opt = embedding.SparseAdam(learning_rate=0.05, b1=0.9, b2=0.99, eps=1e-6, mode=mode)
  table = embedding.open_table(
    tmp_path / f"{mode} {switch}", num_rows=ROWS, dim=DIM, optimizer=opt, host_cache_rows=64
  )
  rng = np.random.default_rng(7)
  for step in range(12):
    ids = rng.integers(0, 80 if step % 3 else ROWS, 40 if step != 5 else 150)
    if step % 2:
      table.pull(ids)
    table.push(ids, rng.standard_normal((len(ids), DIM)).astype(np.float32))
  used = table._kept_row_push is not None
  rows = table.pull(np.arange(ROWS))
  stats = {k: v for k, v in table.stats().items() if "bytes" not in k}
  table.close(flush=False)
  return rows, stats, used


@pytest.mark.parametrize("mode", _optimizers.ADAM_MODES)
def test_a_push_stores_the_numpy_forms_bits(tmp_path, mode, monkeypatch):
  kernel, kernel_stats, used = _run(tmp_path, "1", mode, monkeypatch)
  numpy_form, numpy_stats, numpy_used = _run(tmp_path, "0", mode, monkeypatch)
  assert used and not numpy_used
  assert kernel.tobytes() == numpy_form.tobytes()
  assert kernel_stats == numpy_stats


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # NumPy's
@pytest.mark.parametrize("switch", ["1", "0"], ids=["kernel", "numpy"])
def test_a_push_that_overflows_stores_nothing_and_names_the_rows(tmp_path, switch, monkeypatch):
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", switch)
  opt = embedding.SparseAdam(learning_rate=2e38, mode="lazy")
  table = embedding.open_table(tmp_path / "t", num_rows=ROWS, dim=DIM, optimizer=opt)
  ids = np.array([3, 9, 17])
  table.push(ids, np.ones((3, DIM), np.float32))  # a first step of -2e38: still finite
  before, step = table.pull(np.arange(ROWS)), table.step
  grads = -np.ones((3, DIM), np.float32)
  grads[1] = 1.0  # row 9 takes another step of about -2e38: past float32's largest value
  with pytest.raises(embedding.NonFiniteRowsError) as error:
    table.push(ids, grads)
  np.testing.assert_array_equal(error.value.row_ids, [9])
  assert table.pull(np.arange(ROWS)).tobytes() == before.tobytes() and table.step == step
  table.push(ids, np.zeros((3, DIM), np.float32))  # the table goes on
  assert table.step == step + 1
  table.close(flush=False)


def test_the_row_push_applies_only_to_its_layout(monkeypatch):
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "1")
  rows, dirty = np.zeros((8, 1 + 3 * DIM), np.float32), np.zeros(8, bool)
  adam = embedding.SparseAdam()
  assert _optimizers.row_push(adam, rows, dirty) is not None
  assert _optimizers.row_push(embedding.RowwiseAdagrad(), rows, dirty) is None
  assert _optimizers.row_push(adam, rows[:, :-1], dirty) is None  # not 1 + 3 D wide
  assert _optimizers.row_push(adam, rows.astype(np.float64), dirty) is None
  assert _optimizers.row_push(adam, rows, dirty[:4]) is None
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "0")
  assert _optimizers.row_push(adam, rows, dirty) is None
