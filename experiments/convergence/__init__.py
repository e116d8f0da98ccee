"""Library behind ``python -m experiments.convergence_rate``.

* ``problems``: test problems with exact gradients and known (or bounded) constants.
* ``variants``: the compared algorithms, built from ``kstep_adam``'s optimizers.
* ``runner``: N simulated workers (``vmap`` over a named axis) x seeds x step sizes.
* ``sweeps``: runs a config's sweeps, tunes the step size, writes ``results.jsonl``.
* ``checks``: the theory-vs-measurement table (``checks.json``).
* ``plots``: figures from the result files.
* ``configs``: the full and quick configs, with their run headers.
"""
