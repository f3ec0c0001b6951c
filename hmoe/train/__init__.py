"""Training and evaluation: metrics now; the trainer and checkpoints join later (design 3.7)."""

from hmoe.train.metrics import (MetricAccumulator, auc, calibration, calibration_error, evaluate,
                                gauc, logloss, normalized_entropy)

__all__ = ["MetricAccumulator", "auc", "calibration", "calibration_error", "evaluate", "gauc",
           "logloss", "normalized_entropy"]
