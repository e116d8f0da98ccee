"""Baselines: synchronous Adam (DDP), local SGD, DiLoCo, and two compressed exchanges.

One optimizer per module, as in ``optax.contrib``; the public names are re-exported by
:mod:`kstep_adam` only (this package re-exports nothing, so every name has one import path).

- ``_sync_adam``: :func:`~kstep_adam.sync_adam`, DDP Adam (gradients averaged every step).
- ``_local_sgd``: :func:`~kstep_adam.local_sgd`.
- ``_diloco``: :func:`~kstep_adam.diloco` and its state.
- ``_onebit_adam``: :func:`~kstep_adam.onebit_adam`, :func:`~kstep_adam.scale_by_onebit_adam`.
- ``_topk_ef``: :func:`~kstep_adam.topk_ef`, :func:`~kstep_adam.sparsified_mean` (top-k or
  random-k with error feedback).
- ``_schedules``: how a baseline builds the schedule it runs from its arguments (internal).

They share the merge schedule, the collectives and the harness with :func:`kstep_adam.kstep_adam`,
so their communication is counted the same way. Each takes the :class:`~kstep_adam.MergeSchedule`
it runs (``sync_schedule(...)`` for DDP, ``compressed_schedule(...)`` for 1-bit Adam and top-k /
random-k with error feedback, ``merge_schedule(...)`` for the others): build it once, pass it to
the optimizer and to :func:`kstep_adam.comm_bytes`.
"""
