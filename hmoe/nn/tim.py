r"""hmoe.nn.TemporalInterest: the Temporal Interest Module (TIM) over behaviour sequences.

For behaviours e_i (i < length), their target-relative positions p_i (1 = the most recent, or a
time bucket from :func:`hmoe.nn.time_buckets`) and the target ad v, with the learned position
table P (max_position + 1, D) whose row 0 is the target's (paper section 3.1, eq. TIM):

    ẽ_i = e_i + P[p_i],   ṽ = v + P[0]
    α = softmax over i < length of ⟨ẽ_i, ṽ⟩ / sqrt(D / H)          per head     (B, H, L)
    u = Σ_i α_i (ẽ_i ⊙ ṽ)                                                        (B, D)

Steps i >= length are padding and never read; length 0 gives u = 0. The work runs in the fused
op hmoe.ops.tim_attention (C++ / CUDA / Triton), which keeps α rather than (B, L, D)
intermediates and, in :meth:`TemporalInterest.forward_ids`, gathers the behaviour rows straight
from the item table by id.

Ablations of the paper's analysis, as switches: ``temporal_encoding=False`` drops P (ẽ = e,
ṽ = v), ``target_aware=False`` drops the target-aware representation (u = Σ_i α_i ẽ_i).
"""

from __future__ import annotations

import torch
from torch import nn

from hmoe.ops.multi_embedding import FusedUpdate
from hmoe.ops.tim_attention import tim_attention
from hmoe.optim import FusedRowWiseAdagrad, FusedSGD

__all__ = ["TemporalInterest"]


class TemporalInterest(nn.Module):
    """TIM target attention with temporal encoding.

    Args:
        dim: D, the width of behaviours, target and positions.
        max_position: P, the largest position (rank or time bucket); positions lie in [1, P].
        num_heads: H, a divisor of D; each head attends over its D / H columns.
        temporal_encoding: add the position table (False: the "TIM without temporal encoding"
            ablation; positions may then be None).
        target_aware: u = Σ α (ẽ ⊙ ṽ) (False: the "without target-aware representation"
            ablation, u = Σ α ẽ).
        init_std: standard deviation of the normal initialisation of the position table.

    Parameter: ``position_embedding`` (P + 1, D); row 0 belongs to the target.

    forward(behaviors (B, L, D), target (B, D), positions (B, L), lengths (B,)) -> u (B, D);
    with ``return_attention=True``, (u, alpha (B, H, L)).
    """

    def __init__(
        self,
        dim: int,
        max_position: int,
        num_heads: int = 1,
        *,
        temporal_encoding: bool = True,
        target_aware: bool = True,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if dim < 1 or max_position < 1:
            raise ValueError(f"dim and max_position must be >= 1, got {dim} and {max_position}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive divisor of dim={dim}, got {num_heads}")
        self.dim, self.max_position, self.num_heads = dim, max_position, num_heads
        self.temporal_encoding, self.target_aware = temporal_encoding, target_aware
        self.init_std = init_std
        table = torch.empty(max_position + 1, dim, device=device, dtype=dtype)
        if temporal_encoding:
            self.position_embedding = nn.Parameter(table)
        else:  # a fixed zero table: the op adds nothing, and nothing is learned
            self.register_buffer("position_embedding", table, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.temporal_encoding:
                self.position_embedding.normal_(std=self.init_std)
            else:
                self.position_embedding.zero_()

    def _positions(self, positions, like: torch.Tensor) -> torch.Tensor:
        if positions is not None:
            return positions
        if self.temporal_encoding:
            raise ValueError("positions is None, but temporal_encoding=True needs them")
        return torch.ones(like.shape, dtype=torch.int32, device=like.device)  # (B, L)

    def _attend(self, rows, ids, target, positions, lengths, return_attention, steps,
                sparse_grad=False, fused=None):
        if not isinstance(target, torch.Tensor) or target.dim() != 2:
            raise ValueError(f"target must be (B, D), got shape {tuple(getattr(target, 'shape', ()))}")
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be a tensor of ints, got {type(lengths).__name__}")
        positions = self._positions(positions, steps)
        table = self.position_embedding.to(rows.dtype)
        out, alpha, pooled = tim_attention(rows, ids, target, table, positions, lengths,
                                           self.num_heads, sparse_grad=sparse_grad, fused=fused)
        u = out if self.target_aware else pooled.to(out.dtype)  # (B, D)
        return (u, alpha) if return_attention else u

    def forward(
        self,
        behaviors: torch.Tensor,
        target: torch.Tensor,
        positions: torch.Tensor | None,
        lengths: torch.Tensor,
        *,
        return_attention: bool = False,
    ):
        """u (B, D) from pre-gathered behaviours (B, L, D); see the class docstring."""
        if not isinstance(behaviors, torch.Tensor) or behaviors.dim() != 3:
            raise ValueError(f"behaviors must be (B, L, D), got shape "
                             f"{tuple(getattr(behaviors, 'shape', ()))}")
        B, L, D = behaviors.shape
        if D != self.dim:
            raise ValueError(f"behaviors must have D={self.dim} columns, got shape {(B, L, D)}")
        if isinstance(target, torch.Tensor) and target.shape[:1] != (B,):
            raise ValueError(f"target must be (B={B}, D), got shape {tuple(target.shape)}")
        rows = behaviors.reshape(B * L, D)  # (B·L, D)
        return self._attend(rows, None, target, positions, lengths, return_attention,
                            behaviors[..., 0])

    def forward_ids(
        self,
        ids: torch.Tensor,
        items: torch.Tensor | nn.Embedding,
        target: torch.Tensor,
        positions: torch.Tensor | None,
        lengths: torch.Tensor,
        *,
        return_attention: bool = False,
        fused_optimizer: FusedSGD | FusedRowWiseAdagrad | None = None,
        optimizer_state: torch.Tensor | None = None,
    ):
        """u (B, D) with behaviour rows gathered by id (B, L) straight from ``items``: an item
        table (N, D) tensor (a view with a row stride, e.g. ``weight[:, k]`` of a (N, K, D)
        multi-embedding table, is read in place) or an nn.Embedding. Ids at padded steps are
        never read. The table's gradient is dense (N, D), or, for an
        nn.Embedding(sparse=True), a sparse COO gradient of the rows read (as its own forward
        gives: torch.optim.SGD, SparseAdam and Adagrad take it).

        With ``fused_optimizer`` (hmoe.optim.FusedSGD or FusedRowWiseAdagrad) backward updates
        the table rows read in place and gives the table no gradient (leave it out of the
        optimizer of the rest of the model); the fastest training step on CPU, where forming
        and applying a (B, L, D) row gradient costs more than the attention itself.
        FusedRowWiseAdagrad needs ``optimizer_state``, one float32 accumulator per table row
        (N,), e.g. ``torch.zeros(N)``, kept by the caller (and saved with its checkpoints)."""
        table = items.weight if isinstance(items, nn.Embedding) else items
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != self.dim:
            raise ValueError(f"items must be an nn.Embedding or an (N, D={self.dim}) tensor, got "
                             f"{tuple(getattr(table, 'shape', ())) or type(items).__name__}")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"ids must be (B, L), got shape {tuple(getattr(ids, 'shape', ()))}")
        fused = None
        if fused_optimizer is not None:
            if not isinstance(fused_optimizer, (FusedSGD, FusedRowWiseAdagrad)):
                raise TypeError(f"fused_optimizer must be hmoe.optim.FusedSGD or "
                                f"FusedRowWiseAdagrad, got {type(fused_optimizer).__name__}")
            if isinstance(fused_optimizer, FusedRowWiseAdagrad) and optimizer_state is None:
                raise ValueError("FusedRowWiseAdagrad needs optimizer_state: an (N,) float32 "
                                 "tensor of row-wise accumulators")
            state = optimizer_state if optimizer_state is not None else table.new_empty(0)
            fused = FusedUpdate(fused_optimizer.code, fused_optimizer.lr, fused_optimizer.eps,
                                state)
        sparse = isinstance(items, nn.Embedding) and items.sparse and fused is None
        return self._attend(table, ids, target, positions, lengths, return_attention, ids,
                            sparse_grad=sparse, fused=fused)

    def extra_repr(self) -> str:
        flags = "" if self.temporal_encoding else ", temporal_encoding=False"
        flags += "" if self.target_aware else ", target_aware=False"
        return f"dim={self.dim}, max_position={self.max_position}, num_heads={self.num_heads}{flags}"
