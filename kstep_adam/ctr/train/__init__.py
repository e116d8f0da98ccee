"""The training room: how a model is trained on a run's batches. Imports ``data``, never ``run``.

- ``_config``: :class:`TrainConfig`, every training option, validated in one place.
- ``_models``: DLRM and DCN-v2 (flax nnx). ``_interaction``: DLRM's pair dots, by a C++
  kernel on a CPU (``pair_dots.cc``) or by XLA. ``_optimizer``: the dense optimizer of a config.
- ``_loss``: the loss and the per-worker loss/gradient both step builders share.
- ``_step`` / ``_sharded_step``: the jitted step of one process / of several (rows exchanged).
- ``_local_tier`` / ``_sharded_tier`` (+ ``_exchange``): the sparse rows of a step, from one
  process's table or from the shards of all processes. A new sparse-tier strategy goes here.
- ``_loop``: what a step did (:class:`StepResult`), how many steps, the run's batches.
- ``_hooks``: :class:`Hook` and the shipped hooks (progress, metrics log, evaluation). A new
  hook goes here.
- ``_evaluate``: scoring a held-out set. ``_meters``: bytes and time of each step.
- ``_divergence``: the loss monitor that stops a diverging run. ``_adaptive``: the adaptive
  merge period of a run.

This package re-exports nothing: the public names are in :mod:`kstep_adam.ctr`.
"""
