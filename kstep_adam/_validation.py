"""Argument checks shared by every layer of the package, each written once.

Every public entry point validates its arguments with these helpers, so a bad value gets the
same kind of message everywhere: ``ValueError`` naming the parameter, what is allowed and what
was given. Bools are never counts, and NumPy scalars count as numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_int_at_least(x: Any, minimum: int) -> bool:
  """Whether ``x`` is a Python or NumPy int (not a bool) with ``x >= minimum``."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x >= minimum


def check_int(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
  """Return ``value`` as an int, or raise ValueError naming ``name`` and the allowed range.

  Examples:
    >>> check_int(3, "k")
    3
    >>> check_int(True, "k")
    Traceback (most recent call last):
    ...
    ValueError: k must be an int >= 1, got True
  """
  allowed = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
  if not is_int_at_least(value, minimum) or (maximum is not None and value > maximum):
    raise ValueError(f"{name} must be {allowed}, got {value!r}")
  return int(value)


def check_float(
  value: Any,
  name: str,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  allow_none: bool = False,
) -> float | None:
  """Return ``value`` as a finite float within the bounds, or raise ValueError naming it.

  Args:
    value: the number to check (a Python or NumPy real scalar; bools are refused).
    name: the parameter's name, used in the message.
    low: smallest allowed value (None: unbounded below).
    high: largest allowed value (None: unbounded above).
    low_open: exclude ``low`` itself.
    high_open: exclude ``high`` itself.
    allow_none: also accept None (returned as is).

  Returns:
    ``float(value)``, or None when ``allow_none`` and ``value`` is None.

  Examples:
    >>> check_float(0.9, "b1", low=0.0, high=1.0, high_open=True)
    0.9
    >>> check_float(1.0, "b1", low=0.0, high=1.0, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: b1 must be a finite number in [0.0, 1.0), got 1.0
  """
  if allow_none and value is None:
    return None
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
    value, (bool, np.bool_)
  )
  x = float(value) if ok else math.nan
  if ok and math.isfinite(x):
    ok = (low is None or (x > low if low_open else x >= low)) and (
      high is None or (x < high if high_open else x <= high)
    )
  else:
    ok = False
  if not ok:
    lo = "(-inf" if low is None else ("(" if low_open else "[") + repr(float(low))
    hi = "inf)" if high is None else repr(float(high)) + (")" if high_open else "]")
    none = "None or " if allow_none else ""
    raise ValueError(f"{name} must be {none}a finite number in {lo}, {hi}, got {value!r}")
  return x


def check_hyperparameter(value: Any, name: str, *, schedule: bool = False, **bounds) -> None:
  """Raise ValueError unless ``value`` is a real scalar within ``bounds`` (see :func:`check_float`).

  Optimizer hyperparameters may arrive as 0-d arrays (``optax.inject_hyperparams`` passes them
  so), checked by value; under ``jit`` they are tracers, whose value is unknown, and pass. With
  ``schedule=True`` a callable passes too: a schedule's values are known only when it is
  called, so they cannot be checked at construction.

  Examples:
    >>> import jax.numpy as jnp
    >>> check_hyperparameter(jnp.float32(0.1), "learning_rate", low=0.0, schedule=True)
    >>> check_hyperparameter(-1.0, "learning_rate", low=0.0, schedule=True)
    Traceback (most recent call last):
    ...
    ValueError: learning_rate must be a finite number in [0.0, inf), got -1.0
  """
  if (schedule and callable(value)) or isinstance(value, jax.core.Tracer):
    return
  if (
    hasattr(value, "dtype")
    and np.ndim(value) == 0
    and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))
  ):
    value = value.item()  # a 0-d NumPy or JAX array
  check_float(value, name, **bounds)


def check_float_dtype(value: Any, name: str) -> jnp.dtype | None:
  """Return ``value`` as a floating ``jnp.dtype`` (None stays None), or raise ValueError.

  Examples:
    >>> check_float_dtype("bfloat16", "mu_dtype")
    dtype(bfloat16)
    >>> check_float_dtype("int32", "mu_dtype")
    Traceback (most recent call last):
    ...
    ValueError: mu_dtype must be None or a floating dtype, got 'int32'
  """
  if value is None:
    return None
  dtype = None
  if not isinstance(value, (jax.Array, np.ndarray)):  # an array is a value, not a dtype
    with contextlib.suppress(TypeError, ValueError):
      dtype = jnp.dtype(value)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    hint = ""
    if isinstance(value, jax.Array):  # a dtype is callable: inject_hyperparams schedules it
      hint = f" (under optax.inject_hyperparams pass static_args=('{name}',))"
    raise ValueError(f"{name} must be None or a floating dtype, got {value!r}{hint}")
  return dtype


def check_choice(value: Any, name: str, allowed: tuple) -> Any:
  """Return ``value`` if it is one of ``allowed``, else raise ValueError listing them."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed!r}, got {value!r}")
  return value


def choice_field(default: str, choices: tuple[str, ...]):
  """A dataclass string field whose allowed values the validation and the command line both
  read (the CTR configurations: ``TrainConfig``, ``DataConfig``)."""
  return dataclasses.field(default=default, metadata={"choices": choices})


def check_choices(config) -> None:
  """Raise ValueError for a dataclass field whose value is not among its ``choices`` metadata.

  Examples:
    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Config:
    ...   mode: str = choice_field("fast", ("fast", "exact"))
    >>> check_choices(Config())
    >>> check_choices(Config(mode="slow"))
    Traceback (most recent call last):
    ValueError: mode must be one of ('fast', 'exact'), got 'slow'
  """
  for field in dataclasses.fields(config):
    if "choices" in field.metadata:
      check_choice(getattr(config, field.name), field.name, tuple(field.metadata["choices"]))
