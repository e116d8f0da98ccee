"""Hands the memory a flush freed back to the operating system (glibc only).

glibc's malloc gives threads arenas of their own and returns an arena's free memory to the
system only from its top. A flush allocates and frees many MiB in many threads at once
(TensorStore's I/O threads decode and encode chunks; the copy sorts and gathers log
records), so afterwards every arena keeps the largest transient it held, resident but
unused, through the training steps until the next flush. ``malloc_trim(0)`` releases the
free pages of every arena (``madvise``, no copying). The table calls it once at the end
of a flush and of a compaction: after every disk batch it would also lower the flush's own
peak, but then each batch faults its pages back in, which made flushes markedly slower.
The flush's peak depends on the number of arenas instead, which glibc reads from
``MALLOC_ARENA_MAX`` when the process starts (docs/embedding.md's large-table run shows both
effects). Elsewhere (macOS, musl) this is a no-op.
"""

import ctypes


def _find_malloc_trim():
  try:
    malloc_trim = ctypes.CDLL(None).malloc_trim  # the C library already in the process
  except (AttributeError, OSError):
    return None
  malloc_trim.argtypes = [ctypes.c_size_t]
  malloc_trim.restype = ctypes.c_int
  return malloc_trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> bool:
  """Returns the free pages of every malloc arena to the OS; False where unsupported."""
  if _MALLOC_TRIM is None:
    return False
  _MALLOC_TRIM(0)
  return True
