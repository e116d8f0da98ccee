r"""The network model against a real shaped link: measured ÷ modelled seconds of collectives.

  python -m experiments.benchmarks.link_model                    # rates 0.1, 1, 10 Gbit/s
  python -m experiments.benchmarks.link_model --quick --out runs/link_model.jsonl

Needs root and iproute2. For each rate, ``python -m kstep_adam.launch --num-processes 2
--link-gbps RATE`` starts two processes in two network namespaces joined by a link shaped to
RATE in each direction (:mod:`kstep_adam._link`), one CPU device each, so the ``'node'`` axis
crosses the link. Each process times, for buffers of several sizes per device:

* ``all_reduce``: ``pmean`` over ``'node'`` (what a merge of the dense replicas runs);
* ``all_to_all``: a tiled ``all_to_all`` over ``'node'`` (the sparse tier's exchange).

Each is run at least ``--repeats`` times after a warm-up call (which compiles), more often
when short (up to about half a second), and its median time is set beside two models for the
same bytes: bytes / rate alone (what :class:`kstep_adam.NetworkModel` gives without latency:
:func:`kstep_adam.merge_bytes` of a one-step merge for the all-reduce, ``(P-1)/P`` of the
buffer for the all-to-all), and :class:`kstep_adam._comm.GlooTcpLink`, which adds the
machine's own ceiling, a cost per message (both calibrated first, from a run on a link too
fast to limit them, ``--calibrate-gbps``), and the all-to-all's half duplex. Rows go to
``--out`` (JSON lines) and a table to standard output. The machine's load average is recorded:
on shared cores the short collectives' times are mostly scheduling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RATES_GBPS = (0.1, 1.0, 10.0)
SIZES_BYTES = (16_384, 163_840, 1_638_400, 16_384_000)
QUICK_SIZES_BYTES = (16_384, 163_840, 1_638_400)
OPS = ("all_reduce", "all_to_all")


def model_seconds(op: str, size_bytes: int, link, num_processes: int = 2) -> dict:
  """The model's bytes, messages and seconds for one ``op`` of ``size_bytes`` per process:
  bytes / rate alone (the project's :class:`kstep_adam.NetworkModel` without latency) and
  :class:`kstep_adam._comm.GlooTcpLink` (``link``)."""
  import numpy as np

  import kstep_adam
  from kstep_adam import _comm

  n = num_processes
  if op == "all_reduce":
    schedule = kstep_adam.merge_schedule(1, axis_name="node")
    params = {"x": np.zeros(size_bytes // 4, np.float32)}
    cost = kstep_adam.merge_bytes(params, schedule, {"node": n}, step=1)
    seconds = link.all_reduce_seconds(size_bytes, n)
  else:
    cost = _comm.CommCost({"node": (n - 1) / n * size_bytes}, {"node": n - 1})
    seconds = link.all_to_all_seconds(size_bytes, n)
  bare = _comm.NetworkModel({"node": link.gbps * 1e9 / 8})
  return {
    "model_bytes": cost.bytes_by_axis["node"],
    "model_messages": cost.messages_by_axis["node"],
    "model_seconds": seconds,
    "bandwidth_only_seconds": bare.seconds(cost),
  }


def worker(out_path: str, gbps: float, sizes: list[int], repeats: int) -> None:
  """One process of the run (started by the launcher): times the collectives."""
  from kstep_adam import _distributed

  processes = _distributed.initialize()
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from kstep_adam import parallel
  from kstep_adam._comm import GlooTcpLink

  with _distributed.exit_on_error(processes):
    n = processes.count
    mesh = parallel.make_mesh(n, 1, devices=_distributed.process_major_devices())
    spec = P(("node", "local"))
    sharding = NamedSharding(mesh, spec)
    programs = {
      "all_reduce": lambda x: jax.lax.pmean(x, "node"),
      "all_to_all": lambda x: jax.lax.all_to_all(x, "node", 0, 0, tiled=True),
    }
    rows = []
    for size in sizes:
      local = np.full((size // 4,), processes.index + 1.0, np.float32)
      x = jax.make_array_from_process_local_data(sharding, local, (n * local.size,))
      for op, body in programs.items():
        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))
        fn(x).block_until_ready()  # compiles
        # At least `repeats` calls, more of the short ones: the same count in every process.
        expected = model_seconds(op, size, GlooTcpLink(gbps))["bandwidth_only_seconds"]
        calls = max(repeats, min(30, int(0.5 / expected)))
        seconds = []
        for _ in range(calls):
          start = time.perf_counter()
          fn(x).block_until_ready()
          seconds.append(time.perf_counter() - start)
        rows.append({"op": op, "size_bytes": size, "seconds": seconds})
    if processes.is_main:
      with open(out_path, "w") as f:
        json.dump(rows, f)


def run_rate(gbps: float, sizes: list[int], repeats: int, timeout: float) -> list[dict]:
  """Launch the two processes over a link of ``gbps`` and return their timings."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "rows.json")
    command = [
      sys.executable,
      "-m",
      "kstep_adam.launch",
      "--num-processes",
      "2",
      "--link-gbps",
      f"{gbps:g}",
      "--",
      sys.executable,
      "-m",
      "experiments.benchmarks.link_model",
      "--worker",
      path,
      "--sizes",
      *map(str, sizes),
      "--repeats",
      str(repeats),
      "--rates",
      f"{gbps:g}",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
      raise SystemExit(f"the run at {gbps:g} Gbit/s failed (status {done.returncode})")
    with open(path) as f:
      return json.load(f)


def calibrate(gbps: float, timeout: float) -> dict:
  """The machine's own ceiling and per-message cost, from an all-reduce of 16 KB and one of
  16 MB on a link too fast to limit them (``gbps``): two runs outside the compared table."""
  rows = run_rate(gbps, [16_384, 16_777_216], 10, timeout)
  t = {row["size_bytes"]: statistics.median(row["seconds"]) for row in rows if row["op"] == OPS[0]}
  small, big = 16_384, 16_777_216
  bandwidth = big / t[big]
  for _ in range(3):  # t = S / bandwidth + 2 messages (two processes)
    message = max(0.0, (t[small] - small / bandwidth) / 2)
    bandwidth = big / max(t[big] - 2 * message, 1e-9)
  return {"at_gbps": gbps, "host_gbps": bandwidth * 8 / 1e9, "message_seconds": message}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rates", type=float, nargs="+", default=list(RATES_GBPS))
  parser.add_argument("--sizes", type=int, nargs="+", default=None, help="bytes per process")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="3 sizes, 3 repeats")
  parser.add_argument(
    "--calibrate-gbps",
    type=float,
    default=100.0,
    help="rate of the calibration run (fast enough not to limit); 0: no calibration",
  )
  parser.add_argument("--out", default=os.path.join("runs", "link_model.jsonl"))
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds per rate")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sizes = args.sizes or list(QUICK_SIZES_BYTES if args.quick else SIZES_BYTES)
  repeats = 3 if args.quick and args.repeats == 5 else args.repeats
  if args.worker is not None:
    worker(args.worker, args.rates[0], sizes, repeats)
    return
  from kstep_adam._comm import GlooTcpLink

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  calibration = {"at_gbps": None, "host_gbps": float("inf"), "message_seconds": 0.0}
  if args.calibrate_gbps:
    calibration = calibrate(args.calibrate_gbps, args.timeout)
  print(
    f"calibration at {args.calibrate_gbps:g} Gbit/s: host ceiling "
    f"{calibration['host_gbps']:.2f} Gbit/s, {calibration['message_seconds'] * 1e3:.3f} ms "
    f"per message; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
  )
  results = []
  for gbps in args.rates:
    link = GlooTcpLink(
      gbps, host_gbps=calibration["host_gbps"], message_seconds=calibration["message_seconds"]
    )
    for row in run_rate(gbps, sizes, repeats, args.timeout):
      measured = statistics.median(row["seconds"])
      model = model_seconds(row["op"], row["size_bytes"], link)
      results.append(
        {
          "gbps": gbps,
          **row,
          "measured_seconds": measured,
          "measured_min_seconds": min(row["seconds"]),
          **model,
          "measured_over_model": measured / model["model_seconds"],
          "measured_over_bandwidth_only": measured / model["bandwidth_only_seconds"],
          "calibration": calibration,
          "load_average": os.getloadavg()[0],
        }
      )
  with open(args.out, "w") as f:
    for row in results:
      f.write(json.dumps(row) + "\n")
  print(
    f"{'Gbit/s':>7} {'op':>10} {'bytes':>10} {'measured s':>11} {'bytes/rate':>11} "
    f"{'ratio':>6} {'model s':>10} {'ratio':>6}"
  )
  for row in results:
    print(
      f"{row['gbps']:>7g} {row['op']:>10} {row['size_bytes']:>10} "
      f"{row['measured_seconds']:>11.5f} {row['bandwidth_only_seconds']:>11.5f} "
      f"{row['measured_over_bandwidth_only']:>6.2f} {row['model_seconds']:>10.5f} "
      f"{row['measured_over_model']:>6.2f}"
    )
  print(f"rows written to {args.out}")


if __name__ == "__main__":
  main()
