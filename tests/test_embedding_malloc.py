"""Memory freed by disk batches goes back to the OS (glibc ``malloc_trim``), batch by batch."""

import ctypes
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
    table.compact()  # its flush (nothing dirty) and the copy: one release each
    assert len(calls) == 3
