"""The embedding-tier benchmark runs end to end on its --quick config (a smoke test)."""

import os

from experiments._common import read_jsonl
from experiments.benchmarks import embedding_tier


def _quick_case(tmp_path, flag: str) -> list[dict]:
  """The records of one ``--quick`` case (``flag``) on a 2^16-row table."""
  out = tmp_path / "case.jsonl"
  embedding_tier.main(
    ["--quick", flag, "--log2-rows", "16", "--workdir", str(tmp_path / "w"), "--out", str(out)]
  )
  return read_jsonl(str(out))


def test_benchmark_quick_run_reports_every_case(tmp_path):
  out = tmp_path / "bench.jsonl"
  embedding_tier.main(["--quick", "--workdir", str(tmp_path / "w"), "--out", str(out)])
  records = read_jsonl(str(out))
  assert [r["case"] for r in records] == [
    "fits_in_host_cache",
    "zipf_table_10x_cache",
    "zipf_table_10x_cache",
    "cold_random_gather_vs_sequential_read",
    "cold_random_gather_vs_sequential_read",
  ]
  assert records[0]["hit_rate"] == 1.0  # the working set fits: no misses after warm-up
  for r in records[1:3]:
    assert 0.0 < r["hit_rate"] < 1.0 and r["dirty_evictions"] > 0
  assert all(r.get("ratio_vs_numpy", 1.0) > 0 for r in records)
  assert all(r["fraction_of_seq_bandwidth"] > 0 for r in records[3:])


def test_benchmark_large_case_runs_scaled_down(tmp_path):
  out = tmp_path / "large.jsonl"
  embedding_tier.main(
    ["--quick", "--large", "--log2-rows", "18", "--workdir", str(tmp_path / "w"), "--out", str(out)]
  )
  records = read_jsonl(str(out))
  assert [r["ids"] for r in records] == ["zipf", "uniform"]
  for record in records:
    assert record["rows"] == 2**18 and record["steps"] == 10 and record["flushes"] == 2
    assert 0 < record["disk_after_compact_gib"] <= record["disk_used_gib"]
    assert record["peak_rss_gib"] > 0 and record["max_flush_seconds"] > 0


def test_benchmark_large_case_compares_the_merge_policies(tmp_path):
  """At 2^18 rows each flush of 5 steps (about 20k rows) passes 1/16 of the table, and two
  stay under 1/3: the table's policy merges its segments in the background, the earlier one
  (``inline``) inside the flush; both end with every row in the chunks after ``compact``."""
  out = tmp_path / "large.jsonl"
  embedding_tier.main(
    ["--quick", "--large", "--log2-rows", "18", "--large-ids", "uniform"]
    + ["--large-merge", "inline", "background"]
    + ["--workdir", str(tmp_path / "w"), "--out", str(out)]
  )
  inline, background = read_jsonl(str(out))
  assert (inline["merge"], background["merge"]) == ("inline", "background")
  assert inline["background_merges"] == 0 and not inline["background_merge_running_at_end"]
  assert inline["segment_rows_at_end"] == 0  # every flush merged its rows itself
  assert background["background_merges"] + background["background_merge_running_at_end"] >= 1
  assert background["segment_rows_at_end"] > 0  # the last flush's rows, merged by compact
  assert embedding_tier._table._BACKGROUND_MERGE_FRACTION > 0  # the policy was restored


def test_benchmark_flush_case_flushes_the_same_rows_into_each_layout(tmp_path):
  records = _quick_case(tmp_path, "--flush-compare")
  assert [r["layout"] for r in records] == [name for name, _, _ in embedding_tier.FLUSH_LAYOUTS]
  assert records[0]["btree_node_bytes"] is None  # OCDBT's default: the reference layout
  assert records[0]["speedup_vs_ocdbt_default_nodes"] == [1.0, 1.0]
  for record in records:
    assert record["dirty_rows"] == records[0]["dirty_rows"]
    assert len(record["flush_seconds"]) == 2 and record["disk_used_gib"] > 0
  assert records[2]["chunk_rows"] == 32
  assert not os.listdir(tmp_path / "w")  # every table removed


def test_benchmark_merge_case_merges_the_same_rows_on_each_layout(tmp_path):
  records = _quick_case(tmp_path, "--merge-compare")
  assert [r["layout"] for r in records] == [name for name, _, _ in embedding_tier.MERGE_LAYOUTS]
  assert [r["chunk_rows"] for r in records] == [256, 1024, 4096, 256]
  assert [r["compress"] for r in records] == [True, True, True, False]
  assert records[0]["merge_vs_default"] == [1.0, 1.0] and records[0]["miss_vs_default"] == 1.0
  for record in records:
    # 1/20 of the rows a round, past the 1/64 at which the case has the table start a merge
    # (each round's merge is checked to have run) and under the in-line limit.
    assert record["merged_rows"] == records[0]["merged_rows"]
    assert all(2**16 // 64 < n < 2**16 // 16 for n in record["merged_rows"])
    assert all(t > 0 for t in record["merge_seconds"]) and record["miss_us_per_row"] > 0
    assert record["disk_used_gib"] > 0
  assert not os.listdir(tmp_path / "w")  # every table removed


def test_benchmark_flush_fraction_case_times_a_1pct_and_a_full_flush(tmp_path):
  (record,) = _quick_case(tmp_path, "--flush-fraction")
  assert record["case"] == "flush_fraction" and record["rows"] == 2**16
  assert len(record["flush_1pct_seconds"]) == len(record["flush_100pct_seconds"]) == 1
  assert record["ratio_1pct_to_100pct"] > 0
  assert not os.listdir(tmp_path / "w")  # the table removed


def test_benchmark_zipf_case_on_a_stored_table(tmp_path):
  out = tmp_path / "stored.jsonl"
  args = embedding_tier.parse_args(["--quick", "--out", str(out)])
  os.makedirs(tmp_path / "w")
  embedding_tier.case_zipf_10x(args, str(tmp_path / "w"), stored=True)
  records = read_jsonl(str(out))
  assert [r["case"] for r in records] == ["zipf_table_10x_cache_stored"] * 2
  for r in records:
    assert 0.0 < r["hit_rate"] < 1.0 and r["mib_read"] > 0 and r["ratio_vs_numpy"] > 0
