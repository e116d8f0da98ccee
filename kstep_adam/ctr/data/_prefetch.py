"""Batches on their way to the trainer: a background reader and the held-out sets."""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import numpy as np

from kstep_adam.ctr.data._records import CTRBatch

_DONE = object()


@dataclasses.dataclass
class IndexedBatch:
  """A global batch of G examples with its keys already hashed to table rows, deduplicated."""

  batch: CTRBatch  # G examples
  row_ids_U: np.ndarray  # int64 [U], the batch's table rows, sorted, each once
  inverse_GxF: np.ndarray  # int32 [G, F], the index into row_ids_U of every key
  position: Any = None  # where the data continues after this batch (JSON), if known


class Prefetcher:
  """Read, hash and deduplicate batches on a background thread, ``depth`` steps ahead.

  Args:
    batches: iterator of global batches, or of ``(batch, position)`` with ``positioned``.
    index_of: ``keys_GxF -> (row_ids_U, inverse_GxF)``, the tier's key hashing and
      deduplication (pure NumPy, thread-safe).
    depth: queue length (how far the reader runs ahead).
    background: False runs everything on the caller's thread (for tests and debugging).
    positioned: the items are ``(batch, position)``; the position is kept in
      ``IndexedBatch.position``.
  """

  def __init__(
    self,
    batches: Iterator[CTRBatch] | Iterator[tuple[CTRBatch, Any]],
    index_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    depth: int = 2,
    background: bool = True,
    positioned: bool = False,
  ):
    self._batches, self._index_of, self._positioned = batches, index_of, positioned
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = None
    if background:
      self._thread = threading.Thread(target=self._run, name="ctr-reader", daemon=True)
      self._thread.start()

  def _index(self, item) -> IndexedBatch:
    batch, position = item if self._positioned else (item, None)
    return IndexedBatch(batch, *self._index_of(batch.keys_BxF), position)

  def _run(self) -> None:
    try:
      for batch in self._batches:
        item = self._index(batch)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
      self._queue.put(_DONE)
    except BaseException as error:  # handed to the consumer, raised there
      self._queue.put(error)

  def get(self) -> IndexedBatch:
    """Return the next prepared batch; raise the reader's error if it failed."""
    if self._thread is None:
      batch = next(self._batches, None)
      if batch is None:
        raise StopIteration("the data source is exhausted")
      return self._index(batch)
    item = self._queue.get()
    if item is _DONE:
      raise StopIteration("the data source is exhausted")
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():
        with contextlib.suppress(queue.Empty):
          self._queue.get(timeout=0.05)
      self._thread.join()


class HeldOutSet:
  """The test batches, read and indexed once per run and kept while they fit in memory.

  Every evaluation iterates it. The first one reads the source and hashes its keys; later
  ones reuse the kept batches, so a synthetic test set is not generated again and a test
  file not parsed again (nor its bad lines counted again). A set larger than ``max_bytes``
  (a held-out day of a click log) is read again at every evaluation instead.

  Args:
    read: ``() -> iterator`` of test batches (the source's ``test_batches``).
    index_of: ``keys_GxF -> (row_ids_U, inverse_GxF)``, as for :class:`Prefetcher`.
    max_bytes: the most host memory the kept batches may take.
  """

  def __init__(
    self,
    read: Callable[[], Iterator[CTRBatch]],
    index_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    max_bytes: int,
  ):
    self._read, self._index_of, self._max_bytes = read, index_of, max_bytes
    self._kept: list[IndexedBatch] | None = None
    self.reads = 0  # passes over the source so far

  def __iter__(self) -> Iterator[IndexedBatch]:
    if self._kept is not None:
      yield from self._kept
      return
    self.reads += 1
    kept, size = [], 0
    for batch in self._read():
      item = IndexedBatch(batch, *self._index_of(batch.keys_BxF))
      if kept is not None:
        size += sum(x.nbytes for x in (*batch, item.row_ids_U, item.inverse_GxF))
        if size <= self._max_bytes:
          kept.append(item)
        else:
          kept = None  # too large to keep: read again next time
      yield item
    self._kept = kept
