r"""Baseline sequence modules to compare with TIM: mean pooling, DIN and SASRec + target attention.

Design section 3.3 asks for baselines beside hmoe.nn.TemporalInterest (TIM, Pan et al. 2024,
section 3.1). All three take TemporalInterest's call shape:

    forward(behaviors (B, L, D), target (B, D), positions (B, L), lengths (B,),
            *, return_attention=False) -> u (B, D)      or (u, weights (B, L))

Storage convention (the one TIM uses). Step i of sample b is valid for i < lengths[b]; steps
i >= lengths[b] are padding. The valid steps may be stored in any order: recency is carried by
positions[b, i], the target-relative rank (1 = the most recent, as TIM's positions) or a time
bucket from ``time_buckets`` (non-decreasing with age); hmoe's data layer stores them oldest
first (position = length − i). Padding is
never read: it is replaced by 0 with torch.where before any arithmetic (a 0-mask product would
keep NaN, NaN·0 = NaN), so whatever it holds, NaN included, changes neither u nor any gradient,
and a sample of length 0 gives u = 0 and weights = 0.

MeanPooling (positions and target unused):

    u = (1 / n) Σ_{i<n} e_i,   n = lengths[b];   u = 0 for n = 0                  weights = 1/n

DINAttention (Zhou et al. 2018, "Deep Interest Network", its local activation unit):

    w_i = MLP([e_i, v, e_i − v, e_i ⊙ v])       scalar per step, no softmax (as in DIN)
    u   = Σ_{i<n} w_i e_i                        weights = w (B, L), 0 at padding

with hidden layers (default 80, 40) activated by Dice (DIN's data-adaptive activation,
``Dice``), PReLU or ReLU, and a linear output. Without a softmax, u keeps the intensity of the interest: scaling every
score by c scales u by c.

SelfAttentionTarget (SASRec, Kang & McAuley 2018, then target attention):

    x_i = e_i + PE[p_i]                                   (B, L, D), PE (max_position + 1, D)
    h   = LN(Block_N(... Block_1(x)))                     causal, pre-LN blocks (below)
    u   = Σ_{i<n} softmax_{i<n}(⟨h_i, v⟩ / sqrt(D)) h_i   weights = that softmax (B, L)

Each block is pre-LN, as SASRec's own code (LayerNorm before each sub-layer, a residual around
it, one final LayerNorm after the last block):

    x ← x + Dropout(MHA(LN(x)));   x ← x + Dropout(W_2 ReLU(W_1 LN(x)))           W_1, W_2 (D, D)

Causality is by position value, so it holds for any storage order: step i attends to the valid
steps j with p_j >= p_i, itself and the behaviours at least as old (with time buckets, steps of
one bucket see each other). So h_i depends on e_i and older behaviours only, and the most recent
step sees the whole history. A padded query row (i >= n) would have no key left
(a fully masked softmax is NaN in torch): it attends to itself alone, and its output is reset to
0 after every block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINAttention", "Dice", "MeanPooling", "SelfAttentionTarget", "time_buckets"]

ACTIVATIONS = ("dice", "prelu", "relu")


# --------------------------------------------------------------------------------------------
# Input checks shared by the three modules.


def _dtype_name(t) -> str:
    return str(getattr(t, "dtype", type(t).__name__))


def _check_index_tensor(name: str, t, shape: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {_dtype_name(t)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but behaviors is on {device}")


def valid_steps(lengths: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, L) bool, True at the valid steps i < lengths[b]."""
    return torch.arange(num_steps, device=lengths.device) < lengths.long()[:, None]


def _validate(behaviors, target, positions, lengths, *, dim: int | None = None,
              max_position: int | None = None) -> torch.Tensor:
    """Checks the forward inputs and returns the valid-step mask (B, L).

    positions may be None unless max_position is given (the module embeds them); when given,
    their values are checked at valid steps only.
    """
    if not isinstance(behaviors, torch.Tensor) or not behaviors.is_floating_point():
        raise TypeError(f"behaviors must be a floating-point tensor, got {_dtype_name(behaviors)}")
    if behaviors.dim() != 3:
        raise ValueError(f"behaviors must be (B, L, D), got shape {tuple(behaviors.shape)}")
    B, L, D = behaviors.shape
    if dim is not None and D != dim:
        raise ValueError(f"behaviors must be (B, L, D={dim}), got shape {tuple(behaviors.shape)}")
    if not isinstance(target, torch.Tensor) or not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got {_dtype_name(target)}")
    if target.dtype != behaviors.dtype:
        raise TypeError(f"target is {target.dtype} but behaviors is {behaviors.dtype}: one dtype")
    if tuple(target.shape) != (B, D):
        raise ValueError(f"target must have shape (B, D) = {(B, D)}, got {tuple(target.shape)}")
    if target.device != behaviors.device:
        raise ValueError(f"target is on {target.device} but behaviors is on {behaviors.device}")
    if positions is None:
        if max_position is not None:
            raise TypeError("positions must be a (B, L) int tensor: this module embeds them")
    else:
        _check_index_tensor("positions", positions, (B, L), behaviors.device)
    _check_index_tensor("lengths", lengths, (B,), behaviors.device)
    if B > 0 and not torch.compiler.is_compiling():
        _check_values(positions, lengths, L, max_position)
    return valid_steps(lengths, L)


def _check_values(positions, lengths, num_steps: int, max_position: int | None) -> None:
    """Host-side range checks (skipped under torch.compile, like the ops' own)."""
    bad = (lengths < 0) | (lengths > num_steps)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"lengths must lie in [0, L={num_steps}], got lengths[{b}] = "
                         f"{int(lengths[b])}")
    if max_position is None:
        return
    bad = valid_steps(lengths, num_steps) & ((positions < 1) | (positions > max_position))
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise IndexError(f"positions must lie in [1, max_position={max_position}] at valid steps, "
                         f"got positions[{b}, {i}] = {int(positions[b, i])}")


def _masked(behaviors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """behaviors with every padded step replaced by 0 (NaN there cannot leak: no product)."""
    return torch.where(valid[..., None], behaviors, 0.0)  # (B, L, D)


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """softmax over the valid entries of the last axis; all zero where none is valid."""
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return torch.where(valid, torch.softmax(scores, dim=-1), 0.0)


# --------------------------------------------------------------------------------------------
# Time buckets for TIM positions.


def time_buckets(delta_t, num_buckets: int, base: float = 2.0, unit: float = 1.0) -> torch.Tensor:
    """Log-bucketed time intervals, as positions in [1, num_buckets] for TIM's position table.

    bucket = 1                                   for delta_t < unit
           = floor(log_base(delta_t / unit)) + 2  otherwise, clamped to num_buckets

    so bucket k >= 2 holds delta_t / unit in [base^(k-2), base^(k-1)). Example, base 2, unit 1,
    num_buckets 4: delta_t 0, 0.5, 1, 1.9, 2, 3, 4, 7, 8, 1e9 -> 1, 1, 2, 2, 3, 3, 4, 4, 4, 4.
    Boundaries are exact (delta_t = unit · base^k falls in bucket k + 2 despite rounding in log).

    Args:
        delta_t: time from the behaviour to the target, in ``unit``s, >= 0 (inf lands in the
            last bucket); a tensor of any shape (or anything torch.as_tensor takes), int or float.
        num_buckets: the largest bucket, >= 1 (the TIM layer's max_position).
        base: > 1.  unit: > 0, the width of bucket 1.
    Returns int64 buckets of delta_t's shape, on its device. Raises ValueError for negative or
    NaN delta_t.
    """
    if not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be an int >= 1, got {num_buckets!r}")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base!r}")
    if not unit > 0 or math.isinf(unit):
        raise ValueError(f"unit must be finite and > 0, got {unit!r}")
    delta_t = torch.as_tensor(delta_t)
    if delta_t.dtype == torch.bool or delta_t.is_complex():
        raise TypeError(f"delta_t must be a real int or float tensor, got {delta_t.dtype}")
    scaled = delta_t.to(torch.float64) / unit  # float64: exact for int timestamps up to 2^53
    if not torch.compiler.is_compiling() and scaled.numel() > 0:
        if bool(torch.isnan(scaled).any()):
            raise ValueError("delta_t must not be NaN")
        if bool((scaled < 0).any()):
            raise ValueError(f"delta_t must be >= 0 (time from the behaviour to the target), got "
                             f"{float(delta_t.min())}")
    safe = scaled.clamp(min=1.0)  # (...,) bucket 1 below one unit; log of >= 1 is >= 0
    exponent = torch.floor(torch.log(safe) / math.log(base))
    exponent = exponent.clamp(max=num_buckets)  # inf -> finite; buckets clamp anyway
    # Correct log's rounding at the exact boundaries base^k.
    exponent = torch.where(torch.pow(base, exponent + 1) <= safe, exponent + 1, exponent)
    exponent = torch.where(torch.pow(base, exponent) > safe, exponent - 1, exponent)
    buckets = torch.where(scaled < 1.0, 1.0, exponent + 2).clamp(max=num_buckets)
    return buckets.long()


# --------------------------------------------------------------------------------------------
# Mean pooling.


class MeanPooling(nn.Module):
    """u = mean of the valid behaviours (B, D); 0 for length 0. target and positions unused.

    forward(behaviors (B, L, D), target (B, D), positions (B, L) or None, lengths (B,),
    *, return_attention=False) -> u, or (u, weights (B, L)) with weights 1/n at valid steps.
    """

    def forward(self, behaviors, target, positions, lengths, *, return_attention=False):
        valid = _validate(behaviors, target, positions, lengths)  # (B, L)
        count = lengths.to(behaviors.dtype).clamp(min=1.0)[:, None]  # (B, 1); n = 0 divides 0
        weights = torch.where(valid, 1.0 / count, 0.0).to(behaviors.dtype)  # (B, L)
        pooled = _masked(behaviors, valid).sum(dim=1) / count  # (B, D)
        return (pooled, weights) if return_attention else pooled


# --------------------------------------------------------------------------------------------
# DIN.


class Dice(nn.Module):
    """Dice activation (DIN, Zhou et al. 2018), a data-adaptive PReLU.

        p(s) = sigmoid((s − E[s]) / sqrt(Var[s] + eps)),   f(s) = p(s) · s + (1 − p(s)) · α · s

    per channel, α learned (initialised to 0, as DIN's code). In training, E[s] and Var[s]
    (biased) are the statistics of the current batch over the rows where ``mask`` is True
    (all rows without a mask), so padded steps never shift them; running estimates are kept as
    in BatchNorm (``momentum``, unbiased variance) and used in eval. A batch without a masked-in
    row leaves the running estimates unchanged. eps = 1e-8 as in the DIN paper.

    forward(x (..., C), mask (...) bool or None) -> (..., C).
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.alpha = nn.Parameter(torch.zeros(num_features))  # (C,)
        self.register_buffer("running_mean", torch.zeros(num_features))  # (C,)
        self.register_buffer("running_var", torch.ones(num_features))  # (C,)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"x must be (..., C={self.num_features}), got shape {tuple(x.shape)}")
        if self.training:
            mean, var = self._batch_statistics(x, mask)  # (C,), (C,)
        else:
            mean, var = self.running_mean, self.running_var
        gate = torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))  # (..., C)
        return gate * x + (1 - gate) * self.alpha * x

    def _batch_statistics(self, x, mask):
        rows = x.reshape(-1, self.num_features)  # (N, C)
        if mask is None:
            keep = torch.ones(rows.shape[0], dtype=torch.bool, device=x.device)
        else:
            keep = mask.reshape(-1)  # (N,)
            if keep.shape[0] != rows.shape[0]:
                raise ValueError(f"mask must have the shape {tuple(x.shape[:-1])} of x's leading "
                                 f"dims, got {tuple(mask.shape)}")
        keep = keep[:, None]  # (N, 1)
        count = keep.sum().to(x.dtype)  # ()
        divisor = count.clamp(min=1.0)
        mean = torch.where(keep, rows, 0.0).sum(0) / divisor  # (C,)
        var = torch.where(keep, (rows - mean) ** 2, 0.0).sum(0) / divisor  # (C,) biased
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp(min=1.0)
            seen = count > 0
            m = self.momentum
            self.running_mean.copy_(torch.where(
                seen, (1 - m) * self.running_mean + m * mean.detach(), self.running_mean))
            self.running_var.copy_(torch.where(
                seen, (1 - m) * self.running_var + m * unbiased.detach(), self.running_var))
        return mean, var

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class DINAttention(nn.Module):
    """DIN's local activation unit: unnormalised target attention (see the module docstring).

    Args:
        dim: D, the width of behaviours and target.
        hidden: widths of the MLP's hidden layers (default DIN's (80, 40)); () gives a linear score.
        activation: "dice" (default, ``Dice``: batch statistics over the valid steps in
            training, running ones in eval), "prelu" (one α per channel) or "relu".

    Attributes: ``linears`` (nn.ModuleList: 4D -> hidden... -> 1), ``activations``.

    forward(behaviors (B, L, D), target (B, D), positions (B, L) or None (unused), lengths (B,),
    *, return_attention=False) -> u (B, D), or (u, weights (B, L)), weights 0 at padding.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (80, 40), activation: str = "dice"):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be >= 1, got {hidden}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.dim, self.hidden, self.activation = dim, hidden, activation
        widths = (4 * dim, *hidden, 1)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activations = nn.ModuleList(_activation(activation, h) for h in hidden)

    def scores(self, behaviors: torch.Tensor, target: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        """The MLP's score w (B, L) of the already masked behaviours, 0 at padding."""
        B, L, D = behaviors.shape
        query = target[:, None, :].expand(B, L, D)  # (B, L, D)
        features = torch.cat([behaviors, query, behaviors - query, behaviors * query], dim=-1)
        hidden = features.reshape(B * L, 4 * D)  # (B·L, 4D)
        rows_valid = valid.reshape(B * L)  # (B·L,)
        for linear, activation in zip(self.linears[:-1], self.activations):
            hidden = linear(hidden)  # (B·L, h)
            hidden = activation(hidden, rows_valid) if isinstance(activation, Dice) \
                else activation(hidden)
        score = self.linears[-1](hidden).reshape(B, L)  # (B, L)
        return torch.where(valid, score, 0.0)

    def forward(self, behaviors, target, positions, lengths, *, return_attention=False):
        valid = _validate(behaviors, target, positions, lengths, dim=self.dim)  # (B, L)
        behaviors = _masked(behaviors, valid)  # (B, L, D)
        weights = self.scores(behaviors, target, valid)  # (B, L)
        pooled = torch.einsum("bl,bld->bd", weights, behaviors)  # (B, D)
        return (pooled, weights) if return_attention else pooled

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}"


def _activation(name: str, width: int) -> nn.Module:
    if name == "dice":
        return Dice(width)
    if name == "prelu":
        return nn.PReLU(width)  # on (B·L, width): one α per channel
    return nn.ReLU()


# --------------------------------------------------------------------------------------------
# SASRec-style self-attention, then target attention.


class CausalBlock(nn.Module):
    """One pre-LN Transformer block with the causal rule of the module docstring.

    forward(x (B, L, D), allowed (B, L, L) bool [query, key], valid (B, L)) -> (B, L, D), 0 at
    padded rows. ``allowed`` must let every row attend to at least one key (SelfAttentionTarget
    lets padded rows attend to themselves).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.feedforward_norm = nn.LayerNorm(dim)
        self.feedforward = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout),
                                         nn.Linear(dim, dim))
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.num_heads
        qkv = self.qkv(self.attention_norm(x)).view(B, L, 3, H, D // H)  # (B, L, 3, H, D/H)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D/H)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed[:, None],
            dropout_p=self.dropout if self.training else 0.0)  # (B, H, L, D/H)
        attended = attended.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        x = x + self.residual_dropout(self.attention_out(attended))
        x = x + self.residual_dropout(self.feedforward(self.feedforward_norm(x)))
        return _masked(x, valid)  # padded rows back to 0: they stay finite and inert


class SelfAttentionTarget(nn.Module):
    """SASRec-style causal self-attention over the behaviours, then target attention.

    Args:
        dim: D.  max_position: P; positions at valid steps lie in [1, P] (ranks, 1 = most
            recent, or ``time_buckets``).  num_heads: H of the encoder, divides D.
        num_layers: encoder blocks (>= 0; 0 gives target attention on e_i + PE[p_i]).
        dropout: on the encoder's attention weights and residual branches (training only).

    Parameters: ``position_embedding`` (nn.Embedding (P + 1, D); row p embeds position p, row 0
    is the padding row, zero and never trained), ``blocks`` (CausalBlock), ``final_norm``.

    forward(behaviors (B, L, D), target (B, D), positions (B, L) int, lengths (B,),
    *, return_attention=False) -> u (B, D), or (u, weights (B, L)): the target-attention softmax,
    0 at padding. ``encode`` returns the encoder output h (B, L, D).
    """

    def __init__(self, dim: int, max_position: int, num_heads: int = 1, num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if dim < 1 or max_position < 1:
            raise ValueError(f"dim and max_position must be >= 1, got {dim}, {max_position}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive divisor of dim={dim}, got {num_heads}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.dim, self.max_position = dim, max_position
        self.position_embedding = nn.Embedding(max_position + 1, dim, padding_idx=0)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.position_embedding.weight[0].zero_()
        self.blocks = nn.ModuleList(CausalBlock(dim, num_heads, dropout)
                                    for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)

    def encode(self, behaviors, positions, lengths) -> torch.Tensor:
        """The encoder output h (B, L, D), 0 at padding; h_i depends on step i and the steps
        at least as old (positions >= p_i) only."""
        target = behaviors.new_zeros(behaviors.shape[0], behaviors.shape[-1])
        valid = _validate(behaviors, target, positions, lengths, dim=self.dim,
                          max_position=self.max_position)
        return self._encode(behaviors, positions, valid)

    def _encode(self, behaviors, positions, valid) -> torch.Tensor:
        L = behaviors.shape[1]
        safe_positions = torch.where(valid, positions.long(), 0)  # (B, L); padding -> row 0
        x = _masked(behaviors, valid) + self.position_embedding(safe_positions)  # (B, L, D)
        x = _masked(x, valid)
        older_or_same = safe_positions[:, None, :] >= safe_positions[:, :, None]  # (B, L, L)
        allowed = older_or_same & valid[:, None, :]  # [b, query i, key j]: p_j >= p_i, j valid
        # A padded query has no valid key left; let it see itself so the softmax stays finite.
        allowed = allowed | (torch.eye(L, dtype=torch.bool, device=x.device) & ~valid[:, :, None])
        for block in self.blocks:
            x = block(x, allowed, valid)  # (B, L, D)
        return _masked(self.final_norm(x), valid)  # (B, L, D)

    def forward(self, behaviors, target, positions, lengths, *, return_attention=False):
        valid = _validate(behaviors, target, positions, lengths, dim=self.dim,
                          max_position=self.max_position)  # (B, L)
        encoded = self._encode(behaviors, positions, valid)  # (B, L, D)
        scores = torch.einsum("bld,bd->bl", encoded, target) / math.sqrt(self.dim)  # (B, L)
        weights = _masked_softmax(scores, valid)  # (B, L); all 0 for length 0
        pooled = torch.einsum("bl,bld->bd", weights, encoded)  # (B, D)
        return (pooled, weights) if return_attention else pooled

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_position={self.max_position}, layers={len(self.blocks)}"
