"""Named points of the checkpoint and flush sequence, where a test can stop the process.

Every point where a kill leaves a different state on disk is named here and reached in
order by :func:`reached`; the tests of exact resume kill a run at each of them (not at a
random moment) and check that the resumed run ends as the uninterrupted one did. In a run
without a fault set, :func:`reached` is a dictionary lookup.

A fault is set in the environment, so it reaches every process a test starts (a run, the
processes of ``kstep_adam.launch``, the runs of a sweep)::

  KSTEP_ADAM_FAULT=POINT[@N][:RANK]

kills the process (SIGKILL, as the kernel's OOM killer or a preemption would) the ``N``-th
time (default 1) it reaches ``POINT``; with ``:RANK``, only the process of that index in a
multi-process run (``KSTEP_ADAM_PROCESS_ID``). In-process tests use :func:`set_handler`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

ENV = "KSTEP_ADAM_FAULT"

# In the order a checkpoint reaches them.
POINTS = (
  "checkpoint.dense",  # the dense state is saved (dense/ renamed into place)
  "checkpoint.host",  # host.json is written
  "flush.appended",  # the dirty rows are in the pending log, not yet committed
  "flush.committed",  # the pending log's commit point: the table's step is now durable
  "flush.segment_written",  # one part of the committed log is a segment in the database
  # (a flush that merges writes none: it copies the segments and the log in one pass)
  "flush.copied_batch",  # one batch of the segments' and the log's rows is in the chunks
  "flush.segments_merged",  # the segments and the log are in the chunks, segments deleted
  "flush.step_written",  # the table's commit.json names the new step; the log is not cleared
  "flush.cleared",  # the pending log is cleared: the flush is done
  "checkpoint.manifest",  # the manifest is written: the checkpoint is complete
  "checkpoint.pruned",  # older checkpoints are deleted
)
# Reached by a table's background merge of segments into its chunks (``SegmentMerge``), in a
# thread of its own beside training, so at no fixed point of the sequence above.
MERGE_POINTS = (
  "merge.copied_batch",  # one batch of the merged segments' rows is in the chunks
  "merge.segments_deleted",  # the merged segments are deleted
)

_handler: Callable[[str], None] | None = None
_counts: dict[str, int] = {}


def set_handler(handler: Callable[[str], None] | None) -> None:
  """Call ``handler(point)`` at every point reached (None: stop), e.g. one that raises."""
  global _handler
  _handler = handler


def reached(point: str) -> None:
  """The process has reached ``point`` (one of :data:`POINTS` or :data:`MERGE_POINTS`)."""
  if _handler is not None:
    _handler(point)
  spec = os.environ.get(ENV)
  if not spec:
    return
  target, _, rank = spec.partition(":")
  name, _, nth = target.partition("@")
  if name != point or (rank and rank != os.environ.get("KSTEP_ADAM_PROCESS_ID", "0")):
    return
  _counts[point] = _counts.get(point, 0) + 1
  if _counts[point] == int(nth or 1):
    os.kill(os.getpid(), signal.SIGKILL)
