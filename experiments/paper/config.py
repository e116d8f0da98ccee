"""Configs of the paper-reproduction experiment: the full grid and the quick one derived from it.

Full run (:data:`FULL`), the one behind ``results/reproduce_paper/`` and ``figures/paper_*.png``:

  Command:  python -m experiments.reproduce_paper --out runs/paper
            (without ``--out`` it resumes the committed ``results/reproduce_paper``, whose runs
            are all done, so it only redraws the table and figures)
  Hardware: CPU only: 8 simulated devices (2 nodes x 4) on a 2-core VM shared with other jobs.
  Runtime:  see docs/benchmarks.md (every command with its runtime).
  Expected: with parameter-only averaging, mean test AUC stays within 0.001 of k = 1 up to
            k = 32 (the run prints this "largest k"; the committed run reaches it) while dense
            inter-node bytes fall as 1/k. docs/paper.md has the whole table.

Quick run (:data:`QUICK`): ``python -m experiments.reproduce_paper --quick`` writes under
``runs/reproduce_paper_quick``; a smoke test of every code path (three values of k, one variant,
one seed, short runs), not evidence.
"""

from __future__ import annotations

import dataclasses
import json

from experiments._common import write_json
from kstep_adam._validation import check_choice
from kstep_adam._validation import check_float
from kstep_adam._validation import check_int
from kstep_adam.ctr import MODELS
from kstep_adam.ctr.train._config import SYNC_STATES

# Fields that only size the grid; every other field changes what a single run computes, so a
# results directory holds runs of one value of each (see ``experiments.paper.run``).
GRID_FIELDS = ("ks", "variants", "num_seeds")


@dataclasses.dataclass(frozen=True)
class PaperConfig:
  """One grid of the paper experiment: sync Adam (DDP) and k-step Adam for every k.

  Each seed runs sync Adam once and k-step Adam once per (variant, k), each run on 2 nodes x 4
  simulated devices (8 workers) with synchronous sparse embeddings; the seed fixes the data, the
  teacher and the initialization, so deltas between runs of one seed are paired.

  Attributes:
    ks: merge periods k of k-step Adam.
    variants: what k-step Adam averages every k steps: ``params`` (the production default),
      ``params+nu`` or ``params+moments``.
    num_seeds: runs use seeds 0 .. num_seeds - 1.
    steps: training steps per run.
    batch_size: examples per worker per step (8 workers).
    test_examples: held-out examples per seed, for test AUC and logloss.
    vocab_size: largest field vocabulary of the synthetic data.
    model: the CTR model, ``dlrm`` or ``dcn_v2``.
    slow_inter_node_gbps: bandwidth of the slow inter-node link, Gbit/s per device, that the
      estimated communication times assume.
    inter_node_latency_us: latency per inter-node message, microseconds, in the same estimate.
  """

  ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
  variants: tuple[str, ...] = dataclasses.field(
    default=("params", "params+moments"), metadata={"choices": SYNC_STATES}
  )
  num_seeds: int = 5
  steps: int = 512
  batch_size: int = 128
  test_examples: int = 40_000
  vocab_size: int = 5000
  model: str = dataclasses.field(default="dlrm", metadata={"choices": MODELS})
  slow_inter_node_gbps: float = 1.0
  inter_node_latency_us: float = 50.0

  def __post_init__(self):
    for name in ("ks", "variants"):
      values = getattr(self, name)
      if not isinstance(values, tuple) or not values or len(set(values)) != len(values):
        raise ValueError(f"{name} must be a non-empty tuple without repeats, got {values!r}")
    for k in self.ks:
      check_int(k, "ks")
    for variant in self.variants:
      check_choice(variant, "variants", SYNC_STATES)
    for name in ("num_seeds", "steps", "batch_size", "test_examples", "vocab_size"):
      check_int(getattr(self, name), name)
    check_choice(self.model, "model", MODELS)
    check_float(self.slow_inter_node_gbps, "slow_inter_node_gbps", low=0.0, low_open=True)
    check_float(self.inter_node_latency_us, "inter_node_latency_us", low=0.0)

  @property
  def seeds(self) -> tuple[int, ...]:
    return tuple(range(self.num_seeds))


FULL = PaperConfig()
QUICK = dataclasses.replace(
  FULL,
  ks=(1, 8, 64),
  variants=("params",),
  num_seeds=1,
  steps=96,
  batch_size=32,
  test_examples=8192,
)


def write(cfg: PaperConfig, path: str) -> None:
  """Record ``cfg`` as JSON at ``path`` (atomically)."""
  write_json(path, dataclasses.asdict(cfg))


def read(path: str) -> PaperConfig:
  """The config recorded by :func:`write`; ValueError naming ``path`` if it is not one.

  Examples:
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...   write(QUICK, os.path.join(d, "config.json"))
    ...   read(os.path.join(d, "config.json")) == QUICK
    True
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    record = json.loads(text)
    return PaperConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})
  except (AttributeError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: not a paper-experiment config ({e})") from None


def run_fields_differ(a: PaperConfig, b: PaperConfig) -> list[str]:
  """The fields outside :data:`GRID_FIELDS` where ``a`` and ``b`` differ."""
  return [
    f.name
    for f in dataclasses.fields(PaperConfig)
    if f.name not in GRID_FIELDS and getattr(a, f.name) != getattr(b, f.name)
  ]
