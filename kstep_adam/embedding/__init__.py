"""A host-offloaded sparse embedding tier: device cache, host cache, TensorStore disk.

``open_table`` returns an ``EmbeddingTable`` whose rows live on disk (zarr3 in an OCDBT
database), are staged through a bounded host cache, and are updated by a sparse
optimizer (exact or lazy ``SparseAdam``, ``RowwiseAdagrad``).
"""

from kstep_adam.embedding._config import TableConfig
from kstep_adam.embedding._errors import TableFailedError
from kstep_adam.embedding._errors import TableLockedError
from kstep_adam.embedding._hashing import hash_keys_to_rows
from kstep_adam.embedding._hashing import splitmix64
from kstep_adam.embedding._init import init_rows
from kstep_adam.embedding._open import open_table
from kstep_adam.embedding._optimizers import RowwiseAdagrad
from kstep_adam.embedding._optimizers import SparseAdam
from kstep_adam.embedding._store import TableVersion
from kstep_adam.embedding._table import EmbeddingTable
from kstep_adam.embedding._table import WorkingSet

__all__ = [
  "EmbeddingTable",
  "RowwiseAdagrad",
  "SparseAdam",
  "TableConfig",
  "TableFailedError",
  "TableLockedError",
  "TableVersion",
  "WorkingSet",
  "hash_keys_to_rows",
  "init_rows",
  "open_table",
  "splitmix64",
]
