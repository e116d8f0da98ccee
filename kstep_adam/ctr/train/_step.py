"""The jitted CTR train step: per-worker forward/backward, synchronous sparse gradients.

The generic :func:`kstep_adam.parallel.make_train_step` takes one batch pytree split over the
workers and returns only parameters and state. The CTR step needs two things it lacks:

* the step's deduplicated embedding rows ``rows_PxD`` as an extra *replicated* input (every
  worker indexes into the same rows with its own ``inverse``; the ``U`` rows in use are
  padded with zero rows to ``P``, a shape bucket), and
* their gradient as an extra *replicated* output, averaged over all workers, so the host can
  push it to the embedding tier once (the padding rows' gradient is zero).

So this module builds its own ``shard_map`` over the same mesh, applies the same optax
optimizer to the dense parameters (which merge on their own schedule inside ``tx.update``)
and reuses the harness's :class:`kstep_adam.parallel.DispatchedStep` for local steps.

With a device tier (``device_optimizer``), the rows never leave the device: the step takes
the tier's arrays and the batch's slots instead of ``rows_PxD``, gathers the rows (catching
up stale ones in exact mode), and after the ``pmean`` applies the sparse optimizer to them
(:func:`kstep_adam.embedding.apply_grads`) on every worker alike; it returns the new arrays
instead of the gradient.

Scaling: every worker's loss is the mean over its ``B`` examples and the global objective is
the mean over the ``N`` workers, i.e. the mean over all ``N*B`` examples. Its gradient with
respect to the rows is ``pmean`` of the per-worker row gradients (not ``psum``), the same
gradient a single worker would get on the concatenated global batch.

Non-finite values: the step also says, per worker, whether its loss and gradients (dense and
rows) were all finite, so the trainer can stop at the step that produced a NaN or an
infinity, before anything of it is saved. With ``skip_nonfinite`` a step where any worker's
were not is skipped by every worker: parameters and optimizer state stay as they were, except
the step counters, which count it (the merge schedule stays on the host's count).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kstep_adam import embedding
from kstep_adam import parallel
from kstep_adam.ctr.train._loss import all_finite
from kstep_adam.ctr.train._loss import keep_unless
from kstep_adam.ctr.train._loss import num_chunks
from kstep_adam.ctr.train._loss import worker_value_and_grad


def make_ctr_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  skip_nonfinite: bool = False,
  device_optimizer: embedding.SparseAdam | None = None,
  host_optimizer: embedding.SparseAdam | None = None,
  donate_state: bool = True,
) -> Callable:
  """Build ``step(params_W, opt_state_W, sparse_rows, sparse_batch, inverse_GxF, dense_GxI,
  label_G)``.

  Args:
    graphdef: the nnx graph definition of the model (from ``nnx.split``).
    tx: the dense optimizer, e.g. ``kstep_adam.kstep_adam(..., axis_name=('node', 'local'))``.
    mesh: the ``('node', 'local')`` mesh.
    skip_nonfinite: a step where any worker's loss or gradients are not finite changes no
      parameter or optimizer moment on any worker (one scalar all-reduce per step decides);
      the caller skips its row push too. False applies every step. A device tier never
      applies a non-finite step to its rows, whichever the setting (the caller, which then
      stops or skips, would not push them either).
    device_optimizer: the device tier's sparse optimizer, or None for a host optimizer.
    host_optimizer: the host tier's lazy ``SparseAdam``, for steps whose rows were read
      before the previous step's push (``sparse_batch`` then ``(pending, pushed_grads,
      pushed)``, see ``SparseTier.pull``): the step applies that push to the rows the two
      batches share first (where ``pushed``: the host skips a non-finite step's push).
    donate_state: donate ``params_W`` and ``opt_state_W`` to the step. False keeps them
      readable while a later step computes (a pipelined run's hooks read them).

  Returns:
    A :class:`kstep_adam.parallel.DispatchedStep` (called like a jitted function) returning
    ``(params_W, opt_state_W, sparse_output, loss, finite_W)``: new per-worker replicas, the
    sparse output, the global-mean loss and, per worker, whether its loss and gradients were
    all finite. ``sparse_rows`` is the batch's rows ``rows_PxD`` (replicated,
    ``sparse_batch`` None or a pending push) and ``sparse_output`` their gradient of the
    global-mean loss; with a ``device_optimizer`` they are the device tier's ``DeviceRows``
    and ``DeviceBatch`` and its new ``DeviceRows``. ``G = N * B`` is the global batch; worker
    ``w`` owns rows ``[w*B, (w+1)*B)`` of the batch arrays. ``sparse_rows`` is donated, and
    params and state unless ``donate_state`` is False.
  """
  axes = tuple(mesh.axis_names)
  worker = P(axes)
  cpu = mesh.devices.flat[0].platform == "cpu"

  def per_worker(params_W, opt_state_W, sparse_rows, sparse_batch, inverse_BxF, dense_BxI, label_B):
    chunks = num_chunks(inverse_BxF.shape[0]) if cpu else 1
    params, opt_state = jax.tree.map(lambda x: x[0], (params_W, opt_state_W))
    if device_optimizer is None:
      rows_PxD = sparse_rows
      if sparse_batch is not None:  # the previous step's push, not yet in the rows read
        pending, pushed_grads, pushed = sparse_batch
        rows_PxD = embedding.apply_pending_push(
          host_optimizer, rows_PxD, pending, pushed_grads, pushed
        )
    else:  # the same program on every worker: the rows stay replicated
      device_rows, rows_PxD = embedding.gather_rows(device_optimizer, sparse_rows, sparse_batch)

    # The rows enter replicated (unvarying over the mesh); differentiating with respect to
    # an unvarying input makes JAX psum the cotangent implicitly, which would give the *sum*
    # of the workers' gradients. Casting to varying first keeps the gradient per worker,
    # so the pmean below is the gradient of the global-mean loss.
    rows_PxD = jax.lax.pcast(rows_PxD, axes, to="varying")
    batch = (inverse_BxF, dense_BxI, label_B)
    loss, (grads, grad_rows_PxD) = worker_value_and_grad(graphdef, params, rows_PxD, batch, chunks)
    with jax.named_scope("finite_check"):
      finite = all_finite(loss, grads, grad_rows_PxD)  # this worker's, before any averaging
    grad_rows_PxD = jax.lax.pmean(grad_rows_PxD, axes)  # synchronous sparse, every step
    with jax.named_scope("dense_optimizer"):
      updates, new_opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
    # Whether every worker's values were finite; all workers skip together, or their
    # replicas would drift apart.
    ok = jax.lax.pmin(finite.astype(jnp.int32), axes) > 0
    if skip_nonfinite:
      new_params = keep_unless(ok, new_params, params)
      new_opt_state = keep_unless(ok, new_opt_state, opt_state, keep_counters=True)
    sparse_output = grad_rows_PxD
    if device_optimizer is not None:  # never a non-finite row: the host would not push it
      sparse_output = embedding.apply_grads(
        device_optimizer, device_rows, sparse_batch, grad_rows_PxD, apply=ok
      )
    params_W, opt_state_W = jax.tree.map(lambda x: x[None], (new_params, new_opt_state))
    return params_W, opt_state_W, sparse_output, jax.lax.pmean(loss, axes), finite[None]

  def build(body):
    return jax.jit(
      jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(worker, worker, P(), P(), worker, worker, worker),
        out_specs=(worker, worker, P(), P(), worker),
      ),
      donate_argnums=(0, 1, 2) if donate_state else (2,),
    )

  # Non-merge steps run a second, branch-free program without collectives for the dense
  # part (the sparse pmean stays in both).
  return parallel.DispatchedStep(build, per_worker)
