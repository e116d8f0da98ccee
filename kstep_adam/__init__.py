"""kstep_adam: communication-efficient adaptive optimizers for data-parallel JAX.

The optimizer core (this module's names, :mod:`kstep_adam.parallel` and the baselines, one per
module in ``kstep_adam/baselines/``) needs only JAX, optax and NumPy. The subpackages
:mod:`kstep_adam.embedding` (TensorStore) and :mod:`kstep_adam.ctr` (flax, TensorStore) are
imported on first use, ``kstep_adam.ctr`` or ``from kstep_adam import ctr``, so that
``import kstep_adam`` never loads their dependencies; install them with the ``embedding`` and
``ctr`` extras. Imports run one way: the core imports neither of them, ``embedding`` imports
only the core, ``ctr`` imports both.

The public API is re-exported here, one name per line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kstep_adam import parallel
from kstep_adam._adaptive import AdaptiveController
from kstep_adam._adaptive import AdaptiveState
from kstep_adam._adaptive import adaptive_schedule
from kstep_adam._adaptive import estimated_merge_seconds
from kstep_adam._comm import NETWORKS
from kstep_adam._comm import CommCost
from kstep_adam._comm import NetworkModel
from kstep_adam._comm import comm_bytes
from kstep_adam._comm import merge_bytes
from kstep_adam._comm import node_local_network
from kstep_adam._kstep_adam import ScaleByKStepAdamState
from kstep_adam._kstep_adam import kstep_adam
from kstep_adam._kstep_adam import scale_by_kstep_adam
from kstep_adam._merge import AdaptiveMergeState
from kstep_adam._merge import MergeParamsState
from kstep_adam._merge import assume_local_step
from kstep_adam._merge import merge_params
from kstep_adam._merge import tree_mean
from kstep_adam._schedule import AdaptivePeriod
from kstep_adam._schedule import Compression
from kstep_adam._schedule import MergeSchedule
from kstep_adam._schedule import compressed_schedule
from kstep_adam._schedule import merge_schedule
from kstep_adam._schedule import sync_schedule
from kstep_adam.baselines._diloco import DiLoCoState
from kstep_adam.baselines._diloco import diloco
from kstep_adam.baselines._local_sgd import local_sgd
from kstep_adam.baselines._onebit_adam import ScaleByOneBitAdamState
from kstep_adam.baselines._onebit_adam import onebit_adam
from kstep_adam.baselines._onebit_adam import scale_by_onebit_adam
from kstep_adam.baselines._sync_adam import sync_adam
from kstep_adam.baselines._topk_ef import SparsifiedMeanState
from kstep_adam.baselines._topk_ef import sparsified_mean
from kstep_adam.baselines._topk_ef import topk_ef

if TYPE_CHECKING:  # Loaded lazily at run time, see __getattr__.
  from kstep_adam import ctr as ctr
  from kstep_adam import embedding as embedding

__version__ = "0.1.0"

# Subpackages with optional dependencies, imported on first attribute access (PEP 562). They
# are not in __all__, so `from kstep_adam import *` does not import them either.
_LAZY_SUBPACKAGES = ("ctr", "embedding")


def __getattr__(name: str):
  if name not in _LAZY_SUBPACKAGES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  try:
    return importlib.import_module(f"{__name__}.{name}")  # also binds it as an attribute
  except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] == __name__:
      raise
    raise ModuleNotFoundError(
      f"kstep_adam.{name} needs {e.name!r}, which is not installed; "
      f"install the extra: pip install 'kstep_adam[{name}]'",
      name=e.name,
    ) from e


def __dir__() -> list[str]:
  return sorted([*globals(), *_LAZY_SUBPACKAGES])


__all__ = [
  "__version__",
  "parallel",
  "AdaptiveController",
  "AdaptiveState",
  "adaptive_schedule",
  "estimated_merge_seconds",
  "DiLoCoState",
  "ScaleByOneBitAdamState",
  "SparsifiedMeanState",
  "diloco",
  "local_sgd",
  "onebit_adam",
  "scale_by_onebit_adam",
  "sparsified_mean",
  "sync_adam",
  "topk_ef",
  "NETWORKS",
  "CommCost",
  "NetworkModel",
  "comm_bytes",
  "merge_bytes",
  "node_local_network",
  "ScaleByKStepAdamState",
  "kstep_adam",
  "scale_by_kstep_adam",
  "AdaptiveMergeState",
  "MergeParamsState",
  "assume_local_step",
  "merge_params",
  "tree_mean",
  "AdaptivePeriod",
  "Compression",
  "MergeSchedule",
  "compressed_schedule",
  "merge_schedule",
  "sync_schedule",
]
