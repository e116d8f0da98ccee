"""I/O faults in the embedding tier: a full disk or a failing device, in any operation.

The contract (``kstep_adam/embedding/_table.py``): a call that hits an I/O error either
leaves the table as it was (it raises the ``OSError``; retrying gives what a fault-free run
gives) or puts it in a failed state (``TableFailedError`` from then on, ``flush`` and
``close`` included); no call hangs; a reopen gives exactly the last committed flush.

The main test replays one scripted run (prefetch, working_set, push, pull, flush, compact,
and a push larger than the host cache) once without faults, then once per N with every
I/O primitive after the (N-1)-th raising ``OSError(ENOSPC)`` until the run "frees the
disk" (right after the failing call), and checks every returned row and every reopened
table bit for bit against the fault-free run. Row state is compared raw (parameters,
optimizer slots, last step) from the zarr table, which after a reopen holds everything.
"""

import collections
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

from kstep_adam import _faults
from kstep_adam import embedding
from kstep_adam.embedding import _pending
from kstep_adam.embedding import _store
from kstep_adam.embedding import _table

NUM_ROWS, DIM, CACHE = 150, 3, 16
_CALL_TIMEOUT_S = 60.0  # far above any call here: reaching it means a hang


def _adam():
  return embedding.SparseAdam(learning_rate=0.05, b1=0.9, b2=0.99, eps=1e-6)


def _open(path, **kw):
  return embedding.open_table(
    path, num_rows=NUM_ROWS, dim=DIM, optimizer=_adam(), host_cache_rows=CACHE, chunk_rows=8, **kw
  )


def _script(steps=14, seed=0):
  """The scripted run: a list of (name, args) table calls."""
  rng = np.random.default_rng(seed)
  # Mostly a few hot rows, so dirty rows are evicted again and again between flushes
  # (the pending log then has superseded records to compact away), sometimes any row.
  batches = [np.unique(rng.integers(0, 40 if s % 3 else NUM_ROWS, 12)) for s in range(steps)]
  batches[5] = np.unique(rng.integers(0, NUM_ROWS, 60))  # > CACHE: pushed block by block
  ops = []
  for step, ids in enumerate(batches):
    if step + 1 < steps and step % 2 == 0:
      ops.append(("prefetch", (batches[step + 1][:CACHE],)))  # its Future is never read
    ops.append(("working_set", (ids,)))
    ops.append(("push", (ids, rng.standard_normal((len(ids), DIM)).astype(np.float32))))
    if step % 3 == 1:
      ops.append(("pull", (rng.integers(0, NUM_ROWS, 10),)))
    if step % 4 == 3:
      ops.append(("flush", ()))
    if step == 9:
      ops.append(("compact", ()))
  ops.append(("flush", ()))
  ops.append(("close", ()))  # flushes once more (nothing is dirty: the same step)
  return ops


def _call(table, name, args):
  if name == "prefetch":
    table.prefetch(*args)
    return None
  if name == "working_set":
    return table.working_set(*args).rows
  if name in ("compact", "close"):
    getattr(table, name)()
    return None
  return getattr(table, name)(*args)


def _with_timeout(fn, *args):
  """Runs ``fn`` on a thread; fails the test if it has not returned after the timeout."""
  outcome = {}

  def target():
    try:
      outcome["value"] = fn(*args)
    except BaseException as e:
      outcome["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(_CALL_TIMEOUT_S)
  assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)}{args!r} hung"
  if "error" in outcome:
    raise outcome["error"]
  return outcome.get("value")


def _committed_rows(table):
  """Every row's raw committed state (all in zarr after an open: the pending log is empty)."""
  assert table.stats()["pending_rows"] == 0
  return table._store.read_rows(np.arange(NUM_ROWS))


class _Reference:
  """The scripted run without faults: outputs per call, committed state per flushed step."""

  def __init__(self, path, ops):
    table = _open(path)
    self.committed = {0: _committed_rows(table)}  # step -> raw rows of its flush
    self.resume_at = {0: 0}  # step -> index of the first call after its flush
    self.outputs = []
    for i, (name, args) in enumerate(ops):
      self.outputs.append(_call(table, name, args))
      if name in ("flush", "compact"):
        self.committed[table.step] = table._store.read_rows(np.arange(NUM_ROWS))
        self.resume_at.setdefault(table.step, i + 1)
    assert ops[-1][0] == "close"
    self.final_step = table.step


class _DiskFull:
  """Makes the table's I/O primitives raise ENOSPC from their ``fail_at``-th call on, until
  ``free()``. Counts calls across threads (the prefetch thread does I/O too)."""

  PRIMITIVES = (
    (_pending, "_pwrite_all"),  # pending-log append: rows, then ids (a half-done append)
    (_pending.PendingLog, "read"),
    (_pending.PendingLog, "_read_ids"),  # the copy's scans of the ids file
    (_pending.PendingLog, "commit"),  # fsync + the commit marker
    (_pending.PendingLog, "clear"),
    (_store.TableStore, "read_rows"),
    (_store.TableStore, "write_rows"),
    (_store.TableStore, "write_step"),
    (_store.TableStore, "stored_chunks"),
    (_store.TableStore, "write_segment"),
    (_store.TableStore, "_read_segment_rows"),  # the merge's reads of segments
    (_store.TableStore, "delete_segments"),
    (_store, "set_current_db"),
    (_pending.PendingLog, "install_compaction"),  # the renames (staging is _pwrite_all)
  )

  def __init__(self, monkeypatch, fail_at=None):
    self.fail_at = fail_at
    self.calls = 0
    self.calls_by_name = collections.Counter()
    self.fired = False
    self._free = False
    self._lock = threading.Lock()
    for owner, name in self.PRIMITIVES:
      monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

  def _wrap(self, original, name):
    def primitive(*args, **kwargs):
      with self._lock:
        self.calls += 1
        self.calls_by_name[name] += 1
        full = not self._free and self.fail_at is not None and self.calls >= self.fail_at
        self.fired |= full
      if full:
        raise OSError(errno.ENOSPC, f"No space left on device (injected in {name})")
      return original(*args, **kwargs)

    return primitive

  def free(self):
    with self._lock:
      self._free = True


def _every_call_refuses(table):
  calls = [
    (table.pull, [1]),
    (table.working_set, [1]),
    (table.push, [1], np.ones((1, DIM), np.float32)),
    (table.prefetch, [1]),
    (table.flush,),
    (table.compact,),
  ]
  for fn, *args in calls:
    with pytest.raises(embedding.TableFailedError, match="reopen"):
      _with_timeout(fn, *args)
  assert table.failed
  with pytest.raises(embedding.TableFailedError):
    table.close()  # flush=True: the lost steps must not pass silently
  table.close()  # released anyway, and idempotent


def _run_with_disk_full(path, ops, ref, disk):
  """Runs the script with ``disk`` armed; returns what happened, checking as it goes."""
  outcome = "no fault"
  try:
    table = _with_timeout(_open, path)
  except OSError as e:  # creating is all or nothing; a failed open releases the table
    assert e.errno == errno.ENOSPC
    disk.free()
    outcome = "open raised"
    table = _open(path)
  i = 0
  while i < len(ops):
    name, args = ops[i]
    try:
      out = _with_timeout(_call, table, name, args)
    except embedding.TableFailedError:
      assert disk.fired
      disk.free()
      last_flushed = max(s for s, at in ref.resume_at.items() if at <= i)
      if name != "close":  # a failed close has released the table already
        _every_call_refuses(table)
      table = _with_timeout(embedding.open_table, path)
      # The last committed flush: the one before, or the failing flush past its commit point.
      allowed = {last_flushed}
      if name in ("flush", "compact"):
        allowed.add(max(s for s, at in ref.resume_at.items() if at <= i + 1))
      assert table.step in allowed, (table.step, allowed, name)
      np.testing.assert_array_equal(_committed_rows(table), ref.committed[table.step])
      outcome = f"failed in {name}, reopened at {table.step}"
      i = ref.resume_at[table.step]  # redo what was lost, from that flush on
      continue
    except OSError as e:
      assert e.errno == errno.ENOSPC and disk.fired, e
      assert not table.failed
      disk.free()
      outcome = outcome if outcome != "no fault" else f"{name} raised, table intact"
      continue  # the table is as before: retry the call
    if ref.outputs[i] is not None:
      np.testing.assert_array_equal(out, ref.outputs[i], err_msg=f"call {i}: {name}")
    i += 1
  disk.free()  # the fault point may lie past this run's calls (the prefetch timing varies)
  with embedding.open_table(path) as reopened:
    assert reopened.step == ref.final_step
    np.testing.assert_array_equal(_committed_rows(reopened), ref.committed[ref.final_step])
  return outcome


@pytest.fixture
def scratch(tmp_path):
  """A directory in RAM when there is one (/dev/shm): these tests are about I/O errors, not
  the medium, and an fsync there costs nothing, which makes trying every fault point cheap."""
  if not os.access("/dev/shm", os.W_OK):
    yield tmp_path
    return
  path = tempfile.mkdtemp(prefix="kstep_adam-faults-", dir="/dev/shm")
  yield pathlib.Path(path)
  shutil.rmtree(path, ignore_errors=True)


@pytest.mark.filterwarnings("ignore:the background merge:RuntimeWarning")  # a full disk in it
@pytest.mark.parametrize("stride", [pytest.param(1, marks=pytest.mark.slow), 3])
@pytest.mark.parametrize("segment_fraction", [_table._SEGMENT_FRACTION, 1])
def test_disk_full_at_any_io_call_never_mixes_steps_nor_hangs(
  scratch, monkeypatch, stride, segment_fraction
):
  # segment_fraction=1: flushes keep their rows in segments until they hold as many records
  # as the table has rows, so misses read segments and some flushes merge them.
  monkeypatch.setattr(_table, "_SEGMENT_FRACTION", segment_fraction)
  # Compact the pending log as soon as it holds a superseded record (the real policy waits
  # for twice as many records as rows, and 64 MiB), so its rewrite meets the faults too.
  monkeypatch.setattr(
    _pending.PendingLog, "wants_compaction", lambda log: log._num_records > len(log)
  )
  ops = _script()
  ref = _Reference(scratch / "ref", ops)
  with pytest.MonkeyPatch.context() as patch:  # count the I/O calls of a fault-free run
    counter = _DiskFull(patch)
    _Reference(scratch / "count", ops)
  assert counter.calls > 50 and counter.calls_by_name["install_compaction"] > 0
  outcomes = []
  for fail_at in range(1, counter.calls + 1, stride):
    path = scratch / f"t{fail_at}"
    with pytest.MonkeyPatch.context() as patch:
      outcomes.append(_run_with_disk_full(path, ops, ref, _DiskFull(patch, fail_at)))
    shutil.rmtree(path)
  # Both kinds of outcome were exercised: calls that left the table intact, and failures.
  assert any("intact" in o for o in outcomes), outcomes
  assert any("failed in flush" in o for o in outcomes), outcomes
  assert any("failed in push" in o for o in outcomes), outcomes


def test_disk_full_while_evicting_leaves_the_table_as_before(scratch, monkeypatch):
  """The reported bug: the pending-log append of evicted dirty rows fails inside a push.
  The rows used to be dropped and their slots left pinned and loading, so the next pull
  hung and a flush committed a mix of steps."""
  rng = np.random.default_rng(1)
  batches = [
    (rng.integers(0, NUM_ROWS, 20), rng.standard_normal((20, DIM)).astype(np.float32))
    for _ in range(12)
  ]
  with _open(scratch / "ref") as ref:
    for step, (ids, grads) in enumerate(batches, start=1):
      ref.push(ids, grads)
      if step == 7:
        ref.flush()
        committed_at_7 = ref._store.read_rows(np.arange(NUM_ROWS))
    expected_rows = ref.pull(np.arange(NUM_ROWS))
  table = _open(scratch / "t")
  for ids, grads in batches[:6]:
    table.push(ids, grads)
  disk = _DiskFull(monkeypatch, fail_at=1)
  ids, grads = batches[6]
  with pytest.raises(OSError) as info:
    _with_timeout(table.push, ids, grads)
  assert info.value.errno == errno.ENOSPC and disk.fired and not table.failed
  assert table.step == 6  # the step did not happen
  disk.free()  # the disk has room again: retry, flush, carry on
  _with_timeout(table.push, ids, grads)
  _with_timeout(table.flush)
  for ids, grads in batches[7:]:
    _with_timeout(table.push, ids, grads)
  np.testing.assert_array_equal(_with_timeout(table.pull, np.arange(NUM_ROWS)), expected_rows)
  table.close(flush=False)
  with embedding.open_table(scratch / "t") as reopened:  # exactly the flush at step 7
    assert reopened.step == 7
    np.testing.assert_array_equal(_committed_rows(reopened), committed_at_7)


def _fail_commit(monkeypatch):
  """An fsync of the pending log that fails (ENOSPC surfaces there with delayed allocation)."""

  def commit(self, step, first_part=0):
    raise OSError(errno.ENOSPC, "No space left on device (injected in commit)")

  monkeypatch.setattr(_pending.PendingLog, "commit", commit)


def test_a_failed_table_refuses_everything_and_a_with_block_keeps_the_first_error(
  scratch, monkeypatch
):
  table = _open(scratch / "t")
  table.push(np.arange(40), np.ones((40, DIM), np.float32))  # dirty rows to flush
  _fail_commit(monkeypatch)
  with pytest.raises(embedding.TableFailedError, match="failed during flush") as info:
    table.flush()
  assert info.value.operation == "flush" and info.value.__cause__.errno == errno.ENOSPC
  monkeypatch.undo()  # even with room again, the failed table refuses every call
  _every_call_refuses(table)
  with embedding.open_table(scratch / "t") as table:  # the last committed flush: none yet
    assert table.step == 0
    with pytest.raises(RuntimeError, match="the model diverged"), table:
      table.push(np.arange(40), np.ones((40, DIM), np.float32))
      _fail_commit(monkeypatch)
      try:
        table.flush()
      except embedding.TableFailedError:
        raise RuntimeError("the model diverged") from None  # any error in flight
    monkeypatch.undo()
  with embedding.open_table(scratch / "t") as table:  # __exit__ released it
    assert table.step == 0


def _wait_until(predicate):
  for _ in range(6000):
    if predicate():
      return
    threading.Event().wait(0.01)
  raise AssertionError("timed out")


def test_a_failed_prefetch_read_surfaces_to_the_waiting_caller_and_never_hangs_it(
  scratch, monkeypatch
):
  ids = np.arange(12)
  with _open(scratch / "t") as table:
    table.push(ids, np.ones((12, DIM), np.float32))
  expected = None
  with embedding.open_table(scratch / "t") as table:  # cold cache: rows come from disk
    expected = table.pull(ids)
  table = embedding.open_table(scratch / "t")
  reading, fail_now = threading.Event(), threading.Event()
  read_rows = _store.TableStore.read_rows

  def read_then_fail_in_prefetch(self, ids_N):
    if threading.current_thread().name.startswith("embedding-prefetch"):
      reading.set()
      fail_now.wait()
      raise OSError(errno.EIO, "Input/output error (injected)")
    return read_rows(self, ids_N)

  monkeypatch.setattr(_store.TableStore, "read_rows", read_then_fail_in_prefetch)
  future = table.prefetch(ids)
  assert reading.wait(_CALL_TIMEOUT_S)
  outcome = {}

  def working_set():  # needs rows the prefetch is loading: waits for them
    try:
      outcome["rows"] = table.working_set(ids).rows
    except OSError as e:
      outcome["error"] = e

  waiter = threading.Thread(target=working_set, daemon=True)
  waiter.start()
  _wait_until(lambda: len(table._cond._waiters) > 0)  # the waiter is blocked on the rows
  fail_now.set()
  waiter.join(_CALL_TIMEOUT_S)
  assert not waiter.is_alive()
  assert outcome["error"].errno == errno.EIO  # the prefetch's error, handed to the waiter
  assert "background prefetch" in str(outcome["error"].__notes__)
  assert not table.failed  # a failed read changes nothing: the next call just works
  np.testing.assert_array_equal(table.working_set(ids).rows, expected)
  with pytest.raises(OSError):
    future.result()  # the Future holds it too
  table.close()


@pytest.mark.parametrize("read_future", [False, True])
def test_a_failed_prefetch_is_raised_once_by_the_next_call_unless_its_future_was_read(
  scratch, monkeypatch, read_future
):
  with _open(scratch / "t") as table:
    table.push(np.arange(12), np.ones((12, DIM), np.float32))
  table = embedding.open_table(scratch / "t")
  disk = _DiskFull(monkeypatch, fail_at=1)
  future = table.prefetch(np.arange(12))
  if read_future:
    assert isinstance(future.exception(_CALL_TIMEOUT_S), OSError)
  else:
    _wait_until(future.done)
  disk.free()
  if read_future:
    table.pull([1])  # the error was delivered through the Future: not raised again
  else:
    with pytest.raises(OSError, match="injected in read_rows"):
      table.pull([1])
  assert table.pull([1]).shape == (1, DIM) and not table.failed
  table.close()


_TMPFS_CHILD = """
import json, os, sys
import numpy as np
from kstep_adam import _faults
from kstep_adam import embedding

mount, batches_file, out = sys.argv[1:]
batches = np.load(batches_file)
ids_SxB, grads_SxBxD = batches["ids"], batches["grads"]
path = os.path.join(mount, "t")


def open_table():
  return embedding.open_table(path, num_rows=20000, dim=8, host_cache_rows=300)


table = open_table()
free = os.statvfs(mount)
filler = os.path.join(mount, "filler")
with open(filler, "wb") as f:  # leave about 1 MiB: the run soon fills the disk
  f.write(bytes(free.f_bavail * free.f_frsize - (1 << 20)))
events = []
step = 0
while step < len(ids_SxB):
  try:
    table.push(ids_SxB[step], grads_SxBxD[step])
    step += 1
    if step % 5 == 0 or step == len(ids_SxB):
      table.flush()
  except embedding.TableFailedError as e:
    events.append(["failed", step, e.__cause__.errno, repr(e.__cause__)])
    table.close(flush=False)
    os.remove(filler)  # make room (a second failure finds no filler and stops the run)
    table = open_table()
    step = table.step  # the last committed flush: redo the steps after it
  except OSError as e:
    events.append(["intact", step, e.errno, repr(e)])
    os.remove(filler)  # make room and retry the call
table.close()
with embedding.open_table(path) as reopened:
  np.save(out + ".npy", reopened._store.read_rows(np.arange(20000)))
  with open(out + ".json", "w") as f:
    json.dump({"step": reopened.step, "events": events}, f)
"""


def _can_mount_tmpfs(tmp_path) -> bool:
  if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
    return False
  mount = tmp_path / "probe"
  mount.mkdir()
  probe = subprocess.run(
    ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"],
    capture_output=True,
  )
  return probe.returncode == 0


def test_a_real_full_tmpfs_never_mixes_steps(tmp_path):
  """A real ENOSPC from a small tmpfs (in a user+mount namespace; skipped where that is not
  permitted): the run frees space and carries on, and the table ends exactly where a
  fault-free run does."""
  if not _can_mount_tmpfs(tmp_path):
    pytest.skip("cannot mount a tmpfs here (needs `unshare -rm` and user namespaces)")
  rng = np.random.default_rng(0)
  steps = 40
  ids_SxB = rng.integers(0, 20000, (steps, 400))
  grads_SxBxD = rng.standard_normal((steps, 400, 8)).astype(np.float32)
  np.savez(tmp_path / "batches.npz", ids=ids_SxB, grads=grads_SxBxD)
  (tmp_path / "child.py").write_text(_TMPFS_CHILD)
  mount, out = tmp_path / "mnt", tmp_path / "out"
  mount.mkdir()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = (
    f"mount -t tmpfs -o size=16m tmpfs {mount} && "
    f"exec {sys.executable} {tmp_path / 'child.py'} {mount} {tmp_path / 'batches.npz'} {out}"
  )
  run = subprocess.run(
    ["unshare", "-rm", "sh", "-c", script],
    capture_output=True,
    text=True,
    cwd=repo,
    env={**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"},
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  with open(f"{out}.json") as f:
    result = json.load(f)
  assert result["events"], "the tmpfs never filled up: the test tested nothing"
  assert all(event[2] == errno.ENOSPC for event in result["events"]), result["events"]
  with embedding.open_table(tmp_path / "ref", num_rows=20000, dim=8, host_cache_rows=300) as ref:
    for ids, grads in zip(ids_SxB, grads_SxBxD):
      ref.push(ids, grads)
  with embedding.open_table(tmp_path / "ref") as ref:
    assert result["step"] == ref.step == steps
    np.testing.assert_array_equal(np.load(f"{out}.npy"), ref._store.read_rows(np.arange(20000)))


# -- issue 17, item 1: a flush interrupted at any of its points ---------------------------------
class _Killed(BaseException):
  """What a kill at a fault point looks like in process: nothing after it runs."""


# A flush of every row merges straight into the chunks: it writes no segment (the points of a
# flush that writes segments are in the segment tests below).
@pytest.mark.parametrize(
  "point", [p for p in _faults.POINTS if p.startswith("flush.") and p != "flush.segment_written"]
)
def test_a_flush_interrupted_at_any_point_reopens_at_the_previous_version_exactly(
  tmp_path, monkeypatch, point
):
  """A flush stopped at each of its points, then the table reopened at the previous flush's
  version (what a checkpoint names) or as it is: every row is the one that version holds, bit
  for bit. Reopening redoes a committed copy through the rows array and then reverts under
  it; reads must not see what the redo left in the array's cache."""
  monkeypatch.setattr(_table, "_FLUSH_BATCH_BYTES", 8 * 4 * (1 + 3 * DIM))  # 8 chunks a batch
  every = np.arange(NUM_ROWS)
  rng = np.random.default_rng(0)
  path = str(tmp_path / "t")
  table = _open(path, ts_cache_bytes=64 << 20)
  for _ in range(2):
    table.push(every, rng.standard_normal((NUM_ROWS, DIM)).astype(np.float32))
  table.flush()
  before, rows_before = table.committed, table.pull(every)
  table.push(every, rng.standard_normal((NUM_ROWS, DIM)).astype(np.float32))

  def kill(reached):
    if reached == point:
      raise _Killed(point)

  _faults.set_handler(kill)
  try:
    with pytest.raises(_Killed):
      table.flush()
  finally:
    _faults.set_handler(None)
  table.close(flush=False)
  with embedding.open_table(path, version=before, ts_cache_bytes=64 << 20) as reopened:
    assert reopened.step == 2
    np.testing.assert_array_equal(reopened.pull(every), rows_before)
    reopened.close(flush=False)
  with embedding.open_table(path, ts_cache_bytes=64 << 20) as reopened:
    assert reopened.step == 2  # reverted for good
    np.testing.assert_array_equal(reopened.pull(every), rows_before)
    reopened.close(flush=False)


# -- issue 22: a flush that keeps its rows in segments, interrupted at any point ---------------
_SEGMENT_FLUSH_POINTS = [
  ("flush.appended", 1),
  ("flush.committed", 1),
  ("flush.segment_written", 1),
  ("flush.segment_written", 2),
  ("flush.copied_batch", 1),
  ("flush.segments_merged", 1),
  ("flush.step_written", 1),
  ("flush.cleared", 1),
]


def _segment_flushes(path, merge, handler=None):
  """Two flushes (every row into the chunks, then 5 rows into segments), and a third of 7 rows
  (12 with ``merge``: it then merges the segments) run with ``handler`` at the fault points.
  Returns the second flush's version and raw rows, and whether the third raised ``_Killed``.
  Rows are never pulled between flushes (an exact-mode pull dirties every row it catches up)."""
  rng = np.random.default_rng(1)
  every = np.arange(NUM_ROWS)
  table = _open(path, ts_cache_bytes=64 << 20)
  table.push(every, rng.standard_normal((NUM_ROWS, DIM)).astype(np.float32))
  table.flush()  # into the chunks
  hot = np.array([3, 17, 40, 41, 90])
  table.push(hot, rng.standard_normal((len(hot), DIM)).astype(np.float32))
  table.flush()  # 5 rows in segments
  assert len(table._store.segment_ids()) == len(hot)
  before, raw_before = table.committed, table._store.read_rows(every)
  ids = np.array([3, 5, 7, 8, 41, 100, 149] + ([20, 30, 60, 61, 62] if merge else []))
  table.push(np.sort(ids), rng.standard_normal((len(ids), DIM)).astype(np.float32))
  _faults.set_handler(handler)
  killed = False
  try:
    table.flush()
  except _Killed:
    killed = True
  finally:
    _faults.set_handler(None)
  table.close(flush=False)
  return before, raw_before, killed


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("point,nth", _SEGMENT_FLUSH_POINTS)
def test_a_segment_flush_interrupted_at_any_point_reopens_at_one_flushed_step_exactly(
  tmp_path, monkeypatch, point, nth, merge
):
  """Flushes that write their rows as segments (and one that merges segments of an earlier
  flush into the chunks), stopped at each of their points: a plain reopen gives exactly the
  flush before (killed before the commit point) or the interrupted one (after it, redone),
  and a reopen at the earlier flush's version gives exactly that one, bit for bit."""
  monkeypatch.setattr(_table, "_FLUSH_BATCH_BYTES", 2 * 4 * (1 + 3 * DIM))  # 2 rows a segment
  monkeypatch.setattr(_table, "_SEGMENT_FRACTION", 10)  # merge past 15 segment records
  monkeypatch.setattr(_table, "_BACKGROUND_MERGE_FRACTION", 0)  # the flush's own points
  every = np.arange(NUM_ROWS)
  _segment_flushes(str(tmp_path / "ref"), merge)
  with embedding.open_table(str(tmp_path / "ref")) as ref:
    assert len(ref._store.segment_ids()) == (0 if merge else 10)
    raw_after = ref._store.read_rows(every)
  reached = collections.Counter()

  def kill(name):
    reached[name] += 1
    if name == point and reached[name] == nth:
      raise _Killed(point)

  path = str(tmp_path / "t")
  before, raw_before, killed = _segment_flushes(path, merge, kill)
  # A flush that does not merge passes every point but the merge's; one that merges writes
  # no segment of its own (the segments and its rows go into the chunks in one pass).
  merge_points = ("flush.copied_batch", "flush.segments_merged")
  skipped = ("flush.segment_written",) if merge else merge_points
  assert killed == (point not in skipped)
  durable = not killed or point != "flush.appended"
  with embedding.open_table(path, ts_cache_bytes=64 << 20) as reopened:
    assert reopened.step == (3 if durable else 2)
    np.testing.assert_array_equal(
      reopened._store.read_rows(every), raw_after if durable else raw_before
    )
    reopened.close(flush=False)
  with embedding.open_table(path, version=before, ts_cache_bytes=64 << 20) as reopened:
    assert reopened.step == 2
    np.testing.assert_array_equal(reopened._store.read_rows(every), raw_before)
    reopened.close(flush=False)


@pytest.mark.parametrize(
  "point,nth",
  [
    (None, 0),
    ("flush.committed", 1),
    ("flush.segment_written", 1),
    ("flush.segment_written", 3),
    ("flush.step_written", 1),
  ],
)
def test_a_second_flush_at_the_same_step_keeps_the_first_flushs_segments(
  tmp_path, monkeypatch, point, nth
):
  """An exact-mode pull after a flush catches rows up and dirties them without a step, so the
  next flush commits the same step again. Its segments must come after the first flush's,
  not over them (they once did: the first flush's rows then read as their older chunk
  rows). Whole, or stopped at any of its points and redone at open, every row reads as it
  did before the second flush."""
  monkeypatch.setattr(_table, "_FLUSH_BATCH_BYTES", 2 * 4 * (1 + 3 * DIM))  # 2 rows a segment
  monkeypatch.setattr(_table.EmbeddingTable, "_segment_max_records", lambda self: 1 << 30)
  monkeypatch.setattr(_table, "_BACKGROUND_MERGE_FRACTION", 0)
  rng = np.random.default_rng(4)
  every, warm, hot = np.arange(NUM_ROWS), np.arange(0, NUM_ROWS, 3), np.array([2, 9, 33, 71])
  path = str(tmp_path / "t")
  table = _open(path, ts_cache_bytes=64 << 20)
  table.push(warm, rng.standard_normal((len(warm), DIM)).astype(np.float32))
  table.push(hot, rng.standard_normal((len(hot), DIM)).astype(np.float32))
  table.flush()  # the rows at steps 1 and 2: segments of 2 rows
  first = table._store.segment_records()
  assert first == len(np.union1d(warm, hot))
  rows = table.pull(every)  # catches up the warm rows not pushed at step 2: dirty, same step
  assert table.step == 2 and table._pending.num_records + table._cache.dirty_C.sum() > 0
  reached = collections.Counter()

  def kill(name):
    reached[name] += 1
    if name == point and reached[name] == nth:
      raise _Killed(point)

  _faults.set_handler(kill)
  try:
    if point is None:
      table.flush()
    else:
      with pytest.raises(_Killed):
        table.flush()
  finally:
    _faults.set_handler(None)
  table.close(flush=False)
  with embedding.open_table(path, ts_cache_bytes=64 << 20) as reopened:
    assert reopened.step == 2
    assert reopened._store.segment_records() > first  # the first flush's segments stayed
    np.testing.assert_array_equal(reopened.pull(every), rows)
    reopened.close(flush=False)


def test_rows_read_from_segments_equal_rows_read_from_the_chunks(tmp_path, monkeypatch):
  """The same pushes and flushes into a table that keeps every flush in segments and one that
  merges each into the chunks: every pull, before and after reopening, is the same bits."""
  rng = np.random.default_rng(2)
  script = [np.unique(rng.integers(0, NUM_ROWS, 20)) for _ in range(12)]
  grads = [rng.standard_normal((len(ids), DIM)).astype(np.float32) for ids in script]
  pulls = {}

  def run(name, after_flush=lambda table: None):
    """The script into a new table, pulling after each push; returns it, still open."""
    table, out = _open(str(tmp_path / name)), pulls.setdefault(name, [])
    for step, (ids, g) in enumerate(zip(script, grads)):
      table.push(ids, g)
      out.append(table.pull(np.arange(0, NUM_ROWS, 7)))
      if step % 3 == 2:
        table.flush()
        after_flush(table)
    return table

  def reopen_and_pull(table, name):
    """Closes the table, reopens it and pulls every row; returns the segment rows it read."""
    table.close()
    with _open(str(tmp_path / name)) as reopened:
      pulls[name].append(reopened.pull(np.arange(NUM_ROWS)))
      return len(reopened._store.segment_ids())

  # Threshold NUM_ROWS // fraction: 0 or 1 record.
  for name, fraction in (("merged at 0", NUM_ROWS + 1), ("merged", 1 << 30)):
    monkeypatch.setattr(_table, "_SEGMENT_FRACTION", fraction)

    def merged_in_line(table, name=name):
      if name == "merged":
        assert len(table._store.segment_ids()) == 0

    reopen_and_pull(run(name, merged_in_line), name)
  monkeypatch.setattr(_table, "_SEGMENT_FRACTION", 1)  # 150 records: the 20-row flushes stay
  monkeypatch.setattr(_table, "_BACKGROUND_MERGE_FRACTION", 0)
  table = run("kept")
  assert len(table._store.segment_ids()) > 0  # the segment path was taken
  assert reopen_and_pull(table, "kept") > 0  # and is read after a reopen
  # Merged in the background after every flush, while the next pushes and pulls run.
  monkeypatch.setattr(_table, "_BACKGROUND_MERGE_FRACTION", NUM_ROWS)  # past 1 record

  def merging(table):
    assert table.stats()["background_merge_running"] or table._merge is not None

  table = run("background", merging)
  table._finish_merge()
  assert table.stats()["background_merges"] >= 1 and table.stats()["segment_rows"] == 0
  reopen_and_pull(table, "background")
  for kind in ("kept", "background"):
    for a, b in zip(pulls[kind], pulls["merged"], strict=True):
      np.testing.assert_array_equal(a, b)


def test_a_flush_that_merges_writes_no_segment_of_its_own(tmp_path, monkeypatch):
  """Past the segment limit, the segments and the flush's rows go into the chunks in one pass:
  the flush writes each changed row once, not as a segment first and then into a chunk, and
  reads the log one write batch at a time."""
  monkeypatch.setattr(_table, "_SEGMENT_FRACTION", 10)  # merge past 15 segment records
  monkeypatch.setattr(_table, "_BACKGROUND_MERGE_FRACTION", 0)  # segments stay until then
  monkeypatch.setattr(_table, "_FLUSH_BATCH_BYTES", 8 * 4 * (1 + 3 * DIM))  # 1 chunk a batch
  rng = np.random.default_rng(3)
  table = _open(str(tmp_path / "t"), ts_cache_bytes=64 << 20)
  first = np.array([3, 17, 40, 41, 90])
  table.push(first, rng.standard_normal((len(first), DIM)).astype(np.float32))
  table.flush()  # 5 rows: a segment
  assert len(table._store.segment_ids()) == len(first)
  segments = []
  write_segment = table._store.write_segment
  monkeypatch.setattr(
    table._store, "write_segment", lambda *a: (segments.append(a[2]), write_segment(*a))
  )
  second = np.arange(20, 32)
  table.push(second, rng.standard_normal((len(second), DIM)).astype(np.float32))
  expected = table.pull(np.arange(NUM_ROWS))
  written = table._store.bytes_written
  reads = []
  read = table._pending.read
  monkeypatch.setattr(table._pending, "read", lambda p: (reads.append(len(p)), read(p))[1])
  table.flush()  # 5 + 12 records > 15: merged
  assert segments == [] and len(table._store.segment_ids()) == 0
  assert max(reads) <= 8  # the 12 rows 20-31 of chunks 2 and 3: one chunk at a time
  # The chunks received the 5 segment rows and the 12 new ones, each once.
  row_bytes = table._config.row_bytes
  assert table._store.bytes_written - written == (len(first) + len(second)) * row_bytes
  table.close()
  with _open(str(tmp_path / "t")) as reopened:
    np.testing.assert_array_equal(reopened.pull(np.arange(NUM_ROWS)), expected)


# -- issue 22: the background merge of segments into the chunks --------------------------------
def _background_setup(path, monkeypatch, background=True):
  """A table whose rows are all in the chunks, then a flush of 7 rows that stays in segments
  and starts a background merge of them (one chunk a merge batch; none without
  ``background``). Returns the table (the merge running or done), that flush's version and
  the raw rows it committed."""
  monkeypatch.setattr(_table, "_FLUSH_BATCH_BYTES", 8 * 4 * (1 + 3 * DIM))  # 1 chunk a batch
  monkeypatch.setattr(_table, "_SEGMENT_FRACTION", 16)  # merge in the flush past 9 records
  # Background merges past 2 records.
  monkeypatch.setattr(_table, "_BACKGROUND_MERGE_FRACTION", NUM_ROWS // 2 if background else 0)
  rng = np.random.default_rng(5)
  every = np.arange(NUM_ROWS)
  table = _open(path, ts_cache_bytes=64 << 20)
  table.push(every, rng.standard_normal((NUM_ROWS, DIM)).astype(np.float32))
  table.flush()  # 150 records, past 150 // 32: into the chunks in the flush itself
  assert table._merge is None and table.stats()["segment_rows"] == 0
  hot = np.array([3, 5, 17, 40, 41, 90, 149])  # in 6 chunks
  table.push(hot, rng.standard_normal((len(hot), DIM)).astype(np.float32))
  table.flush()
  return table, table.committed, table._store.read_rows(every)


_MERGE_KILLS = [("merge.copied_batch", 1), ("merge.copied_batch", 4), ("merge.segments_deleted", 1)]


@pytest.mark.parametrize("point,nth", _MERGE_KILLS)
def test_a_background_merge_killed_at_any_point_reopens_exactly(tmp_path, monkeypatch, point, nth):
  """A background merge stopped at each of its points (after a batch of chunks, after the
  delete): the table reopens exactly at the flush that started it, as it is and at that
  flush's version, with no revert (only a merge committed since), and its next merge
  finishes the job."""
  reached = collections.Counter()

  def kill(name):
    if name.startswith("merge."):
      reached[name] += 1
      if name == point and reached[name] == nth:
        raise _Killed(point)

  _faults.set_handler(kill)
  try:
    table, version, raw = _background_setup(str(tmp_path / "t"), monkeypatch)
    table._merge.join()  # the kill ends it
    with pytest.raises(_Killed):
      table.close(flush=False)
  finally:
    _faults.set_handler(None)
  every = np.arange(NUM_ROWS)
  reverts = []
  monkeypatch.setattr(_store.TableStore, "revert", lambda store, v: reverts.append(v))
  for kwargs in ({}, {"version": version}):
    with _open(str(tmp_path / "t"), ts_cache_bytes=64 << 20, **kwargs) as reopened:
      assert reopened.step == 2
      np.testing.assert_array_equal(reopened._store.read_rows(every), raw)
      left = reopened.stats()["segment_rows"]
      assert left == (0 if point == "merge.segments_deleted" else 7)
      reopened.close(flush=False)
  assert reverts == []
  with _open(str(tmp_path / "t"), ts_cache_bytes=64 << 20) as reopened:
    reopened.flush()  # nothing changed; it starts the merge again if segments are left
    reopened._finish_merge()
    assert reopened.stats()["segment_rows"] == 0
    np.testing.assert_array_equal(reopened._store.read_rows(every), raw)
    reopened.close(flush=False)


def test_reads_and_flushes_during_a_background_merge_are_exact(tmp_path, monkeypatch):
  """While a merge copies one batch after another, every read of the committed rows is the
  flush's, and a flush that writes newer segments meanwhile (rows the merge also holds among
  them) wins over the merge, which then merges them in a second pass (they pass the
  threshold): after it and after a reopen, every row is the one a table without background
  merges holds."""
  every = np.arange(NUM_ROWS)
  ready, paused, resume = threading.Event(), threading.Event(), threading.Event()
  raws = []
  table_box = []

  def hook(name):
    if name == "merge.copied_batch":
      # Inside the merge thread: reads see the committed rows, whatever the chunks hold now.
      assert ready.wait(_CALL_TIMEOUT_S)
      raws.append(table_box[0]._store.read_rows(every))
      if len(raws) == 2:
        paused.set()
        assert resume.wait(_CALL_TIMEOUT_S)

  _faults.set_handler(hook)
  try:
    table, _, raw = _background_setup(str(tmp_path / "t"), monkeypatch)
    table_box.append(table)
    ready.set()
    assert paused.wait(_CALL_TIMEOUT_S)  # the merge is halfway
    # 7 + 4 records stay under the in-line limit: this flush does not wait for the merge.
    monkeypatch.setattr(_table, "_SEGMENT_FRACTION", 1)
    rng = np.random.default_rng(6)
    newer = np.array([5, 6, 41, 120])  # 5 and 41 are in the merging segments
    table.push(newer, rng.standard_normal((len(newer), DIM)).astype(np.float32))
    table.flush()  # writes a segment beside the merging ones; starts no second merge thread
    raw_newer = table._store.read_rows(every)
    resume.set()
    table._finish_merge()
  finally:
    resume.set()
    _faults.set_handler(None)
  # One read after each of the 5 chunks the 7 rows fall in, then after each of the 3 chunks
  # of the newer flush's 4 rows, which the same thread merges in its second pass.
  assert len(raws) == 5 + 3
  for seen in raws[:2]:  # before the newer flush
    np.testing.assert_array_equal(seen, raw)
  for seen in raws[2:]:
    np.testing.assert_array_equal(seen, raw_newer)
  assert not np.array_equal(raw, raw_newer)
  assert table.stats()["background_merges"] == 2
  assert table.stats()["segment_rows"] == 0
  np.testing.assert_array_equal(table._store.read_rows(every), raw_newer)
  table.close()
  # The same pushes and flushes without background merges.
  reference, _, raw_ref = _background_setup(str(tmp_path / "ref"), monkeypatch, background=False)
  np.testing.assert_array_equal(raw_ref, raw)
  reference.push(newer, np.random.default_rng(6).standard_normal((4, DIM)).astype(np.float32))
  reference.close()
  for path in ("t", "ref"):
    with _open(str(tmp_path / path)) as reopened:
      np.testing.assert_array_equal(reopened._store.read_rows(every), raw_newer)
      reopened.close(flush=False)


def test_a_version_is_reverted_only_when_a_flush_came_after_it(tmp_path, monkeypatch):
  """A checkpoint's version after a background merge is the same rows, and reopening at it
  rewrites nothing; after a later flush, reopening at it reverts that flush, exactly."""
  table, version, raw = _background_setup(str(tmp_path / "t"), monkeypatch)
  table._finish_merge()
  assert table.stats()["background_merges"] == 1
  table.close()
  reverts = []
  revert = _store.TableStore.revert
  monkeypatch.setattr(
    _store.TableStore, "revert", lambda store, v: (reverts.append(v), revert(store, v))
  )
  every = np.arange(NUM_ROWS)
  with _open(str(tmp_path / "t"), version=version) as reopened:
    assert reverts == []
    np.testing.assert_array_equal(reopened._store.read_rows(every), raw)
    reopened.push(np.array([7]), np.ones((1, DIM), np.float32))
    reopened.flush()  # step 3
  with _open(str(tmp_path / "t"), version=version) as reopened:
    assert reverts == [version]
    assert reopened.step == 2
    np.testing.assert_array_equal(reopened._store.read_rows(every), raw)
    reopened.close(flush=False)


def test_a_failed_background_merge_warns_and_loses_nothing(tmp_path, monkeypatch):
  """A full disk in the background merge: a warning names it, every read is as before, the
  segments stay, and the next flush's merge (once there is room) finishes the job."""
  write_rows = _store.TableStore.write_rows
  failing = threading.Event()
  failing.set()

  def write(store, ids, rows):
    if failing.is_set() and threading.current_thread().name == "embedding-segment-merge":
      raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return write_rows(store, ids, rows)

  monkeypatch.setattr(_store.TableStore, "write_rows", write)
  table, _, raw = _background_setup(str(tmp_path / "t"), monkeypatch)
  with pytest.warns(RuntimeWarning, match=r"background merge of 7 segment rows.*No space left"):
    table._finish_merge()
  every = np.arange(NUM_ROWS)
  assert table.stats()["segment_rows"] == 7
  np.testing.assert_array_equal(table._store.read_rows(every), raw)
  failing.clear()
  table.flush()
  table._finish_merge()
  assert table.stats()["segment_rows"] == 0 and table.stats()["background_merges"] == 1
  np.testing.assert_array_equal(table._store.read_rows(every), raw)
  table.close()


def test_a_paused_background_merge_copies_no_further_batch_until_resumed(tmp_path, monkeypatch):
  """A flush pauses a running merge (their memory peaks would add up): after the batch under
  way, the merge waits, and goes on when resumed, to the same rows."""
  batches, first_batch, go_on = [], threading.Event(), threading.Event()

  def hook(name):
    if name == "merge.copied_batch":
      batches.append(name)
      first_batch.set()
      assert go_on.wait(_CALL_TIMEOUT_S)

  _faults.set_handler(hook)
  try:
    table, _, raw = _background_setup(str(tmp_path / "t"), monkeypatch)
    merge = table._merge
    assert first_batch.wait(_CALL_TIMEOUT_S)
    merge.pause()
    go_on.set()  # the first batch ends; the second waits for resume
    merge.join(timeout=0.5)
    assert merge.is_alive() and len(batches) == 1
    merge.resume()
    table._finish_merge()
  finally:
    go_on.set()
    _faults.set_handler(None)
  assert len(batches) == 5 and table.stats()["segment_rows"] == 0
  np.testing.assert_array_equal(table._store.read_rows(np.arange(NUM_ROWS)), raw)
  table.close()


@pytest.mark.parametrize("num_rows", [NUM_ROWS, (1 << 32) + 3], ids=["small table", "2^32 rows"])
def test_segment_index_searches_at_the_edges_of_the_id_range(tmp_path, monkeypatch, num_rows):
  """Rows at both ends of the id range (2^32 - 1 and 2^32 on the large table) read back from
  segments and merge into the chunks as they were pushed."""
  monkeypatch.setattr(_table, "_BACKGROUND_MERGE_FRACTION", 0)  # segments stay until merged
  ids = np.array(
    [0, 1, num_rows - 2, num_rows - 1] + ([(1 << 32) - 1, 1 << 32] if num_rows > 1 << 32 else [])
  )
  ids = np.sort(ids)
  table = embedding.open_table(
    str(tmp_path / "t"), num_rows=num_rows, dim=DIM, host_cache_rows=CACHE, chunk_rows=8
  )
  grads = np.random.default_rng(0).standard_normal((len(ids), DIM)).astype(np.float32)
  table.push(ids, grads)
  table.flush()
  expected = table.pull(ids)
  table.close(flush=False)
  with embedding.open_table(str(tmp_path / "t")) as reopened:  # from the segments
    store = reopened._store
    assert store.segment_index_bytes() > 0
    np.testing.assert_array_equal(store.segment_ids(), ids)
    np.testing.assert_array_equal(reopened.pull(ids), expected)
    store.merge_segments(chunk_rows=8, max_chunks=4)  # into the chunks, segments deleted
    assert len(store.segment_ids()) == 0
  with embedding.open_table(str(tmp_path / "t")) as merged:
    np.testing.assert_array_equal(merged.pull(ids), expected)
