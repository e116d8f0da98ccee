"""The FLOP count the CTR throughput benchmark rates its step by agrees with XLA's."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments.benchmarks.ctr_throughput import dlrm_train_flops
from kstep_adam import ctr


@pytest.mark.parametrize(
  "shape",
  [
    dict(num_dense=13, num_categorical=26, embed_dim=16),
    dict(num_dense=4, num_categorical=7, embed_dim=8),  # 8 vectors: no padding
  ],
)
def test_dlrm_train_flops_is_three_forward_passes_as_xla_counts_them(shape, monkeypatch):
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "0")  # XLA counts its own dots, not a kernel's
  model = ctr.make_model("dlrm", **shape)
  graphdef, params = nnx.split(model)
  batch = 64
  emb = jnp.zeros((batch, shape["num_categorical"], shape["embed_dim"]))
  dense = jnp.zeros((batch, shape["num_dense"]))
  forward = jax.jit(lambda p, e, d: nnx.merge(graphdef, p)(e, d).sum())
  xla_flops = forward.lower(params, emb, dense).compile().cost_analysis()["flops"] / batch
  # XLA also counts the elementwise work (activations, bias adds) and the interaction's
  # padding (27 vectors padded to 28: 1.3% of the forward pass), which this count leaves out.
  assert dlrm_train_flops(model) == pytest.approx(3 * xla_flops, rel=0.03)
  assert dlrm_train_flops(model) < 3 * xla_flops
  if shape["num_categorical"] == 26:
    assert dlrm_train_flops(model) == 412_512  # the figure the README's FLOP rate uses


# The pipelined and the synchronous step give the same bits, so the same evaluation; the
# interaction's kernel and XLA's form round differently (the host's Adam kernel does not), so
# close models.
@pytest.mark.slow  # two runs at batch 4096 each: about half a minute
@pytest.mark.parametrize(
  ("what", "variants", "auc_tolerance"),
  [("pipeline", ["pipelined", "synchronous"], 0), ("native", ["kernels", "xla+numpy"], 1e-3)],
)
def test_a_comparison_runs_both_variants_to_the_same_or_a_close_model(
  what, variants, auc_tolerance
):
  from experiments.benchmarks import ctr_throughput

  args = ctr_throughput.parse_args([f"--{what}-compare", "--peer-rounds", "1", "--peer-steps", "4"])
  result = ctr_throughput.run_comparison(args, what)
  (runs,) = result["rounds"]
  assert list(runs) == variants == result["variants"]
  first, second = (runs[variant]["test_auc"] for variant in variants)
  assert first == pytest.approx(second, abs=auc_tolerance)
  assert result["ratio_median"] > 0 and result["cases"][variants[0]]["share_of_matmul_rate"] > 0
