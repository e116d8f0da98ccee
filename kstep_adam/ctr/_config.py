"""Configuration of a CTR training run, validated in one place."""

from __future__ import annotations

import dataclasses

from kstep_adam.ctr._models import MODELS

OPTIMIZERS = ("sync_adam", "kstep_adam")
SYNC_STATES = ("params", "params+nu", "params+moments")
MERGE_MODES = ("global", "node")
SPARSE_MODES = ("exact", "lazy")


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a run; it is written whole into ``summary.json``.

  Attributes:
    model: ``'dlrm'`` or ``'dcn_v2'``.
    embed_dim: embedding width D.
    batch_size: examples per worker per step (global batch = workers x batch_size).
    learning_rate: dense Adam learning rate.
    sparse_learning_rate: learning rate of the embedding tier's sparse Adam.
    optimizer: ``'sync_adam'`` (DDP) or ``'kstep_adam'``.
    k: merge period of k-step Adam (ignored by sync_adam).
    sync: what k-step Adam averages: ``'params'`` (production default), ``'params+nu'`` or
      ``'params+moments'``.
    merge: ``'global'`` averages over all workers every k steps; ``'node'`` averages inside a
      node every step and across nodes every k (PaddleBox's "k-step node" mode).
    nodes: size of the ``'node'`` mesh axis.
    devices_per_node: size of the ``'local'`` mesh axis.
    steps: training steps; None means ``epochs`` passes over file data, or
      ``synthetic_steps`` on the endless synthetic stream.
    epochs: passes over file data (when ``steps`` is None).
    synthetic_steps: default run length on synthetic data.
    log_every: steps between JSONL metric records.
    eval_every: steps between evaluations (0: only at the end).
    table_rows: rows of the embedding table (keys are hashed into them).
    host_cache_rows: rows the host tier keeps in memory.
    device_cache_rows: rows the device tier keeps (0 disables it).
    init_scale: half-width of the uniform init of embedding rows.
    sparse_mode: the tier's SparseAdam mode: ``'exact'`` (every row follows dense Adam,
      untouched rows caught up lazily) or ``'lazy'`` (LazyAdam: only pushed rows change).
    sparse_eps: the tier's Adam epsilon.
    table_dir: directory of the on-disk tier; None uses a fresh temporary directory.
    prefetch: read data and stage the next step's rows in the background.
    seed: seed of the model, the table and the data.
    intra_node_gbps: modelled intra-node link bandwidth, Gbit/s (NVLink-class).
    inter_node_gbps: modelled inter-node link bandwidth, Gbit/s per device.
    intra_node_latency_us: modelled latency per intra-node message, microseconds.
    inter_node_latency_us: modelled latency per inter-node message, microseconds.
  """

  model: str = "dlrm"
  embed_dim: int = 16
  batch_size: int = 128
  learning_rate: float = 2e-3
  sparse_learning_rate: float = 2e-2
  optimizer: str = "kstep_adam"
  k: int = 8
  sync: str = "params"
  merge: str = "global"
  nodes: int = 2
  devices_per_node: int = 4
  steps: int | None = None
  epochs: int = 1
  synthetic_steps: int = 800
  log_every: int = 50
  eval_every: int = 0
  table_rows: int = 1 << 20
  host_cache_rows: int = 1 << 18
  device_cache_rows: int = 0
  init_scale: float = 0.05
  sparse_mode: str = "lazy"
  sparse_eps: float = 1e-8
  table_dir: str | None = None
  prefetch: bool = True
  seed: int = 0
  intra_node_gbps: float = 1200.0
  inter_node_gbps: float = 100.0
  intra_node_latency_us: float = 5.0
  inter_node_latency_us: float = 20.0

  def __post_init__(self):
    choices = dict(
      model=MODELS,
      optimizer=OPTIMIZERS,
      sync=SYNC_STATES,
      merge=MERGE_MODES,
      sparse_mode=SPARSE_MODES,
    )
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    positive = (
      "embed_dim",
      "batch_size",
      "k",
      "nodes",
      "devices_per_node",
      "epochs",
      "synthetic_steps",
      "log_every",
      "table_rows",
      "host_cache_rows",
    )
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("eval_every", "device_cache_rows"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
    if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
      raise ValueError(f"steps must be None or a positive int, got {self.steps!r}")
    for name in ("learning_rate", "sparse_learning_rate", "intra_node_gbps", "inter_node_gbps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

  @property
  def num_workers(self) -> int:
    return self.nodes * self.devices_per_node

  @property
  def global_batch(self) -> int:
    return self.num_workers * self.batch_size
