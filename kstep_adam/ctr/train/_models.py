"""CTR models in flax nnx: DLRM and DCN-v2 over embeddings handed in from the sparse tier.

The models own only the *dense* parameters. Embedding rows live in the embedding tier; the
trainer gathers the working set into ``emb_BxFxD`` and passes it in, so the gradient with
respect to the embeddings falls out of ``jax.grad`` with respect to that input.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from kstep_adam.ctr.train._interaction import dlrm_interaction
from kstep_adam.ctr.train._interaction import pairwise_dots

MODELS = ("dlrm", "dcn_v2")


class MLP(nnx.Module):
  """A stack of Linear layers with ReLU between them (none after the last)."""

  def __init__(self, sizes: list[int], *, rngs: nnx.Rngs, final_activation: bool = False):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
    self.final_activation = final_activation

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i + 1 < len(self.layers) or self.final_activation:
        x = jax.nn.relu(x)
    return x


class DLRM(nnx.Module):
  """DLRM: a bottom MLP on dense features, pairwise dot interactions, a top MLP.

  .. math::
    h = \\mathrm{MLP}_b(x), \\quad z = [h; (\\langle e_i, e_j \\rangle)_{i<j}], \\quad
    \\mathrm{logit} = \\mathrm{MLP}_t(z), \\qquad e_0 = h,\\ e_{1..F} = \\text{field embeddings}.

  Args:
    num_dense: number of dense features.
    num_categorical: number of categorical fields ``F``.
    embed_dim: embedding width ``D`` (the bottom MLP ends at ``D`` too).
    bottom: hidden sizes of the bottom MLP.
    top: hidden sizes of the top MLP (a final size-1 layer is added).
    rngs: flax random streams.

  References:
    Naumov et al., "Deep Learning Recommendation Model for Personalization and
    Recommendation Systems", https://arxiv.org/abs/1906.00091
  """

  def __init__(
    self,
    num_dense: int,
    num_categorical: int,
    embed_dim: int,
    *,
    bottom: tuple[int, ...] = (64,),
    top: tuple[int, ...] = (128, 64),
    rngs: nnx.Rngs,
  ):
    # Without dense features (a categorical-only CSV) there is no bottom MLP.
    self.bottom = (
      MLP([num_dense, *bottom, embed_dim], rngs=rngs, final_activation=True) if num_dense else None
    )
    # The vectors the interaction pairs: the bottom MLP's output and one per field.
    self.num_vectors = n = num_categorical + int(num_dense > 0)
    self.top = MLP([embed_dim * int(num_dense > 0) + n * (n - 1) // 2, *top, 1], rngs=rngs)

  def __call__(self, emb_BxFxD: jax.Array, dense_BxI: jax.Array) -> jax.Array:
    # The named scopes label the compiled ops (experiments/benchmarks/ctr_step_profile.py).
    if self.bottom is None:
      with jax.named_scope("interaction"):
        z = pairwise_dots(emb_BxFxD)
    else:
      with jax.named_scope("bottom_mlp"):
        h_BxD = self.bottom(dense_BxI)
      with jax.named_scope("interaction"):
        z = dlrm_interaction(h_BxD, emb_BxFxD)
    with jax.named_scope("top_mlp"):
      return self.top(z)[:, 0]


class DCNv2(nnx.Module):
  """DCN-v2 (stacked): full-rank cross layers on the flattened input, then a deep MLP.

  .. math::
    x_{l+1} = x_0 \\odot (W_l x_l + b_l) + x_l, \\qquad
    \\mathrm{logit} = \\mathrm{MLP}(x_L),\\quad x_0 = [\\mathrm{vec}(E); x_{\\mathrm{dense}}].

  Args:
    num_dense: number of dense features.
    num_categorical: number of categorical fields.
    embed_dim: embedding width.
    num_cross: number of cross layers.
    deep: hidden sizes of the MLP after the cross stack (a size-1 layer is added).
    rngs: flax random streams.

  References:
    Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale
    Learning to Rank Systems", https://arxiv.org/abs/2008.13535
  """

  def __init__(
    self,
    num_dense: int,
    num_categorical: int,
    embed_dim: int,
    *,
    num_cross: int = 2,
    deep: tuple[int, ...] = (128, 64),
    rngs: nnx.Rngs,
  ):
    width = num_categorical * embed_dim + num_dense
    self.cross = nnx.List(
      [
        nnx.Linear(
          width,
          width,
          rngs=rngs,
          kernel_init=nnx.initializers.variance_scaling(0.1, "fan_in", "normal"),
        )
        for _ in range(num_cross)
      ]
    )
    self.deep = MLP([width, *deep, 1], rngs=rngs)

  def __call__(self, emb_BxFxD: jax.Array, dense_BxI: jax.Array) -> jax.Array:
    x0 = jnp.concatenate([emb_BxFxD.reshape(emb_BxFxD.shape[0], -1), dense_BxI], axis=1)
    x = x0
    with jax.named_scope("interaction"):  # the cross layers
      for layer in self.cross:
        x = x0 * layer(x) + x
    with jax.named_scope("top_mlp"):  # the deep tower
      return self.deep(x)[:, 0]


def make_model(
  name: str,
  *,
  num_dense: int,
  num_categorical: int,
  embed_dim: int,
  top_mlp: tuple[int, ...] = (128, 64),
  seed: int = 0,
) -> nnx.Module:
  """Build a CTR model by name: ``'dlrm'`` or ``'dcn_v2'``.

  Args:
    name: ``'dlrm'`` or ``'dcn_v2'``.
    num_dense: number of dense features.
    num_categorical: number of categorical fields.
    embed_dim: embedding width.
    top_mlp: hidden sizes of the dense tower, the DLRM's top MLP or DCN-v2's deep MLP (a
      size-1 output layer is added).
    seed: seed of the initialization.

  Examples:
    >>> model = make_model('dlrm', num_dense=13, num_categorical=26, embed_dim=16)
    >>> model(jnp.zeros((2, 26, 16)), jnp.zeros((2, 13))).shape
    (2,)
    >>> big = make_model('dlrm', num_dense=13, num_categorical=26, embed_dim=16,
    ...                  top_mlp=(2048, 1024))
    >>> round(dense_parameter_count(big) / 1e6, 2)
    2.85
  """
  if name not in MODELS:
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")
  if embed_dim < 1 or num_categorical < 1 or num_dense < 0:
    raise ValueError(
      f"need embed_dim >= 1, num_categorical >= 1, num_dense >= 0, got "
      f"{embed_dim!r}, {num_categorical!r}, {num_dense!r}"
    )
  if not top_mlp or not all(isinstance(n, int) and n >= 1 for n in top_mlp):
    raise ValueError(f"top_mlp must be a non-empty tuple of positive ints, got {top_mlp!r}")
  tower = {"top": tuple(top_mlp)} if name == "dlrm" else {"deep": tuple(top_mlp)}
  cls = DLRM if name == "dlrm" else DCNv2
  return cls(num_dense, num_categorical, embed_dim, **tower, rngs=nnx.Rngs(seed))


def dense_parameter_count(model: nnx.Module) -> int:
  """Number of dense parameters of ``model`` (the embedding rows live in the tier)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
