"""The jitted step of a multi-process run: rows arrive from their owners, gradients go back.

The multi-process twin of :mod:`._step`, with the same per-worker loss and gradient
(:func:`._loss.worker_value_and_grad`); the exchange is described in :mod:`._sharded_tier`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kstep_adam import parallel
from kstep_adam.ctr.train import _loss


def make_sharded_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  skip_nonfinite: bool = False,
) -> parallel.DispatchedStep:
  """Build ``step(params_W, opt_state_W, answers, inverse_GxF, dense_GxI, label_G)``.

  The multi-process twin of :func:`kstep_adam.ctr.train._step.make_ctr_train_step`: the same
  per-worker forward and backward and the same dense optimizer, but the rows arrive from
  their owners and their gradients return to them (steps 3 and 4 of
  :mod:`._sharded_tier`).

  Args:
    graphdef: the nnx graph definition of the model.
    tx: the dense optimizer (merging over ``('node', 'local')`` on its own schedule).
    mesh: the ``('node', 'local')`` mesh, one process per node.
    skip_nonfinite: a step where any worker's loss or gradients are not finite changes no
      parameter or optimizer moment on any worker; the owners skip their push too.

  Returns:
    A :class:`kstep_adam.parallel.DispatchedStep` returning ``(params_W, opt_state_W,
    grads_to_owners, loss, finite)``: ``answers`` and ``grads_to_owners`` are global
    ``[P * P, S, D]`` buffers sharded ``P('node', 'local')`` (see :class:`ShardedSparseTier`);
    ``inverse_GxF`` indexes each process's ``P * S`` rows; ``loss`` is the global-mean loss
    and ``finite`` whether every worker's loss and gradients were finite (the same on every
    process, so all of them take the same decision on it).
  """
  axes = tuple(mesh.axis_names)
  worker, blocks = P(axes), P("node", "local")
  num_workers = mesh.size

  def per_worker(params_W, opt_state_W, answers_PxBxD, inverse_BxF, dense_BxI, label_B):
    params, opt_state = jax.tree.map(lambda x: x[0], (params_W, opt_state_W))
    mine_PxBxD = jax.lax.all_to_all(answers_PxBxD, "node", 0, 0, tiled=True)
    rows_PxSxD = jax.lax.all_gather(mine_PxBxD, "local", axis=1, tiled=True)
    num_owners, slots, dim = rows_PxSxD.shape
    rows_RxD = rows_PxSxD.reshape(num_owners * slots, dim)
    batch = (inverse_BxF, dense_BxI, label_B)
    loss, (grads, grad_rows_RxD) = _loss.worker_value_and_grad(
      graphdef, params, rows_RxD, batch, chunks=1
    )
    finite = _loss.all_finite(loss, grads, grad_rows_RxD)  # this worker's
    # One all-reduce for both: the global-mean loss, and the share of workers that were not
    # finite (zero when all were).
    loss, not_finite = jax.lax.pmean(jnp.stack([loss, 1.0 - finite.astype(loss.dtype)]), axes)
    # This worker's share of the global-mean loss's gradient; the owners add the shares up.
    grad_PxSxD = grad_rows_RxD.reshape(num_owners, slots, dim) / num_workers
    grad_PxBxD = jax.lax.psum_scatter(grad_PxSxD, "local", scatter_dimension=1, tiled=True)
    grads_to_owners = jax.lax.all_to_all(grad_PxBxD, "node", 0, 0, tiled=True)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    all_finite = not_finite == 0
    if skip_nonfinite:  # every worker skips, or none does
      new_params = _loss.keep_unless(all_finite, new_params, params)
      new_opt_state = _loss.keep_unless(all_finite, new_opt_state, opt_state, keep_counters=True)
    params_W, opt_state_W = jax.tree.map(lambda x: x[None], (new_params, new_opt_state))
    return params_W, opt_state_W, grads_to_owners, loss, all_finite

  def build(body: Callable):
    return jax.jit(
      jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(worker, worker, blocks, worker, worker, worker),
        out_specs=(worker, worker, blocks, P(), P()),
      ),
      donate_argnums=(0, 1),
    )

  return parallel.DispatchedStep(build, per_worker)
