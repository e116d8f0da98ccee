"""kstep_adam: communication-efficient adaptive optimizers for data-parallel JAX.

The public API is re-exported here, one name per line.
"""

from kstep_adam import ctr
from kstep_adam import embedding
from kstep_adam import parallel
from kstep_adam._baselines import DiLoCoState
from kstep_adam._baselines import diloco
from kstep_adam._baselines import local_sgd
from kstep_adam._baselines import sync_adam
from kstep_adam._comm import CommCost
from kstep_adam._comm import NetworkModel
from kstep_adam._comm import comm_bytes
from kstep_adam._comm import merge_bytes
from kstep_adam._kstep_adam import ScaleByKStepAdamState
from kstep_adam._kstep_adam import kstep_adam
from kstep_adam._kstep_adam import scale_by_kstep_adam
from kstep_adam._merge import MergeParamsState
from kstep_adam._merge import assume_local_step
from kstep_adam._merge import merge_params
from kstep_adam._merge import tree_mean
from kstep_adam._schedule import MergeSchedule
from kstep_adam._schedule import merge_schedule

__version__ = "0.1.0"

__all__ = [
  "__version__",
  "ctr",
  "embedding",
  "parallel",
  "DiLoCoState",
  "diloco",
  "local_sgd",
  "sync_adam",
  "CommCost",
  "NetworkModel",
  "comm_bytes",
  "merge_bytes",
  "ScaleByKStepAdamState",
  "kstep_adam",
  "scale_by_kstep_adam",
  "MergeParamsState",
  "assume_local_step",
  "merge_params",
  "tree_mean",
  "MergeSchedule",
  "merge_schedule",
]
