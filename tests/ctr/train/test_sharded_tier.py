"""A table split by ``row % P`` behaves as the whole table; the pieces the multi-process CTR
run builds on it (shard directories, exchange sizes and bytes, per-process data)."""

import numpy as np
import pytest

from kstep_adam import ctr
from kstep_adam import embedding
from kstep_adam.ctr.data._sources import process_part
from kstep_adam.ctr.train import _exchange

DIM = 4
ROWS = 101  # not a multiple of the shard count: the shards differ in size


def _adam(mode):
  return embedding.SparseAdam(learning_rate=0.05, eps=1e-6, mode=mode)


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_shards_together_are_the_whole_table(tmp_path, mode):
  count = 3
  whole = embedding.open_table(tmp_path / "whole", num_rows=ROWS, dim=DIM, optimizer=_adam(mode))
  shards = [
    embedding.open_table(
      tmp_path / f"shard-{index}",
      num_rows=_exchange.shard_rows(ROWS, index, count),
      dim=DIM,
      optimizer=_adam(mode),
      shard_index=index,
      num_shards=count,
      host_cache_rows=8,  # evictions and disk reads in the shards, none in the whole
    )
    for index in range(count)
  ]
  rng = np.random.default_rng(0)
  everything = np.arange(ROWS)

  def pull_sharded(ids):
    out = np.empty((len(ids), DIM), np.float32)
    for index, shard in enumerate(shards):
      mine = ids % count == index
      out[mine] = shard.pull(ids[mine] // count)
    return out

  np.testing.assert_array_equal(pull_sharded(everything), whole.pull(everything))
  for _ in range(6):
    ids = rng.integers(0, ROWS, 40)  # repeats are summed, in the shards as in the whole
    grads = rng.standard_normal((40, DIM)).astype(np.float32)
    whole.push(ids, grads)
    for index, shard in enumerate(shards):  # every shard steps, also with nothing to push
      mine = ids % count == index
      shard.push(ids[mine] // count, grads[mine])
  np.testing.assert_array_equal(pull_sharded(everything), whole.pull(everything))
  assert [s.step for s in shards] == [whole.step] * count
  for table in (whole, *shards):
    table.close()
  # Reopened, a shard knows which one it is and refuses to be another.
  with embedding.open_table(tmp_path / "shard-1") as shard:
    assert (shard.config.shard_index, shard.config.num_shards) == (1, count)
  with pytest.raises(ValueError, match="shard_index=0 conflicts with the table"):
    embedding.open_table(tmp_path / "shard-1", shard_index=0)


def test_shard_fields_are_validated():
  optimizer = embedding.SparseAdam().config()
  with pytest.raises(ValueError, match=r"shard_index must be an int in \[0, 1\], got 2"):
    embedding.TableConfig(num_rows=4, dim=2, optimizer=optimizer, shard_index=2, num_shards=2)
  with pytest.raises(ValueError, match="num_shards must be an int"):
    embedding.TableConfig(num_rows=4, dim=2, optimizer=optimizer, num_shards=0)
  config = embedding.TableConfig(
    num_rows=4, dim=2, optimizer=optimizer, shard_index=1, num_shards=2
  )
  assert embedding.TableConfig.from_json(config.to_json()) == config


def test_exchange_sizes_and_bytes():
  assert [_exchange.shard_rows(7, p, 2) for p in (0, 1)] == [4, 3]
  # S: a power of two that only grows, at least 1024 / P, a multiple of the local devices.
  assert _exchange.exchange_slots(1, 2, 2) == 512
  assert _exchange.exchange_slots(600, 2, 2) == 1024
  assert _exchange.exchange_slots(600, 2, 2, previous=2048) == 2048
  assert _exchange.exchange_slots(0, 4, 3) == 258
  cost = _exchange.exchange_cost(2, 2, 512, 8)
  # Per device: 256 slots of each buffer, half of them (the peer's) cross 'node': ids, rows
  # and gradients, plus the counts' all-reduce; 'local' gathers and scatters 2 * 512 rows.
  assert cost.bytes_by_axis == {"node": 16 + 256 * (8 + 2 * 4 * 8), "local": 2 * 512 * 8 * 4}
  assert _exchange.exchange_cost(2, 1, 512, 8).bytes_by_axis["local"] == 0


def test_a_table_dir_of_another_layout_is_refused(tmp_path):
  _exchange.check_table_dir(str(tmp_path / "new"), 2)  # nothing there yet: fine
  (tmp_path / "mixed" / "shard-0-of-3").mkdir(parents=True)
  with pytest.raises(ValueError, match="holds the shards of a 3-process run"):
    _exchange.check_table_dir(str(tmp_path / "mixed"), 2)
  with embedding.open_table(tmp_path / "one", num_rows=10, dim=2):
    pass
  with pytest.raises(ValueError, match="holds a one-process table"):
    _exchange.check_table_dir(str(tmp_path / "one"), 2)


def test_each_process_reads_its_workers_share():
  config = ctr.TrainConfig(nodes=2, devices_per_node=2, batch_size=8)
  data = ctr.DataConfig(test_examples=100)
  whole = ctr.make_source(data, config)
  batch = next(whole.train_epoch(0, config.global_batch))
  tests = list(whole.test_batches())
  for index in (0, 1):
    made = ctr.make_source(data, config, part=(index, 2))  # only its workers' streams
    cut = process_part(whole, index, 2)  # whole batches, cut
    assert made.part == cut.part == (index, 2)
    rows = slice(16 * index, 16 * (index + 1))
    for source in (made, cut):
      got = next(source.train_epoch(0, config.global_batch))
      for x, y in zip(got, batch):
        np.testing.assert_array_equal(x, y[rows])
      got_tests = list(source.test_batches())
      assert sum(b.size for b in got_tests) == 50
      np.testing.assert_array_equal(
        got_tests[0].label_B, tests[0].label_B[50 * index : 50 * (index + 1)]
      )
    assert process_part(made, index, 2) is made
  with pytest.raises(ValueError, match="yields part 1 of 2, but this is process 0 of 2"):
    process_part(made, 0, 2)
  with pytest.raises(ValueError, match="count dividing the 4 workers"):
    ctr.make_source(data, config, part=(0, 3))


def test_a_checkpoint_names_every_shard_and_is_resumed_by_as_many_processes(tmp_path):
  from kstep_adam import _distributed
  from kstep_adam.ctr.run import _checkpoint
  from kstep_adam.ctr.run import _processes
  from kstep_adam.ctr.run._rundir import RunDirectoryError

  versions = (embedding.TableVersion(4, "db", 5), embedding.TableVersion(4, "db", 6))
  path = tmp_path / _checkpoint.step_dir("", 4)
  path.mkdir()
  _checkpoint.write_manifest(str(path), 4, versions)
  (found,) = _checkpoint.complete_checkpoints(str(tmp_path))
  assert found.table == versions  # a tuple, in process order
  two, three = _distributed.Processes(1, 2), _distributed.Processes(1, 3)
  assert _processes.shard_version(versions, two) == versions[1]
  assert _processes.checkpoint_json(found, two)[2] == [v._asdict() for v in versions]
  with pytest.raises(RunDirectoryError, match="saved by a 2-process run"):
    _processes.checkpoint_json(found, three)
  with pytest.raises(RunDirectoryError, match="resume it with 2, not 3"):
    _processes.shard_version(versions, three)
  one = found._replace(table=versions[0])
  with pytest.raises(RunDirectoryError, match="saved by a 1-process run"):
    _processes.checkpoint_json(one, two)


def test_both_tiers_are_table_tiers_and_their_counters_are_the_tables(tmp_path):
  from kstep_adam.ctr.train._local_tier import SparseTier
  from kstep_adam.ctr.train._sharded_tier import ShardedSparseTier
  from kstep_adam.ctr.train._tier import TableTier
  from kstep_adam.ctr.train._tier import Tier

  interface = [name for name, value in vars(Tier).items() if callable(value) and name[0] != "_"]
  assert {"eval_rows", "run_stats", "stats", "hit_rate", "flush", "close"} <= set(interface)
  for cls in (SparseTier, ShardedSparseTier):
    assert issubclass(cls, TableTier)
    assert all(callable(getattr(cls, name, None)) for name in interface), cls
  config = ctr.TrainConfig(embed_dim=DIM, table_rows=1 << 10, host_cache_rows=1 << 8)
  tier = SparseTier(config, str(tmp_path / "table"), temporary=True)
  try:
    row_ids_U, inverse_GxF = tier.index(np.arange(2 * 26, dtype=np.int64).reshape(2, 26))
    rows_RxD, inverse = tier.eval_rows(row_ids_U, inverse_GxF)
    assert rows_RxD.shape[1] == DIM and rows_RxD.shape[0] >= len(row_ids_U)
    np.testing.assert_array_equal(inverse, inverse_GxF)
    assert tier.stats() == tier.table.stats() == tier.run_stats()
    assert tier.hit_rate() == tier.table.stats()["hit_rate"]
    assert tier.flush() == tier.table.committed
  finally:
    tier.close()
