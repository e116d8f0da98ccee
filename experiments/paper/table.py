"""``table.csv`` (every summary column) and ``table.md`` (docs/paper.md's table) from the rows."""

from __future__ import annotations

import csv
import io
import os

from experiments._common import write_atomic
from experiments.paper.config import PaperConfig

# Columns of table.csv; a (mean, std) column becomes NAME_mean and NAME_std.
CSV_FIELDS = (
  "optimizer",
  "variant",
  "k",
  "seeds",
  "auc",
  "d_auc_vs_k1",
  "d_auc_vs_sync",
  "logloss",
  "d_logloss_vs_k1",
  "node_bytes",
  "local_bytes",
  "dense_seconds",
  "sparse_seconds",
  "teacher_auc",
  "steps",
)


def csv_text(rows: list[dict]) -> str:
  """The rows as CSV, one column per scalar and two (mean, std) per pair."""
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer)
  writer.writerow(
    [
      c
      for name in CSV_FIELDS
      for c in ((name + "_mean", name + "_std") if isinstance(rows[0][name], tuple) else (name,))
    ]
  )
  for row in rows:
    writer.writerow(
      [
        c
        for name in CSV_FIELDS
        for c in (row[name] if isinstance(row[name], tuple) else (row[name],))
      ]
    )
  return buffer.getvalue()


def markdown(rows: list[dict], cfg: PaperConfig) -> str:
  """docs/paper.md's table: AUC, paired deltas, logloss, dense traffic and its time on the link."""
  one_seed = rows[0]["seeds"] == 1  # a std of one value measures no spread: none is shown
  spread = lambda x, d=4: "" if one_seed else f" ± {x[1]:.{d}f}"
  pm = lambda x, d=4: f"{x[0]:+.{d}f}" + spread(x, d)
  lines = [
    f"| dense optimizer | k | AUC ({'1 seed' if one_seed else 'mean ± std'}) | ΔAUC vs k=1 "
    f"| ΔAUC vs sync Adam | logloss "
    f"| Δlogloss vs k=1 | dense inter-node MB | est. dense comm s @ "
    f"{cfg.slow_inter_node_gbps:g} Gbit/s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    name = "sync Adam (DDP)" if r["optimizer"] == "sync_adam" else f"k-step Adam ({r['variant']})"
    lines.append(
      f"| {name} | {r['k']} | {r['auc'][0]:.4f}{spread(r['auc'])} | {pm(r['d_auc_vs_k1'])} "
      f"| {pm(r['d_auc_vs_sync'])} | {r['logloss'][0]:.4f}{spread(r['logloss'])} "
      f"| {pm(r['d_logloss_vs_k1'])} | {r['node_bytes'] / 1e6:.2f} "
      f"| {r['dense_seconds']:.3f} |"
    )
  sparse = rows[0]["sparse_seconds"]
  lines.append("")
  lines.append(
    f"{'1 seed: no spread' if one_seed else str(rows[0]['seeds']) + ' seeds'}, "
    f"{rows[0]['steps']} steps of 8 x {cfg.batch_size} "
    f"examples, 2 nodes x 4 devices; teacher AUC {rows[0]['teacher_auc']:.4f}. "
    f"Bytes are per device over the run. Synchronous sparse traffic, the same in "
    f"every row, adds an estimated {sparse:.2f} s on the same link."
  )
  return "\n".join(lines)


def write_table(rows: list[dict], out_dir: str, cfg: PaperConfig) -> str:
  """Write ``out_dir/table.csv`` and ``out_dir/table.md``; return the markdown."""
  write_atomic(os.path.join(out_dir, "table.csv"), csv_text(rows))
  text = markdown(rows, cfg)
  write_atomic(os.path.join(out_dir, "table.md"), text + "\n")
  return text
