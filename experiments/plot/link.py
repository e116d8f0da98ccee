"""The link experiment's figure: validation AUC against wall-clock seconds on the link, one
panel per link rate (from ``DIR/link/link.json``, written by
:mod:`experiments.link_experiment`)."""

from __future__ import annotations

import json
import os

import numpy as np

from experiments.plot import _style
from experiments.plot._style import plt

LINK_JSON = os.path.join("link", "link.json")


def has_link(out_dir: str) -> bool:
  return os.path.exists(os.path.join(out_dir, LINK_JSON))


def time_to_accuracy(out_dir: str, path: str, title: str) -> str:
  """Mean over seeds of each row's validation AUC against its seconds at each rate (each
  seed's steps at the step times measured on that link; the end-to-end runs that check them
  are in the table)."""
  with open(os.path.join(out_dir, LINK_JSON), encoding="utf-8") as f:
    data = json.load(f)
  rates = [f"{r:g}G" for r in data["rates"]]
  fig, axes = plt.subplots(1, len(rates), figsize=(6.2 * len(rates), 4.4), squeeze=False)
  cmap = plt.get_cmap("tab10")
  for ax, rate in zip(axes[0], rates):
    for i, row in enumerate(data["rows"]):
      curves = list(row["curves"].values())
      key = f"seconds@{rate}"
      if not curves or key not in curves[0]:
        continue
      n = min(len(c["step"]) for c in curves)
      seconds = np.mean([np.asarray(c[key][:n], float) for c in curves], axis=0)
      auc = np.mean([np.asarray(c["val_auc"][:n], float) for c in curves], axis=0)
      color = cmap(i % 10)
      width = 2.2 if row["name"] == data["reference"] else 1.3
      ax.plot(seconds, auc, "-", color=color, lw=width, label=row["label"])
    ax.axhline(data["target"], color="0.4", lw=0.8, ls="--")
    ax.set_xlim(left=0)
    ax.set_ylim(data["target"] - 0.02, data["reference_final_val_auc"] + 0.006)
    ax.set_xlabel("training-step seconds on the link")
    ax.set_ylabel("validation AUC")
    ax.set_title(f"{rate}bit/s link")
    ax.grid(alpha=0.3)
  _style.legend(axes[0][-1], outside=True)
  fig.suptitle(
    f"{title}: validation AUC against time on the link, mean of {len(data['rows'][0]['seeds'])} "
    f"seeds; dashed: the target ({data['reference']}'s final − {data['tolerance']:g}, mean)",
    fontsize=9,
  )
  return _style.save(fig, path)
