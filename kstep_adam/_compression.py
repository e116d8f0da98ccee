"""Compressed means with error feedback: 1-bit signs and scales, top-k and random-k entries.

Each function averages a pytree over mesh axes the way a :class:`~kstep_adam.Compression`
prescribes, moving exactly the messages that :func:`kstep_adam.comm_bytes` counts, and returns
the new error-feedback memories. Everything runs inside ``shard_map`` over the axes; with no
axes the worker is alone: it compresses and keeps its errors as on a mesh, and no collective
runs. Messages are byte arrays (``uint8``): packed signs, and float32 scales, values and int32
indices bitcast to bytes, so that one collective per phase carries them and the compiled
program's collectives have exactly the counted sizes.

Error feedback (Stich et al. 2018; Karimireddy et al. 2019): a worker compresses ``x + e``
instead of ``x`` and keeps what the message missed, ``e <- x + e - decompress(message)``, so
no part of the signal is lost, only delayed. Errors are float32 whatever the leaves' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kstep_adam._merge import like_vma
from kstep_adam._merge import tree_mean
from kstep_adam._schedule import Compression


def _group(axes: tuple[str, ...]):
  """``(n, j)``: workers in the group of ``axes`` and this worker's index (node-major)."""
  if not axes:
    return 1, 0
  return math.prod(jax.lax.axis_size(a) for a in axes), jax.lax.axis_index(axes)


def _to_bytes(x: jax.Array) -> jax.Array:
  """The bytes of ``x`` as a flat ``uint8`` array."""
  return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1)


def _from_bytes(b: jax.Array, dtype, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`_to_bytes` for a ``uint8`` array holding ``shape`` items of ``dtype``."""
  itemsize = jnp.dtype(dtype).itemsize
  return jax.lax.bitcast_convert_type(b.reshape(*shape, itemsize), dtype)


def _signed(positive: jax.Array, scale: jax.Array) -> jax.Array:
  """``+scale`` where ``positive``, else ``-scale`` (zero counts as positive, as in 1-bit Adam)."""
  return jnp.where(positive, scale, -scale)


def onebit_mean(tree, worker_error, server_error, axes: Sequence[str] = ()):
  """Average ``tree`` in 1-bit Adam's two-phase compressed all-reduce.

  Per leaf of ``d`` elements, with ``n`` workers and chunks of
  ``c = Compression.chunk_size(d, n)`` elements (worker ``j`` serves chunk ``j``):

  1. each worker compresses ``x = leaf + worker_error`` to signs and the scale
     ``||x||_2 / sqrt(d)`` and keeps ``x - scale * sign(x)`` as its new worker error;
  2. an all-to-all sends chunk ``j`` of every worker's signs, with its scales, to worker ``j``,
     which averages the ``n`` decompressed chunks, adds its server error, compresses the sum
     ``q`` again (scale over the chunk's real elements) and keeps ``q - compressed(q)``;
  3. an all-gather gives every worker all compressed chunks, which it decompresses.

  Args:
    tree: pytree of per-worker arrays to average (the momentum in 1-bit Adam).
    worker_error: float32 pytree like ``tree``.
    server_error: float32 pytree with one ``(c,)`` array per leaf.
    axes: mesh axes to average over, outermost first (one group); ``()``: one worker.

  Returns:
    ``(mean, worker_error, server_error)``; ``mean`` is the same on every worker, in the
    leaves' dtypes.
  """
  axes = tuple(axes)
  leaves, treedef = jax.tree.flatten(tree)
  worker_errors = treedef.flatten_up_to(worker_error)
  server_errors = treedef.flatten_up_to(server_error)
  live = [i for i, leaf in enumerate(leaves) if leaf.size]
  if not live:
    return tree, worker_error, server_error
  n, j = _group(axes)
  chunks = [Compression.chunk_size(leaves[i].size, n) for i in live]

  # Phase 1: every worker compresses its leaves; row r of the message goes to worker r.
  new_worker_errors, rows, scales = list(worker_errors), [], []
  for i, chunk in zip(live, chunks):
    d = leaves[i].size
    x = leaves[i].reshape(-1).astype(jnp.float32) + worker_errors[i].reshape(-1)
    scale = jnp.sqrt(jnp.sum(x * x) / d)
    positive = x >= 0
    new_worker_errors[i] = (x - _signed(positive, scale)).reshape(leaves[i].shape)
    padded = jnp.pad(positive, (0, n * chunk - d))
    rows.append(jnp.packbits(padded.reshape(n, chunk), axis=1))
    scales.append(scale)
  sign_bytes = sum(chunk // 8 for chunk in chunks)
  scale_bytes = jnp.broadcast_to(_to_bytes(jnp.stack(scales)), (n, 4 * len(live)))
  message_NxR = jnp.concatenate([*rows, scale_bytes], axis=1)
  if axes:
    message_NxR = jax.lax.all_to_all(message_NxR, axes, 0, 0, tiled=True)

  # Phase 2: as the server of chunk j, average the workers' chunks and compress them again.
  signs_NxC = jnp.unpackbits(message_NxR[:, :sign_bytes], axis=1) != 0
  worker_scales_NxL = _from_bytes(message_NxR[:, sign_bytes:], jnp.float32, (n, len(live)))
  new_server_errors, server_rows, server_scales = list(server_errors), [], []
  offset = 0
  for slot, (i, chunk) in enumerate(zip(live, chunks)):
    d = leaves[i].size
    real = j * chunk + jnp.arange(chunk) < d  # the padding beyond the leaf carries nothing
    decompressed = _signed(signs_NxC[:, offset : offset + chunk], worker_scales_NxL[:, slot, None])
    q = jnp.where(real, jnp.mean(decompressed, axis=0), 0.0) + server_errors[i]
    count = jnp.clip(d - j * chunk, 0, chunk)
    scale = jnp.where(count > 0, jnp.sqrt(jnp.sum(q * q) / jnp.maximum(count, 1)), 0.0)
    positive = q >= 0
    new_server_errors[i] = q - jnp.where(real, _signed(positive, scale), 0.0)
    server_rows.append(jnp.packbits(positive))
    server_scales.append(scale)
    offset += chunk
  server_message = jnp.concatenate([*server_rows, _to_bytes(jnp.stack(server_scales))])
  if axes:
    gathered_NxR = jax.lax.all_gather(server_message, axes, axis=0, tiled=False)
  else:
    gathered_NxR = server_message[None]

  # Every worker decompresses all chunks: the same mean everywhere.
  signs_NxC = jnp.unpackbits(gathered_NxR[:, :sign_bytes], axis=1) != 0
  server_scales_NxL = _from_bytes(gathered_NxR[:, sign_bytes:], jnp.float32, (n, len(live)))
  means = list(leaves)
  offset = 0
  for slot, (i, chunk) in enumerate(zip(live, chunks)):
    leaf = leaves[i]
    values = _signed(signs_NxC[:, offset : offset + chunk], server_scales_NxL[:, slot, None])
    mean = values.reshape(-1)[: leaf.size].reshape(leaf.shape).astype(leaf.dtype)
    means[i] = like_vma(mean, leaf)
    offset += chunk
  return (
    jax.tree.unflatten(treedef, means),
    jax.tree.unflatten(treedef, new_worker_errors),
    jax.tree.unflatten(treedef, new_server_errors),
  )


def onebit_server_errors(tree, num_workers: int):
  """Float32 zeros of the server error :func:`onebit_mean` keeps for ``tree``'s leaves."""
  return jax.tree.map(
    lambda x: jnp.zeros((Compression.chunk_size(x.size, num_workers),), jnp.float32), tree
  )


def sparse_mean(
  tree,
  error,
  compression: Compression,
  axes: Sequence[str] = (),
  *,
  route: str = "hierarchical",
  key: jax.Array | None = None,
):
  """Average ``tree`` through top-k or random-k sparsification with error feedback.

  Per leaf of ``d`` elements, ``k = compression.values_per_leaf(d)`` entries of
  ``p = leaf + error`` are sent and ``p`` minus what was sent is kept as the new error:

  * ``'topk'``: the ``k`` entries of largest magnitude (ties: the lower index), as values in
    the leaf's dtype and int32 indices; one all-gather; each worker sums the ``n`` sparse
    messages (in float32) and divides by ``n``.
  * ``'randk'``: the entries at ``jax.random.choice(jax.random.fold_in(key, leaf_index), d,
    (k,), replace=False)``, the same on every worker, so the values alone are averaged by
    one all-reduce along ``route``; ``leaf_index`` is the leaf's position in
    ``jax.tree.leaves(tree)``.

  Args:
    tree: pytree of per-worker arrays (gradients).
    error: float32 pytree like ``tree``.
    compression: a ``'topk'`` or ``'randk'`` :class:`~kstep_adam.Compression`.
    axes: mesh axes to average over, outermost first; ``()``: one worker.
    route: routing of the ``'randk'`` all-reduce over several axes.
    key: PRNG key for ``'randk'``; it must be equal on every worker.

  Returns:
    ``(mean, error)``: the mean is dense, the same on every worker, in the leaves' dtypes.
  """
  axes = tuple(axes)
  if compression.method not in ("topk", "randk"):
    raise ValueError(f"sparse_mean needs a 'topk' or 'randk' compression, got {compression!r}")
  if compression.method == "randk" and key is None:
    raise ValueError("'randk' needs a PRNG key shared by every worker, got key=None")
  leaves, treedef = jax.tree.flatten(tree)
  errors = treedef.flatten_up_to(error)
  live = [i for i, leaf in enumerate(leaves) if leaf.size]
  if not live:
    return tree, error
  new_errors, indices, values = list(errors), {}, {}
  for i in live:
    leaf = leaves[i]
    p = leaf.reshape(-1).astype(jnp.float32) + errors[i].reshape(-1)
    k = compression.values_per_leaf(leaf.size)
    if compression.method == "topk":
      _, idx = jax.lax.top_k(jnp.abs(p), k)
    else:
      idx = jax.random.choice(jax.random.fold_in(key, i), leaf.size, (k,), replace=False)
    idx = idx.astype(jnp.int32)
    values[i] = p[idx].astype(leaf.dtype)
    new_errors[i] = p.at[idx].add(-values[i].astype(jnp.float32)).reshape(leaf.shape)
    indices[i] = idx

  means = list(leaves)
  if compression.method == "randk":
    averaged = tree_mean(values, axes, route) if axes else values
    for i in live:
      leaf = leaves[i]
      dense = jnp.zeros(leaf.size, leaf.dtype).at[indices[i]].set(averaged[i])
      means[i] = dense.reshape(leaf.shape)
  else:
    message = jnp.concatenate(
      [part for i in live for part in (_to_bytes(values[i]), _to_bytes(indices[i]))]
    )
    if axes:
      gathered_NxR = jax.lax.all_gather(message, axes, axis=0, tiled=False)
    else:
      gathered_NxR = message[None]
    n = gathered_NxR.shape[0]
    offset = 0
    for i in live:
      leaf, k = leaves[i], values[i].shape[0]
      value_bytes = k * leaf.dtype.itemsize
      sent_NxK = _from_bytes(gathered_NxR[:, offset : offset + value_bytes], leaf.dtype, (n, k))
      offset += value_bytes
      idx_NxK = _from_bytes(gathered_NxR[:, offset : offset + 4 * k], jnp.int32, (n, k))
      offset += 4 * k
      total = (
        jnp.zeros(leaf.size, jnp.float32)
        .at[idx_NxK.reshape(-1)]
        .add(sent_NxK.astype(jnp.float32).reshape(-1))
      )
      means[i] = like_vma((total / n).astype(leaf.dtype).reshape(leaf.shape), leaf)
  return jax.tree.unflatten(treedef, means), jax.tree.unflatten(treedef, new_errors)
