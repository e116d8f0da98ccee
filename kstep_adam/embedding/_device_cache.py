"""The device tier: a fixed-size ``jax.Array`` of hot rows' parameters on the accelerator.

The optimizer runs on the host (``_optimizers``), so the device tier is a *mirror* of the
host tier's parameters for hot rows, with CLOCK replacement (the host cache's policy,
reused through ``HostCache`` with a zero-width row block):

* ``working_set`` gathers a batch's rows on the device from the mirror, and uploads only
  the rows that are absent from it;
* ``push`` re-uploads the new parameters of pushed rows that are resident, right away and
  asynchronously (JAX dispatch does not block), so the transfer overlaps the host's next
  work instead of sitting on the next step's critical path.

What it saves: rows read without being pushed (evaluation, frozen tables, features whose
gradient the caller skips) are never uploaded twice, and the refresh of pushed hot rows
leaves the critical path. What it does not save: a pushed row is still transferred once
per push, because its new value is computed on the host. Moving the optimizer onto the
device (as FBGEMM's TBE does) is the next step and is not done here.

Shapes: every distinct gather size compiles once, so pass ``pad_to`` to ``working_set``
(for example the batch size) to keep one shape; uploads are padded to powers of two.
"""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from kstep_adam.embedding._host_cache import HostCache


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_rows(rows_RxD, slots_P, new_PxD):
  return rows_RxD.at[slots_P].set(new_PxD, mode="drop")  # slot R (padding) is dropped


@jax.jit
def _gather_rows(rows_RxD, slots_P):
  return jnp.take(rows_RxD, slots_P, axis=0, mode="fill", fill_value=0)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


class DeviceCache:
  """Mirror of hot rows' parameters on one device; thread-safe."""

  def __init__(self, capacity_rows: int, dim: int, device=None):
    self.capacity = capacity_rows
    self._device = device or jax.devices()[0]
    # Slot map + CLOCK with no row payload. Resident rows are always current: every host
    # change to a row's parameters (push, exact-mode catch-up) calls ``refresh``.
    self._slots = HostCache(capacity_rows, 0)
    self._rows_RxD = jax.device_put(np.zeros((capacity_rows, dim), np.float32), self._device)
    self._lock = threading.Lock()
    self.hits = 0
    self.uploaded_rows = 0

  def rows_on_device(self, unique_U: np.ndarray, rows_UxD: np.ndarray, pad_to: int):
    """Returns ``rows_UxD`` as a device array ``[pad_to, D]`` (rows past U are zero)."""
    with self._lock:
      if len(unique_U) > self.capacity:  # cannot hold the batch: plain transfer
        self.uploaded_rows += len(unique_U)
        padded = np.zeros((pad_to, rows_UxD.shape[1]), np.float32)
        padded[: len(unique_U)] = rows_UxD
        return jax.device_put(padded, self._device)
      slots_U = self._slots.lookup(unique_U)
      present = slots_U >= 0
      self._slots.pin(slots_U[present])
      new_slots = self._slots.reserve(unique_U[~present])
      self._slots.fill(new_slots, np.zeros((len(new_slots), 0), np.float32))
      slots_U[~present] = new_slots
      self._upload(new_slots, rows_UxD[~present])
      self._slots.unpin(slots_U)
      self.hits += int(np.count_nonzero(present))
      padded_slots = np.full(pad_to, self.capacity, np.int64)
      padded_slots[: len(unique_U)] = slots_U
      return _gather_rows(self._rows_RxD, jax.device_put(padded_slots, self._device))

  def refresh(self, ids_U: np.ndarray, params_UxD: np.ndarray) -> None:
    """Uploads new parameters for the resident rows among ``ids_U`` (others: ignored)."""
    with self._lock:
      slots_U = self._slots.peek(ids_U)
      resident = slots_U >= 0
      self._upload(slots_U[resident], params_UxD[resident])

  def _upload(self, slots_M: np.ndarray, rows_MxD: np.ndarray) -> None:
    if len(slots_M) == 0:
      return
    size = _pow2_at_least(len(slots_M))
    padded_slots = np.full(size, self.capacity, np.int64)
    padded_slots[: len(slots_M)] = slots_M
    padded_rows = np.zeros((size, rows_MxD.shape[1]), np.float32)
    padded_rows[: len(slots_M)] = rows_MxD
    self._rows_RxD = _scatter_rows(
      self._rows_RxD,
      jax.device_put(padded_slots, self._device),
      jax.device_put(padded_rows, self._device),
    )
    self.uploaded_rows += len(slots_M)

  def stats(self) -> dict:
    with self._lock:
      return dict(
        device_hits=self.hits,
        device_uploaded_rows=self.uploaded_rows,
        device_resident_rows=len(self._slots),
      )
