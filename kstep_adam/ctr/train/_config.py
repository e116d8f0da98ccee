"""Configuration of a CTR training run: one frozen dataclass, validated in one place.

Defaults are the README's main job (``python -m experiments.train_ctr`` with no flags); the
command line is generated from these fields (``experiments/_cli.py``), so a default, an allowed
choice or a help text is written here once.
"""

from __future__ import annotations

import dataclasses

from kstep_adam._kstep_adam import FORMS
from kstep_adam._validation import check_choices
from kstep_adam._validation import check_float
from kstep_adam._validation import check_int
from kstep_adam._validation import choice_field
from kstep_adam.ctr.train._models import MODELS

# The dense optimizers of the family, all run by the same harness with the same byte accounting.
OPTIMIZERS = ("sync_adam", "kstep_adam", "local_sgd", "diloco", "onebit_adam", "topk_ef")
SYNC_STATES = ("params", "params+nu", "params+moments", "desloc")
MERGE_MODES = ("global", "node")
# The fields each optimizer reads beside the learning rate (the others do not change its run).
OPTIMIZER_FIELDS = {
  "sync_adam": ("eps",),
  "kstep_adam": ("k", "sync", "form", "merge", "eps"),
  "local_sgd": ("k", "momentum", "merge"),
  "diloco": ("k", "outer_learning_rate", "outer_momentum", "merge", "eps"),
  "onebit_adam": ("warmup_steps", "eps"),
  "topk_ef": ("density", "warmup_steps", "eps"),
}
LR_SCHEDULES = ("constant", "cosine")
SPARSE_MODES = ("exact", "lazy")
NONFINITE_ACTIONS = ("stop", "skip")
# The largest finite float32: rates and epsilons above it are infinite in float32.
FLOAT32_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a CTR model is trained; written whole into ``summary.json``.

  Attributes:
    model: the CTR model, ``dlrm`` or ``dcn_v2``.
    embed_dim: embedding width D.
    batch_size: examples per worker per step (the global batch is workers x batch_size).
    top_mlp: hidden sizes of the DLRM's top MLP (DCN-v2: of its deep MLP); a final size-1
      layer is added. The dense tower: e.g. ``(2048, 1024)`` gives the DLRM about 2.9M dense
      parameters, so that dense traffic is a real share of the bytes.
    learning_rate: learning rate of the dense optimizer (DiLoCo: of its inner Adam); with
      ``lr_schedule="cosine"``, its value at the first step.
    lr_schedule: the learning rates over the run, dense and sparse alike: ``constant``, or
      ``cosine`` (each decayed from its value to 0 at step ``steps`` along a half cosine, so
      that a run of a fixed budget ends at a plateau rather than still climbing; needs
      ``steps``). The schedules count the optimizers' own steps, which the checkpoints hold,
      so a resumed run continues them exactly.
    eps: epsilon of the dense Adam (every optimizer but local_sgd; k-step Adam's
      ``local_adam`` form puts it inside the root). 1-bit Adam needs it well above 1e-8 on a
      ReLU network: a unit that is dead through its warm-up keeps a second moment of exactly
      0, and its compressed momentum (a leaf-wide scale, never 0) is divided by ``eps``.
    sparse_learning_rate: learning rate of the embedding tier's sparse Adam; with
      ``lr_schedule="cosine"``, its value at the first step.
    optimizer: the dense optimizer: ``sync_adam`` (DDP: gradients averaged every step),
      ``kstep_adam`` (local Adam, replicas merged every k), ``local_sgd`` (local SGD with
      momentum, parameters averaged every k) or ``diloco`` (inner Adam, an outer Nesterov step
      on the averaged delta every k = H steps), or a compression baseline that communicates
      every step: ``onebit_adam`` (1-bit Adam: full Adam for ``warmup_steps``, then the
      momentum exchanged as signs with error feedback) or ``topk_ef`` (Adam on gradients
      averaged through top-k sparsification with error feedback). Their bytes are counted
      at the compressed size.
    k: merge period of kstep_adam and local_sgd, inner steps H of diloco (ignored by sync_adam);
      ``auto`` (kstep_adam and local_sgd, merge global) chooses each axis's period while
      training from the measured replica drift and the merge/step time ratio
      (:func:`kstep_adam.adaptive_schedule`), starting at 8.
    k_budget: the relative-drift budget ``delta`` of ``k auto``: larger merges less often.
    k_max: the longest period ``k auto`` may choose (>= 8, its starting period).
    k_cost_ratio: ``C / Y`` for ``k auto``: the time of a merge over every axis divided by a
      local step's, e.g. measured on the link the run will use (a merge step's time minus a
      local step's, over the local step's). It makes the decisions a function of the run's
      inputs alone, so a run repeated on another machine merges at the same steps. None:
      ``C`` from the network model, ``Y`` measured over the first local steps.
    sync: what k-step Adam averages: ``params`` (the production default), ``params+nu``,
      ``params+moments`` or ``desloc`` (params every k, first moment every 3k, second every 6k).
    form: k-step Adam's local step: ``adam`` (bias-corrected, as optax) or ``local_adam``
      (Cheng & Glasgow: no bias correction, epsilon inside the root).
    merge: ``global`` averages over all workers every k steps; ``node`` averages inside a node
      every step and across nodes every k (PaddleBox's "k-step node" mode); k-step optimizers
      only.
    momentum: local_sgd's heavy-ball momentum, in [0, 1); 0 disables it. The buffer stays
      local.
    outer_learning_rate: diloco's outer SGD learning rate.
    outer_momentum: diloco's outer Nesterov momentum, in [0, 1).
    density: topk_ef's share of each parameter array's entries sent per step, in (0, 1].
    warmup_steps: the compression baselines' full-precision steps before compressing
      (onebit_adam: >= 1, its second moment is frozen after them; topk_ef: >= 0).
    nodes: size of the ``node`` mesh axis.
    devices_per_node: size of the ``local`` mesh axis.
    steps: training steps; None means ``epochs`` passes over file data, or ``synthetic_steps``
      on the endless synthetic stream.
    epochs: passes over file data when ``steps`` is None.
    synthetic_steps: run length on synthetic data when ``steps`` is None.
    log_every: steps between metric records in ``metrics.jsonl``.
    eval_every: steps between evaluations on the test set (0: only at the end).
    table_rows: rows of the embedding table (feature keys are hashed into them).
    host_cache_rows: rows the host tier keeps in memory.
    device_cache_rows: rows the device tier keeps (0 disables it).
    init_scale: half-width of the uniform init of embedding rows.
    sparse_mode: the tier's SparseAdam: ``exact`` (every row follows dense Adam, untouched rows
      caught up lazily) or ``lazy`` (LazyAdam: only pushed rows change).
    sparse_eps: the tier's Adam epsilon.
    table_dir: directory of the embedding table, kept and flushed at the end; None uses a
      temporary directory (or OUT/table when the run saves checkpoints). An existing table is
      refused unless init_from_table is set (or the run is resumed).
    init_from_table: start from the table already in table_dir (its rows, optimizer slots
      and step), with freshly initialized dense layers.
    prefetch: read data and stage the next step's rows on a background thread.
    pipeline: launch the next step before this step's rows are pushed (lazy SparseAdam on the
      host tier, one process, a fixed merge period): its program applies the push to the
      rows both batches share, and the host's push and pulls run while a program computes.
      The same bits as without; ignored where it does not apply.
    seed: seed of the model, the table and the synthetic data.
    checkpoint_every: steps between checkpoints in OUT/checkpoints, and one at the end; 0
      saves none. A checkpoint holds everything a resumed run needs to continue exactly.
    keep_checkpoints: complete checkpoints kept (older ones are deleted).
    on_nonfinite: a step whose loss or gradients are not finite: ``stop`` raises
      DivergenceError naming the step; ``skip`` leaves the parameters, optimizer moments
      and table as they were (the step still counts) and lists it in ``skipped_steps``.
    divergence_factor: the run stops as diverged once its loss has been above this multiple
      of its first step's loss for divergence_steps consecutive steps; 0 never.
    divergence_steps: consecutive steps above divergence_factor x the initial loss that
      make a run diverged.
    intra_node_gbps: modelled intra-node link bandwidth in Gbit/s (NVLink-class).
    inter_node_gbps: modelled inter-node link bandwidth in Gbit/s per device.
    intra_node_latency_us: modelled latency per intra-node message in microseconds.
    inter_node_latency_us: modelled latency per inter-node message in microseconds.
  """

  model: str = choice_field("dlrm", MODELS)
  embed_dim: int = 16
  top_mlp: tuple[int, ...] = (128, 64)
  batch_size: int = 128
  learning_rate: float = 2e-3
  lr_schedule: str = choice_field("constant", LR_SCHEDULES)
  eps: float = 1e-8
  sparse_learning_rate: float = 2e-2
  optimizer: str = choice_field("kstep_adam", OPTIMIZERS)
  k: int | str = 8
  k_budget: float = 1e-2
  k_max: int = 256
  k_cost_ratio: float | None = None
  sync: str = choice_field("params", SYNC_STATES)
  form: str = choice_field("adam", FORMS)
  merge: str = choice_field("global", MERGE_MODES)
  momentum: float = 0.9
  outer_learning_rate: float = 0.7
  outer_momentum: float = 0.9
  density: float = 0.01
  warmup_steps: int = 100
  nodes: int = 2
  devices_per_node: int = 4
  steps: int | None = None
  epochs: int = 1
  synthetic_steps: int = 800
  log_every: int = 50
  eval_every: int = 200
  table_rows: int = 1 << 20
  host_cache_rows: int = 1 << 18
  device_cache_rows: int = 0
  init_scale: float = 0.05
  sparse_mode: str = choice_field("lazy", SPARSE_MODES)
  sparse_eps: float = 1e-8
  table_dir: str | None = None
  init_from_table: bool = False
  prefetch: bool = True
  pipeline: bool = True
  seed: int = 0
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  on_nonfinite: str = choice_field("stop", NONFINITE_ACTIONS)
  divergence_factor: float = 10.0
  divergence_steps: int = 20
  intra_node_gbps: float = 1200.0
  inter_node_gbps: float = 100.0
  intra_node_latency_us: float = 5.0
  inter_node_latency_us: float = 20.0

  def __post_init__(self):
    check_choices(self)
    for name in (
      "embed_dim",
      "batch_size",
      "nodes",
      "devices_per_node",
      "epochs",
      "synthetic_steps",
      "log_every",
      "table_rows",
      "host_cache_rows",
      "keep_checkpoints",
      "divergence_steps",
    ):
      check_int(getattr(self, name), name, minimum=1)
    if self.k == "auto":
      if self.optimizer not in ("kstep_adam", "local_sgd") or self.merge != "global":
        raise ValueError(
          "k='auto' is for optimizer kstep_adam or local_sgd with merge='global' (it chooses "
          f"both axes' periods), got optimizer={self.optimizer!r}, merge={self.merge!r}"
        )
    elif isinstance(self.k, str):
      raise ValueError(f"k must be a positive int or 'auto', got {self.k!r}")
    else:
      check_int(self.k, "k", minimum=1)
    check_float(self.k_budget, "k_budget", low=0.0, low_open=True)
    check_int(self.k_max, "k_max", minimum=8)
    if self.k_cost_ratio is not None:
      check_float(self.k_cost_ratio, "k_cost_ratio", low=0.0, low_open=True)
    for name in ("eval_every", "device_cache_rows", "seed", "checkpoint_every"):
      check_int(getattr(self, name), name, minimum=0)
    if self.steps is not None:
      check_int(self.steps, "steps", minimum=1)
    if not isinstance(self.top_mlp, tuple):
      raise ValueError(f"top_mlp must be a tuple of layer sizes, got {self.top_mlp!r}")
    for size in self.top_mlp:
      check_int(size, "top_mlp sizes", minimum=1)
    for name in ("momentum", "outer_momentum"):
      check_float(getattr(self, name), name, low=0.0, high=1.0, high_open=True)
    check_float(self.density, "density", low=0.0, high=1.0, low_open=True)
    check_int(
      self.warmup_steps, "warmup_steps", minimum=1 if self.optimizer == "onebit_adam" else 0
    )
    # Used as float32 (the dense optimizers) or in float32 state: a value that is infinite
    # in float32 (above its largest finite value) would make every update non-finite.
    for name in (
      "learning_rate",
      "eps",
      "sparse_learning_rate",
      "outer_learning_rate",
      "sparse_eps",
    ):
      check_float(getattr(self, name), name, low=0.0, low_open=True, high=FLOAT32_MAX)
    for name in ("intra_node_gbps", "inter_node_gbps"):
      check_float(getattr(self, name), name, low=0.0, low_open=True)
    for name in ("init_scale", "intra_node_latency_us", "inter_node_latency_us"):
      check_float(getattr(self, name), name, low=0.0)
    check_float(self.divergence_factor, "divergence_factor", low=0.0)
    if 0.0 < self.divergence_factor <= 1.0:
      raise ValueError(
        f"divergence_factor must be 0 (off) or > 1 (a multiple of the initial loss), got "
        f"{self.divergence_factor!r}"
      )
    for name in ("prefetch", "pipeline", "init_from_table"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    if self.lr_schedule == "cosine" and self.steps is None:
      raise ValueError(
        "lr_schedule='cosine' decays over the run's steps: set steps (the run's length is "
        "otherwise known only once the data ends)"
      )
    if self.lr_schedule == "cosine" and self.init_from_table:
      raise ValueError(
        "lr_schedule='cosine' counts the run's steps from 0, but a table started from "
        "(init_from_table) is already at a later step: use lr_schedule='constant'"
      )
    if self.init_from_table and self.table_dir is None:
      raise ValueError("init_from_table needs table_dir, the table to start from")

  @property
  def optimizer_fields(self) -> dict:
    """The fields the chosen optimizer reads beside ``learning_rate``, with their values.

    Examples:
      >>> TrainConfig(optimizer="local_sgd", k=4).optimizer_fields
      {'k': 4, 'momentum': 0.9, 'merge': 'global'}
    """
    return {name: getattr(self, name) for name in OPTIMIZER_FIELDS[self.optimizer]}

  @property
  def num_workers(self) -> int:
    """The number of data-parallel workers, ``nodes * devices_per_node``."""
    return self.nodes * self.devices_per_node

  @property
  def global_batch(self) -> int:
    """Examples per step over all workers."""
    return self.num_workers * self.batch_size
