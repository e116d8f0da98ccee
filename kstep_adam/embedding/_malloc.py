"""Hands the memory a flush freed back to the operating system (glibc only).

glibc's malloc gives threads arenas of their own and returns an arena's free memory to the
system only from its top. A flush allocates and frees many MiB in many threads at once
(TensorStore's I/O threads decode and encode chunks; the copy sorts and gathers log
records), so afterwards every arena keeps the largest transient it held, resident but
unused, through the training steps until the next flush. ``malloc_trim(0)`` releases the
free pages of every arena (``madvise``, no copying). The table calls it once at the end
of a flush and of a compaction: after every disk batch it would also lower the flush's own
peak, but then each batch faults its pages back in, which made flushes markedly slower.
The flush's peak depends on the number of arenas instead: glibc's default allows 8 per core
(16 on 2 cores, all of them created by the first jitted JAX call), so ``limit_arenas`` caps
them at ``ARENA_MAX`` with ``mallopt(M_ARENA_MAX)`` when the embedding package is imported, unless the user chose a limit (``MALLOC_ARENA_MAX`` or
``GLIBC_TUNABLES``), which then stands. glibc fixes its arena limit once the process has
more than 8 arenas, so a process that ran threads (a JAX program) before importing
``kstep_adam.embedding`` keeps its arenas; import it first, or set ``MALLOC_ARENA_MAX``.
Elsewhere (macOS, musl) both are no-ops.
"""

import ctypes
import os

# Arenas the table lets glibc create. Two (the main one and one that every other thread
# shares) bounded the 2^28-row run's peak RSS best (3.28 GiB, against 3.38 with four:
# docs/embedding.md), but made XLA's threads, the reader's and the prefetcher's wait on one
# arena's lock: the CTR train step ran 1.06-1.09x faster with four (docs/benchmarks.md).
# glibc's default is 8 per core.
ARENA_MAX = 4
_M_ARENA_MAX = -8  # glibc's <malloc.h>


def _find_malloc_trim():
  try:
    malloc_trim = ctypes.CDLL(None).malloc_trim  # the C library already in the process
  except (AttributeError, OSError):
    return None
  malloc_trim.argtypes = [ctypes.c_size_t]
  malloc_trim.restype = ctypes.c_int
  return malloc_trim


def _find_mallopt():
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (AttributeError, OSError):
    return None
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  return mallopt


_MALLOC_TRIM = _find_malloc_trim()
_MALLOPT = _find_mallopt() if _MALLOC_TRIM is not None else None  # glibc only


def release_free_memory() -> bool:
  """Returns the free pages of every malloc arena to the OS; False where unsupported."""
  if _MALLOC_TRIM is None:
    return False
  _MALLOC_TRIM(0)
  return True


def user_set_arena_max() -> bool:
  """Whether the environment sets glibc's arena limit (then the table leaves it alone)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  return "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in tunables


def limit_arenas() -> int | None:
  """Caps glibc's malloc arenas at ``ARENA_MAX`` (see the module docstring); returns the cap
  applied, or None where the user set one or the C library is not glibc."""
  if _MALLOPT is None or user_set_arena_max():
    return None
  return ARENA_MAX if _MALLOPT(_M_ARENA_MAX, ARENA_MAX) == 1 else None


limit_arenas()  # at import: before a JAX program's threads have made their arenas
