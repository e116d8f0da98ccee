"""The PyTorch peer of the throughput benchmark trains the same model the same way.

Skipped without torch (it is in the optional ``bench`` extra). From the JAX run's own start
(dense layers copied, table rows from the tier's init), the peer's losses and rows follow
the JAX workflow's (one worker, synchronous Adam, lazy SparseAdam) to float32 rounding: torch
does the optimizer arithmetic in float32, the tier in float64, and the two libraries sum in
different orders.
"""

import numpy as np
import pytest
from flax import nnx

from experiments.benchmarks import torch_peer
from kstep_adam import ctr

torch = pytest.importorskip("torch")

TABLE_ROWS = 1 << 12


def test_the_peer_follows_the_jax_workflow_step_for_step():
  data = ctr.SyntheticCTR(num_workers=1, vocab_size=200, seed=2)
  batches = [data.batch(s, 0, 128)[0] for s in range(4)]
  config = ctr.TrainConfig(
    batch_size=128,
    optimizer="sync_adam",
    nodes=1,
    devices_per_node=1,
    steps=len(batches),
    log_every=1,
    eval_every=0,
    table_rows=TABLE_ROWS,
    host_cache_rows=TABLE_ROWS,
    sparse_mode="lazy",
    prefetch=False,
  )
  source = ctr.batches_source("fixed", batches, batches[:1])
  records = []

  class Losses(ctr.Hook):
    def after_step(self, trainer, result):
      records.append(result.loss)

  with ctr.Trainer(config, source, ctr.make_optimizer(config)) as trainer:
    trainer.fit([Losses()])
    row_ids = np.unique(np.concatenate([trainer.tier.index(b.keys_BxF)[0] for b in batches]))
    jax_rows = trainer.tier.table.pull(row_ids)

  model = ctr.make_model("dlrm", num_dense=13, num_categorical=26, embed_dim=config.embed_dim)
  peer = torch_peer.TorchPeer(
    table_rows=TABLE_ROWS,
    learning_rate=config.learning_rate,
    sparse_learning_rate=config.sparse_learning_rate,
    seed=config.seed,
    init_scale=config.init_scale,
    flax_params=nnx.split(model)[1],
  )
  peer_losses = [peer.step(batch) for batch in batches]
  np.testing.assert_allclose(peer_losses, records, rtol=1e-5)
  # A step moves a row by up to the sparse learning rate (2e-2); Adam's normalization turns
  # float32 rounding in tiny gradients into differences far below that.
  np.testing.assert_allclose(peer.rows(row_ids), jax_rows, rtol=0, atol=1e-5)


def test_a_missing_torch_is_named_with_the_install_command(monkeypatch):
  import builtins

  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[bench\]'"):
    torch_peer.require_torch()
