"""CTR training: synthetic and file data, DLRM / DCN-v2 models, metrics and the workflow.

The public API is re-exported here, one name per line.
"""

from kstep_adam.ctr._metrics import auc
from kstep_adam.ctr._metrics import logloss
from kstep_adam.ctr._workflow import summarize
from kstep_adam.ctr._workflow import train
from kstep_adam.ctr.data._config import DataConfig
from kstep_adam.ctr.data._config import make_source
from kstep_adam.ctr.data._readers import CTRFileReader
from kstep_adam.ctr.data._readers import count_lines
from kstep_adam.ctr.data._records import CTRBatch
from kstep_adam.ctr.data._records import concat_batches
from kstep_adam.ctr.data._records import feature_keys
from kstep_adam.ctr.data._schema import ReadStats
from kstep_adam.ctr.data._sources import DataSource
from kstep_adam.ctr.data._sources import batches_source
from kstep_adam.ctr.data._sources import file_source
from kstep_adam.ctr.data._sources import synthetic_source
from kstep_adam.ctr.data._synthetic import SyntheticCTR
from kstep_adam.ctr.data._textfile import CTRDataError
from kstep_adam.ctr.run._interrupt import RunInterrupted
from kstep_adam.ctr.run._rundir import RunDirectoryError
from kstep_adam.ctr.run._trainer import Trainer
from kstep_adam.ctr.train._config import TrainConfig
from kstep_adam.ctr.train._divergence import DivergenceError
from kstep_adam.ctr.train._hooks import Hook
from kstep_adam.ctr.train._hooks import MetricsLog
from kstep_adam.ctr.train._hooks import PeriodicEval
from kstep_adam.ctr.train._hooks import ProgressBar
from kstep_adam.ctr.train._hooks import PushedRows
from kstep_adam.ctr.train._loop import StepResult
from kstep_adam.ctr.train._models import DLRM
from kstep_adam.ctr.train._models import MODELS
from kstep_adam.ctr.train._models import DCNv2
from kstep_adam.ctr.train._models import make_model
from kstep_adam.ctr.train._optimizer import make_optimizer

__all__ = [
  "CTRBatch",
  "CTRDataError",
  "CTRFileReader",
  "DCNv2",
  "DLRM",
  "DataConfig",
  "DataSource",
  "DivergenceError",
  "Hook",
  "MODELS",
  "MetricsLog",
  "PeriodicEval",
  "ProgressBar",
  "PushedRows",
  "ReadStats",
  "RunDirectoryError",
  "RunInterrupted",
  "StepResult",
  "SyntheticCTR",
  "TrainConfig",
  "Trainer",
  "auc",
  "batches_source",
  "concat_batches",
  "count_lines",
  "feature_keys",
  "file_source",
  "logloss",
  "make_model",
  "make_optimizer",
  "make_source",
  "summarize",
  "synthetic_source",
  "train",
]
