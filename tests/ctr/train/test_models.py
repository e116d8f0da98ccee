"""The CTR models: DLRM's interaction gradient, and every model takes embeddings and passes
gradients back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kstep_adam import ctr
from kstep_adam.ctr.train._models import pairwise_dots


def _reference_dots(v_BxNxD):
  i, j = np.triu_indices(v_BxNxD.shape[1], k=1)
  return jnp.einsum("bnd,bmd->bnm", v_BxNxD, v_BxNxD)[:, i, j]


# 27, 5 and 2 vectors are padded to a multiple of 4; 8 is not; 1 has no pairs.
@pytest.mark.parametrize("shape", [(4096, 27, 16), (3, 5, 2), (7, 2, 3), (2, 8, 3), (2, 1, 3)])
def test_pairwise_dots_and_their_gradient_match_the_gathered_gram_matrix(shape):
  # Full size too: XLA:CPU has miscompiled other formulations at this shape.
  rng = np.random.default_rng(0)
  v = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  weights = jnp.asarray(rng.standard_normal(shape[1] * (shape[1] - 1) // 2).astype(np.float32))
  # The weights are an argument, not a constant XLA would fold the reference's scatter into.
  ours = jax.jit(jax.value_and_grad(lambda v, w: jnp.sum(pairwise_dots(v) * w)))
  reference = jax.jit(jax.value_and_grad(lambda v, w: jnp.sum(_reference_dots(v) * w)))
  (value, grad), (ref_value, ref_grad) = ours(v, weights), reference(v, weights)
  np.testing.assert_allclose(pairwise_dots(v), _reference_dots(v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ctr.MODELS)
@pytest.mark.parametrize("num_dense", [13, 0])
def test_models_take_embeddings_and_pass_gradients_back(name, num_dense):
  model = ctr.make_model(name, num_dense=num_dense, num_categorical=5, embed_dim=4)
  graphdef, params = nnx.split(model)
  emb = jax.random.normal(jax.random.key(0), (3, 5, 4)) * 0.1
  dense = jnp.ones((3, num_dense))
  logit_fn = lambda p, e: nnx.merge(graphdef, p)(e, dense).sum()
  assert jax.jit(lambda p, e: nnx.merge(graphdef, p)(e, dense))(params, emb).shape == (3,)
  g_params, g_emb = jax.jit(jax.grad(logit_fn, argnums=(0, 1)))(params, emb)
  assert g_emb.shape == emb.shape and float(jnp.abs(g_emb).min()) > 0  # every field matters
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g_params))
  with pytest.raises(ValueError, match="model must be one of"):
    ctr.make_model("fm", num_dense=1, num_categorical=2, embed_dim=2)
