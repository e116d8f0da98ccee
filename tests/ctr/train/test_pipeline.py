"""A pipelined run (the next step launched before this step's push, ``pipeline=True``) ends
with the bits of the synchronous one: dense replicas, embedding rows, evaluations."""

import dataclasses

import jax
import numpy as np
import pytest

from kstep_adam import ctr


def _run(config, batches, test):
  source = ctr.batches_source("fixed", batches, test)
  return ctr.train(config, source, return_state=True)


def _data(num_steps, global_batch, vocab_size, poisoned_step=None):
  data = ctr.SyntheticCTR(num_workers=1, vocab_size=vocab_size, seed=2)
  batches = [data.batch(s, 0, global_batch)[0] for s in range(num_steps)]
  if poisoned_step is not None:
    dense = batches[poisoned_step - 1].dense_BxI.copy()
    dense[0, 0] = np.nan
    batches[poisoned_step - 1] = batches[poisoned_step - 1]._replace(dense_BxI=dense)
  return batches, [b for b, _ in data.test_batches(256)][:1]


def _assert_same_bits(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


@pytest.mark.parametrize(
  "case",
  [
    # a host cache smaller than the rows the run touches: rows leave it and come back
    dict(table_rows=1 << 15, host_cache_rows=2048, vocab_size=3000),
    # merges every 2 steps on 2 x 2 workers, evaluations between steps
    dict(nodes=2, devices_per_node=2, optimizer="kstep_adam", k=2, eval_every=3),
    # a non-finite step, skipped: the step after it must not apply its push
    dict(on_nonfinite="skip", poisoned_step=4),
  ],
  ids=["evicting", "kstep_2x2", "skip"],
)
def test_a_pipelined_run_gives_the_synchronous_runs_bits(case):
  case = dict(case)
  batches, test = _data(9, 256, case.pop("vocab_size", 200), case.pop("poisoned_step", None))
  workers = case.get("nodes", 1) * case.get("devices_per_node", 1)
  config = ctr.TrainConfig(
    **{
      "batch_size": 256 // workers,
      "optimizer": "sync_adam",
      "nodes": 1,
      "devices_per_node": 1,
      "steps": len(batches),
      "eval_every": 0,
      "table_rows": 1 << 12,
      "host_cache_rows": 1 << 12,
      "sparse_mode": "lazy",
      **case,
    }
  )
  piped, piped_state = _run(dataclasses.replace(config, pipeline=True), batches, test)
  plain, plain_state = _run(dataclasses.replace(config, pipeline=False), batches, test)
  np.testing.assert_array_equal(piped_state["row_ids"], plain_state["row_ids"])
  _assert_same_bits(
    (piped_state["rows"], piped_state["params_W"]), (plain_state["rows"], plain_state["params_W"])
  )
  assert piped["table_stats"]["step"] == plain["table_stats"]["step"]
  assert piped["skipped_steps"] == plain["skipped_steps"] == ([4] if "on_nonfinite" in case else [])
  assert piped["test_logloss"] == plain["test_logloss"] and piped["evals"] == plain["evals"]
  if "host_cache_rows" in case:
    assert piped["table_stats"]["evictions"] > 0
