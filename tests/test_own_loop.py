"""The own-loop example (examples/own_loop.py) runs, and says what its docs page says it does."""

import importlib.util
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


@pytest.fixture(scope="module")
def results():
  spec = importlib.util.spec_from_file_location("own_loop_example", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # its jax_num_cpu_devices=8 equals the suite's own setting
  return module.main(k=8)


def test_sync_adam_equals_optax_adam_on_averaged_gradients(results):
  # Same maths, different summation order (pmean of shard gradients vs one global mean).
  assert results["sync_adam_vs_optax_adam"] < 1e-5


@pytest.mark.parametrize("k", [1, 8])
def test_kstep_replicas_are_equal_after_every_merge(results, k):
  spreads = results[f"k{k}_spread_after_merges"]
  assert len(spreads) == 48 // k  # one entry per merge step of the 48
  # A merge returns mean - params; params + (mean - params) is the mean up to one rounding.
  assert max(spreads) < 1e-6


def test_k1_is_not_ddp_adam(results):
  # Local Adam on each worker's gradient, then averaged params: not Adam on averaged gradients.
  assert results["k1_vs_sync_adam"] > 1e-3
  assert results["k8_loss"] < 0.1 and results["sync_adam_loss"] < 0.1  # both learn
