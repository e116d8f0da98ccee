"""The disk tier: a TensorStore zarr3 array of every row's state, in an OCDBT database.

Directory layout of a table at ``path``::

  path/table.json   the static ``TableConfig``, written once (the table is created in a
                    temporary sibling directory that is renamed into place, so a table
                    either exists whole or not at all)
  path/CURRENT      name of the live database directory (absent: ``db``); ``compact``
                    writes a fresh ``db.<n>`` and switches this file atomically
  path/db/          an OCDBT database holding
                      rows/        zarr3 float32 [num_rows, W]: every row's full state
                      seg/<step>.<part>/{ids,rows}  segments: rows changed by recent
                                   flushes, newer than the chunks (sorted int64 ids, and
                                   their float32 rows uncompressed), merged into rows/ in
                                   the background once they hold 1/16 of the table's rows
                                   (by a flush past 1/3), then deleted
                      commit.json  {"step": t, "write": token}: the table step of the
                                   last flush, and a token unique to each write
                    and, since OCDBT is copy-on-write, every earlier version of both:
                    a flush's ``TableVersion`` (database, generation, step) names one
                    and ``TableStore.revert`` brings the table back to it
  path/pending.*    the pending log: rows changed since the last flush, and the redo
                    log that makes a flush atomic (see ``_pending``)
  path/LOCK         flock'ed by the process that has the table open

Chunks are zstd-compressed (level 1) unless the table was created with
``compress=False``: a chunk written for one row is otherwise fill zeros, so compression
keeps the disk footprint near the bytes of written rows, both for the first write and
for each flush's copy-on-write rewrite (and the flushes write fewer bytes). A densely
written table gains nothing from it and pays the (de)compression on every chunk.

Row layout (width ``W = 1 + D + S``): column 0 holds the int32 bits of ``last_step + 1``
(so the zarr fill value 0 reads as "never written", and the row's value is its
deterministic init), columns ``1:1+D`` the parameters, and ``1+D:`` the optimizer slots.

``db/`` changes when a flush copies a committed pending log into it: its rows as segments
(each one transaction; a write costs the rows, not the chunks they fall in), then, past the
limit, the segments' newest rows merged into the chunks in batches of whole chunks (each
batch one transaction, writes grouped by chunk, so each touched chunk is written once per
merge however many of its rows changed) and the segments deleted, then ``commit.json``.
It also changes when a ``SegmentMerge`` merges segments in the background: the same
batches, rows the merged segments already return, then their delete; no read returns
anything else meanwhile. A read of a row takes it from the newest segment holding it, else from
``rows/``. An interrupted copy is redone from the log at the next open, so ``db/``
is read only when it holds exactly one flushed step. OCDBT packs chunks into a few data
files (faster than one file per chunk here), but it is copy-on-write and does not
garbage-collect old versions, so ``db/`` grows by the compressed bytes of the chunks
each flush rewrites; ``EmbeddingTable.compact`` copies the live chunks into a fresh
database and deletes the old one.

The database's index is a B+tree of chunk keys, with nodes of at most
``BTREE_NODE_BYTES`` (decoded). OCDBT's default (80 MiB) makes the whole index of a table
of a million chunks one leaf, which each chunk read of a flush's read-modify-write looks
up and each commit (one per flush batch) decodes, re-encodes, compresses and rewrites
whole; in profiles of a flush of random rows those two took most of its time. With small
nodes a commit rewrites the leaves its batch's keys fall in (a batch is a range of chunk
indices, whose keys mostly neighbour each other), so the work per chunk no longer grows
with the table. The node size is stored in the database: a database keeps the size it
was created with, and ``compact`` writes its new one with this size.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from typing import NamedTuple

import numpy as np
import tensorstore as ts

from kstep_adam.embedding._config import TableConfig
from kstep_adam.embedding._segment_index import SegmentIndex

CONFIG_FILE = "table.json"
CURRENT_FILE = "CURRENT"
# Decoded B+tree node size of new databases (see the module docstring): small enough that a
# commit rewrites little besides the leaves its keys fall in, large enough to keep the
# tree shallow (thousands of chunk keys a leaf).
BTREE_NODE_BYTES = 256 << 10
COMMIT_KEY = b"commit.json"
SEGMENT_PREFIX, SEGMENT_PREFIX_END = b"seg/", b"seg0"  # b"0" sorts right after b"/"


def _segment_name(prefix: bytes) -> tuple[int, int]:
  """``(step, part)`` of a segment's key prefix, ``seg/<step>.<part>/``."""
  step, part = prefix[len(SEGMENT_PREFIX) : -1].split(b".")
  return int(step), int(part)


class TableVersion(NamedTuple):
  """One committed state of a table: what a flush made durable, and how to find it again.

  OCDBT never overwrites: each commit is a new *generation* of the database, and every
  earlier one stays readable, so a flush's version can be restored later (``open_table(...,
  version=)``), e.g. by a trainer whose checkpoint names it. ``compact`` starts a new
  database and drops the history before it.
  """

  step: int  # the table step the flush committed
  database: str  # the database directory it lives in ('db', or 'db.<n>' after compact)
  generation: int  # the OCDBT generation number of that commit


def current_db(path: str) -> str:
  """Name of the live database directory of the table at ``path``."""
  current = os.path.join(path, CURRENT_FILE)
  if not os.path.exists(current):
    return "db"
  with open(current) as f:
    return f.read().strip()


def set_current_db(path: str, name: str) -> None:
  """Switches the live database atomically."""
  replace_file_durably(path, CURRENT_FILE, name)


def replace_file_durably(directory: str, name: str, text: str) -> None:
  """Replaces ``directory/name`` with ``text`` atomically and durably: write a temporary
  file, fsync it, rename it over ``name``, fsync the directory."""
  tmp = os.path.join(directory, name + ".tmp")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, name))
  fsync_dir(directory)


def fsync_dir(directory: str) -> None:
  """Makes the directory's entries (creations, renames, removals) durable."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def remove_stale_dbs(path: str) -> None:
  """Deletes database directories left by an interrupted or finished ``compact``."""
  live = current_db(path)
  for entry in os.listdir(path):
    if (entry == "db" or entry.startswith("db.")) and entry != live:
      shutil.rmtree(os.path.join(path, entry), ignore_errors=True)


def du_bytes(directory: str) -> int:
  """Bytes allocated on disk under ``directory`` (as ``du`` counts them)."""
  return sum(
    os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(directory) for f in files
  )


def encode_last_step(last_step_N: np.ndarray) -> np.ndarray:
  """Column 0 of the row layout: the float32 bit pattern of int32 ``last_step + 1``."""
  return (np.asarray(last_step_N) + 1).astype(np.int32).view(np.float32)


def decode_last_step(rows_NxW: np.ndarray) -> np.ndarray:
  """``last_step`` of each row from column 0 (-1: never written)."""
  return np.ascontiguousarray(rows_NxW[:, 0]).view(np.int32).astype(np.int64) - 1


def _array_spec(kvstore: dict, num_rows: int, width: int, chunk_rows: int, compress: bool) -> dict:
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if compress:
    codecs.append({"name": "zstd", "configuration": {"level": 1}})
  return {
    "driver": "zarr3",
    "kvstore": kvstore,
    "metadata": {
      "shape": [num_rows, width],
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, width]}},
      "data_type": "float32",
      "fill_value": 0.0,
      "codecs": codecs,
    },
    "recheck_cached_data": False,
  }


def read_config(path: str) -> TableConfig:
  """Reads ``table.json``; raises ValueError if ``path`` is not an embedding table."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ValueError(
      f"{path!r} exists but is not an embedding table (no {CONFIG_FILE}); "
      "pass a new or empty directory to create one"
    )
  with open(config_path) as f:
    return TableConfig.from_json(f.read(), source=config_path)


def create(path: str, config: TableConfig, *, btree_node_bytes: int | None = BTREE_NODE_BYTES):
  """Creates an empty table atomically: build in a temporary sibling, then rename.

  ``btree_node_bytes`` is the database's B+tree node size (None: OCDBT's default, which
  only benchmarks of the previous layout ask for).
  """
  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".creating-", dir=parent)
  try:
    # Durable before the rename publishes the table: after a power loss a table either does
    # not exist or has its config (a process kill alone never needed the fsyncs).
    replace_file_durably(tmp, CONFIG_FILE, config.to_json())
    store = TableStore(
      tmp, config, ts_cache_bytes=0, create=True, btree_node_bytes=btree_node_bytes
    )
    store.write_step(0)
    del store
    if os.path.isdir(path):
      os.rmdir(path)  # only an empty directory gets here; see open_table
    os.rename(tmp, path)
    fsync_dir(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


class TableStore:
  """TensorStore handles of one table; all calls take sorted unique row ids."""

  def __init__(
    self,
    path: str,
    config: TableConfig,
    *,
    ts_cache_bytes: int,
    create: bool = False,
    db_name: str | None = None,
    btree_node_bytes: int | None = BTREE_NODE_BYTES,
  ):
    self.db_name = current_db(path) if db_name is None else db_name
    self.db_path = os.path.join(path, self.db_name)
    self._config, self._ts_cache_bytes = config, int(ts_cache_bytes)
    self._row_bytes = config.row_bytes
    self.bytes_read = 0
    self.bytes_written = 0
    db_config = None
    if create and btree_node_bytes is not None:
      # Only at creation: an existing database has its own configuration, and a
      # constraint passed on open would have to match it.
      db_config = {"max_decoded_node_bytes": int(btree_node_bytes)}
    self._open_handles(create=create, db_config=db_config)

  def _open_handles(self, *, create: bool = False, db_config: dict | None = None) -> None:
    """Opens the key-value store and the rows array, with caches of their own.

    The rows array's chunk cache is never rechecked against the database
    (``recheck_cached_data`` is off: this process is the database's only writer, and every
    row write goes through the array). A change made below the array, through the
    key-value store (``revert``), must therefore reopen both, so that no read returns a
    chunk the cache kept from before the change.
    """
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": self._ts_cache_bytes}})
    db = {"driver": "ocdbt", "base": {"driver": "file", "path": self.db_path}}
    if db_config is not None:
      db["config"] = db_config
    self._kv = ts.KvStore.open(db, context=self._context).result()
    config = self._config
    spec = _array_spec(
      dict(db, path="rows/"), config.num_rows, config.width, config.chunk_rows, config.compress
    )
    self._rows = ts.open(spec, create=create, open=not create, context=self._context).result()
    self._load_segments()

  # ------------------------------------------------------------------ segments
  # The index (``SegmentIndex``) keeps each flush's parts as one group, about 1.5 bytes a
  # segment row; a flush appends a group, a merge deletes the oldest ones. A lookup searches
  # one group a flush.
  def _load_segments(self) -> None:
    """Builds the index of the segments in the database (see the module docstring): the
    consecutive parts of one step whose ids ascend form one group, as a flush wrote them."""
    self._index_lock = _SharedLock()  # readers of the index against its changes
    self._index = SegmentIndex()
    with self._io("list segments of"):
      keys = set(self._kv.list(ts.KvStore.KeyRange(SEGMENT_PREFIX, SEGMENT_PREFIX_END)).result())
    previous, last_id = None, -1
    for prefix in sorted({k[: k.rindex(b"/") + 1] for k in keys}):
      if prefix + b"ids" in keys and prefix + b"rows" in keys:
        with self._io("read segment ids of"):
          ids = np.frombuffer(self._kv.read(prefix + b"ids").result().value, np.int64)
        step, part = _segment_name(prefix)
        follows = previous == (step, part - 1) and len(ids) and ids[0] > last_id
        if not follows:
          self._index.seal()  # the group before this one is whole
        self._index.add(prefix, ids, new_group=not follows)
        previous, last_id = (step, part), int(ids[-1]) if len(ids) else last_id
    self._index.seal()

  def segment_records(self) -> int:
    """Rows written into segments since they were last merged (superseded ones included)."""
    with self._index_lock.shared():
      return self._index.records()

  def segment_ids(self) -> np.ndarray:
    """The sorted unique ids that some segment holds."""
    with self._index_lock.shared():
      return self._index.ids()

  def segment_index_bytes(self) -> int:
    """Memory the index of the segments takes."""
    with self._index_lock.shared():
      return self._index.nbytes

  def next_part(self, step: int) -> int:
    """The part number after every segment named with ``step``: a second flush at the same
    step (one that only wrote rows caught up by a pull) must not overwrite the first's."""
    with self._index_lock.shared():
      parts = [part for s, part in map(_segment_name, self._index.names()) if s == step]
    return max(parts) + 1 if parts else 0

  def write_segment(
    self, step: int, part: int, ids_N: np.ndarray, rows_NxW: np.ndarray, *, first: bool
  ) -> None:
    """Writes sorted unique rows as one segment (one OCDBT commit: its ids and rows).
    ``first``: the flush's first part (it starts a group in the index); once a flush has
    written its last, ``seal_segments``."""
    if len(ids_N) == 0:
      return
    prefix = SEGMENT_PREFIX + b"%012d.%06d/" % (step, part)
    ids_N = np.ascontiguousarray(ids_N, np.int64)
    self.bytes_written += len(ids_N) * self._row_bytes
    with self._io("write a segment of"), ts.Transaction() as txn:
      target = self._kv.with_transaction(txn)
      target[prefix + b"ids"] = ids_N.tobytes()
      target[prefix + b"rows"] = np.ascontiguousarray(rows_NxW, np.float32).tobytes()
    with self._index_lock.exclusive():
      self._index.add(prefix, ids_N, new_group=first)

  def seal_segments(self) -> None:
    """Encodes the newest flush's parts as one group of the index (see ``SegmentIndex``)."""
    with self._index_lock.exclusive():
      self._index.seal()

  def _read_segment_rows(self, prefix: bytes, first: int, stop: int) -> np.ndarray:
    """Rows ``first:stop`` of one segment (one ranged read)."""
    row_bytes = self._row_bytes
    with self._io("read a segment of"):
      value = self._kv.read(
        prefix + b"rows", byte_range=slice(first * row_bytes, stop * row_bytes)
      ).result()
    return np.frombuffer(value.value, np.float32).reshape(stop - first, row_bytes // 4)

  def merge_segments(
    self, chunk_rows: int, max_chunks: int, on_batch=lambda: None, newer=()
  ) -> None:
    """Copies the segments' newest rows into the rows array, then deletes the segments.

    ``newer``: pieces ``(ids, read)`` newer than every segment (a flush's pending log), ids
    ascending and unique across pieces, each piece whole chunks, ``read(slice)`` giving the
    rows of ``ids[slice]`` (read one batch at a time, so memory stays one batch's rows); they
    are merged in the same pass, so a flush that merges never writes its own rows as a
    segment first.

    Batches of at most ``max_chunks`` consecutive chunks, each one transaction; each
    segment's rows of a batch are one ranged read (a segment's ids are sorted). Until the
    segments are deleted they stay the newest record of their rows, so a crash anywhere in
    between leaves every read as it was without ``newer``; with it, a chunk may hold a row
    newer than its segment's, and the flush must be redone (as the table does at the next
    open) before the database is read. No background merge may run (``SegmentMerge``).
    """
    groups, done = len(self._index), 0
    for ids, read in newer:
      if not len(ids):
        continue
      end = int(ids[-1]) // chunk_rows + 1
      self._merge_chunks(groups, done, end, chunk_rows, max_chunks, on_batch, (ids, read))
      done = end
    self._merge_chunks(groups, done, self._num_chunks(), chunk_rows, max_chunks, on_batch)
    self.delete_segments(groups)

  def _num_chunks(self) -> int:
    return -(-self._config.num_rows // self._config.chunk_rows)

  def _merge_chunks(
    self,
    groups,
    first_chunk,
    stop_chunk,
    chunk_rows,
    max_chunks,
    on_batch,
    newer=None,
    stop=None,
    may_run=None,
  ) -> bool:
    """Writes chunks ``[first_chunk, stop_chunk)`` in batches of at most ``max_chunks``
    consecutive ones, skipping those with nothing to write: the rows whose newest record is
    in one of the oldest ``groups`` groups of segments (a row a newer group holds is left to
    that one's merge), then ``newer = (ids, read)``'s rows over them. Before each batch it
    waits for ``may_run`` (an Event) to be set; it returns False if ``stop`` is set then (the
    rest is not written)."""
    new_ids, read_new = newer if newer is not None else (np.zeros(0, np.int64), None)
    chunk = first_chunk
    while chunk < stop_chunk:
      low = chunk * chunk_rows  # skip to the next chunk with a row to write
      with self._index_lock.shared():
        nexts = [self._index.first_at_least(low, groups)]
      nexts += [new_ids[i]] if (i := np.searchsorted(new_ids, low)) < len(new_ids) else []
      nexts = [i for i in nexts if i is not None]
      if not nexts:
        break
      chunk = max(chunk, int(min(nexts)) // chunk_rows)
      if chunk >= stop_chunk:
        break
      if may_run is not None:
        may_run.wait()
      if stop is not None and stop.is_set():
        return False
      end = min(chunk + max_chunks, stop_chunk)
      low, high = chunk * chunk_rows, end * chunk_rows
      with self._index_lock.shared():  # only this merge deletes the groups it reads
        ids, group_no, pos = self._index.newest_in(low, high, groups)
        places = []  # for each group: its rows among ids, their parts and rows there
        for no in np.unique(group_no):
          mine = np.flatnonzero(group_no == no)
          places.append((mine, *self._index.where(no, pos[mine])))
      first, last = np.searchsorted(new_ids, [low, high])
      union = np.union1d(ids, new_ids[first:last]) if last > first else ids
      rows = np.empty((len(union), self._row_bytes // 4), np.float32)
      at = np.searchsorted(union, ids)
      for mine, part, offset, names in places:  # one ranged read a segment
        for k in np.unique(part):
          in_part = part == k
          lo, hi = int(offset[in_part][0]), int(offset[in_part][-1]) + 1  # ascending
          rows[at[mine[in_part]]] = self._read_segment_rows(names[k], lo, hi)[offset[in_part] - lo]
      if last > first:
        rows[np.searchsorted(union, new_ids[first:last])] = read_new(slice(first, last))
      self.write_rows(union, rows)
      on_batch()
      chunk = end
    return True

  def delete_segments(self, groups: int | None = None) -> None:
    """Deletes the oldest ``groups`` groups of segments (default: every one) in one commit,
    once their rows are in the chunks, and drops them from the index. Waits for reads that
    may be reading them."""
    with self._index_lock.exclusive():
      names = self._index.names(groups)
      if not names:
        return
      with self._io("delete the segments of"), ts.Transaction() as txn:
        target = self._kv.with_transaction(txn)
        for prefix in names:
          del target[prefix + b"ids"]
          del target[prefix + b"rows"]
      self._index.drop(len(self._index) if groups is None else groups)

  def merge_in_background(
    self, chunk_rows: int, max_chunks: int, on_batch, on_deleted, more=lambda: False
  ):
    """Starts merging the segments there are now into the chunks in a thread of its own
    (``SegmentMerge``), and again after each pass while ``more()``; flushes may write newer
    segments meanwhile."""
    with self._index_lock.shared():
      groups = self._index.sealed_groups()
    merge = SegmentMerge(self, groups, chunk_rows, max_chunks, on_batch, on_deleted, more)
    merge.start()
    return merge

  def committed_step(self) -> int:
    with self._io("read commit.json of"):
      result = self._kv.read(COMMIT_KEY).result()
    if result.state != "value":
      raise ValueError(
        "table database has no commit.json: it was not created by open_table or is damaged"
      )
    return int(json.loads(result.value)["step"])

  def read_rows(self, ids_N: np.ndarray) -> np.ndarray:
    """Gathers committed rows of sorted unique ids: those a segment holds from it (one ranged
    read a row, issued together), the others in one batched read of the rows array."""
    if len(ids_N) == 0:
      return np.zeros((0, self._row_bytes // 4), np.float32)
    self.bytes_read += len(ids_N) * self._row_bytes
    # Shared: a background merge deletes the segments it merged only after the reads that
    # may be reading them are done.
    with self._index_lock.shared():
      group_no, pos = self._index.lookup(ids_N)
      in_segment = group_no >= 0
      if not in_segment.any():
        with self._io("read rows of"):
          return self._rows[ids_N].read().result()
      rows = np.empty((len(ids_N), self._row_bytes // 4), np.float32)
      with self._io("read rows of"):
        if not in_segment.all():
          rows[~in_segment] = self._rows[ids_N[~in_segment]].read().result()
        row_bytes, reads = self._row_bytes, []
        for no in np.unique(group_no[in_segment]):
          mine = np.flatnonzero(group_no == no)
          part, offset, names = self._index.where(no, pos[mine])
          reads += [
            (
              at,
              self._kv.read(
                names[k] + b"rows", byte_range=slice(o * row_bytes, (o + 1) * row_bytes)
              ),
            )
            for at, k, o in zip(mine, part.tolist(), offset.tolist())
          ]
        for at, read in reads:
          rows[at] = np.frombuffer(read.result().value, np.float32)
      return rows

  def write_rows(self, ids_N: np.ndarray, rows_NxW: np.ndarray) -> None:
    """Scatters rows in one transaction, so each touched chunk is written once."""
    if len(ids_N) == 0:
      return
    self.bytes_written += len(ids_N) * self._row_bytes
    with self._io("write rows of"), ts.Transaction() as txn:
      self._rows.with_transaction(txn)[ids_N] = rows_NxW

  def write_step(self, step: int) -> None:
    """Writes ``commit.json``: the step, and a token unique to this write, by which
    ``only_merged_since`` tells whether it was written again since a version."""
    record = {"step": int(step), "write": os.urandom(8).hex()}
    with self._io("write commit.json of"):
      self._kv[COMMIT_KEY] = json.dumps(record).encode()

  def generation(self) -> int:
    """The OCDBT generation number of the database's latest commit."""
    with self._io("read the manifest of"):
      base = ts.KvStore.open({"driver": "file", "path": self.db_path}).result()
      return int(ts.ocdbt.dump(base).result()["versions"][-1]["generation_number"])

  def version(self) -> TableVersion:
    """The committed state now: its step, this database and its latest generation."""
    return TableVersion(self.committed_step(), self.db_name, self.generation())

  def _open_version(self, version: TableVersion) -> ts.KvStore:
    """The database as ``version`` left it (read-only: OCDBT keeps every generation)."""
    spec = {
      "driver": "ocdbt",
      "base": {"driver": "file", "path": self.db_path},
      "version": int(version.generation),
    }
    return ts.KvStore.open(spec, context=self._context).result()

  def only_merged_since(self, version: TableVersion) -> bool:
    """Whether at most background merges committed since ``version``: every flush and
    revert writes ``commit.json``, a merge never does, and it changes no row a read
    returns (``SegmentMerge``). So the table is still exactly that version."""
    if version.database != self.db_name:
      return False
    with self._io("read the history of"):
      then = self._open_version(version)
      reads = [kv.read(COMMIT_KEY) for kv in (then, self._kv)]
      then_value, now_value = (read.result().value for read in reads)
    # Each write of commit.json is unique (its "write" token): OCDBT gives a small value the
    # same storage generation when it is rewritten with the same bytes, so compare bytes.
    return b'"write"' in then_value and then_value == now_value

  def revert(self, version: TableVersion) -> None:
    """Makes the live database equal to an earlier ``version`` of it, as new commits.

    Only the keys whose value differs between that generation and now are rewritten (their
    storage generations say which may, without reading the values); ``commit.json`` goes
    last, so an interrupted revert still reads as the later step and is simply done again.
    The versions in between stay in the history. The handles are reopened afterwards (see
    ``_open_handles``): reads then see the reverted chunks, never cached later ones.
    """
    if version.database != self.db_name:
      raise ValueError(
        f"cannot revert the table to {version}: it lives in database {self.db_name!r} now "
        f"(compacted since), whose history starts later"
      )
    with self._io("revert"):
      then = self._open_version(version)
      keys_then = set(then.list().result()) - {COMMIT_KEY}
      keys_now = set(self._kv.list().result()) - {COMMIT_KEY}
      common = sorted(keys_then & keys_now)
      stamp = lambda kv, key: kv.read(key, byte_range=slice(0, 0))
      stamps = [(stamp(then, k), stamp(self._kv, k)) for k in common]
      changed = [
        k
        for k, (a, b) in zip(common, stamps)
        if a.result().stamp.generation != b.result().stamp.generation
      ]
      candidates = sorted(keys_then - keys_now) + changed
      restore = []
      for lo in range(0, len(candidates), 256):  # bounded memory: a batch of chunks at a time
        keys = candidates[lo : lo + 256]
        reads = [(then.read(k), self._kv.read(k)) for k in keys]
        values = {k: (a.result(), b.result()) for k, (a, b) in zip(keys, reads)}
        # A value rewritten with the same bytes (an earlier revert) has a new generation.
        keys = [k for k, (a, b) in values.items() if b.state != "value" or a.value != b.value]
        restore += keys
        if keys:
          with ts.Transaction() as txn:
            target = self._kv.with_transaction(txn)
            for key in keys:
              target[key] = values[key][0].value
      stale = sorted(keys_now - keys_then)
      if stale:
        with ts.Transaction() as txn:
          target = self._kv.with_transaction(txn)
          for key in stale:
            del target[key]
    if restore or stale or self.committed_step() != version.step:
      self.write_step(version.step)
    # The chunks changed below the rows array: its cache (and the database's) may hold
    # rows of the later version, e.g. those a redone flush just wrote through it.
    self._open_handles()

  def stored_chunks(self) -> np.ndarray:
    """Indices (along rows) of the chunks that exist on disk, sorted."""
    with self._io("list chunks of"):
      keys = self._kv.list(ts.KvStore.KeyRange(b"rows/c/", b"rows/c0")).result()
    return np.sort(np.array([int(k.split(b"/")[2]) for k in keys], np.int64))

  @contextlib.contextmanager
  def _io(self, what: str):
    """Re-raises TensorStore's I/O failures as ``OSError`` (with the errno when it names
    one): TensorStore reports them as ``ValueError``, which here means a bad argument."""
    try:
      yield
    except ValueError as e:
      code = re.search(r"os_error_code='?(\d+)", str(e))
      message = f"TensorStore failed to {what} {self.db_path!r}: {e}"
      if code:
        raise OSError(int(code.group(1)), message) from e
      raise OSError(message) from e


class _SharedLock:
  """Many readers or one writer; a waiting writer holds off new readers."""

  def __init__(self):
    self._cond = threading.Condition()
    self._readers = 0
    self._writing = False

  @contextlib.contextmanager
  def shared(self):
    with self._cond:
      self._cond.wait_for(lambda: not self._writing)
      self._readers += 1
    try:
      yield
    finally:
      with self._cond:
        self._readers -= 1
        self._cond.notify_all()

  @contextlib.contextmanager
  def exclusive(self):
    with self._cond:
      self._cond.wait_for(lambda: not self._writing)
      self._writing = True
      self._cond.wait_for(lambda: self._readers == 0)
    try:
      yield
    finally:
      with self._cond:
        self._writing = False
        self._cond.notify_all()


class SegmentMerge(threading.Thread):
  """Merges given segments into the chunks, then deletes them, beside training.

  It writes into each chunk the rows those segments hold newest (batches of consecutive
  chunks, one transaction each), so a chunk receives exactly the value a read already
  returns: until the delete, those segments stay in the index and win over the chunk, and
  rows a later flush wrote are read from that flush's newer segments (and left to a later
  merge). A kill anywhere in between therefore leaves every read as it was, and the
  segments are merged again later. The caller keeps every other writer of the chunks away
  while it runs (a flush that must merge in line, ``compact``, ``revert``) by ``finish``ing
  it; a flush may write newer segments meanwhile, and ``pause``s it for that long (so their
  transients do not add up, nor their work on the CPU). It holds no copy of the index:
  memory is one batch of rows.
  """

  def __init__(self, store, groups, chunk_rows, max_chunks, on_batch, on_deleted, more):
    super().__init__(name="embedding-segment-merge", daemon=True)
    self._store, self._groups = store, groups
    self._chunk_rows, self._max_chunks = chunk_rows, max_chunks
    self._on_batch, self._on_deleted, self._more = on_batch, on_deleted, more
    self._stop_event = threading.Event()
    self._may_run = threading.Event()
    self._may_run.set()
    self.error: BaseException | None = None
    self.records = store._index.records(groups)  # rows of the passes begun
    self.passes = 0  # passes done
    self.seconds = 0.0  # their time

  def run(self) -> None:
    store = self._store
    try:
      while self._groups:  # none: every group's flush is still writing (none yet sealed)
        start = time.perf_counter()
        done = store._merge_chunks(
          self._groups,
          0,
          store._num_chunks(),
          self._chunk_rows,
          self._max_chunks,
          self._on_batch,
          stop=self._stop_event,
          may_run=self._may_run,
        )
        if not done:
          return
        store.delete_segments(self._groups)
        self.passes += 1
        self.seconds += time.perf_counter() - start
        self._on_deleted()
        # Another pass over what the flushes wrote meanwhile, if ``more()``: the segments
        # pile up less than if the next flush started it. Only groups whose flush is done
        # (sealed), and not while a flush runs (it pauses the merge).
        self._may_run.wait()
        if self._stop_event.is_set() or not self._more():
          return
        with store._index_lock.shared():
          self._groups = store._index.sealed_groups()
          self.records += store._index.records(self._groups)
    except BaseException as e:  # kept for whoever finishes the merge
      self.error = e

  def pause(self) -> None:
    """Holds the merge before its next batch (a batch under way completes) until
    ``resume`` or ``finish``."""
    self._may_run.clear()

  def resume(self) -> None:
    self._may_run.set()

  def finish(self, *, stop: bool = False) -> BaseException | None:
    """Waits for the merge (resumed if paused; asked to stop between batches, with
    ``stop``) and returns its error, if any. A stopped merge leaves its segments for a later
    one."""
    if stop:
      self._stop_event.set()
    self._may_run.set()
    self.join()
    return self.error
