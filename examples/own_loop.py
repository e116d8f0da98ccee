"""k-step Adam in your own loop: your ``jax.jit`` + ``jax.shard_map`` over 8 simulated CPU devices.

Run ``python examples/own_loop.py`` (about 10 s); the walk-through is docs/optimizer.md.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kstep_adam

jax.config.update("jax_num_cpu_devices", 8)  # before the first JAX computation
mesh = jax.make_mesh((8,), ("workers",))  # JAX's default axis type: Explicit
WORKER = NamedSharding(mesh, P("workers"))  # leading (worker or batch) dimension split 8 ways


def loss_fn(params, x, y):
  return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def replicate(tree):  # every worker its own copy: a leading worker dimension, split by worker
  return jax.tree.map(lambda a: jax.device_put(jnp.broadcast_to(a, (8, *a.shape)), WORKER), tree)


def batches(num_steps=48, seed=0):  # global batches of 256 from a fixed teacher
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(16, 1)).astype(np.float32) / 4
  for x in rng.normal(size=(num_steps, 256, 16)).astype(np.float32):
    yield jax.device_put(x, WORKER), jax.device_put(np.sin(x @ teacher), WORKER)


def train(tx, schedule, params):
  """Final replicas, last mean loss, and the largest spread across replicas after each merge."""

  def per_worker(params, state, x, y, merge):  # one worker: its replica and its batch shard
    params, state = jax.tree.map(lambda a: a[0], (params, state))  # drop the worker dim (1)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, merge=merge)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(params, updates), state, loss))

  @functools.partial(jax.jit, static_argnames="merge")  # one program per value of merge
  def step(params_W, state_W, x, y, merge):
    body, spec = functools.partial(per_worker, merge=merge), P("workers")  # split dim 0
    return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)(params_W, state_W, x, y)

  params_W, state_W, spreads = replicate(params), replicate(tx.init(params)), []
  for t, (x, y) in enumerate(batches(), start=1):
    merge = schedule.merges_at(t)  # decided on the host, outside the graph
    params_W, state_W, loss_W = step(params_W, state_W, x, y, merge=merge)
    if merge:
      spreads.append(max(float(np.ptp(a, axis=0).max()) for a in jax.tree.leaves(params_W)))
  return params_W, float(jnp.mean(loss_W)), spreads


def max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(lr=1e-2, k=8):
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (16, 32)) / 4, "w2": jax.random.normal(k2, (32, 1)) / 6}
  sync = kstep_adam.sync_schedule("workers")  # gradients averaged on every step: DDP Adam
  ddp_W, ddp_loss, _ = train(kstep_adam.sync_adam(lr, sync), sync, params)
  tx, grad, ref = optax.adam(lr), jax.jit(jax.grad(loss_fn)), params  # one model, plain optax
  state = tx.init(ref)
  for x, y in batches():  # equal shards: the global batch's gradient is the workers' mean
    updates, state = tx.update(grad(ref, np.asarray(x), np.asarray(y)), state, ref)
    ref = optax.apply_updates(ref, updates)
  out = {"sync_adam_loss": ddp_loss, "sync_adam_vs_optax_adam": max_diff(ddp_W, replicate(ref))}
  for period in (1, k):  # sync='params' (default): each worker keeps its own Adam moments
    schedule = kstep_adam.merge_schedule(period, axis_name="workers")
    kstep_W, loss, spreads = train(kstep_adam.kstep_adam(lr, schedule), schedule, params)
    out |= {f"k{period}_loss": loss, f"k{period}_spread_after_merges": spreads}
    out[f"k{period}_vs_sync_adam"] = max_diff(kstep_W, ddp_W)  # k = 1 is not DDP either
  return out


if __name__ == "__main__":
  for name, value in main().items():
    print(f"{name}: {max(value) if isinstance(value, list) else value:.3g}")
