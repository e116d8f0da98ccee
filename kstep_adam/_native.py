"""CPU kernels from C++ sources: compiled on first use, cached on disk, called through XLA's
FFI (inside a program) or ctypes (on the host).

A kernel is a C++ file next to the module that uses it, which keeps the NumPy or XLA form the
kernel replaces for where it cannot run. The first process that needs it compiles it with the
machine's C++ compiler (``$CXX``, else ``c++``) against the FFI headers jaxlib ships, for the
machine's own CPU (``-march=native``), into a cache directory; later processes load the
cached library. The library's name holds a digest of everything that went into it (the
source, the compiler and its version, the flags, jaxlib's version, the CPU's features), so a
changed source or a different CPU compiles anew, and processes racing to build it each write
a temporary file and rename it into place.

Two environment variables, read when a kernel is needed:

- ``KSTEP_ADAM_NATIVE_KERNELS``: unset (the default) uses the kernels where they build and
  falls back to the forms they replace with a warning where they do not (no compiler); ``1``
  requires them (a failed build raises); ``0`` never builds them. A program reads it when it
  is traced, the host's kernels at each call.
- ``KSTEP_ADAM_CACHE_DIR``: where the libraries go (default ``$XDG_CACHE_HOME/kstep_adam``,
  else ``~/.cache/kstep_adam``), in a ``kernels`` subdirectory.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings

SWITCH = "KSTEP_ADAM_NATIVE_KERNELS"
CACHE_DIR = "KSTEP_ADAM_CACHE_DIR"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_BUILD_TIMEOUT = 600  # seconds
_SWITCH_VALUES = {"": "auto", "auto": "auto", "1": "on", "on": "on", "0": "off", "off": "off"}


class NativeBuildError(RuntimeError):
  """A kernel's C++ source did not compile (the compiler's message included)."""


def mode() -> str:
  """``'auto'``, ``'on'`` or ``'off'``: what ``KSTEP_ADAM_NATIVE_KERNELS`` asks for."""
  value = os.environ.get(SWITCH, "").strip().lower()
  if value not in _SWITCH_VALUES:
    raise ValueError(f"{SWITCH}={value!r}: must be 1 (required), 0 (off) or unset (auto)")
  return _SWITCH_VALUES[value]


def cache_dir() -> pathlib.Path:
  """The directory compiled kernels are cached in."""
  if root := os.environ.get(CACHE_DIR):
    return pathlib.Path(root).expanduser() / "kernels"
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base).expanduser() / "kstep_adam" / "kernels"


def compiler() -> list[str]:
  """The C++ compiler a kernel is built with, as a command: ``$CXX`` (which may hold
  arguments, as ``ccache g++``), else the first of c++, g++, clang++."""
  if cxx := os.environ.get("CXX", "").strip():
    return shlex.split(cxx)
  for name in ("c++", "g++", "clang++"):
    if path := shutil.which(name):
      return [path]
  raise NativeBuildError("no C++ compiler: set CXX, or install g++ or clang++")


def _cpu_features() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor()


def build(
  source: str | os.PathLike,
  directory: str | os.PathLike | None = None,
  *,
  extra_flags: tuple[str, ...] = (),
) -> pathlib.Path:
  """Compiles ``source`` (with :data:`FLAGS` and ``extra_flags``) into a shared library in
  ``directory`` (default :func:`cache_dir`), unless a library of the same inputs is there
  already, and returns its path."""
  import jax
  import jaxlib

  source = pathlib.Path(source)
  flags = (*FLAGS, *extra_flags)
  cxx = compiler()
  try:
    version = subprocess.run(
      [*cxx, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()[0]
  except (OSError, subprocess.SubprocessError, IndexError) as e:
    raise NativeBuildError(f"the C++ compiler {shlex.join(cxx)!r} does not run: {e}") from e
  key = "\n".join(
    [
      source.read_text(),
      *cxx,
      version,
      *flags,
      jaxlib.__version__,
      platform.machine(),
      _cpu_features(),
    ]
  )
  directory = pathlib.Path(directory) if directory is not None else cache_dir()
  library = directory / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
  if library.exists():
    return library
  directory.mkdir(parents=True, exist_ok=True)
  fd, partial = tempfile.mkstemp(prefix=f".{library.name}.", dir=directory)
  os.close(fd)
  try:
    command = [*cxx, *flags, "-isystem", jax.ffi.include_dir(), str(source), "-o", partial]
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as e:
      raise NativeBuildError(f"compiling {source} took over {_BUILD_TIMEOUT} s") from e
    if done.returncode != 0:
      raise NativeBuildError(
        f"compiling {source} failed ({shlex.join(command)}):\n{done.stderr.strip()[-2000:]}"
      )
    os.chmod(partial, 0o755)  # mkstemp's 0600: other users of a shared cache read it too
    os.replace(partial, library)  # atomic: a racing process finds a whole library or none
  finally:
    if os.path.exists(partial):
      os.unlink(partial)
  return library


@functools.cache
def _loaded(
  source: pathlib.Path, symbols: tuple[str, ...], extra_flags: tuple[str, ...]
) -> ctypes.CDLL | str:
  """Builds and loads once per process: the library with ``symbols``, or why that failed."""
  try:
    path = build(source, extra_flags=extra_flags)
    library = ctypes.CDLL(str(path))
  except (NativeBuildError, OSError) as e:
    return str(e)
  if missing := [symbol for symbol in symbols if not hasattr(library, symbol)]:
    return f"{path} (built from {source}) lacks the symbols {missing}"
  return library


@functools.cache
def _registered(source: pathlib.Path, symbols: tuple[str, ...]) -> str | None:
  """Loads and registers the FFI handlers once per process: None, or why that failed."""
  import jax

  library = _loaded(source, symbols, ())
  if isinstance(library, str):
    return library
  for symbol in symbols:
    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
  return None


@functools.cache
def _warn(message: str) -> None:
  warnings.warn(
    f"{message}\nUsing the NumPy or XLA form instead; {SWITCH}=0 silences this.",
    RuntimeWarning,
    stacklevel=4,
  )


def _usable(error: str | None) -> bool:
  if error is None:
    return True
  if mode() == "on":
    raise NativeBuildError(error)
  _warn(error)
  return False


def available(source: str | os.PathLike, symbols: tuple[str, ...]) -> bool:
  """Whether the FFI handlers ``symbols`` of ``source`` are registered as CPU targets of the
  same names, building and registering them on the first call of the process. False when
  :func:`mode` is ``'off'``, or when the build failed in ``'auto'`` mode (warned once);
  in ``'on'`` mode a failed build raises :class:`NativeBuildError`."""
  if mode() == "off":
    return False
  return _usable(_registered(pathlib.Path(source), tuple(symbols)))


def library(
  source: str | os.PathLike, symbols: tuple[str, ...], *, extra_flags: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
  """The library built from ``source`` with C functions ``symbols`` (for ctypes), built and
  loaded on the first call of the process; None as :func:`available` returns False."""
  if mode() == "off":
    return None
  loaded = _loaded(pathlib.Path(source), tuple(symbols), tuple(extra_flags))
  error = loaded if isinstance(loaded, str) else None
  return loaded if _usable(error) else None
