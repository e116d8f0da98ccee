"""Demo: train a small MLP with hierarchical k-step Adam on 8 simulated CPU devices.

Command: ``python -m experiments.demo`` (add ``--quick`` for a seconds-long smoke run).
Hardware: any Linux CPU (2 cores are enough); it simulates 2 nodes x 4 devices.
Expected: k-step Adam ends a little above synchronous Adam (DDP), both near the noise floor
(0.01, the variance of the label noise), with k_node times fewer bytes over the inter-node
links. docs/optimizer.md has the measured losses and runtime, with this command.

It prints the steps, the loss of k-step Adam and of DDP Adam, how many merges ran at each
level, the bytes each device sent per mesh axis, and the communication time those bytes
would take on a described network (NVLink-class inside a node, a 100 Gb/s NIC across nodes).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import kstep_adam
from experiments._common import use_cpu_devices
from experiments._common import write_json
from kstep_adam import parallel

NETWORK = kstep_adam.NETWORKS["nvlink+100g"]  # NVLink inside a node, 100 Gb/s NIC across
FEATURES, HIDDEN = 16, 64


def init_mlp(rng: np.random.Generator) -> dict:
  def dense(n_in, n_out):
    return {
      "w": (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32),
      "b": np.zeros(n_out, np.float32),
    }

  return {"l1": dense(FEATURES, HIDDEN), "l2": dense(HIDDEN, HIDDEN), "out": dense(HIDDEN, 1)}


def mlp(params, x_BxF):
  h = jax.nn.gelu(x_BxF @ params["l1"]["w"] + params["l1"]["b"])
  h = jax.nn.gelu(h @ params["l2"]["w"] + params["l2"]["b"])
  return (h @ params["out"]["w"] + params["out"]["b"])[:, 0]


def loss_fn(params, batch):
  x_BxF, y_B = batch
  return jnp.mean((mlp(params, x_BxF) - y_B) ** 2)


def make_batches(num_steps: int, batch_size: int, seed: int = 0):
  """A fixed nonlinear teacher; every worker gets its own rows of each global batch."""
  rng = np.random.default_rng(seed)
  w_teacher = (rng.normal(size=(FEATURES,)) / np.sqrt(FEATURES)).astype(np.float32)
  for _ in range(num_steps):
    x = rng.normal(size=(batch_size, FEATURES)).astype(np.float32)
    y = (np.sin(2.0 * (x @ w_teacher)) + 0.1 * rng.normal(size=batch_size)).astype(np.float32)
    yield x, y


def train(tx, mesh, params, num_steps, batch_size, log_every):
  params_W, state_W = parallel.init_replicas(params, tx, mesh)
  # Non-merge steps run a program without collectives or branches (host-side dispatch).
  step = parallel.make_train_step(loss_fn, tx, mesh)
  losses = []
  for t, batch in enumerate(make_batches(num_steps, batch_size), start=1):
    params_W, state_W, metrics = step(params_W, state_W, batch)
    losses.append(float(np.mean(metrics["loss"])))
    if t % log_every == 0 or t == num_steps:
      print(f"  step {t:5d}  loss {np.mean(losses[-log_every:]):.4f}")
  spread = max(float(np.ptp(np.asarray(x), axis=0).max()) for x in jax.tree.leaves(params_W))
  return losses, spread


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--k-node", type=int, default=8, help="cross-node merge period")
  parser.add_argument("--k-local", type=int, default=2, help="intra-node merge period")
  parser.add_argument("--batch-size", type=int, default=256, help="global batch")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps")
  parser.add_argument("--out", default=None, help="optional JSON file for the summary")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  steps = 40 if args.quick else args.steps

  use_cpu_devices(8, cpu_only=True)  # 2 nodes x 4 devices, on any machine; before JAX starts
  mesh = parallel.make_mesh(2, 4)
  params = init_mlp(np.random.default_rng(0))
  num_params = sum(np.size(x) for x in jax.tree.leaves(params))
  axes = ("node", "local")
  schedule = kstep_adam.merge_schedule({"node": args.k_node, "local": args.k_local}, axis_name=axes)
  ddp_schedule = kstep_adam.sync_schedule(axes)
  print(
    f"mesh {dict(mesh.shape)} on {jax.devices()[0].platform}; MLP with {num_params} params; "
    f"{steps} steps, global batch {args.batch_size}"
  )

  summary = {"steps": steps, "num_params": int(num_params)}
  for name, tx, sched in [
    (
      f"kstep_adam(k_node={args.k_node}, k_local={args.k_local})",
      kstep_adam.kstep_adam(args.lr, schedule),
      schedule,
    ),
    ("sync_adam (DDP)", kstep_adam.sync_adam(args.lr, ddp_schedule), ddp_schedule),
  ]:
    print(name)
    start = time.perf_counter()
    losses, spread = train(tx, mesh, params, steps, args.batch_size, max(steps // 8, 1))
    wall = time.perf_counter() - start
    report = parallel.comm_report(params, sched, mesh, steps, NETWORK)
    merges = {
      lvl: sum(1 for t in range(1, steps + 1) if sched.level_at(sched.states()[0], t) == i + 1)
      for i, lvl in enumerate(axes)
    }
    print(
      f"  final loss {np.mean(losses[-10:]):.4f}; replica spread {spread:.2e}; wall {wall:.1f}s"
    )
    print(f"  merges (DDP: gradient all-reduces) by level: {merges}")
    print(
      "  bytes sent per device: "
      + ", ".join(f"{a}={b / 1e6:.3f} MB" for a, b in report["bytes_by_axis"].items())
    )
    print(
      "  estimated comm time: "
      + ", ".join(f"{a}={s * 1e3:.3f} ms" for a, s in report["seconds_by_axis"].items())
      + f" (total {report['seconds'] * 1e3:.3f} ms)"
    )
    summary[name] = {"final_loss": float(np.mean(losses[-10:])), "merges": merges, **report}
  if args.out:
    write_json(args.out, summary)
  return summary


if __name__ == "__main__":
  main()
