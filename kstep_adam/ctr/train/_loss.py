"""The CTR loss and what both step builders share: the per-worker loss and gradient, the
non-finite checks, the CPU chunking, prediction and the replica mean.

:func:`worker_value_and_grad` is the one per-worker loss/gradient of the one-process step
(:mod:`._step`) and the sharded one (:mod:`._sharded_step`), so both compute the same bits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kstep_adam._dispatch import counter_positions


def bce_loss(logit_B: jax.Array, label_B: jax.Array) -> jax.Array:
  """Mean binary cross-entropy with logits (the CTR training loss)."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logit_B, label_B))


def logits(
  graphdef: nnx.GraphDef, params, rows_PxD: jax.Array, inverse_BxF: jax.Array, dense_BxI: jax.Array
) -> jax.Array:
  """The model on a batch's rows: every key's embedding gathered from the unique rows.

  Internal helper, shared by training (:func:`worker_value_and_grad`) and evaluation
  (:func:`make_predict`).
  """
  with jax.named_scope("embedding_gather"):  # and, differentiated, the rows' scatter-add
    emb_BxFxD = jnp.take(rows_PxD, inverse_BxF, axis=0)
  return nnx.merge(graphdef, params)(emb_BxFxD, dense_BxI)


def all_finite(*trees) -> jax.Array:
  """Whether every element of every leaf is finite (a boolean scalar)."""
  leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def keep_unless(ok: jax.Array, new, old, *, keep_counters: bool = False):
  """``new`` where ``ok``, else ``old``, leaf by leaf; with ``keep_counters`` the state's
  integer ``count`` fields take ``new`` either way (a skipped step is still a step)."""
  counters = set(counter_positions(new)) if keep_counters else set()
  leaves_new, treedef = jax.tree.flatten(new)
  leaves_old = jax.tree.leaves(old)
  picked = [
    n if i in counters else jnp.where(ok, n, o)
    for i, (n, o) in enumerate(zip(leaves_new, leaves_old))
  ]
  return jax.tree.unflatten(treedef, picked)


# On a CPU a worker's forward and backward pass runs over chunks of at least this many
# examples, one after another: the activations of a chunk (the [B, F+1, F+1] Gram matrices,
# the [B, 367] interaction features) stay in the caches, where a whole large batch does not.
# An accelerator gets the whole batch at once.
CPU_CHUNK_EXAMPLES = 1024


def num_chunks(batch_size: int, chunk_examples: int = CPU_CHUNK_EXAMPLES) -> int:
  """How many equal chunks a batch is cut into: the most that divide it and hold at least
  ``chunk_examples`` examples each (1 for a smaller batch).

  Examples:
    >>> num_chunks(4096), num_chunks(1024), num_chunks(3000), num_chunks(7)
    (4, 1, 2, 1)
  """
  chunks = max(1, batch_size // chunk_examples)
  while batch_size % chunks:
    chunks -= 1
  return chunks


def worker_value_and_grad(graphdef, params, rows_PxD, batch, chunks: int):
  """One worker's batch-mean loss and its gradient (params, rows), over ``chunks`` equal chunks.

  The one per-worker loss and gradient of both step builders (this module's and the sharded
  one's, which passes ``chunks=1``); ``batch`` is ``(inverse_BxF, dense_BxI, label_B)``. The
  mean of the chunks' mean losses is the batch mean, so the result is the one-pass gradient up
  to float summation order.
  """

  def loss_fn(params, rows_PxD, inverse_BxF, dense_BxI, label_B):
    logit_B = logits(graphdef, params, rows_PxD, inverse_BxF, dense_BxI)
    with jax.named_scope("loss"):
      return bce_loss(logit_B, label_B)

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1))
  if chunks == 1:
    return grad_fn(params, rows_PxD, *batch)
  chunked = jax.tree.map(lambda x: x.reshape(chunks, -1, *x.shape[1:]), batch)

  def add_chunk(total, chunk):
    return jax.tree.map(jnp.add, total, grad_fn(params, rows_PxD, *chunk)), None

  # zeros_like keeps each value's type, varying over the mesh included (the carry must).
  zeros = jax.tree.map(jnp.zeros_like, (rows_PxD[0, 0], (params, rows_PxD)))
  total, _ = jax.lax.scan(add_chunk, zeros, chunked)
  return jax.tree.map(lambda x: x / chunks, total)


def make_predict(graphdef: nnx.GraphDef) -> Callable:
  """Jitted ``predict(params, rows_PxD, inverse_BxF, dense_BxI) -> click probability [B]``."""

  @jax.jit
  def predict(params, rows_PxD, inverse_BxF, dense_BxI):
    return jax.nn.sigmoid(logits(graphdef, params, rows_PxD, inverse_BxF, dense_BxI))

  return predict


@jax.jit
def replica_mean(params_W):
  """Average the per-worker replicas (what a final merge produces), for evaluation."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), params_W)
