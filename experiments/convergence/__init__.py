"""Library behind ``python -m experiments.convergence_rate``.

* ``problems``: test problems with exact gradients and certified (or labelled) constants.
* ``variants``: the compared algorithms, built from ``kstep_adam``'s optimizers.
* ``runner``: N simulated workers (``vmap`` over a named axis) x seeds x step sizes.
* ``sweeps``: runs a config's sweeps and chooses the step sizes on held-apart seeds.
* ``checks``: the theory-vs-measurement table and the curves the figures draw.
* ``configs``: the full and quick configs (frozen dataclasses), with the run header.

The figures are drawn by :mod:`experiments.plot.convergence`.
"""
