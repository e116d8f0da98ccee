"""The one plotting module: every figure of the project is drawn here, from result files.

Figures are never drawn from in-memory training state: each function takes records read back
from ``results/`` or a run directory, so a figure can be rebuilt without retraining. One
module per figure family (``paper.py``, ``convergence.py``); :mod:`experiments.plot._style` finishes and saves
every figure the same way.
"""
