"""The CTR train step with the device-resident sparse optimizer.

With ``device_cache_rows > 0`` the step updates the embedding rows on the device; the run
must end with the same bits as the host optimizer's run (dense replicas and rows), and its
embedding traffic must fall at a high hit rate.
"""

import dataclasses

import jax
import numpy as np
import pytest

from kstep_adam import ctr


def _run(config, batches, test):
  source = ctr.batches_source("fixed", batches, test)
  return ctr.train(config, source, return_state=True)


def _data(num_steps, global_batch, vocab_size):
  data = ctr.SyntheticCTR(num_workers=1, vocab_size=vocab_size, seed=1)
  batches = [data.batch(s, 0, global_batch)[0] for s in range(num_steps)]
  return batches, [b for b, _ in data.test_batches(256)][:1]


@pytest.mark.parametrize("mode, nodes, devices_per_node", [("exact", 1, 1), ("lazy", 2, 2)])
def test_the_device_resident_optimizer_gives_the_host_runs_bits(mode, nodes, devices_per_node):
  batches, test = _data(8, 256, vocab_size=300)
  config = ctr.TrainConfig(
    batch_size=256 // (nodes * devices_per_node),
    optimizer="kstep_adam",
    k=2,
    nodes=nodes,
    devices_per_node=devices_per_node,
    steps=len(batches),
    eval_every=4,
    table_rows=1 << 12,
    host_cache_rows=1 << 12,
    sparse_mode=mode,
    prefetch=False,
  )
  host, host_state = _run(config, batches, test)
  device, device_state = _run(dataclasses.replace(config, device_cache_rows=4096), batches, test)
  assert device["table_stats"]["device_hits"] > 0
  np.testing.assert_array_equal(device_state["row_ids"], host_state["row_ids"])
  for got, want in zip(
    jax.tree.leaves((device_state["rows"], device_state["params_W"])),
    jax.tree.leaves((host_state["rows"], host_state["params_W"])),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))
  assert device["test_logloss"] == host["test_logloss"]


def test_the_device_tier_cuts_embedding_traffic_at_a_high_hit_rate():
  batches, test = _data(30, 1024, vocab_size=200)
  config = ctr.TrainConfig(
    batch_size=1024,
    optimizer="sync_adam",
    nodes=1,
    devices_per_node=1,
    steps=len(batches),
    eval_every=0,
    table_rows=1 << 14,
    host_cache_rows=1 << 14,
  )
  host = _run(config, batches, test)[0]
  device = _run(dataclasses.replace(config, device_cache_rows=1 << 13), batches, test)[0]
  assert device["table_stats"]["device_hit_rate"] >= 0.9
  host_bytes = host["host_device_bytes_per_step"]
  device_bytes = device["host_device_bytes_per_step"]
  assert device_bytes["embedding"] * 5 <= host_bytes["embedding"]
  assert device_bytes["batch"] == host_bytes["batch"]  # the data crosses either way


def test_a_skipped_nonfinite_step_leaves_the_device_rows_as_the_host_path_does():
  batches, test = _data(6, 128, vocab_size=300)
  poisoned = batches[2].dense_BxI.copy()
  poisoned[0, 0] = np.nan
  batches[2] = batches[2]._replace(dense_BxI=poisoned)
  config = ctr.TrainConfig(
    batch_size=128,
    optimizer="sync_adam",
    nodes=1,
    devices_per_node=1,
    steps=len(batches),
    eval_every=0,
    table_rows=1 << 12,
    host_cache_rows=1 << 12,
    sparse_mode="exact",
    on_nonfinite="skip",
    prefetch=False,
  )
  host, host_state = _run(config, batches, test)
  device, device_state = _run(dataclasses.replace(config, device_cache_rows=2048), batches, test)
  assert host["skipped_steps"] == device["skipped_steps"] == [3]
  assert host["table_stats"]["step"] == device["table_stats"]["step"] == 5  # 3 not pushed
  np.testing.assert_array_equal(
    device_state["rows"].view(np.uint32), host_state["rows"].view(np.uint32)
  )
