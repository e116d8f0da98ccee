"""Config of the paper-reproduction experiment: the full grid and its quick variant."""

from __future__ import annotations

import dataclasses

KS = (1, 2, 4, 8, 16, 32, 64)
VARIANTS = ("params", "params+moments")  # what k-step Adam averages every k steps


@dataclasses.dataclass(frozen=True)
class PaperConfig:
  """One grid of the paper's experiment: k-step Adam (two variants) against sync Adam."""

  ks: tuple[int, ...] = KS
  variants: tuple[str, ...] = VARIANTS
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  steps: int = 512
  batch_size: int = 128  # per worker; 8 workers
  test_examples: int = 40_000
  vocab_size: int = 5000
  model: str = "dlrm"
  slow_inter_node_gbps: float = 1.0  # the "slow link" the time column assumes
  inter_node_latency_us: float = 50.0


FULL = PaperConfig()
QUICK = PaperConfig(
  ks=(1, 8, 64), variants=("params",), seeds=(0,), steps=96, batch_size=32, test_examples=8192
)
