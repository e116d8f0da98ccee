"""The PyTorch CPU peer of the CTR train step: the same DLRM, data and optimizers, in eager torch.

  pip install -e '.[bench]'        # torch is optional: only this benchmark uses it
  python -m experiments.benchmarks.torch_peer --steps 50 --batch-size 4096 --threads 2

What :mod:`experiments.benchmarks.ctr_throughput` measures the JAX step against, in the same
process. The model is :class:`kstep_adam.ctr.DLRM` written in torch: a bottom MLP
13 -> 64 -> 16 on the dense features, the pairwise dot products of that vector and the 26
field embeddings (``np.triu_indices`` order), a top MLP -> 128 -> 64 -> 1, and
``BCEWithLogits``. Embeddings are one ``nn.Embedding(table_rows, 16, sparse=True)`` trained
with ``torch.optim.SparseAdam``, which is the embedding tier's ``SparseAdam(mode='lazy')``
(only the rows of the batch change; bias correction at the global step; epsilon outside the
correction); the dense layers use ``torch.optim.Adam`` (``optax.adam``'s update). Feature keys
are hashed to rows in the timed loop with the tier's own ``hash_keys_to_rows``, as the JAX
trainer's reader does. Given the flax model's parameters, the peer starts from exactly the
JAX run's state (dense layers copied, every table row from the tier's ``init_rows``), so its
losses follow the JAX run's to float32 rounding; ``tests/test_torch_peer.py`` checks that.

Not equivalent: torch does the optimizer arithmetic in float32 where the tier uses float64
intermediates, and ``nn.Embedding`` holds the whole table in RAM (no host cache, no disk).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from experiments._common import write_json

INSTALL_HINT = "the PyTorch peer needs torch: pip install -e '.[bench]' (or pip install torch)"


def require_torch():
  """Import torch, or fail with the install command."""
  try:
    import torch
  except ImportError as error:
    raise ImportError(INSTALL_HINT) from error
  return torch


def _mlp(torch, sizes, *, final_activation: bool):
  layers = []
  for i, (a, b) in enumerate(itertools.pairwise(sizes)):
    layers.append(torch.nn.Linear(a, b))
    if i + 2 < len(sizes) or final_activation:
      layers.append(torch.nn.ReLU())
  return torch.nn.Sequential(*layers)


def make_dlrm(
  *,
  table_rows: int,
  num_dense: int = 13,
  num_categorical: int = 26,
  embed_dim: int = 16,
  bottom: tuple[int, ...] = (64,),
  top: tuple[int, ...] = (128, 64),
):
  """A torch ``nn.Module`` of the DLRM in :mod:`kstep_adam.ctr`: ``model(rows_BxF, dense_BxI)``
  returns logits ``[B]``; ``model.embedding`` is the sparse table."""
  torch = require_torch()
  n = num_categorical + 1
  pair_i, pair_j = (torch.from_numpy(x) for x in np.triu_indices(n, k=1))

  class DLRM(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embedding = torch.nn.Embedding(table_rows, embed_dim, sparse=True)
      self.bottom = _mlp(torch, [num_dense, *bottom, embed_dim], final_activation=True)
      self.top = _mlp(torch, [embed_dim + len(pair_i), *top, 1], final_activation=False)

    def forward(self, rows_BxF, dense_BxI):
      h_BxD = self.bottom(dense_BxI)
      v_BxNxD = torch.cat([h_BxD[:, None, :], self.embedding(rows_BxF)], dim=1)
      gram_BxNxN = torch.bmm(v_BxNxD, v_BxNxD.transpose(1, 2))
      z = torch.cat([h_BxD, gram_BxNxN[:, pair_i, pair_j]], dim=1)
      return self.top(z)[:, 0]

  return DLRM()


def load_flax_params(model, flax_params, table_rows_DxN: np.ndarray | None = None) -> None:
  """Copy a flax DLRM's parameters (``nnx.split``'s state) into the torch model, and the
  table's rows if given: then both start from the same point."""
  torch = require_torch()
  linears = lambda seq: [m for m in seq if isinstance(m, torch.nn.Linear)]
  with torch.no_grad():
    for name in ("bottom", "top"):
      layers = flax_params[name]["layers"]
      for index, linear in enumerate(linears(getattr(model, name))):
        layer = layers[index]
        linear.weight.copy_(torch.from_numpy(np.asarray(layer["kernel"][...]).T.copy()))
        linear.bias.copy_(torch.from_numpy(np.asarray(layer["bias"][...]).copy()))
    if table_rows_DxN is not None:
      model.embedding.weight.copy_(torch.from_numpy(table_rows_DxN))


class TorchPeer:
  """The peer's training state and step.

  Args:
    table_rows: rows of the table (keys are hashed into them with ``salt=seed``).
    embed_dim: embedding width.
    learning_rate: dense Adam's learning rate.
    sparse_learning_rate: SparseAdam's learning rate.
    sparse_eps: SparseAdam's epsilon.
    seed: hashing salt, table init and (without ``flax_params``) torch's init seed.
    init_scale: half-width of the uniform init of the table (the tier's ``init_rows``).
    flax_params: a flax DLRM's parameters to start from (see :func:`load_flax_params`).
  """

  def __init__(
    self,
    *,
    table_rows: int,
    embed_dim: int = 16,
    learning_rate: float = 2e-3,
    sparse_learning_rate: float = 2e-2,
    sparse_eps: float = 1e-8,
    seed: int = 0,
    init_scale: float = 0.05,
    flax_params=None,
  ):
    torch = require_torch()
    from kstep_adam import embedding

    self._torch, self.table_rows, self.seed = torch, table_rows, seed
    torch.manual_seed(seed)
    self.model = make_dlrm(table_rows=table_rows, embed_dim=embed_dim)
    table = embedding.init_rows(np.arange(table_rows), embed_dim, seed=seed, scale=init_scale)
    if flax_params is not None:
      load_flax_params(self.model, flax_params, table)
    else:
      with torch.no_grad():
        self.model.embedding.weight.copy_(torch.from_numpy(table))
    dense = [p for name, p in self.model.named_parameters() if not name.startswith("embedding")]
    self.sparse_opt = torch.optim.SparseAdam(
      list(self.model.embedding.parameters()), lr=sparse_learning_rate, eps=sparse_eps
    )
    self.dense_opt = torch.optim.Adam(dense, lr=learning_rate)
    self.loss_fn = torch.nn.BCEWithLogitsLoss()

  def step(self, batch) -> float:
    """One training step on a :class:`kstep_adam.ctr.CTRBatch`; returns its loss."""
    from kstep_adam import embedding

    torch = self._torch
    rows_BxF = embedding.hash_keys_to_rows(batch.keys_BxF, self.table_rows, salt=self.seed)
    logits = self.model(torch.from_numpy(rows_BxF), torch.from_numpy(batch.dense_BxI))
    loss = self.loss_fn(logits, torch.from_numpy(batch.label_B))
    self.sparse_opt.zero_grad(set_to_none=True)
    self.dense_opt.zero_grad(set_to_none=True)
    loss.backward()
    self.sparse_opt.step()
    self.dense_opt.step()
    return float(loss.detach())

  def rows(self, row_ids: np.ndarray) -> np.ndarray:
    """Current values of these table rows."""
    return self.model.embedding.weight.detach().numpy()[row_ids].copy()


def run(batches, *, threads: int = 2, **peer_kwargs) -> dict:
  """Train the peer on ``batches`` (the first step warms up, untimed); examples/s."""
  torch = require_torch()
  torch.set_num_threads(threads)
  peer = TorchPeer(**peer_kwargs)
  loss = peer.step(batches[0])
  start = time.perf_counter()
  for batch in batches[1:]:
    loss = peer.step(batch)
  seconds = time.perf_counter() - start
  return {
    "examples_per_sec": (len(batches) - 1) * batches[0].size / seconds,
    "seconds": seconds,
    "final_loss": loss,
    "threads": threads,
  }


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--batch-size", type=int, default=4096)
  p.add_argument("--table-rows", type=int, default=1 << 20)
  p.add_argument("--vocab-size", type=int, default=5000)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the result as JSON here")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  require_torch()
  from kstep_adam import ctr

  data = ctr.SyntheticCTR(num_workers=1, vocab_size=args.vocab_size, seed=args.seed)
  batches = [data.batch(s, 0, args.batch_size)[0] for s in range(args.steps)]
  result = run(batches, threads=args.threads, table_rows=args.table_rows, seed=args.seed)
  print(
    f"torch peer: {result['examples_per_sec']:.0f} examples/s "
    f"(batch {args.batch_size}, {args.threads} threads, final loss {result['final_loss']:.4f})"
  )
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
