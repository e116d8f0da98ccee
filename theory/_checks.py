"""Argument checks shared by the bound functions, built on the package's one validation module.

Counts and numbers are checked exactly as everywhere else in the repository
(:mod:`kstep_adam._validation`): bools are never counts or numbers, NumPy scalars are.
"""

from __future__ import annotations

from kstep_adam._validation import check_float
from kstep_adam._validation import check_int


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
  """Return ``value`` as a float, or raise ValueError unless it is finite and > 0 (>= 0).

  Examples:
    >>> check_positive("L", 2)
    2.0
    >>> check_positive("sigma", 0.0, allow_zero=True)
    0.0
    >>> check_positive("L", True)
    Traceback (most recent call last):
    ...
    ValueError: L must be a finite number in (0.0, inf), got True
  """
  return check_float(value, name, low=0.0, low_open=not allow_zero)


def check_count(name: str, value: int) -> int:
  """Return ``value`` as an int, or raise ValueError unless it is an int >= 1 (not a bool).

  Examples:
    >>> check_count("T", 4)
    4
    >>> check_count("T", False)
    Traceback (most recent call last):
    ...
    ValueError: T must be an int >= 1, got False
  """
  return check_int(value, name, minimum=1)


def check_unit_interval(name: str, value: float, *, closed_low: bool, closed_high: bool) -> float:
  """Return ``value`` as a float, or raise ValueError unless it lies in the unit interval.

  Examples:
    >>> check_unit_interval("beta2", 0.999, closed_low=False, closed_high=False)
    0.999
  """
  return check_float(
    value, name, low=0.0, high=1.0, low_open=not closed_low, high_open=not closed_high
  )
