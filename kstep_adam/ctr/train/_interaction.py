"""DLRM's pair interaction: the dot products of every pair of an example's vectors.

:func:`pairwise_dots` has two forms with the same values and gradient, up to float rounding:

- on a CPU, a C++ kernel (``pair_dots.cc``, built on first use by :mod:`kstep_adam._native`)
  that puts examples in the vector lanes and computes only the ``N (N - 1) / 2`` pairs, on
  XLA's intra-op threads. In the CTR train step (batch 4096, 27 vectors of 16, a 2-core
  machine) the interaction's ops fell from 12.6 to 3.8 ms a step (``ctr_step_profile``) and
  the step program took 32% less time, alternated with the XLA form in one process;
- everywhere else (an accelerator, a dtype other than float32, ``KSTEP_ADAM_NATIVE_KERNELS=0``,
  no C++ compiler), XLA's batched matmul of each example's Gram matrix, with a custom VJP.
"""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from kstep_adam import _native

# The vectors are padded with zero vectors to a multiple of this many before their Gram
# matrices are formed: XLA's CPU batched matmul ran DLRM's 27 x 27 Gram matrices slower than
# 28 x 28 ones (with the right operand laid out [d, m], below, the train step alone took 7-14%
# less time on a 2-core machine, alternated with the unpadded form in one process).
_GRAM_MULTIPLE = 4


@functools.cache
def _pair_indices(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """Static indices of the ``n (n-1) / 2`` pairs ``i < j`` of ``n`` vectors, padded to ``m``.

  Returns:
    ``(flat_K, symmetric_MM)``: ``flat_K`` indexes the pairs, in ``np.triu_indices(n, 1)``
    order, in a flattened ``[m, m]`` Gram matrix; ``symmetric_MM`` maps each flattened entry
    ``(i, j)`` and ``(j, i)`` of a pair to its index, and every other entry (the diagonal,
    the padding) to ``K`` (a zero column).
  """
  i, j = np.triu_indices(n, k=1)
  num_pairs = len(i)
  symmetric = np.full((m, m), num_pairs, np.int32)
  symmetric[i, j] = symmetric[j, i] = np.arange(num_pairs, dtype=np.int32)
  return (i * m + j).astype(np.int32), symmetric.reshape(-1)


def _padded(v_BxNxD: jax.Array) -> jax.Array:
  """``v`` with zero vectors appended up to a multiple of ``_GRAM_MULTIPLE``."""
  n = v_BxNxD.shape[1]
  m = -(-n // _GRAM_MULTIPLE) * _GRAM_MULTIPLE
  return jnp.pad(v_BxNxD, ((0, 0), (0, m - n), (0, 0)))


@jax.custom_vjp
def xla_pairwise_dots(v_BxNxD: jax.Array) -> jax.Array:
  """:func:`pairwise_dots` by XLA: one batched matmul of the padded vectors' Gram matrices.

  Cheaper to differentiate than the gathered Gram matrix on a CPU: the indices are trace-time
  constants, and the backward pass is one batched matmul of the symmetric cotangent with
  ``v`` (``dv = (G + G^T) v``) instead of a scatter-add into a zero Gram matrix followed by one
  matmul per operand.
  """
  return _pairwise_dots_fwd(v_BxNxD)[0]


def _pairwise_dots_fwd(v_BxNxD):
  batch, n, _ = v_BxNxD.shape
  v_BxMxD = _padded(v_BxNxD)
  m = v_BxMxD.shape[1]
  flat_K, _ = _pair_indices(n, m)
  # The right operand as [b, d, m]: XLA's CPU batched matmul took less time on this layout
  # than on the [b, m, d] one it would read transposed.
  gram_BxMM = jnp.einsum("bnd,bdm->bnm", v_BxMxD, jnp.swapaxes(v_BxMxD, 1, 2))
  return jnp.take(gram_BxMM.reshape(batch, m * m), flat_K, axis=1), v_BxMxD


def _pairwise_dots_bwd(v_BxMxD, cotangent_BxK):
  batch, m, _ = v_BxMxD.shape
  n = math.isqrt(8 * cotangent_BxK.shape[1] + 1) // 2 + 1  # K = n (n - 1) / 2
  _, symmetric_MM = _pair_indices(n, m)
  with jax.named_scope("interaction"):  # traced outside the forward's scope
    padded_BxK1 = jnp.pad(cotangent_BxK, ((0, 0), (0, 1)))  # a zero column at K
    sym_BxMxM = jnp.take(padded_BxK1, symmetric_MM, axis=1).reshape(batch, m, m)
    return (jnp.einsum("bnm,bmd->bnd", sym_BxMxM, v_BxMxD)[:, :n],)


xla_pairwise_dots.defvjp(_pairwise_dots_fwd, _pairwise_dots_bwd)


_SOURCE = pathlib.Path(__file__).with_name("pair_dots.cc")
TARGETS = ("KstepPairDots", "KstepPairDotsGrad", "KstepDlrmInteraction", "KstepDlrmInteractionGrad")


def _result_type(x: jax.Array, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """The type of a kernel's result of ``shape`` from ``x [..., N, D]``: its dtype, its batch
  dimensions' sharding, and inside a ``shard_map`` the mesh axes it varies over."""
  x_type = jax.typeof(x)
  batch_spec = tuple(x_type.sharding.spec)[: len(shape) - 1]
  spec = jax.sharding.PartitionSpec(*batch_spec, *[None] * (len(shape) - len(batch_spec)))
  return x_type.update(shape=shape, sharding=x_type.sharding.update(spec=spec))


def _kernel(target: str, result_type, *args):
  if not native_available():
    raise RuntimeError(
      "the pair dots' C++ kernel is not there (KSTEP_ADAM_NATIVE_KERNELS=0, or its build "
      "failed); use pairwise_dots, which falls back to the XLA form"
    )
  return jax.ffi.ffi_call(target, result_type, vmap_method="broadcast_all")(*args)


@jax.custom_vjp
def native_pairwise_dots(v: jax.Array) -> jax.Array:
  """:func:`pairwise_dots` by the C++ kernel (float32, on a CPU; see :func:`native_available`).
  Once differentiable: its backward is itself a kernel call."""
  n = v.shape[-2]
  return _kernel(TARGETS[0], _result_type(v, (*v.shape[:-2], n * (n - 1) // 2)), v)


def _native_fwd(v):
  return native_pairwise_dots(v), v


def _native_bwd(v, cotangent):
  return (_kernel(TARGETS[1], jax.typeof(v), v, cotangent),)


native_pairwise_dots.defvjp(_native_fwd, _native_bwd)


@jax.custom_vjp
def native_dlrm_interaction(h: jax.Array, e: jax.Array) -> jax.Array:
  """:func:`dlrm_interaction` by the C++ kernel (float32, on a CPU; see
  :func:`native_available`); its backward is itself a kernel call."""
  n = e.shape[-2] + 1
  return _kernel(TARGETS[2], _result_type(h, (*h.shape[:-1], h.shape[-1] + n * (n - 1) // 2)), h, e)


def _native_interaction_fwd(h, e):
  return native_dlrm_interaction(h, e), (h, e)


def _native_interaction_bwd(residuals, cotangent):
  h, e = residuals
  return tuple(_kernel(TARGETS[3], (jax.typeof(h), jax.typeof(e)), h, e, cotangent))


native_dlrm_interaction.defvjp(_native_interaction_fwd, _native_interaction_bwd)


def xla_dlrm_interaction(h: jax.Array, e: jax.Array) -> jax.Array:
  """:func:`dlrm_interaction` by XLA: the vectors stacked, :func:`xla_pairwise_dots`."""
  v = jnp.concatenate([h[..., None, :], e], axis=-2)
  return jnp.concatenate([h, xla_pairwise_dots(v)], axis=-1)


def native_available() -> bool:
  """Whether the C++ kernel is there to use in this process (built and registered on the
  first call; see :mod:`kstep_adam._native` for the switch and the cache)."""
  return _native.available(_SOURCE, TARGETS)


def _per_shard(kernel, batch_axes: int, *args: jax.Array) -> jax.Array:
  """``kernel(*args)`` on each device's part of a batch split over Explicit mesh axes (an FFI
  call has no partitioning rule: XLA would gather the batch and run all of it everywhere).
  The batch is the first ``batch_axes`` axes of every argument and of the ``[..., W]`` result."""
  sharding = jax.typeof(args[0]).sharding
  batch_spec = tuple(sharding.spec)[:batch_axes]
  if all(axes is None for axes in batch_spec):
    return kernel(*args)
  spec = functools.partial(jax.sharding.PartitionSpec, *batch_spec)
  return jax.shard_map(
    kernel,
    mesh=sharding.mesh,
    in_specs=tuple(spec(*[None] * (x.ndim - len(batch_spec))) for x in args),
    out_specs=spec(None),
  )(*args)


def _kernel_fits(*args: jax.Array) -> bool:
  """Whether the kernels take these arrays here: float32, not empty, a CPU backend with the
  kernels built, and no split of the vectors' own axes (the last two of the last array)."""
  last = args[-1]
  vectors_split = any(axes is not None for axes in tuple(jax.typeof(last).sharding.spec)[-2:])
  usable = all(x.dtype == jnp.float32 and x.size > 0 for x in args)
  return not vectors_split and usable and jax.default_backend() == "cpu" and native_available()


def pairwise_dots(v_BxNxD: jax.Array) -> jax.Array:
  """The dot products ``<v_i, v_j>`` of every pair ``i < j``, ``[B, N (N-1) / 2]``.

  The same values and gradient as ``einsum('bnd,bmd->bnm', v, v)[:, i, j]`` with
  ``np.triu_indices``, up to float rounding: on a CPU by the C++ kernel where it is there
  (:func:`native_available`, float32, at least two vectors, the vectors not split over
  devices), else by XLA (:func:`xla_pairwise_dots`). The kernel's gradient is not itself
  differentiable: a second-order derivative needs ``KSTEP_ADAM_NATIVE_KERNELS=0``. A batch
  split over Explicit mesh axes runs the kernel on each device's part; under ``jit`` with
  Auto sharding XLA gathers the batch for it (the trainer calls it inside ``shard_map``).

  Examples:
    >>> v = jnp.arange(6.0).reshape(1, 3, 2)
    >>> pairwise_dots(v)
    Array([[ 3.,  5., 23.]], dtype=float32)
  """
  if v_BxNxD.shape[-2] < 2 or not _kernel_fits(v_BxNxD):
    return xla_pairwise_dots(v_BxNxD)
  native = functools.partial(_per_shard, native_pairwise_dots, v_BxNxD.ndim - 2)
  return jax.lax.platform_dependent(v_BxNxD, cpu=native, default=xla_pairwise_dots)


def dlrm_interaction(h_BxD: jax.Array, emb_BxFxD: jax.Array) -> jax.Array:
  """DLRM's interaction layer: ``[h, pairwise_dots(v)]``, ``[B, D + N (N-1) / 2]``, for the
  ``N = F + 1`` vectors ``v = (h, e_1, ..., e_F)`` of each example (the bottom MLP's output
  and the ``F`` fields' embeddings).

  On a CPU the kernel (:func:`native_dlrm_interaction`, where :func:`pairwise_dots` would take
  it) reads ``h`` and ``emb`` where they are and writes the dots after ``h``, so neither the
  stacked vectors nor the concatenation is formed, forward or backward: the same values as
  :func:`xla_dlrm_interaction`, and the bits of the pair-dots kernel on the stacked vectors.

  Examples:
    >>> h, e = jnp.ones((1, 2)), jnp.arange(4.0).reshape(1, 2, 2)
    >>> dlrm_interaction(h, e)
    Array([[1., 1., 1., 5., 3.]], dtype=float32)
  """
  if not _kernel_fits(h_BxD, emb_BxFxD):
    return xla_dlrm_interaction(h_BxD, emb_BxFxD)
  native = functools.partial(_per_shard, native_dlrm_interaction, h_BxD.ndim - 1)
  return jax.lax.platform_dependent(h_BxD, emb_BxFxD, cpu=native, default=xla_dlrm_interaction)
