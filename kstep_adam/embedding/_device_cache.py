"""The device tier: hot rows and their optimizer state, owned by the accelerator.

A row resident here lives only here: its parameters and Adam moments are
:class:`~kstep_adam.embedding._device_adam.DeviceRows` on the device, its last step is kept on
the host (``last_step_R``), and the sparse optimizer updates it on the device
(``_device_adam``), inside a jitted training step. The host tier's copy of a resident row,
if any, is stale and is never read: the table sends every read of a resident row here.
So a step whose rows are all resident moves no row across the host-device link; only

* misses: a row read into the device tier travels up once, with its optimizer state, caught
  up to the current step by the host tier (the host path's own pull);
* evictions: a row leaving it (CLOCK, the host cache's policy through ``HostCache`` with a
  zero-width payload) travels down once and is written into the host tier;
* flushes: every resident row is copied down (and stays resident), so the table on disk is
  complete.

Exact mode: a resident row idle for ``window`` steps or more is sent back to the host tier
when it is next read and read in again, caught up by the host; that bounds the per-step
schedule the device catch-up needs (``DeviceBatch.schedule_Wx3x2``).

Every transfer goes through :class:`TransferMeter`, so a run can report its host-device bytes.
Shapes: the batch's slot list is padded to the caller's ``pad_to`` and the catch-up list to a
power of two that never shrinks, so the jitted step sees few shapes; uploads and downloads
are padded to powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kstep_adam.embedding import _device_adam
from kstep_adam.embedding import _optimizers
from kstep_adam.embedding import _store
from kstep_adam.embedding._batch import padded
from kstep_adam.embedding._batch import pow2_at_least
from kstep_adam.embedding._device_adam import DeviceBatch
from kstep_adam.embedding._device_adam import DeviceRows
from kstep_adam.embedding._host_cache import HostCache
from kstep_adam.embedding._transfer import TransferMeter

# Exact mode: rows idle this many steps or more are caught up by the host instead (>= K).
DEFAULT_WINDOW = 256
_MIN_CATCH_UP_ROWS = 256
# Uploads and downloads are padded to a power of two at least this: a few programs only.
_MIN_TRANSFER_ROWS = 64


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_rows(rows: DeviceRows, slots_M, params_MxD, state_MxS) -> DeviceRows:
  return DeviceRows(
    rows.params_RxD.at[slots_M].set(params_MxD, mode="drop", unique_indices=True),
    rows.slots_RxS.at[slots_M].set(state_MxS, mode="drop", unique_indices=True),
  )


@jax.jit
def _gather_state(rows: DeviceRows, slots_M):
  take = functools.partial(jnp.take, axis=0, mode="fill", fill_value=0)
  return jnp.concatenate([take(rows.params_RxD, slots_M), take(rows.slots_RxS, slots_M)], axis=1)


class DeviceCache:
  """Hot rows' parameters and optimizer state on the device. Not thread-safe: the table
  calls it with its locks held.

  Args:
    capacity_rows: slots R.
    dim: embedding width D.
    optimizer: the table's ``SparseAdam`` (the device runs its arithmetic).
    sharding: where the rows live: a device, or a sharding (e.g. replicated over a mesh, so
      every worker of a ``shard_map`` step holds them); default the first device.
    window: exact mode's longest catch-up on the device, in steps (more than the optimizer's
      ``catch_up_terms``); default ``DEFAULT_WINDOW``.
  """

  def __init__(
    self,
    capacity_rows: int,
    dim: int,
    optimizer: _optimizers.SparseAdam,
    *,
    sharding=None,
    window: int | None = None,
  ):
    if not isinstance(optimizer, _optimizers.SparseAdam):
      raise ValueError(
        "device_cache_rows > 0 runs the sparse optimizer on the device, which supports "
        f"SparseAdam (exact or lazy); got {type(optimizer).__name__}: use device_cache_rows=0"
      )
    window = DEFAULT_WINDOW if window is None else window
    if optimizer.mode == "exact" and window <= optimizer.catch_up_terms:
      raise ValueError(
        f"window must exceed the catch-up terms K={optimizer.catch_up_terms}, got {window}"
      )
    self.capacity, self.dim, self.optimizer, self.window = capacity_rows, dim, optimizer, window
    if sharding is None:
      sharding = jax.devices()[0]
    if isinstance(sharding, jax.Device):
      sharding = jax.sharding.SingleDeviceSharding(sharding)
    self.sharding = sharding
    self.meter = TransferMeter()
    self._slots = HostCache(capacity_rows, 0)  # id <-> slot and CLOCK, no payload
    self.last_step_R = np.full(capacity_rows, -1, np.int64)
    width = optimizer.slot_width(dim)
    self.rows = self.meter.put(
      DeviceRows(
        np.zeros((capacity_rows, dim), np.float32), np.zeros((capacity_rows, width), np.float32)
      ),
      sharding,
      "device_tier_init",
    )
    self._catch_up_rows = _MIN_CATCH_UP_ROWS  # high-water mark of the catch-up bucket
    self.hits = self.misses = 0
    self.uploaded_rows = self.downloaded_rows = 0

  def __len__(self) -> int:
    return len(self._slots)

  # -- what the table asks ----------------------------------------------------------------
  def peek(self, ids_U: np.ndarray) -> np.ndarray:
    """Slots of ``ids_U`` (-1 where not resident), CLOCK bits untouched."""
    return self._slots.peek(ids_U)

  def resident_ids(self) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, slots)`` of every resident row."""
    slots = np.flatnonzero(self._slots.ids_C >= 0)
    return self._slots.ids_C[slots], slots

  def stale(self, slots_U: np.ndarray, step: int) -> np.ndarray:
    """Which resident rows are too stale for the device catch-up (exact mode)."""
    if self.optimizer.mode != "exact":
      return np.zeros(len(slots_U), bool)
    last = self.last_step_R[slots_U]
    return (last >= 0) & (step - last >= self.window)

  def admit(self, ids_U: np.ndarray, write_back) -> tuple[np.ndarray, np.ndarray]:
    """Make room for the batch's sorted unique rows: returns ``(slots_U, new)``, ``new``
    marking the rows that were not resident (their slots are reserved and must be filled).

    Rows evicted to make room are handed to ``write_back(ids_V, rows_VxW)`` (host row
    layout) first; if it raises, nothing has changed. The batch's rows stay pinned until
    :meth:`release`.
    """
    self.check_fits(len(ids_U))
    slots_U = self._slots.lookup(ids_U)
    present = slots_U >= 0
    self._slots.pin(slots_U[present])

    def write_back_victims(victim_ids, _payload):
      victim_slots = self._slots.peek(victim_ids)
      write_back(victim_ids, self.download(victim_slots))

    try:
      new_slots = self._slots.reserve(ids_U[~present], write_back=write_back_victims)
    except BaseException:
      self._slots.unpin(slots_U[present])
      raise
    self._slots.fill(new_slots, np.zeros((len(new_slots), 0), np.float32))
    # A resident row is newer than the host's copy: "dirty", so eviction writes it back.
    self._slots.dirty_C[new_slots] = True
    slots_U[~present] = new_slots
    self.hits += int(np.count_nonzero(present))
    self.misses += len(new_slots)
    return slots_U, ~present

  def check_fits(self, num_rows: int) -> None:
    """Raise ValueError if a batch of ``num_rows`` unique rows cannot all be resident."""
    if num_rows > self.capacity:
      raise ValueError(
        f"a batch of {num_rows} unique rows does not fit in device_cache_rows="
        f"{self.capacity}; raise device_cache_rows to at least the rows of one batch"
      )

  def release(self, slots_U: np.ndarray) -> None:
    self._slots.unpin(slots_U)

  def evict(self, ids_V: np.ndarray, write_back) -> None:
    """Send resident rows back to the host tier (``write_back``) and free their slots."""
    slots_V = self._slots.peek(ids_V)
    ids_V, slots_V = ids_V[slots_V >= 0], slots_V[slots_V >= 0]
    if len(ids_V) == 0:
      return
    write_back(ids_V, self.download(slots_V))
    self._slots.free(slots_V)
    self.last_step_R[slots_V] = -1

  def download(self, slots_M: np.ndarray) -> np.ndarray:
    """The rows in ``slots_M`` in the host row layout ``[M, 1 + D + S]`` (last step first)."""
    if len(slots_M) == 0:
      return np.zeros((0, 1 + self.dim + self.optimizer.slot_width(self.dim)), np.float32)
    slots_T = padded(slots_M, _transfer_size(len(slots_M)), self.capacity, np.int32)
    slots = self.meter.put(slots_T, self.sharding, "slot_ids")
    state = self.meter.get(_gather_state(self.rows, slots), "rows")
    rows_MxW = np.empty((len(slots_M), 1 + state.shape[1]), np.float32)
    rows_MxW[:, 0] = _store.encode_last_step(self.last_step_R[slots_M])
    rows_MxW[:, 1:] = state[: len(slots_M)]
    self.downloaded_rows += len(slots_M)
    return rows_MxW

  def upload(self, slots_M: np.ndarray, rows_MxW: np.ndarray) -> None:
    """Write rows (host row layout) into ``slots_M``."""
    if len(slots_M) == 0:
      return
    size = _transfer_size(len(slots_M))
    params = padded(rows_MxW[:, 1 : 1 + self.dim], size, 0.0)
    state = padded(rows_MxW[:, 1 + self.dim :], size, 0.0)
    slots, params, state = self.meter.put(
      (padded(slots_M, size, self.capacity, np.int32), params, state), self.sharding, "rows"
    )
    self.rows = _scatter_rows(self.rows, slots, params, state)
    self.last_step_R[slots_M] = _store.decode_last_step(rows_MxW)
    self.uploaded_rows += len(slots_M)

  def batch(self, slots_U: np.ndarray, step: int, pad_to: int) -> DeviceBatch:
    """The device inputs of a step that reads ``slots_U`` at table step ``step`` (and, if it
    pushes, performs step ``step + 1``): slots, catch-up plan, scalars. NumPy arrays."""
    opt = self.optimizer
    slots_P = padded(slots_U, pad_to, self.capacity, np.int32)
    if opt.mode == "exact":
      last = self.last_step_R[slots_U]
      needs = (last >= 0) & (last < step)
      catch_slots, catch_last = slots_U[needs], last[needs]
      size = self._catch_up_rows = max(self._catch_up_rows, pow2_at_least(len(catch_slots)))
      first_c = step - self.window + 1  # the schedule covers steps first_c .. step
      c = np.arange(first_c, step + 1)
      valid = c >= 1
      schedule = np.ones((self.window, 3))
      schedule[valid, 0] = _optimizers.learning_rates(opt.learning_rate, c[valid] - 1)
      schedule[valid, 1] = 1.0 - _optimizers.powers(opt.b1, c[valid])
      schedule[valid, 2] = 1.0 - _optimizers.powers(opt.b2, c[valid])
      catch = (
        padded(catch_slots, size, self.capacity, np.int32),
        padded(catch_last - first_c, size, 0, np.int32),
        padded(step - catch_last, size, 0, np.int32),
      )
      schedule_bits = _device_adam.float64_bits(schedule)
    else:
      catch = (np.zeros(0, np.int32),) * 3
      schedule_bits = np.zeros((0, 3, 2), np.uint32)
    return DeviceBatch(
      slots_P,
      *catch,
      schedule_bits,
      _device_adam.step_scalar_bits(opt, step + 1),
      np.float32(0.0),
    )

  def put_batch(self, batch: DeviceBatch, kind: str = "step_inputs") -> DeviceBatch:
    """Copy a batch's inputs to the device (counted as ``kind``)."""
    return self.meter.put(batch, self.sharding, kind)

  def after_read(self, slots_U: np.ndarray, step: int) -> None:
    """Rows read at ``step`` were caught up to it (exact mode)."""
    if self.optimizer.mode == "exact":
      last = self.last_step_R[slots_U]
      self.last_step_R[slots_U] = np.where(last >= 0, step, last)

  def after_push(self, slots_U: np.ndarray, step: int) -> None:
    """Rows pushed by step number ``step`` now reflect it."""
    self.last_step_R[slots_U] = step

  def stats(self) -> dict:
    return dict(
      device_hits=self.hits,
      device_misses=self.misses,
      device_hit_rate=self.hits / max(1, self.hits + self.misses),
      device_evictions=self._slots.evictions,
      device_uploaded_rows=self.uploaded_rows,
      device_downloaded_rows=self.downloaded_rows,
      device_resident_rows=len(self._slots),
      device_transfer_bytes=self.meter.totals(),
    )


def _transfer_size(num_rows: int) -> int:
  return max(_MIN_TRANSFER_ROWS, pow2_at_least(num_rows))
