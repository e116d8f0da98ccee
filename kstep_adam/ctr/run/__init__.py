"""The run room: a training run's life on disk and across processes. Imports ``train`` and ``data``.

- ``_trainer``: :class:`Trainer`, one run: its step loop, checkpoints and evaluation.
- ``_context``: :func:`open_run`, which opens a run's resources (a :class:`RunContext`) and is the
  one place choosing one process or several; ``_layouts`` holds the two choices.
- ``_state``: the host state a checkpoint keeps (:class:`RunState`) and ``metrics.jsonl``.
- ``_rundir``: the output directory (claimed, checked against ``run.json``, locked).
- ``_checkpoint``: checkpoints (dense state, host state, the table version) and their checks.
- ``_processes``: what a multi-process run does differently (process 0 decides, all learn).
- ``_interrupt``: SIGINT / SIGTERM stop a run at the next step boundary.

This package re-exports nothing: the public names are in :mod:`kstep_adam.ctr`.
"""
