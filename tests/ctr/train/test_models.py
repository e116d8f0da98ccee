"""The CTR models: every model takes embeddings and passes gradients back (DLRM's pair
interaction: test_interaction.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kstep_adam import ctr


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
