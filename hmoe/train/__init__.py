"""Training and evaluation: the run config, the trainer and the metrics (design 3.7)."""

from hmoe.train.config import (DataConfig, LossConfig, ModelSection, RunConfig, TrainConfig,
                               apply_overrides, load_run_config)
from hmoe.train.metrics import (MetricAccumulator, auc, calibration, calibration_error, evaluate,
                                gauc, logloss, normalized_entropy)
from hmoe.train.trainer import (Dataset, Run, Trainer, build_model, evaluate_model, load_data,
                                load_run, predict_scores, read_metrics)

__all__ = ["DataConfig", "Dataset", "LossConfig", "MetricAccumulator", "ModelSection", "Run",
           "RunConfig", "TrainConfig", "Trainer", "apply_overrides", "auc", "build_model",
           "calibration", "calibration_error", "evaluate", "evaluate_model", "gauc",
           "load_data", "load_run", "load_run_config", "logloss", "normalized_entropy",
           "predict_scores", "read_metrics"]
