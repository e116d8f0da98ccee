"""Memory freed by disk batches goes back to the OS (glibc ``malloc_trim``), batch by batch."""

import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from kstep_adam import embedding
from kstep_adam.embedding import _malloc
from kstep_adam.embedding import _store
from kstep_adam.embedding import _table

glibc_only = pytest.mark.skipif(_malloc._MALLOC_TRIM is None, reason="needs glibc malloc_trim")


def _rss_anon_bytes() -> int:
  with open("/proc/self/status") as f:
    return int(next(line for line in f if line.startswith("RssAnon:")).split()[1]) << 10


@glibc_only
def test_release_free_memory_returns_a_threads_freed_arena_pages():
  libc = ctypes.CDLL(None)
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  block, count = 64 << 10, 512  # below the mmap threshold: served from the thread's arena
  measured = {}

  def allocate_touch_free_all_but_last():
    # As an I/O thread does: blocks in its own arena, freed, and one still live above them,
    # so free() cannot shrink the arena from its top.
    pointers = [libc.malloc(block) for _ in range(count)]
    for pointer in pointers:
      ctypes.memset(pointer, 1, block)  # resident
    for pointer in pointers[:-1]:
      libc.free(pointer)
    measured["before"] = _rss_anon_bytes()
    assert _malloc.release_free_memory()
    measured["after"] = _rss_anon_bytes()
    libc.free(pointers[-1])

  thread = threading.Thread(target=allocate_touch_free_all_but_last)
  thread.start()
  thread.join()
  # Most of the freed blocks left the resident set (other threads may allocate meanwhile).
  assert measured["before"] - measured["after"] >= block * count // 2


def test_flush_and_compact_release_freed_memory_once_each(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(_malloc, "release_free_memory", lambda: calls.append(1) or True)
  monkeypatch.setattr(_table, "_FLUSH_BATCH_BYTES", 8 * 4 * 13 * 4)  # 4 chunks a batch
  num_rows, dim = 400, 4
  rng = np.random.default_rng(0)
  with embedding.open_table(
    tmp_path / "t",
    num_rows=num_rows,
    dim=dim,
    optimizer=embedding.SparseAdam(learning_rate=0.01),
    host_cache_rows=num_rows,
    chunk_rows=8,
  ) as table:
    table.push(np.arange(num_rows), rng.standard_normal((num_rows, dim)).astype(np.float32))
    writes = []
    write_rows = _store.TableStore.write_rows
    monkeypatch.setattr(
      _store.TableStore, "write_rows", lambda store, *a: writes.append(1) or write_rows(store, *a)
    )
    table.flush()  # 50 chunks in 13 write batches, then one release
    assert len(writes) == 13 and len(calls) == 1
    table.pull(np.arange(num_rows))  # no disk batch: nothing to release
    assert len(calls) == 1
    table.compact()  # its flush commits nothing (nothing changed); the copy: one release
    assert len(calls) == 2


# A fresh interpreter imports the embedding package, then holds 8 threads alive at once,
# each with a block from malloc, and prints how many arenas glibc made (malloc_info's heaps).
_COUNT_ARENAS = """
import ctypes, re, threading
import kstep_adam.embedding
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.open_memstream.restype = ctypes.c_void_p
barrier = threading.Barrier(9)
def hold_a_block():
  libc.malloc(1024)
  barrier.wait()
  barrier.wait()
threads = [threading.Thread(target=hold_a_block) for _ in range(8)]
for thread in threads:
  thread.start()
barrier.wait()
text, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(text), ctypes.byref(size)))
libc.malloc_info(0, stream)
libc.fclose(stream)
barrier.wait()
print(len(re.findall(r"<heap nr=", text.value.decode())))
"""


def _arenas_in_fresh_process(environ: dict) -> int:
  env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
  env.update(environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run(
    [sys.executable, "-c", _COUNT_ARENAS], env=env, capture_output=True, text=True, check=True
  )
  return int(out.stdout.split()[-1])


@glibc_only
def test_importing_the_tier_caps_malloc_arenas_unless_the_user_chose_a_limit():
  # As the user leaves the environment: the package's own cap holds against 8 threads.
  assert _arenas_in_fresh_process({}) <= _malloc.ARENA_MAX
  # A limit the user set stands (glibc reads it at start; the package leaves it alone).
  assert _arenas_in_fresh_process({"MALLOC_ARENA_MAX": "8"}) > _malloc.ARENA_MAX


def test_a_user_set_arena_limit_is_left_alone(monkeypatch):
  monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert not _malloc.user_set_arena_max()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
  assert _malloc.user_set_arena_max() and _malloc.limit_arenas() is None
  monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
  assert _malloc.user_set_arena_max() and _malloc.limit_arenas() is None
