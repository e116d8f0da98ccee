"""Library behind ``python -m experiments.reproduce_paper``, one job per module.

* ``config``: :class:`~experiments.paper.config.PaperConfig`, the full and quick grids.
* ``run``: trains every (optimizer, k, seed) of a grid and appends one line per run to
  ``runs.jsonl`` (each run's curve lands in ``RUN/metrics.jsonl``).
* ``summary``: one row per (optimizer, variant, k) from ``runs.jsonl``: means, stds, paired
  deltas; the largest k that keeps AUC.
* ``table``: ``table.csv`` and ``table.md`` from the summary rows.

The figures are drawn by :mod:`experiments.plot.paper`, from the same files.
"""
