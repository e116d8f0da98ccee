"""CTR training: synthetic and file data, DLRM / DCN-v2 models, metrics and the workflow.

The public API is re-exported here, one name per line.
"""

from kstep_adam.ctr._batch import CTRBatch
from kstep_adam.ctr._batch import concat_batches
from kstep_adam.ctr._batch import feature_keys
from kstep_adam.ctr._metrics import auc
from kstep_adam.ctr._metrics import logloss
from kstep_adam.ctr._models import DCNv2
from kstep_adam.ctr._models import DLRM
from kstep_adam.ctr._models import MODELS
from kstep_adam.ctr._models import make_model
from kstep_adam.ctr._readers import CTRDataError
from kstep_adam.ctr._readers import CTRFileReader
from kstep_adam.ctr._readers import ReadStats
from kstep_adam.ctr._readers import count_lines
from kstep_adam.ctr._synthetic import SyntheticCTR

__all__ = [
    "CTRBatch",
    "CTRDataError",
    "CTRFileReader",
    "DCNv2",
    "DLRM",
    "MODELS",
    "ReadStats",
    "SyntheticCTR",
    "auc",
    "concat_batches",
    "count_lines",
    "feature_keys",
    "logloss",
    "make_model",
]
