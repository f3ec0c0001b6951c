"""Optimizers fused into backward: of hmoe.nn.MultiEmbedding, and of the item table in
hmoe.nn.TemporalInterest.forward_ids.

Pass one as ``MultiEmbedding(..., fused_optimizer=FusedSGD(lr=0.05))``: backward then updates
only the embedding rows the batch used, in place, without ever forming a (N, K, D) gradient —
the technique of FBGEMM's table-batched embeddings. The layer's ``weight`` gets no ``.grad``, so
leave it out of (or let it be skipped by) the optimizer of the rest of the model. Change ``lr``
on the object at any time (a scheduler can set it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hmoe.ops.multi_embedding import FUSED_OPTIMIZERS

__all__ = ["FusedRowWiseAdagrad", "FusedSGD"]


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass
class FusedSGD:
    """weight[r] -= lr * g[r] for every row r used by the batch."""

    lr: float

    def __post_init__(self):
        self.lr = _check_positive("lr", self.lr)

    code = FUSED_OPTIMIZERS["sgd"]
    eps = 0.0

    def init_state(self, num_rows: int, num_sets: int, weight: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, device=weight.device)


@dataclass
class FusedRowWiseAdagrad:
    """Row-wise Adagrad, one accumulator per (row, set):
    state[r, k] += mean_d g[r, k, d]^2;  weight[r, k] -= lr * g[r, k] / (sqrt(state[r, k]) + eps).
    """

    lr: float
    eps: float = 1e-8
    initial_accumulator_value: float = 0.0

    def __post_init__(self):
        self.lr = _check_positive("lr", self.lr)
        self.eps = _check_positive("eps", self.eps)
        if not (math.isfinite(self.initial_accumulator_value) and self.initial_accumulator_value >= 0):
            raise ValueError(
                f"initial_accumulator_value must be finite and >= 0, got {self.initial_accumulator_value!r}"
            )

    code = FUSED_OPTIMIZERS["rowwise_adagrad"]

    def init_state(self, num_rows: int, num_sets: int, weight: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        return torch.full((num_rows, num_sets), self.initial_accumulator_value, dtype=dtype,
                          device=weight.device)
