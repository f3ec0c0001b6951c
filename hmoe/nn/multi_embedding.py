"""MultiEmbedding: K embedding sets of F categorical fields, looked up in one fused gather.

Multi-embedding (Pan et al. 2024, section 4.1) gives every expert its own embedding set, which
counters the dimensional collapse a single shared embedding suffers. Here all fields and all sets
live in one parameter ``weight`` (N, K, D), N = sum(vocab_sizes), so a lookup reads each row's
K·D values once; ``forward`` returns (K, B, F, D) and expert k reads plane k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hmoe.ops.multi_embedding import FusedUpdate, _raise_out_of_range, multi_embedding
from hmoe.optim import FusedRowWiseAdagrad, FusedSGD

__all__ = ["MultiEmbedding"]


class MultiEmbedding(nn.Module):
    """K embedding sets for F categorical fields, fused into one table.

    Args:
        vocab_sizes: rows of each field's table; field f owns rows
            [offsets[f], offsets[f] + vocab_sizes[f]) of ``weight``.
        dim: D, the embedding dimension.
        num_sets: K, the number of embedding sets (one per expert in HMoE-ME).
        pooling: "sum" or "mean", for multi-hot fields (``forward_jagged``).
        sparse: give ``weight`` a sparse COO gradient (like ``nn.Embedding(sparse=True)``), for
            torch's sparse-capable optimizers (SGD, SparseAdam, Adagrad).
        fused_optimizer: ``hmoe.optim.FusedSGD`` or ``FusedRowWiseAdagrad``: backward updates the
            rows used in place and leaves no ``.grad``.
        init_std: standard deviation of the normal initialisation.

    Attributes:
        weight: (N, K, D) parameter.
        offsets: (F + 1,) int64 buffer, the first row of each field followed by N.
        optimizer_state: the fused optimizer's row-wise state (saved with the model).
    """

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        dim: int,
        num_sets: int = 1,
        *,
        pooling: str = "sum",
        sparse: bool = False,
        fused_optimizer: FusedSGD | FusedRowWiseAdagrad | None = None,
        init_std: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        vocab_sizes = [int(v) for v in vocab_sizes]
        if not vocab_sizes or any(v < 1 for v in vocab_sizes):
            raise ValueError(f"vocab_sizes must be a non-empty list of sizes >= 1, got {vocab_sizes}")
        if dim < 1 or num_sets < 1:
            raise ValueError(f"dim and num_sets must be >= 1, got dim={dim}, num_sets={num_sets}")
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
        if sparse and fused_optimizer is not None:
            raise ValueError("choose sparse=True or a fused_optimizer, not both")
        if fused_optimizer is not None and not isinstance(fused_optimizer, (FusedSGD, FusedRowWiseAdagrad)):
            raise TypeError(
                f"fused_optimizer must be hmoe.optim.FusedSGD or FusedRowWiseAdagrad, got "
                f"{type(fused_optimizer).__name__}"
            )
        self.vocab_sizes = vocab_sizes
        self.dim, self.num_sets, self.pooling = dim, num_sets, pooling
        self.sparse, self.fused_optimizer = sparse, fused_optimizer
        num_rows = sum(vocab_sizes)
        self.weight = nn.Parameter(torch.empty(num_rows, num_sets, dim, device=device, dtype=dtype))
        offsets = torch.tensor([0] + vocab_sizes, device=device).cumsum(0)
        self.register_buffer("offsets", offsets)  # (F + 1,)
        # forward_rows reads the whole table as one field: rows [0, N).
        self.register_buffer("_whole_table", torch.tensor([0, num_rows], device=device),
                             persistent=False)
        state = torch.empty(0, device=device)
        if fused_optimizer is not None:
            state = fused_optimizer.init_state(num_rows, num_sets, self.weight)
        self.register_buffer("optimizer_state", state)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    @torch.no_grad()
    def reset_rows(self, rows: torch.Tensor) -> None:
        """Rows given to new ids (a dynamic vocabulary reclaimed them): fresh weights drawn as
        at initialisation, and the fused optimizer's state of those rows as it starts."""
        rows = rows.to(device=self.weight.device, dtype=torch.int64).reshape(-1)
        if not rows.numel():
            return
        if int(rows.min()) < 0 or int(rows.max()) >= self.weight.shape[0]:
            raise IndexError(f"rows must lie in [0, {self.weight.shape[0]}), got "
                             f"[{int(rows.min())}, {int(rows.max())}]")
        self.weight[rows] = torch.randn(len(rows), self.num_sets, self.dim,
                                        dtype=self.weight.dtype,
                                        device=self.weight.device) * self.init_std
        if self.optimizer_state.numel():
            fresh = self.fused_optimizer.init_state(len(rows), self.num_sets, self.weight)
            self.optimizer_state[rows] = fresh.to(self.optimizer_state.dtype)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def _grad_mode(self) -> tuple[str, FusedUpdate | None]:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return "dense", None
        if self.sparse:
            return "sparse", None
        if self.fused_optimizer is not None:
            opt = self.fused_optimizer
            return "fused", FusedUpdate(opt.code, opt.lr, opt.eps, self.optimizer_state)
        return "dense", None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, F) int32/int64 per-field local ids -> (K, B, F, D)."""
        grad, update = self._grad_mode()
        return multi_embedding(
            self.weight, ids, self.offsets, pooling=self.pooling, grad=grad, fused_update=update
        )

    def global_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, F) per-field local ids -> (B, F) int64 rows of ``weight`` (field f's id i is
        row offsets[f] + i), after the range check forward does (IndexError naming the field
        and the sample)."""
        if ids.dim() != 2 or ids.shape[1] != self.num_fields:
            raise ValueError(f"ids must be (B, F={self.num_fields}), got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
        vocab = self.offsets[1:] - self.offsets[:-1]  # (F,)
        if not torch.compiler.is_compiling() and ids.numel():
            bad = (ids < 0) | (ids >= vocab)
            if bool(bad.any()):
                _raise_out_of_range(ids, None, vocab, bad, None, ids.shape[0])
        return ids.to(torch.int64) + self.offsets[:-1]

    def forward_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (*S) int64 global rows of ``weight`` in [0, N) -> (K, *S, D).

        One fused lookup for ids of several fields in any layout, e.g. the categorical fields
        of a batch (``global_rows(ids)``) next to the behaviour sequences that read one field's
        rows: backward then accumulates every lookup into one gradient (or one fused update)
        instead of one per layout. The gradient modes are forward's; the rows' range [0, N) is
        checked, the fields' ranges are the caller's (``global_rows``).
        """
        grad, update = self._grad_mode()
        flat = multi_embedding(self.weight, rows.reshape(-1, 1), self._whole_table,
                               pooling=self.pooling, grad=grad, fused_update=update)  # (K, n, 1, D)
        return flat.view(self.num_sets, *rows.shape, self.dim)

    def forward_jagged(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Multi-hot fields, pooled ("sum" or "mean") -> (K, B, F, D).

        Args:
            values: (nnz,) int32/int64 local ids, field-major: all of field 0's samples, then
                field 1's, ... (the KeyedJaggedTensor order).
            lengths: (F, B) non-negative number of values of each (field, sample).
        """
        if lengths.dim() != 2 or lengths.shape[0] != self.num_fields:
            raise ValueError(f"lengths must be (F={self.num_fields}, B), got shape {tuple(lengths.shape)}")
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")
        if values.dim() != 1:
            raise ValueError(f"values must be 1-D (nnz,), got shape {tuple(values.shape)}")
        lengths = lengths.to(torch.int64).reshape(-1)
        if not torch.compiler.is_compiling():
            if bool((lengths < 0).any()):
                raise ValueError(f"lengths must be >= 0, got min {int(lengths.min())}")
            if int(lengths.sum()) != values.numel():
                raise ValueError(f"lengths sum to {int(lengths.sum())} but values holds {values.numel()}")
        segment_offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths, 0, out=segment_offsets[1:])
        grad, update = self._grad_mode()
        return multi_embedding(
            self.weight, values, self.offsets, segment_offsets=segment_offsets,
            pooling=self.pooling, grad=grad, fused_update=update,
        )

    def extra_repr(self) -> str:
        mode = "sparse" if self.sparse else type(self.fused_optimizer).__name__ if self.fused_optimizer else "dense"
        return (f"fields={self.num_fields}, rows={self.weight.shape[0]}, num_sets={self.num_sets}, "
                f"dim={self.dim}, pooling={self.pooling}, grad={mode}")
