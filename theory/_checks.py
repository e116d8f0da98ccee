"""Argument checks shared by the bound functions: one message per kind of mistake."""

from __future__ import annotations

import math


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
  """Raise ValueError unless ``value`` is a finite positive (or, with allow_zero, >= 0) number."""
  ok = value >= 0 if allow_zero else value > 0
  if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
    kind = "non-negative" if allow_zero else "positive"
    raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")


def check_count(name: str, value: int) -> None:
  """Raise ValueError unless ``value`` is a positive int (bools are not counts)."""
  if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
    raise ValueError(f"{name} must be a positive int, got {value!r}")
