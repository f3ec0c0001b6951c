r"""Gates: how one task combines the outputs of the experts it sees.

Design section 3.4; paper notes sections 3.4 (HMoE's gate, learned weights or a plain mean) and
4.1 (STEM-Net's All-Forward Task-specific-Backward gate, eqs. 4-5). A task sees E experts whose
outputs h_e (B, H) are stacked into (B, E, H); a gate gives weights g (B, E) and the task's
representation is the mixture

    o = Σ_e g_e · h_e                                                             (B, H)

Three gates, one interface ``forward(experts (B, E, H), x (B, I) or None) -> (o, g)``:

    SoftmaxGate         g = softmax(W_out MLP(x) + b_out)    x: the gate input, e.g. STEM's
                        h_t + h_S (the flattened field embeddings of the task's set plus the
                        shared set's); MLP: ReLU layers of ``hidden`` (none: a linear gate)
    MeanGate            g_e = 1 / E                           gate-free (x unused)
    LearnedWeightGate   g_e = w_e, w (E,) learned, initialised to 1 / E (not normalised: the
                        "learnable per-expert weight" aggregation of HMoE)

Stop-gradient (STEM, eq. 4): a task reads some experts forward-only, SG(h) = h in the forward
pass and ∂SG(h)/∂h = 0 in the backward pass, so its loss never trains those experts or the
embeddings under them. :func:`stack_experts` applies it while stacking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hmoe.nn.experts import MLP

__all__ = ["LearnedWeightGate", "MeanGate", "SoftmaxGate", "mix", "stack_experts"]


def stack_experts(outputs: Sequence[torch.Tensor], detach: Sequence[bool]) -> torch.Tensor:
    """The E expert outputs (B, H) stacked to (B, E, H), output e through stop-gradient where
    detach[e] is True."""
    if len(outputs) != len(detach) or not outputs:
        raise ValueError(f"outputs and detach must have one non-zero length, got {len(outputs)} "
                         f"and {len(detach)}")
    first = outputs[0].shape  # (compared pairwise, not in a set: sizes may be symbolic)
    if len(first) != 2 or any(h.shape != first for h in outputs):
        raise ValueError(f"expert outputs must all be (B, H) of one shape, got "
                         f"{[tuple(h.shape) for h in outputs]}")
    return torch.stack([h.detach() if d else h for h, d in zip(outputs, detach)], dim=1)


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """o = Σ_e weights[:, e] · experts[:, e], weights (B, E), experts (B, E, H) -> (B, H)."""
    return torch.einsum("be,beh->bh", weights, experts)


def _check_experts(experts: torch.Tensor, num_experts: int) -> None:
    if not isinstance(experts, torch.Tensor) or experts.dim() != 3 \
            or experts.shape[1] != num_experts:
        raise ValueError(f"experts must be (B, E={num_experts}, H), got shape "
                         f"{tuple(getattr(experts, 'shape', ()))}")


def _check_num_experts(num_experts: int) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


class SoftmaxGate(nn.Module):
    """g = softmax(W_out MLP(x) + b_out) over the E experts (a linear gate without ``hidden``).

    Args:
        in_dim: I, the width of the gate input x (B, I).
        num_experts: E.
        hidden: widths of the ReLU layers before the output layer (STEM's code uses (128, 64)).
        dropout: after each hidden ReLU (training only).

    forward(experts (B, E, H), x (B, I)) -> (o (B, H), g (B, E)); ``weights(x)`` -> g.
    """

    def __init__(self, in_dim: int, num_experts: int, hidden: Sequence[int] = (),
                 dropout: float = 0.0):
        super().__init__()
        _check_num_experts(num_experts)
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        hidden = tuple(int(h) for h in hidden)
        self.in_dim, self.num_experts = in_dim, num_experts
        self.mlp = MLP(in_dim, hidden, dropout) if hidden else nn.Identity()
        self.output = nn.Linear(hidden[-1] if hidden else in_dim, num_experts)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must be (B, I={self.in_dim}), got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        return torch.softmax(self.output(self.mlp(x)), dim=-1)  # (B, E)

    def forward(self, experts: torch.Tensor, x: torch.Tensor):
        _check_experts(experts, self.num_experts)
        weights = self.weights(x)  # (B, E)
        return mix(weights, experts), weights

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_experts={self.num_experts}"


class MeanGate(nn.Module):
    """g_e = 1 / E: the plain mean of the experts (gate-free).

    forward(experts (B, E, H), x=None (unused)) -> (o (B, H), g (B, E)).
    """

    def __init__(self, num_experts: int):
        super().__init__()
        _check_num_experts(num_experts)
        self.num_experts = num_experts

    def forward(self, experts: torch.Tensor, x: torch.Tensor | None = None):
        _check_experts(experts, self.num_experts)
        weights = experts.new_full(experts.shape[:2], 1.0 / self.num_experts)  # (B, E)
        return mix(weights, experts), weights

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


class LearnedWeightGate(nn.Module):
    """g_e = w_e, one learned weight per expert, the same for every sample (gate-free).

    Parameter: ``weight`` (E,), initialised to 1 / E (the mean), not normalised.
    forward(experts (B, E, H), x=None (unused)) -> (o (B, H), g (B, E)).
    """

    def __init__(self, num_experts: int):
        super().__init__()
        _check_num_experts(num_experts)
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.full((num_experts,), 1.0 / num_experts))

    def forward(self, experts: torch.Tensor, x: torch.Tensor | None = None):
        _check_experts(experts, self.num_experts)
        weights = self.weight.to(experts.dtype).expand(experts.shape[0], -1)  # (B, E)
        return mix(weights, experts), weights

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"
