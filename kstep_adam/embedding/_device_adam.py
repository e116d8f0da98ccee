"""Sparse Adam on device-resident rows: the host's arithmetic, traced into a jitted step.

The device tier (``_device_cache``) keeps hot rows *and their Adam moments* in device arrays
(:class:`DeviceRows`); this module updates them where they live, so a training step that
reads and writes only resident rows sends no row across the host-device link. Each step's
small inputs (slot numbers, catch-up plan, step scalars) form a :class:`DeviceBatch`.

The arithmetic is the host's own (``_optimizers.adam_moments``, ``adam_params``,
``catch_up_coefficients``, ``catch_up_params``), run on ``jax.numpy`` in float64 under
``jax.enable_x64`` and stored in float32 like the host tier, so a row gets the same bits
whichever tier updates it. float64 scalars cross into the program as uint32 bit patterns
(without ``jax_enable_x64`` a float64 argument would be rounded to float32 on the way in).
A backend without float64 (TPU) cannot run this; keep ``device_cache_rows=0`` there.

Exact mode: a resident row that missed steps is caught up where the host would do it, when
it is next read (:func:`gather_rows`), with the same truncated sum; the per-step terms come in
``DeviceBatch.schedule_Wx3x2`` (learning rate and bias corrections of the last ``W`` steps)
and the powers ``b^j`` are constants of the program. Rows idle for ``W`` steps or more are
sent back to the host tier instead (see ``DeviceCache``), which bounds ``W``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kstep_adam.embedding import _optimizers


class DeviceRows(NamedTuple):
  """The device tier's rows: parameters and optimizer state of ``R`` cache slots."""

  params_RxD: jax.Array  # float32 [R, D]
  slots_RxS: jax.Array  # float32 [R, S], the optimizer's per-row state (Adam: m, then v)


class DeviceBatch(NamedTuple):
  """One step's inputs for the device rows (built on the host, small)."""

  slots_P: jax.Array  # int32 [P], the slot of each of the batch's U rows, then R (padding)
  catch_slots_C: jax.Array  # int32 [C], resident rows to catch up first, then R (padding)
  catch_offset_C: jax.Array  # int32 [C], last step s minus the schedule's first step c0
  catch_gap_C: jax.Array  # int32 [C], steps missed (t - s), 0 for padding
  schedule_Wx3x2: jax.Array  # uint32 [W, 3, 2], float64 bits of (lr_(c-1), 1-b1^c, 1-b2^c)
  # for c = c0 .. c0 + W - 1
  scalars_4x2: jax.Array  # uint32 [4, 2], float64 bits of this step's lr, bc1, bc2, lazy_scale
  zero: jax.Array  # float32 [], 0.0 at run time (see ``_optimizers``: no fused multiply-add)


def float64_bits(values) -> np.ndarray:
  """float64 values as uint32 pairs ``[..., 2]``, the form :class:`DeviceBatch` carries."""
  values = np.ascontiguousarray(values, dtype=np.float64)
  return values.view(np.uint32).reshape(*values.shape, 2)


def step_scalar_bits(optimizer: _optimizers.SparseAdam, step: int) -> np.ndarray:
  """The float64 bits of table step ``step``'s ``lr, bc1, bc2, lazy_scale`` (uint32 ``[4, 2]``),
  the form ``DeviceBatch.scalars_4x2`` and ``PendingPush.scalars_4x2`` carry."""
  scalars = optimizer.step_scalars(step)
  return float64_bits([scalars[k] for k in ("lr", "bc1", "bc2", "lazy_scale")])


def _float64(bits):
  return jax.lax.bitcast_convert_type(bits, jnp.float64)


def gather_rows(optimizer: _optimizers.SparseAdam, rows: DeviceRows, batch: DeviceBatch):
  """Catch up the batch's stale rows (exact mode), then gather its rows.

  Returns:
    ``(rows, rows_PxD)``: the updated :class:`DeviceRows` and the batch's parameters,
    float32 ``[P, D]``, zero past its ``U`` rows.
  """
  if optimizer.mode == "exact" and batch.catch_slots_C.shape[0]:
    rows = _catch_up(optimizer, rows, batch)
  rows_PxD = jnp.take(rows.params_RxD, batch.slots_P, axis=0, mode="fill", fill_value=0)
  return rows, rows_PxD


def apply_grads(
  optimizer: _optimizers.SparseAdam,
  rows: DeviceRows,
  batch: DeviceBatch,
  grads_PxD: jax.Array,
  *,
  apply: jax.Array | None = None,
) -> DeviceRows:
  """One Adam step on the batch's rows with their gradients (rows past ``U`` are ignored).

  ``apply``: an optional traced boolean; where False the rows keep their values (a step
  skipped for non-finite gradients), at the cost of a select over the batch's rows only.
  """
  slots_P = batch.slots_P
  params_PxD = jnp.take(rows.params_RxD, slots_P, axis=0, mode="fill", fill_value=0)
  state_PxS = jnp.take(rows.slots_RxS, slots_P, axis=0, mode="fill", fill_value=0)
  new_params, new_state = _adam_step(
    optimizer, params_PxD, state_PxS, grads_PxD, batch.scalars_4x2, batch.zero
  )
  if apply is not None:
    new_params = jnp.where(apply, new_params, params_PxD)
    new_state = jnp.where(apply, new_state, state_PxS)
  return DeviceRows(
    rows.params_RxD.at[slots_P].set(new_params, mode="drop", unique_indices=True),
    rows.slots_RxS.at[slots_P].set(new_state, mode="drop", unique_indices=True),
  )


class PendingPush(NamedTuple):
  """A push the host has yet to apply, for a step that reads rows before it (built on the
  host by ``EmbeddingTable.working_set_before_push``, small).

  The next step's rows are read while the previous step still computes, so the ``Q`` rows
  both steps share are read as they were before that step's push. The next step's program
  applies the push to them itself (:func:`~kstep_adam.embedding.apply_pending_push`), with
  the gradient the previous program returned, while the host applies it to the table: both
  get the same bits.
  """

  rows_Q: jax.Array  # int32 [Q], the shared rows' positions in this step's rows, then P
  pushed_Q: jax.Array  # int32 [Q], their positions in the pushed gradient's rows, then 0
  state_QxS: jax.Array  # float32 [Q, S], their optimizer state before the push
  scalars_4x2: jax.Array  # uint32 [4, 2], float64 bits of the push's lr, bc1, bc2, lazy_scale
  zero: jax.Array  # float32 [], 0.0 at run time (see ``_optimizers``: no fused multiply-add)


def apply_pending_push(
  optimizer: _optimizers.SparseAdam,
  rows_PxD: jax.Array,
  pending: PendingPush,
  pushed_grads_GxD: jax.Array,
  apply: jax.Array,
) -> jax.Array:
  """This step's rows ``[P, D]`` after the pending push of ``pushed_grads_GxD`` (the previous
  step's row gradient; ``apply`` False: that step was skipped, the rows stay as read).

  Only a lazy ``SparseAdam`` push can wait this way: exact mode moves every row each step.
  """
  if optimizer.mode != "lazy":
    raise ValueError(f"a pending push needs a lazy SparseAdam, got mode={optimizer.mode!r}")
  params_QxD = jnp.take(rows_PxD, pending.rows_Q, axis=0, mode="fill", fill_value=0)
  grads_QxD = jnp.take(pushed_grads_GxD, pending.pushed_Q, axis=0, mode="fill", fill_value=0)
  new_params, _ = _adam_step(
    optimizer, params_QxD, pending.state_QxS, grads_QxD, pending.scalars_4x2, pending.zero
  )
  new_params = jnp.where(apply, new_params, params_QxD)
  return rows_PxD.at[pending.rows_Q].set(new_params, mode="drop", unique_indices=True)


def _adam_step(optimizer, params_PxD, state_PxS, grads_PxD, scalars_4x2, zero):
  """The host's ``SparseAdam.apply`` in ``jax.numpy``: new float32 parameters and state."""
  dim = params_PxD.shape[1]
  with jax.enable_x64(True):
    lr, bc1, bc2, lazy_scale = _float64(scalars_4x2)
    zero = zero.astype(jnp.float64)
    m, v = _optimizers.adam_moments(
      jnp,
      state_PxS[:, :dim],
      state_PxS[:, dim:],
      grads_PxD.astype(jnp.float64),
      b1=optimizer.b1,
      b2=optimizer.b2,
      zero=zero,
    )
    new_params = _optimizers.adam_params(
      jnp,
      params_PxD,
      m,
      v,
      lr=lr,
      bc1=bc1,
      bc2=bc2,
      lazy_scale=lazy_scale,
      eps=optimizer.eps,
      exact=optimizer.mode == "exact",
      zero=zero,
    ).astype(jnp.float32)
    return new_params, jnp.concatenate([m, v], axis=1).astype(jnp.float32)


def _catch_up(optimizer: _optimizers.SparseAdam, rows: DeviceRows, batch: DeviceBatch):
  """``SparseAdam.catch_up`` of the rows ``batch.catch_slots_C`` to the current step."""
  dim = rows.params_RxD.shape[1]
  slots_C, offset_C, gap_C = batch.catch_slots_C, batch.catch_offset_C, batch.catch_gap_C
  params_CxD = jnp.take(rows.params_RxD, slots_C, axis=0, mode="fill", fill_value=0)
  state_CxS = jnp.take(rows.slots_RxS, slots_C, axis=0, mode="fill", fill_value=0)
  window = batch.schedule_Wx3x2.shape[0]
  b1_pow, b2_pow = optimizer.power_tables()  # b^j, j = 0..K
  with jax.enable_x64(True):
    zero = batch.zero.astype(jnp.float64)
    schedule = _float64(batch.schedule_Wx3x2)  # [W, 3]
    m_s = state_CxS[:, :dim].astype(jnp.float64)
    v_s = state_CxS[:, dim:].astype(jnp.float64)
    sqrt_v = jnp.sqrt(v_s)
    terms_C = jnp.minimum(gap_C, optimizer.catch_up_terms)
    b1_pow_j, b2_pow_j = jnp.asarray(b1_pow), jnp.asarray(b2_pow)

    def term(j, coef_CxD):  # term j of every row's sum, in the host's order (j = 1, 2, ...)
      index_C = jnp.clip(offset_C + j, 0, window - 1)
      num_C, shift_C = _optimizers.catch_up_coefficients(
        jnp,
        schedule[index_C, 0],
        b1_pow_j[j],
        schedule[index_C, 1],
        b2_pow_j[j],
        schedule[index_C, 2],
        optimizer.eps,
      )
      value = num_C[:, None] / (sqrt_v + shift_C[:, None])
      return coef_CxD + jnp.where((j <= terms_C)[:, None], value, 0.0)

    coef_CxD = jax.lax.fori_loop(1, jnp.max(terms_C) + 1, term, jnp.zeros_like(sqrt_v))
    new_params = _optimizers.catch_up_params(jnp, params_CxD, m_s, coef_CxD, zero)
    # b^gap from the same Python powers as the host (gap < W, see DeviceCache).
    gap_pow = _optimizers.powers
    b1_gap = jnp.asarray(gap_pow(optimizer.b1, np.arange(window + 1)))[gap_C]
    b2_gap = jnp.asarray(gap_pow(optimizer.b2, np.arange(window + 1)))[gap_C]
    new_state = jnp.concatenate([m_s * b1_gap[:, None], v_s * b2_gap[:, None]], axis=1)
    moved = (gap_C > 0)[:, None]
    new_params = jnp.where(moved, new_params.astype(jnp.float32), params_CxD)
    new_state = jnp.where(moved, new_state.astype(jnp.float32), state_CxS)
  return DeviceRows(
    rows.params_RxD.at[slots_C].set(new_params, mode="drop", unique_indices=True),
    rows.slots_RxS.at[slots_C].set(new_state, mode="drop", unique_indices=True),
  )
