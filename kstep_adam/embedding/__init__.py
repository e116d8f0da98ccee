"""A host-offloaded sparse embedding tier: device cache, host cache, TensorStore disk.

``open_table`` returns an ``EmbeddingTable`` whose rows live on disk (zarr3 in an OCDBT
database), are staged through a bounded host cache, and are updated by a sparse
optimizer (exact or lazy ``SparseAdam``, ``RowwiseAdagrad``). With a device tier, hot rows
and their ``SparseAdam`` state live in device memory and a jitted step updates them there
(``begin_device_step``, ``gather_rows``, ``apply_grads``, ``end_device_step``).
"""

from kstep_adam.embedding._batch import RowDeduplicator
from kstep_adam.embedding._batch import pow2_at_least
from kstep_adam.embedding._config import TableConfig
from kstep_adam.embedding._device_adam import DeviceBatch
from kstep_adam.embedding._device_adam import DeviceRows
from kstep_adam.embedding._device_adam import PendingPush
from kstep_adam.embedding._device_adam import apply_grads
from kstep_adam.embedding._device_adam import apply_pending_push
from kstep_adam.embedding._device_adam import gather_rows
from kstep_adam.embedding._errors import NonFiniteRowsError
from kstep_adam.embedding._errors import TableFailedError
from kstep_adam.embedding._errors import TableLockedError
from kstep_adam.embedding._hashing import hash_keys_to_rows
from kstep_adam.embedding._hashing import splitmix64
from kstep_adam.embedding._hashing import uniform01
from kstep_adam.embedding._init import init_rows
from kstep_adam.embedding._open import open_table
from kstep_adam.embedding._optimizers import RowwiseAdagrad
from kstep_adam.embedding._optimizers import SparseAdam
from kstep_adam.embedding._store import TableVersion
from kstep_adam.embedding._table import DeviceStep
from kstep_adam.embedding._table import EmbeddingTable
from kstep_adam.embedding._table import WorkingSet
from kstep_adam.embedding._transfer import TransferMeter

__all__ = [
  "DeviceBatch",
  "DeviceRows",
  "DeviceStep",
  "EmbeddingTable",
  "RowDeduplicator",
  "RowwiseAdagrad",
  "SparseAdam",
  "TableConfig",
  "NonFiniteRowsError",
  "PendingPush",
  "TableFailedError",
  "TableLockedError",
  "TableVersion",
  "TransferMeter",
  "WorkingSet",
  "apply_grads",
  "apply_pending_push",
  "gather_rows",
  "hash_keys_to_rows",
  "init_rows",
  "open_table",
  "pow2_at_least",
  "splitmix64",
  "uniform01",
]
