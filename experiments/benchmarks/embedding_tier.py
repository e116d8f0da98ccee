"""Benchmark of the tiered embedding table against a plain in-RAM NumPy table.

Command (default; runtimes and measured ratios are in docs/embedding.md, with these commands):
  .venv/bin/python -m experiments.benchmarks.embedding_tier
Smoke run (seconds):          ... -m experiments.benchmarks.embedding_tier --quick
With a warm table too (every row on disk before the Zipf case): ... --zipf-stored
Flush cost against the rows changed (1% of the cache's rows dirty against all of them):
  .venv/bin/python -m experiments.benchmarks.embedding_tier --flush-fraction --log2-rows 22 \
    --flush-rows 262144 --repeats 2
A background merge and a miss on each chunk layout (chunk size and compression):
  .venv/bin/python -m experiments.benchmarks.embedding_tier --merge-compare --log2-rows 22
Large table (NOT for CI: 2^28 rows of 16 floats and their Adam slots take tens of GiB of disk):
  .venv/bin/python -m experiments.benchmarks.embedding_tier --large --log2-rows 28
  (its flushes with the background merge against the merge inside the flush, in turn:
   ... --large-ids uniform --large-merge inline background --large-steps 300 --flush-every 150)
  (a scaled-down check of the same code path:
   --large --log2-rows 22 --large-steps 100 --flush-every 25 --batch 20000
   --large-cache-mib 128)

The baseline ``NumpyTable`` holds params, optimizer slots and last steps in RAM and runs
the same ``_optimizers`` math on gathered rows (np.unique + gather + update + scatter),
so it stands in for the memory-bandwidth limit of one host. Every ratio below comes from
one process, measured back to back, so it stays meaningful on a shared machine.
Results are printed and appended as JSON lines to ``--out``.
"""

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from experiments._common import dumps
from kstep_adam import embedding
from kstep_adam.embedding import _malloc
from kstep_adam.embedding import _store
from kstep_adam.embedding import _table

# The large case's merge policies: how a flush's segments reach the chunks. "background" is
# the table's own; "inline" is the policy before background merges (the flush past 1/64 of
# the table's rows merges them itself, and nothing merges between flushes), kept to compare.
MERGE_POLICIES = {
  "background": (_table._BACKGROUND_MERGE_FRACTION, _table._SEGMENT_FRACTION),
  "inline": (0, 64),
}


class NumpyTable:
  """The in-RAM baseline: whole table as NumPy arrays, same optimizer math."""

  def __init__(self, num_rows: int, dim: int, optimizer, seed: int = 0):
    self.dim, self.optimizer, self.step = dim, optimizer, 0
    self.params = embedding.init_rows(np.arange(num_rows), dim, seed=seed, scale=dim**-0.5)
    self.slots = optimizer.init_slots(num_rows, dim)
    self.last_step = np.full(num_rows, -1, np.int64)

  def working_set(self, ids):
    unique, inverse = np.unique(ids, return_inverse=True)
    p, s = self.params[unique], self.slots[unique]
    self.optimizer.catch_up(p, s, self.last_step[unique], self.step)
    self.params[unique], self.slots[unique] = p, s
    self.last_step[unique] = np.where(self.last_step[unique] >= 0, self.step, -1)
    return unique, p, inverse

  def push(self, unique, grads_UxD):
    p, s = self.params[unique], self.slots[unique]
    self.optimizer.catch_up(p, s, self.last_step[unique], self.step)
    self.step += 1
    self.optimizer.apply(p, s, grads_UxD, self.step)
    self.params[unique], self.slots[unique] = p, s
    self.last_step[unique] = self.step


def make_optimizer(name: str):
  if name == "adagrad":
    return embedding.RowwiseAdagrad(learning_rate=0.05)
  return embedding.SparseAdam(learning_rate=1e-3, mode=name)


def zipf_ids(rng, num_rows: int, n: int, a: float, perm) -> np.ndarray:
  """Zipf(a) ranks folded into [0, num_rows), scattered by a fixed permutation."""
  ranks = (rng.zipf(a, n) - 1) % num_rows
  return perm[ranks]


def run_steps(table, batches, prefetch: bool) -> float:
  """pull (working set) + push for each batch; returns seconds."""
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  future = None
  for i, ids in enumerate(batches):
    if future is not None:
      future.result()
    if prefetch and i + 1 < len(batches):
      future = table.prefetch(batches[i + 1])
    if isinstance(table, NumpyTable):
      unique, rows, _ = table.working_set(ids)
    else:
      ws = table.working_set(ids)
      unique, rows = ws.unique_ids, ws.rows
    grads = rng.standard_normal(rows.shape).astype(np.float32) * 0.01
    table.push(unique, grads)
  return time.perf_counter() - start


def hit_rate(before: dict, after: dict) -> float:
  hits = after["hits"] - before["hits"]
  return hits / max(1, hits + after["misses"] - before["misses"])


def unique_rows(batches) -> int:
  return sum(len(np.unique(b)) for b in batches)


def sequential_read_bandwidth(directory: str, size_bytes: int) -> float:
  """Bytes/s of a sequential read of a fresh file, evicted from the page cache first."""
  path = os.path.join(directory, "seq.bin")
  block = np.random.default_rng(0).integers(0, 255, 1 << 24, dtype=np.uint8).tobytes()
  with open(path, "wb") as f:
    for _ in range(size_bytes // len(block)):
      f.write(block)
    f.flush()
    os.fsync(f.fileno())
  _drop_page_cache(path)
  start = time.perf_counter()
  with open(path, "rb", buffering=0) as f:
    while f.read(1 << 24):
      pass
  seconds = time.perf_counter() - start
  os.remove(path)
  return size_bytes // len(block) * len(block) / seconds


def _drop_page_cache(root: str) -> None:
  paths = (
    [root]
    if os.path.isfile(root)
    else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  )
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def _storage_read_bytes() -> int:
  """Bytes this process fetched from the storage layer (Linux /proc/self/io)."""
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def emit(out, record: dict) -> None:
  line = dumps(record)
  print(line, flush=True)
  if out:
    with open(out, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def case_fits_in_cache(args, workdir):
  num_rows, dim = args.rows, args.dim
  rng = np.random.default_rng(1)
  batches = [rng.integers(0, num_rows, args.batch) for _ in range(args.steps)]
  opt = make_optimizer(args.optimizer)
  base = NumpyTable(num_rows, dim, opt)
  table = embedding.open_table(
    os.path.join(workdir, "fits"),
    num_rows=num_rows,
    dim=dim,
    optimizer=opt,
    host_cache_rows=num_rows,
  )
  table.pull(np.arange(num_rows))  # warm: the whole working set resident
  run_steps(base, batches[:2], prefetch=False)
  run_steps(table, batches[:2], prefetch=False)
  before = table.stats()
  t_base, t_table = [], []
  for _ in range(args.repeats):  # interleaved, best of each: the machine is shared
    t_base.append(run_steps(base, batches, prefetch=False))
    t_table.append(run_steps(table, batches, prefetch=False))
  n = unique_rows(batches)
  emit(
    args.out,
    dict(
      case="fits_in_host_cache",
      optimizer=args.optimizer,
      rows=num_rows,
      dim=dim,
      batch_ids=args.batch,
      steps=args.steps,
      repeats=args.repeats,
      numpy_unique_rows_per_s=n / min(t_base),
      table_unique_rows_per_s=n / min(t_table),
      ratio_vs_numpy=min(t_base) / min(t_table),
      hit_rate=hit_rate(before, table.stats()),
    ),
  )
  table.close()


def write_every_row(table, num_rows: int, dim: int) -> None:
  """One zero-gradient push of every row, in blocks: each row then has a last step (and,
  for the tier, a stored row once flushed), its parameters unchanged."""
  for lo in range(0, num_rows, 1 << 16):
    ids = np.arange(lo, min(lo + (1 << 16), num_rows))
    table.push(ids, np.zeros((len(ids), dim), np.float32))


def case_zipf_10x(args, workdir, stored: bool = False):
  """Zipf ids over a table ten times its host cache. The tables start empty (most misses
  are first touches, with no disk read), or with ``stored`` every row written and flushed
  beforehand and the table reopened, so every miss reads the zarr table or the pending
  log (the NumPy table gets the same pushes)."""
  cache_rows, dim = args.rows // 10, args.dim
  num_rows = args.rows
  rng = np.random.default_rng(2)
  perm = rng.permutation(num_rows)
  batches = [zipf_ids(rng, num_rows, args.batch, args.zipf_a, perm) for _ in range(args.steps)]
  opt = make_optimizer(args.optimizer)
  times = {"numpy": [], False: [], True: []}
  results = {}
  source = os.path.join(workdir, "zipf_stored")
  if stored:
    with embedding.open_table(
      source, num_rows=num_rows, dim=dim, optimizer=opt, host_cache_rows=cache_rows
    ) as table:
      write_every_row(table, num_rows, dim)
  for repeat in range(args.repeats):  # fresh tables each time, best time of each kind
    base = NumpyTable(num_rows, dim, opt)
    if stored:
      write_every_row(base, num_rows, dim)
    times["numpy"].append(run_steps(base, batches, prefetch=False))
    for prefetch in (False, True):
      path = os.path.join(workdir, f"zipf{int(prefetch)}_{repeat}")
      if stored:
        shutil.copytree(source, path)
        table = embedding.open_table(path, optimizer=opt, host_cache_rows=cache_rows)
      else:
        table = embedding.open_table(
          path, num_rows=num_rows, dim=dim, optimizer=opt, host_cache_rows=cache_rows
        )
      times[prefetch].append(run_steps(table, batches, prefetch=prefetch))
      flush_start = time.perf_counter()
      table.flush()
      results[prefetch] = (time.perf_counter() - flush_start, table.stats())
      table.close()
      shutil.rmtree(path)
  shutil.rmtree(source, ignore_errors=True)
  n, t_base = unique_rows(batches), min(times["numpy"])
  for prefetch, (t_flush, stats) in results.items():
    t = min(times[prefetch])
    emit(
      args.out,
      dict(
        case="zipf_table_10x_cache_stored" if stored else "zipf_table_10x_cache",
        optimizer=args.optimizer,
        prefetch_next_batch=prefetch,
        rows=num_rows,
        host_cache_rows=cache_rows,
        zipf_a=args.zipf_a,
        batch_ids=args.batch,
        steps=args.steps,
        repeats=args.repeats,
        numpy_unique_rows_per_s=n / t_base,
        table_unique_rows_per_s=n / t,
        ratio_vs_numpy=t_base / t,
        hit_rate=stats["hit_rate"],
        prefetched_rows=stats["prefetched_rows"],
        evictions=stats["evictions"],
        dirty_evictions=stats["dirty_evictions"],
        flush_s=t_flush,
        mib_read=stats["bytes_read"] / 2**20,
        mib_written=stats["bytes_written"] / 2**20,
      ),
    )


def case_disk_bandwidth(args, workdir, seq: float, compress: bool):
  num_rows, dim = args.rows, args.dim
  path = os.path.join(workdir, f"cold{int(compress)}")
  opt = make_optimizer(args.optimizer)
  with embedding.open_table(
    path, num_rows=num_rows, dim=dim, optimizer=opt, host_cache_rows=num_rows, compress=compress
  ) as table:
    rng = np.random.default_rng(3)
    for lo in range(0, num_rows, 1 << 16):  # write every row once (incompressible)
      ids = np.arange(lo, min(lo + (1 << 16), num_rows))
      table.push(ids, rng.standard_normal((len(ids), dim)).astype(np.float32))
    chunk_rows, width = table.config.chunk_rows, table.config.width
  ids = np.unique(rng.integers(0, num_rows, args.batch))
  best = None
  for _ in range(args.repeats):  # best of repeats, each from a cold page cache
    _drop_page_cache(path)
    with embedding.open_table(path, host_cache_rows=len(ids), ts_cache_bytes=0) as table:
      io_before, start = _storage_read_bytes(), time.perf_counter()
      table.prefetch(ids).result()
      seconds, disk_bytes = time.perf_counter() - start, _storage_read_bytes() - io_before
    if best is None or seconds < best[0]:
      best = (seconds, disk_bytes)
  seconds, disk_bytes = best
  emit(
    args.out,
    dict(
      case="cold_random_gather_vs_sequential_read",
      rows=num_rows,
      compress=compress,
      unique_ids=len(ids),
      chunk_rows=chunk_rows,
      chunks_touched=len(np.unique(ids // chunk_rows)),
      seq_read_mib_per_s=seq / 2**20,
      useful_row_mib_per_s=len(ids) * width * 4 / seconds / 2**20,
      disk_read_mib_per_s=disk_bytes / seconds / 2**20,
      fraction_of_seq_bandwidth=disk_bytes / seconds / seq,
    ),
  )


def _reset_peak_rss() -> None:
  """Starts a new peak-RSS window for ``_peak_rss_bytes`` (Linux ``clear_refs``; elsewhere
  the peak stays the process's)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _peak_rss_bytes() -> int:
  """Peak resident set since ``_reset_peak_rss`` (``VmHWM``), else since the process began."""
  try:
    with open("/proc/self/status") as f:
      return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) << 10
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def large_ids(rng, kind: str, num_rows: int, n: int, zipf_a: float) -> np.ndarray:
  """A batch of ``n`` ids: Zipf(a) ranks hashed to rows (hot rows scattered over the table
  without a ``num_rows`` permutation in RAM), or uniform over all rows."""
  if kind == "uniform":
    return rng.integers(0, num_rows, n)
  return embedding.hash_keys_to_rows(rng.zipf(zipf_a, n) - 1, num_rows, salt=12345)


def case_large(args, workdir, ids_kind: str, merge: str = "background"):
  saved = _table._BACKGROUND_MERGE_FRACTION, _table._SEGMENT_FRACTION
  _table._BACKGROUND_MERGE_FRACTION, _table._SEGMENT_FRACTION = MERGE_POLICIES[merge]
  try:
    _case_large(args, workdir, ids_kind, merge)
  finally:
    _table._BACKGROUND_MERGE_FRACTION, _table._SEGMENT_FRACTION = saved


def _case_large(args, workdir, ids_kind: str, merge: str):
  num_rows, dim = 1 << args.log2_rows, 16
  opt = make_optimizer(args.optimizer)
  path = os.path.join(workdir, f"large_{ids_kind}")
  _reset_peak_rss()
  table = embedding.open_table(
    path,
    num_rows=num_rows,
    dim=dim,
    optimizer=opt,
    host_cache_bytes=args.large_cache_mib << 20,
    chunk_rows=args.large_chunk_rows,
  )
  rng = np.random.default_rng(4)
  # The peak RSS of each phase (the steps up to a flush, the flush, the compaction): the
  # window restarts at each phase, and the run's peak is the largest.
  phase_peaks = []

  def end_phase(name):
    phase_peaks.append((name, _peak_rss_bytes() / 2**30))
    _reset_peak_rss()

  n_unique, start, future, flush_seconds, flush_ends = 0, time.perf_counter(), None, [], []
  max_pending_bytes = max_segment_rows = max_index_bytes = 0
  next_ids = large_ids(rng, ids_kind, num_rows, args.batch, args.zipf_a)
  for step in range(args.large_steps):
    ids = next_ids
    next_ids = large_ids(rng, ids_kind, num_rows, args.batch, args.zipf_a)
    if future is not None:
      future.result()
    future = table.prefetch(next_ids)
    ws = table.working_set(ids)
    n_unique += len(ws.unique_ids)
    table.push(ws.unique_ids, rng.standard_normal(ws.rows.shape).astype(np.float32) * 0.01)
    if (step + 1) % args.flush_every == 0 or step + 1 == args.large_steps:
      max_pending_bytes = max(max_pending_bytes, table.stats()["pending_bytes"])
      future.result()
      end_phase(f"steps to {step + 1}")
      flush_start = time.perf_counter()
      table.flush()
      flush_seconds.append(time.perf_counter() - flush_start)
      flush_ends.append(time.perf_counter() - start)
      end_phase(f"flush at {step + 1}")
      merges = table.stats()
      max_segment_rows = max(max_segment_rows, merges["segment_rows"])
      max_index_bytes = max(max_index_bytes, merges["segment_index_bytes"])
      if args.verbose:
        elapsed = time.perf_counter() - start
        print(
          f"{ids_kind} step {step + 1}: flush {flush_seconds[-1]:.1f} s, "
          f"{merges['segment_rows']} segment rows "
          f"(index {merges['segment_index_bytes'] / 2**20:.0f} MiB), "
          f"{merges['background_merges']} background merges done "
          f"({merges['background_merge_seconds']:.0f} s), "
          f"{merges['flush_merge_waits']} flush waits "
          f"({merges['flush_merge_wait_seconds']:.0f} s), "
          f"{merges['inline_merges']} in-line merges, "
          f"{n_unique / elapsed:.0f} unique rows/s so far, "
          f"peak RSS {max(peak for _, peak in phase_peaks):.2f} GiB "
          f"(steps {phase_peaks[-2][1]:.2f}, flush {phase_peaks[-1][1]:.2f}), "
          f"pending log {max_pending_bytes / 2**30:.2f} GiB",
          flush=True,
        )
  seconds = time.perf_counter() - start
  stats = table.stats()
  # How long a merge the last flushes started still ran once the steps were done.
  tail_start = time.perf_counter()
  while table.stats()["background_merge_running"]:
    time.sleep(0.2)
  merge_tail_seconds = time.perf_counter() - tail_start
  disk_bytes = _store.du_bytes(path)
  # The merge has ended (above), so compact's time is its in-line merge of the segments
  # left and its copy.
  compact_start = time.perf_counter()
  sizes = table.compact()
  compact_seconds = time.perf_counter() - compact_start
  end_phase("compact")
  table.close()
  emit(
    args.out,
    dict(
      case="large",
      ids=ids_kind,
      merge=merge,
      rows=num_rows,
      dim=dim,
      optimizer=args.optimizer,
      host_cache_rows=table.host_cache_rows,
      chunk_rows=table.config.chunk_rows,
      steps=args.large_steps,
      batch_ids=args.batch,
      unique_rows_per_s=n_unique / seconds,
      unique_rows_per_s_between_flushes=n_unique / (seconds - sum(flush_seconds)),
      seconds=seconds,
      flushes=len(flush_seconds),
      flush_seconds=sum(flush_seconds),
      max_flush_seconds=max(flush_seconds),
      each_flush_seconds=flush_seconds,
      flush_end_seconds=flush_ends,  # since the first step
      # Merges of segments into the chunks that ran beside the steps (their time overlaps
      # the steps'), and the segment rows left when the steps ended.
      background_merges=stats["background_merges"],
      background_merge_seconds=stats["background_merge_seconds"],
      background_merge_running_at_end=stats["background_merge_running"],
      segment_rows_at_end=stats["segment_rows"],
      max_segment_rows=max_segment_rows,
      max_segment_index_mib=max_index_bytes / 2**20,
      # Flushes past the segment limit: those that waited for a background merge, and
      # those that then merged the segments themselves.
      flush_merge_waits=stats["flush_merge_waits"],
      flush_merge_wait_seconds=stats["flush_merge_wait_seconds"],
      inline_merges=stats["inline_merges"],
      merge_tail_seconds=merge_tail_seconds,
      max_pending_log_gib=max_pending_bytes / 2**30,
      hit_rate=stats["hit_rate"],
      prefetched_rows=stats["prefetched_rows"],
      peak_rss_gib=max(peak for _, peak in phase_peaks),
      peak_rss_gib_by_phase=dict(phase_peaks),
      # glibc's arena limit, which the peak depends on: the user's, else the package's cap
      # (see kstep_adam.embedding._malloc)
      malloc_arena_max=(
        os.environ.get("MALLOC_ARENA_MAX")
        if _malloc.user_set_arena_max()
        else _malloc.limit_arenas()
      ),
      disk_used_gib=disk_bytes / 2**30,
      compact_seconds=compact_seconds,
      disk_after_compact_gib=sizes["bytes_after"] / 2**30,
      dense_equivalent_gib=num_rows * table.config.row_bytes / 2**30,
    ),
  )
  shutil.rmtree(path)


# Disk layouts compared by the flush case: (name, B+tree node bytes (None: OCDBT's default,
# the layout before tables got small nodes), rows per chunk (None: the table's default)).
def _layout_tables(workdir, prefix, layouts, num_rows, dim, opt, rounds) -> dict:
  """``{name: table}``, one new table a layout ``(name, TableConfig fields, create
  arguments)``, each with a host cache that holds a whole round of ``rounds``."""
  tables = {}
  for name, fields, create_args in layouts:
    config = embedding.TableConfig(num_rows=num_rows, dim=dim, optimizer=opt.config(), **fields)
    path = os.path.join(workdir, f"{prefix}_{name}")
    _store.create(path, config, **create_args)
    tables[name] = embedding.open_table(
      path, optimizer=opt, host_cache_rows=max(len(ids) for ids in rounds)
    )
  return tables


def _time_rounds(tables, rounds, rng, dim, measure, what: str, verbose: bool) -> dict:
  """``{name: [seconds a round]}``: each round's ids pushed into every table in turn (the same
  random gradients), then ``measure(table)`` timed."""
  seconds = {name: [] for name in tables}
  for ids in rounds:
    grads = rng.standard_normal((len(ids), dim)).astype(np.float32)
    for name, table in tables.items():
      table.push(ids, grads)
      seconds[name].append(measure(table))
      if verbose:
        print(f"{name}: {what} {seconds[name][-1]:.1f} s", flush=True)
  return seconds


FLUSH_LAYOUTS = (
  ("ocdbt_default_nodes", None, None),
  ("small_nodes", _store.BTREE_NODE_BYTES, None),
  ("small_nodes_32_row_chunks", _store.BTREE_NODE_BYTES, 32),
)


def case_flush_layouts(args, workdir):
  """Flush time of the same random dirty rows on each disk layout, in one process.

  Two rounds of ``--flush-rows`` uniformly random rows are pushed and flushed: the first
  writes chunks that do not exist yet, the second read-modify-writes chunks that mostly
  do (a steady-state flush). Each round goes to every layout back to back, so the ratios
  hold on a shared machine.
  """
  num_rows, dim = 1 << args.log2_rows, 16
  opt = make_optimizer(args.optimizer)
  rng = np.random.default_rng(5)
  rounds = [np.unique(rng.integers(0, num_rows, args.flush_rows)) for _ in range(2)]
  layouts = [
    (name, dict(chunk_rows=chunk_rows), dict(btree_node_bytes=node_bytes))
    for name, node_bytes, chunk_rows in FLUSH_LAYOUTS
  ]
  tables = _layout_tables(workdir, "flush", layouts, num_rows, dim, opt, rounds)

  def timed_flush(table) -> float:
    start = time.perf_counter()
    table.flush()
    return time.perf_counter() - start

  seconds = _time_rounds(tables, rounds, rng, dim, timed_flush, "flush", args.verbose)
  reference = seconds[FLUSH_LAYOUTS[0][0]]
  for name, node_bytes, _ in FLUSH_LAYOUTS:
    table = tables[name]
    chunk_rows = table.config.chunk_rows
    emit(
      args.out,
      dict(
        case="flush_random_rows",
        layout=name,
        btree_node_bytes=node_bytes,
        chunk_rows=chunk_rows,
        rows=num_rows,
        dirty_rows=[len(ids) for ids in rounds],
        chunks_written=[len(np.unique(ids // chunk_rows)) for ids in rounds],
        flush_seconds=seconds[name],
        speedup_vs_ocdbt_default_nodes=[r / t for r, t in zip(reference, seconds[name])],
        disk_used_gib=_store.du_bytes(table.path) / 2**30,
      ),
    )
    table.close(flush=False)
    shutil.rmtree(table.path)


# The merge case's layouts: (name, chunk_rows (None: the table's default, about 64 KiB a
# chunk), compress).
MERGE_LAYOUTS = (
  ("default_chunks", None, True),
  ("1024_row_chunks", 1024, True),
  ("4096_row_chunks", 4096, True),
  ("default_chunks_uncompressed", None, False),
)


def case_merge_layouts(args, workdir):
  """What a background merge and a miss cost per chunk layout: the trade-off of chunk size.

  For each layout a table of ``2^--log2-rows`` rows gets two rounds of ``--flush-rows``
  uniformly random rows (1/20 of the table by default), each pushed, flushed and merged in
  the background into every chunk (the case sets the thresholds so that a round's flush
  starts a merge: past 1/64 of the table, under 1/4); the second round's merge rewrites chunks that exist already,
  as every merge of a long run does. Then the table is reopened with an empty host cache and
  up to ``--batch`` written rows are pulled, each in a chunk of its own (misses, each reading
  and decompressing its chunk). Layouts go one after the other for each round, so the ratios
  to the default layout hold on a shared machine.
  """
  num_rows, dim = 1 << args.log2_rows, 16
  opt = make_optimizer(args.optimizer)
  rng = np.random.default_rng(6)
  per_round = args.flush_rows or num_rows // 20
  rounds = [np.unique(rng.integers(0, num_rows, per_round)) for _ in range(2)]
  layouts = [
    (name, dict(chunk_rows=chunk_rows, compress=compress), {})
    for name, chunk_rows, compress in MERGE_LAYOUTS
  ]
  tables = _layout_tables(workdir, "merge", layouts, num_rows, dim, opt, rounds)

  def timed_merge(table) -> float:
    merges = table.stats()["background_merges"]
    table.flush()  # commits the segments and starts their merge
    start = time.perf_counter()
    while table.stats()["background_merge_running"]:
      time.sleep(0.01)
    seconds = time.perf_counter() - start
    if table.stats()["background_merges"] != merges + 1:
      raise RuntimeError(f"the flush of {per_round} rows started no background merge")
    return seconds

  # A round's rows start a merge whatever the table's thresholds are (this case measures
  # what one pass costs, not when the table starts one).
  saved = _table._BACKGROUND_MERGE_FRACTION, _table._SEGMENT_FRACTION
  _table._BACKGROUND_MERGE_FRACTION, _table._SEGMENT_FRACTION = 64, 4
  try:
    merge_seconds = _time_rounds(tables, rounds, rng, dim, timed_merge, "merge", args.verbose)
  finally:
    _table._BACKGROUND_MERGE_FRACTION, _table._SEGMENT_FRACTION = saved
  # One written row in each of up to --batch chunks of the largest layout: in a table much
  # larger than a step's misses (2^28 rows, 50k misses), each miss reads a chunk of its own.
  written = rng.permutation(np.union1d(*rounds))
  widest = max(tables[name].config.chunk_rows for name in tables)
  _, first = np.unique(written // widest, return_index=True)
  misses = np.sort(written[first[: args.batch]])
  miss_seconds = {}
  for name, table in tables.items():
    path, config = table.path, table.config
    table.close()
    with embedding.open_table(path, optimizer=opt, host_cache_rows=len(misses)) as reopened:
      start = time.perf_counter()
      reopened.pull(misses)
      miss_seconds[name] = time.perf_counter() - start
    num_chunks = -(-num_rows // config.chunk_rows)
    emit(
      args.out,
      dict(
        case="merge_layouts",
        layout=name,
        chunk_rows=config.chunk_rows,
        compress=config.compress,
        rows=num_rows,
        merged_rows=[len(ids) for ids in rounds],
        merge_seconds=merge_seconds[name],
        merge_us_per_chunk=[1e6 * t / num_chunks for t in merge_seconds[name]],
        merge_us_per_row=[1e6 * t / len(ids) for t, ids in zip(merge_seconds[name], rounds)],
        miss_us_per_row=1e6 * miss_seconds[name] / len(misses),
        merge_vs_default=[
          t / r for t, r in zip(merge_seconds[name], merge_seconds[MERGE_LAYOUTS[0][0]])
        ],
        miss_vs_default=miss_seconds[name] / miss_seconds[MERGE_LAYOUTS[0][0]],
        disk_used_gib=_store.du_bytes(path) / 2**30,
      ),
    )
    shutil.rmtree(path)


def case_flush_fraction(args, workdir):
  """Flush time against the share of the cache's rows that changed, in one process.

  A table of ``2^--log2-rows`` rows with a host cache of ``--flush-rows`` rows: every
  cached row (uniformly random ids, so they fall in nearly every chunk, as in the large
  run) is pushed and flushed once, so the chunks exist on disk. Then, ``--repeats`` times
  back to back, 1% of the cached rows are pushed and flushed, and all of them are. Goal
  (issue 22): the 1% flush takes under 10% of the time of the full one.
  """
  num_rows, dim = 1 << args.log2_rows, 16
  opt = make_optimizer(args.optimizer)
  rng = np.random.default_rng(7)
  cached = np.unique(rng.integers(0, num_rows, args.flush_rows))
  path = os.path.join(workdir, "flush_fraction")
  table = embedding.open_table(
    path, num_rows=num_rows, dim=dim, optimizer=opt, host_cache_rows=len(cached)
  )
  grads = rng.standard_normal((len(cached), dim)).astype(np.float32)
  table.push(cached, grads)
  start = time.perf_counter()
  table.flush()
  first = time.perf_counter() - start
  seconds = {0.01: [], 1.0: []}
  for _ in range(args.repeats):
    for fraction in seconds:
      ids = np.sort(rng.choice(cached, max(1, int(len(cached) * fraction)), replace=False))
      table.push(ids, grads[: len(ids)])
      start = time.perf_counter()
      table.flush()
      seconds[fraction].append(time.perf_counter() - start)
      if args.verbose:
        print(f"flush of {fraction:.0%}: {seconds[fraction][-1]:.2f} s", flush=True)
  chunk_rows = table.config.chunk_rows
  emit(
    args.out,
    dict(
      case="flush_fraction",
      rows=num_rows,
      cached_rows=len(cached),
      chunk_rows=chunk_rows,
      chunks_touched=len(np.unique(cached // chunk_rows)),
      first_flush_seconds=first,
      flush_1pct_seconds=seconds[0.01],
      flush_100pct_seconds=seconds[1.0],
      ratio_1pct_to_100pct=min(seconds[0.01]) / min(seconds[1.0]),
      disk_used_gib=_store.du_bytes(table.path) / 2**30,
      load_average=os.getloadavg()[0],
    ),
  )
  table.close(flush=False)
  shutil.rmtree(path)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=1 << 20)
  parser.add_argument("--dim", type=int, default=16)
  parser.add_argument("--batch", type=int, default=50_000, help="ids per step")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--optimizer", choices=["exact", "lazy", "adagrad"], default="exact")
  parser.add_argument("--zipf-a", type=float, default=1.05)
  parser.add_argument("--seq-mib", type=int, default=512)
  parser.add_argument(
    "--repeats",
    type=int,
    default=3,
    help="interleaved repeats; the best time of each side is reported",
  )
  parser.add_argument(
    "--zipf-stored",
    action="store_true",
    help="also the Zipf case on a table whose every row is on disk (misses read it)",
  )
  parser.add_argument("--quick", action="store_true", help="smoke run in seconds")
  parser.add_argument("--large", action="store_true", help="only the large-table case")
  parser.add_argument("--log2-rows", type=int, default=28)
  parser.add_argument("--large-steps", type=int, default=3000)
  parser.add_argument("--large-cache-mib", type=int, default=2048)
  parser.add_argument(
    "--large-chunk-rows",
    type=int,
    default=None,
    help="rows per zarr chunk (default: the table's ~64 KiB chunks)",
  )
  parser.add_argument("--flush-every", type=int, default=500)
  parser.add_argument(
    "--large-ids",
    nargs="+",
    choices=["zipf", "uniform"],
    default=["zipf", "uniform"],
    help="id distributions of the large case, one table each",
  )
  parser.add_argument(
    "--large-merge",
    nargs="+",
    choices=sorted(MERGE_POLICIES),
    default=["background"],
    help="merge policies of the large case, one table each (for each id distribution, "
    "in turn): the table's background merge, or the earlier merge inside the flush",
  )
  parser.add_argument(
    "--flush-compare",
    action="store_true",
    help="only the flush case: the same random rows flushed into each disk layout",
  )
  parser.add_argument(
    "--flush-fraction",
    action="store_true",
    help="only the flush-cost case: 1%% of the cache's rows dirty against all of them",
  )
  parser.add_argument(
    "--merge-compare",
    action="store_true",
    help="only the merge case: a background merge and misses on each chunk layout",
  )
  parser.add_argument(
    "--flush-rows",
    type=int,
    default=None,
    help="ids per flush round (default: 2^20; the merge case: 1/20 of the rows)",
  )
  parser.add_argument("--verbose", action="store_true", help="print each flush's time")
  parser.add_argument("--workdir", default=None, help="default: a temp dir, removed after")
  parser.add_argument("--out", default=None, help="append JSON lines here")
  args = parser.parse_args(argv)
  if args.quick:
    args.rows, args.batch, args.steps, args.seq_mib = 1 << 16, 4096, 5, 32
    args.repeats = 1
    args.log2_rows, args.large_steps, args.flush_every = min(args.log2_rows, 20), 10, 5
    args.large_cache_mib = 64
    if args.flush_rows is not None or not args.merge_compare:
      args.flush_rows = min(args.flush_rows or 4096, 4096)
  if args.flush_rows is None and not args.merge_compare:
    args.flush_rows = 1 << 20
  return args


def main(argv=None):
  args = parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="embedding_tier_")
  os.makedirs(workdir, exist_ok=True)
  try:
    if args.merge_compare:
      case_merge_layouts(args, workdir)
    elif args.flush_fraction:
      case_flush_fraction(args, workdir)
    elif args.flush_compare:
      case_flush_layouts(args, workdir)
    elif args.large:
      for ids_kind in args.large_ids:
        for merge in args.large_merge:
          case_large(args, workdir, ids_kind, merge)
    else:
      case_fits_in_cache(args, workdir)
      case_zipf_10x(args, workdir)
      if args.zipf_stored:
        case_zipf_10x(args, workdir, stored=True)
      seq = max(sequential_read_bandwidth(workdir, args.seq_mib << 20) for _ in range(args.repeats))
      for compress in (True, False):
        case_disk_bandwidth(args, workdir, seq, compress)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
