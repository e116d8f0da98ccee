"""The paper-reproduction experiment end to end on its --quick grid."""

import os

from experiments import reproduce_paper
from experiments.paper import config
from experiments.paper import run
from experiments.paper import summary


def test_reproduce_paper_quick_writes_results_table_and_figures(tmp_path):
  out = tmp_path / "paper"
  table = reproduce_paper.main(["--quick", "--out", str(out)])
  runs = run.read_runs(str(out))
  assert len(runs) == 1 + len(config.QUICK.ks)  # sync Adam + k-step Adam per k, one seed
  by_k = {r["k"]: r for r in runs if r["optimizer"] == "kstep_adam"}
  # inter-node dense traffic falls as 1/k (k divides the step count here up to rounding)
  steps = config.QUICK.steps
  node = {k: r["dense_bytes_by_axis"]["node"] for k, r in by_k.items()}
  assert node[8] == node[1] * (steps // 8) / steps
  assert node[64] == node[1] * (steps // 64) / steps
  assert all(0.55 < r["test_auc"] < r["teacher_auc"] for r in runs)
  assert "sync Adam (DDP)" in table and "| 64 |" in table
  for name in ("paper_auc_vs_k.png", "paper_traffic_vs_k.png", "paper_loss_curves.png"):
    path = out / "figures" / name
    assert path.stat().st_size > 10_000
    os.remove(path)
  # --plot-only rebuilds table and figures from the files, without training
  assert reproduce_paper.main(["--quick", "--out", str(out), "--plot-only"]) == table
  assert (out / "figures" / "paper_auc_vs_k.png").exists()
  rows = summary.summarize(runs)
  assert summary.largest_safe_k(rows, "params") in (None, *config.QUICK.ks)
