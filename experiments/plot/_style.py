"""How every figure is finished and written: one backend, one DPI, legends that stay readable."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display is ever needed
import matplotlib.pyplot as plt

DPI = 120


def legend(ax, *, outside: bool = False, fontsize: float = 8, **kwargs) -> None:
  """A legend inside the axes, or to their right when ``outside`` (for crowded panels)."""
  if not ax.get_legend_handles_labels()[0]:
    return
  if outside:
    kwargs = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, **kwargs}
  ax.legend(fontsize=fontsize, **kwargs)


def save(fig, path: str) -> str:
  """Lay out, write ``path`` as PNG at :data:`DPI` (legends outside the axes included), close."""
  fig.tight_layout()
  fig.savefig(path, dpi=DPI, bbox_inches="tight" if _has_outside_legend(fig) else None)
  plt.close(fig)
  return path


def _has_outside_legend(fig) -> bool:
  for ax in fig.axes:
    leg = ax.get_legend()
    if leg is not None and leg.get_bbox_to_anchor() is not None:
      anchor = leg.get_bbox_to_anchor().transformed(ax.transAxes.inverted())
      if anchor.x0 > 1.0:
        return True
  return False
