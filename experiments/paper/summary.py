"""One row per (optimizer, variant, k) from ``runs.jsonl``, and the largest k that keeps AUC."""

from __future__ import annotations

import math

import numpy as np


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> list[dict]:
  """One row per (optimizer, variant, k): means, stds, paired deltas against k = 1.

  Deltas are paired by seed (same data, same initialization): ``d_auc_vs_k1`` against k-step
  Adam with k = 1 of the same variant, ``d_auc_vs_sync`` against sync Adam. Sync Adam's row
  comes first, then k-step Adam's by variant and k.
  """
  by_key: dict[tuple, dict[int, dict]] = {}
  for r in runs:
    by_key.setdefault((r["optimizer"], r["variant"], r["k"]), {})[r["seed"]] = r
  sync = by_key.get(("sync_adam", "grads", 1), {})
  rows = []
  for (optimizer, variant, k), seeds in sorted(
    by_key.items(), key=lambda x: (x[0][0] != "sync_adam", x[0])
  ):
    ref = by_key.get(("kstep_adam", variant, 1), {}) if optimizer == "kstep_adam" else seeds
    paired = [s for s in seeds if s in ref]
    common_sync = [s for s in seeds if s in sync]
    first = next(iter(seeds.values()))
    comm = first["estimated_comm_seconds_by_kind"]
    row = {
      "optimizer": optimizer,
      "variant": variant,
      "k": k,
      "seeds": len(seeds),
      "auc": _mean_std([r["test_auc"] for r in seeds.values()]),
      "logloss": _mean_std([r["test_logloss"] for r in seeds.values()]),
      "d_auc_vs_k1": _mean_std([seeds[s]["test_auc"] - ref[s]["test_auc"] for s in paired]),
      "d_logloss_vs_k1": _mean_std(
        [seeds[s]["test_logloss"] - ref[s]["test_logloss"] for s in paired]
      ),
      "d_auc_vs_sync": _mean_std([seeds[s]["test_auc"] - sync[s]["test_auc"] for s in common_sync])
      if common_sync
      else (math.nan, 0.0),
      "teacher_auc": float(np.mean([r["teacher_auc"] for r in seeds.values()])),
      "node_bytes": first["dense_bytes_by_axis"].get("node", 0.0),
      "local_bytes": first["dense_bytes_by_axis"].get("local", 0.0),
      "dense_node_seconds": comm.get("dense_node", 0.0),
      "dense_seconds": comm.get("dense_node", 0.0) + comm.get("dense_local", 0.0),
      "sparse_seconds": comm.get("sparse", 0.0),
      "steps": first["steps"],
    }
    rows.append(row)
  return rows


def kstep_rows(rows: list[dict], variant: str) -> list[dict]:
  """The k-step Adam rows of one variant, by increasing k."""
  return sorted(
    (r for r in rows if r["optimizer"] == "kstep_adam" and r["variant"] == variant),
    key=lambda r: r["k"],
  )


def kstep_variants(rows: list[dict]) -> list[str]:
  """The k-step Adam variants present in ``rows``, sorted."""
  return sorted({r["variant"] for r in rows if r["optimizer"] == "kstep_adam"})


def largest_safe_k(rows: list[dict], variant: str, tolerance: float = 0.001) -> int | None:
  """The largest k whose mean AUC is within ``tolerance`` of k = 1's (same variant), such
  that every smaller k is too."""
  best = None
  for r in kstep_rows(rows, variant):
    if r["d_auc_vs_k1"][0] < -tolerance:
      break
    best = r["k"]
  return best
