"""Library behind ``python -m experiments.sweep``, one job per module.

* ``spec``: a sweep file (TOML) -> :class:`~experiments.sweep_lib.spec.SweepSpec` -> its runs.
* ``tasks``: what a run trains (``ctr``: :func:`kstep_adam.ctr.train`; ``convergence``: the
  convergence experiment's runner) and the ``results.csv`` columns of its summary.
* ``worker``: one run in a process of its own, under a lock.
* ``scheduler``: runs the unfinished runs of a shard, ``--jobs`` at a time.
* ``results``: ``results.csv`` rebuilt from the run directories; each run's curves.
* ``select``: the best learning rate per group on validation, test metric over seeds.
* ``report``: ``selection.csv`` and ``table.md``.

The sweep files live in ``experiments/sweeps/``; the figures are drawn by
:mod:`experiments.plot.sweep`, from the same files.
"""
