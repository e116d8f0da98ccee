"""Shared fixtures of the CTR tests: a tiny run's config and its synthetic data.

A test that needs a variant replaces fields (``dataclasses.replace(tiny_config, steps=8)``);
a test about one field's value or validation writes its own ``ctr.TrainConfig(...)``.
"""

import pytest

from kstep_adam import ctr

# A tiny vocabulary keeps every step's unique rows inside one shape bucket: one program to
# compile per step kind.
TINY_DATA = ctr.DataConfig(vocab_size=20, test_examples=512)


@pytest.fixture(scope="session")
def tiny_config() -> ctr.TrainConfig:
  """Six steps of 16 examples per worker on the default mesh, merges every 4 (one at step 4),
  a 2^14-row table with a 2^12-row host cache, a metrics record every 2 steps and one
  evaluation at the end. Frozen, so one for the session."""
  return ctr.TrainConfig(
    batch_size=16,
    steps=6,
    k=4,
    table_rows=1 << 14,
    host_cache_rows=1 << 12,
    log_every=2,
    eval_every=0,
  )


@pytest.fixture(scope="session")
def tiny_source():
  """``tiny_source(config)``: a fresh synthetic source of :data:`TINY_DATA` shaped for
  ``config`` (its workers and batch size), 512 test examples."""

  def make(config: ctr.TrainConfig) -> ctr.DataSource:
    return ctr.make_source(TINY_DATA, config)

  return make
