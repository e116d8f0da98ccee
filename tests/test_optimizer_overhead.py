"""The optimizer-overhead benchmark runs end to end on a tiny model (a smoke test)."""

import json

from experiments.benchmarks import optimizer_overhead


def test_benchmark_times_every_variant_and_counts_every_schedule(tmp_path):
  out = tmp_path / "overhead.json"
  argv = ["--width", "16", "--depth", "2", "--reps", "2", "--out", str(out)]
  optimizer_overhead.main(argv)
  with open(out) as f:
    result = json.load(f)
  for mode in ("step", "update"):
    for clock in ("wall", "cpu"):
      times = result[mode][clock]
      assert set(times) >= {"adam", "in_graph_local", "in_graph_merge", "hoisted_local"}
      assert all(t > 0 for k, t in times.items() if not k.endswith("_paired"))
  rows = {row["schedule"]: row["bytes_per_step"] for row in result["bytes"]}
  assert rows["k=2"]["node"] == rows["DDP (grads)"]["node"] / 2
  assert rows["1-bit Adam"]["node"] < rows["DDP (grads)"]["node"]  # mostly 1 bit per entry
