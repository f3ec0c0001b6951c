r"""Fused multi-embedding lookup: every field and every embedding set in one gather.

The tables of all F fields and all K embedding sets live in one weight of shape (N, K, D),
N = sum of the fields' vocabulary sizes; field f owns rows [o_f, o_{f+1}) where
``table_offsets = (o_0 = 0, o_1, ..., o_F = N)``. The set axis sits just before the embedding
axis, so one row holds every set's vector and a lookup reads K·D contiguous values once
("Ads Recommendation in a Collapsed and Entangled World", Pan et al. 2024, section 4.1:
multi-embedding, one table per expert).

Single-hot: ``indices`` (B, F) of per-field local ids,

    out[k, b, f, :] = weight[o_f + indices[b, f], k, :]                      # (K, B, F, D)

Jagged (multi-hot): ``indices`` (nnz,) holds the values of segment s = f·B + b (field-major, the
KeyedJaggedTensor order) in ``indices[seg[s] : seg[s+1]]`` with ``segment_offsets = seg``
(F·B + 1,), and the segment is pooled:

    out[k, b, f, :] = c_s · Σ_{j in segment s} weight[o_f + indices[j], k, :]

with c_s = 1 (sum pooling) or 1 / length (mean pooling; an empty segment gives zeros).

Backward: d weight[r] = Σ over lookups of row r of c_s · grad[:, b, f, :]. Three consumers:
``multi_embedding_backward`` (a dense (N, K, D) gradient), ``multi_embedding_backward_rows``
(sorted unique rows and their gradients, for a sparse COO gradient) and
``multi_embedding_backward_fused_`` (SGD or row-wise Adagrad applied in place to the rows used;
row-wise Adagrad keeps one accumulator per (row, set): state[r, k] += mean_d g[r, k, d]²,
weight[r, k] -= lr · g[r, k] / (sqrt(state[r, k]) + eps)).

Dtypes: float32 and float64 weights everywhere, bfloat16/float16 with float32 accumulation;
indices int32 or int64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hmoe.ops import _backend, _extension

__all__ = [
    "FusedUpdate",
    "POOLING",
    "multi_embedding",
    "multi_embedding_backward_ref",
    "multi_embedding_backward_rows_ref",
    "multi_embedding_backward_fused_ref_",
    "multi_embedding_ref",
    "sort_lookups",
]

OP = _backend.register_op("multi_embedding", has_triton=True)
POOLING = {"sum": 0, "mean": 1}
FUSED_OPTIMIZERS = {"sgd": 0, "rowwise_adagrad": 1}


class FusedUpdate(NamedTuple):
    """An optimizer step fused into backward (see hmoe.optim for the user-facing classes)."""

    optimizer: int  # FUSED_OPTIMIZERS value
    lr: float
    eps: float
    state: torch.Tensor  # (N, K) row-wise accumulators in the accumulation dtype; empty for SGD


# --------------------------------------------------------------------------------------------
# Reference: readable, differentiable, the spec.


def _lookups(indices, segment_offsets, table_offsets, pooling):
    """Every lookup as (global row, output slot b·F + f, pooling factor c_s, segment s)."""
    F = table_offsets.numel() - 1
    if segment_offsets is None:
        B = indices.shape[0]
        rows = (indices.long() + table_offsets[:-1]).reshape(-1)  # (B·F,)
        segments = torch.arange(B * F, device=indices.device)
        return rows, segments, torch.ones(B * F, dtype=torch.float64, device=indices.device), segments
    B = (segment_offsets.numel() - 1) // F
    lengths = segment_offsets.diff()  # (F·B,)
    segments = torch.repeat_interleave(torch.arange(F * B, device=indices.device), lengths)
    field = segments // B
    slots = (segments % B) * F + field
    rows = indices.long() + table_offsets[field]
    # float64 so that the float64 reference is exact; callers cast to their dtype.
    scale = torch.ones(F * B, dtype=torch.float64, device=indices.device)
    if pooling == POOLING["mean"]:
        scale = lengths.clamp(min=1).double().reciprocal()
    return rows, slots, scale[segments], segments


def multi_embedding_ref(weight, indices, segment_offsets, table_offsets, pooling):
    """out (K, B, F, D) from weight (N, K, D); see the module docstring."""
    N, K, D = weight.shape
    F = table_offsets.numel() - 1
    B = indices.shape[0] if segment_offsets is None else (segment_offsets.numel() - 1) // F
    rows, slots, scale, _ = _lookups(indices, segment_offsets, table_offsets, pooling)
    values = weight[rows] * scale.to(weight.dtype)[:, None, None]  # (M, K, D)
    pooled = weight.new_zeros(B * F, K, D).index_add(0, slots, values)  # (B·F, K, D)
    return pooled.reshape(B, F, K, D).permute(2, 0, 1, 3).contiguous()  # (K, B, F, D)


def _row_gradients(grad, indices, segment_offsets, table_offsets, pooling):
    """Per lookup: its row (M,) and its gradient contribution (M, K, D)."""
    K, B, F, D = grad.shape
    rows, slots, scale, _ = _lookups(indices, segment_offsets, table_offsets, pooling)
    per_slot = grad.permute(1, 2, 0, 3).reshape(B * F, K, D)  # (B·F, K, D)
    return rows, per_slot[slots] * scale.to(grad.dtype)[:, None, None]


def multi_embedding_backward_ref(grad, indices, segment_offsets, table_offsets, pooling, num_rows):
    """Dense gradient (N, K, D) of weight."""
    rows, contrib = _row_gradients(grad, indices, segment_offsets, table_offsets, pooling)
    return grad.new_zeros(num_rows, grad.shape[0], grad.shape[3]).index_add(0, rows, contrib)


def multi_embedding_backward_rows_ref(grad, indices, segment_offsets, table_offsets, pooling):
    """Sorted unique rows (U,) and their gradients (U, K, D)."""
    rows, contrib = _row_gradients(grad, indices, segment_offsets, table_offsets, pooling)
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    summed = grad.new_zeros(unique.numel(), grad.shape[0], grad.shape[3]).index_add(0, inverse, contrib)
    return unique, summed


def apply_fused_update(weight, state, rows, row_grads, optimizer, lr, eps):
    """The fused optimizer step on weight[rows] (weight (N, K, D), rows (U,) distinct) given their
    summed gradients (U, K, D); the row-wise state is (N, K)."""
    acc_dtype = state.dtype if optimizer == FUSED_OPTIMIZERS["rowwise_adagrad"] else torch.float32
    if weight.dtype == torch.float64:
        acc_dtype = torch.float64
    g = row_grads.to(acc_dtype)
    step = torch.full(g.shape[:2], lr, dtype=acc_dtype, device=g.device)  # (U, K)
    if optimizer == FUSED_OPTIMIZERS["rowwise_adagrad"]:
        state[rows] += g.square().mean(dim=2)
        step = lr / (state[rows].sqrt() + eps)
    weight[rows] = (weight[rows].to(acc_dtype) - step[:, :, None] * g).to(weight.dtype)


def multi_embedding_backward_fused_ref_(
    weight, state, grad, indices, segment_offsets, table_offsets, pooling, optimizer, lr, eps
):
    """Applies SGD / row-wise Adagrad in place to the rows used (see the module docstring)."""
    rows, row_grads = multi_embedding_backward_rows_ref(
        grad, indices, segment_offsets, table_offsets, pooling
    )
    with torch.no_grad():
        apply_fused_update(weight, state, rows, row_grads, optimizer, lr, eps)


def sort_lookups(indices, segment_offsets, table_offsets):
    """Lookups sorted by row, for segment-reduce backward kernels.

    Returns (run_rows (U,), run_starts (U + 1,), sorted_segments (M,)): the distinct rows in
    increasing order, where each row's run starts in the sorted order, and the segment (slot
    b·F + f for single-hot, f·B + b for jagged) of every sorted lookup. Stable, so a run lists
    its lookups in input order and reductions over it are deterministic.
    """
    rows, _, _, segments = _lookups(indices, segment_offsets, table_offsets, POOLING["sum"])
    sorted_rows, order = torch.sort(rows, stable=True)
    run_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    run_starts = torch.zeros(counts.numel() + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(counts, 0, out=run_starts[1:])
    return run_rows, run_starts, segments[order]


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops (registered only when hmoe._C is loaded,
# because the schemas live in csrc/registration.cpp).


def _output_batch(indices, segment_offsets, table_offsets):
    F = table_offsets.shape[0] - 1
    return indices.shape[0] if segment_offsets is None else (segment_offsets.shape[0] - 1) // F


if _extension.load_error is None:

    @torch.library.register_fake("hmoe::multi_embedding")
    def _(weight, indices, segment_offsets, table_offsets, pooling):
        torch._check(weight.dim() == 3, lambda: f"weight must be (N, K, D), got {weight.shape}")
        B = _output_batch(indices, segment_offsets, table_offsets)
        F = table_offsets.shape[0] - 1
        return weight.new_empty(weight.shape[1], B, F, weight.shape[2])

    @torch.library.register_fake("hmoe::multi_embedding_backward")
    def _(grad, indices, segment_offsets, table_offsets, pooling, num_rows):
        return grad.new_empty(num_rows, grad.shape[0], grad.shape[3])

    @torch.library.register_fake("hmoe::multi_embedding_backward_rows")
    def _(grad, indices, segment_offsets, table_offsets, pooling):
        num_unique = torch.library.get_ctx().new_dynamic_size()
        rows = table_offsets.new_empty(num_unique)
        return rows, grad.new_empty(num_unique, grad.shape[0], grad.shape[3])

    @torch.library.register_fake("hmoe::multi_embedding_backward_fused_")
    def _(weight, state, grad, indices, segment_offsets, table_offsets, pooling, optimizer, lr, eps):
        return None

    def _setup_context(ctx, inputs, output):
        weight, indices, segment_offsets, table_offsets, pooling = inputs
        ctx.save_for_backward(indices, segment_offsets, table_offsets)
        ctx.pooling = pooling
        ctx.num_rows = weight.shape[0]

    def _backward(ctx, grad):
        indices, segment_offsets, table_offsets = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = torch.ops.hmoe.multi_embedding_backward(
                grad.contiguous(), indices, segment_offsets, table_offsets, ctx.pooling, ctx.num_rows
            )
        return grad_weight, None, None, None, None

    torch.library.register_autograd(
        "hmoe::multi_embedding", _backward, setup_context=_setup_context
    )


# --------------------------------------------------------------------------------------------
# Backends: the same four entry points per backend.


class _Impl(NamedTuple):
    forward: object
    backward: object
    backward_rows: object
    backward_fused_: object


def _compiled_impl():
    ops = torch.ops.hmoe
    return _Impl(
        ops.multi_embedding,
        ops.multi_embedding_backward,
        ops.multi_embedding_backward_rows,
        ops.multi_embedding_backward_fused_,
    )


def _triton_impl():
    from hmoe.kernels import multi_embedding_triton as kernels

    def backward_rows(grad, indices, segment_offsets, table_offsets, pooling):
        run_rows, run_starts, segments = sort_lookups(indices, segment_offsets, table_offsets)
        K, B, F, D = grad.shape
        sums = grad.new_empty(run_rows.numel(), K, D)
        kernels.reduce_runs(grad, segments, run_starts, run_rows, segment_offsets, pooling, sums)
        return run_rows, sums

    def backward(grad, indices, segment_offsets, table_offsets, pooling, num_rows):
        rows, sums = backward_rows(grad, indices, segment_offsets, table_offsets, pooling)
        return grad.new_zeros(num_rows, grad.shape[0], grad.shape[3]).index_copy_(0, rows, sums)

    def backward_fused_(weight, state, grad, indices, segment_offsets, table_offsets, pooling,
                        optimizer, lr, eps):
        run_rows, run_starts, segments = sort_lookups(indices, segment_offsets, table_offsets)
        kernels.reduce_runs(
            grad, segments, run_starts, run_rows, segment_offsets, pooling, weight,
            optimizer=optimizer, state=state, lr=lr, eps=eps,
        )

    def forward(weight, indices, segment_offsets, table_offsets, pooling):
        return kernels.multi_embedding_forward(weight, indices, segment_offsets, table_offsets, pooling)

    return _Impl(forward, backward, backward_rows, backward_fused_)


_REFERENCE = _Impl(
    multi_embedding_ref,
    multi_embedding_backward_ref,
    multi_embedding_backward_rows_ref,
    multi_embedding_backward_fused_ref_,
)


def implementation(backend_name: str) -> _Impl:
    """The forward / backward entry points of one backend (for tests and benchmarks)."""
    if backend_name == "reference":
        return _REFERENCE
    if backend_name == "triton":
        return _triton_impl()
    return _compiled_impl()


class _Lookup(torch.autograd.Function):
    """The lookup with a non-dense backward: a sparse COO gradient, a fused optimizer step, or a
    dense gradient from a backend without registered autograd (Triton)."""

    @staticmethod
    def forward(ctx, weight, indices, segment_offsets, table_offsets, pooling, impl, fused):
        ctx.save_for_backward(indices, segment_offsets, table_offsets)
        ctx.impl, ctx.fused, ctx.pooling = impl, fused, pooling
        ctx.mode = fused if isinstance(fused, str) else "fused"
        ctx.weight = weight if ctx.mode == "fused" else None
        ctx.num_rows = weight.shape[0]
        return impl.forward(weight, indices, segment_offsets, table_offsets, pooling)

    @staticmethod
    def backward(ctx, grad):
        indices, segment_offsets, table_offsets = ctx.saved_tensors
        grad = grad.contiguous()
        args = (grad, indices, segment_offsets, table_offsets, ctx.pooling)
        grad_weight = None
        if ctx.mode == "dense":
            grad_weight = ctx.impl.backward(*args, ctx.num_rows)
        elif ctx.mode == "sparse":
            rows, row_grads = ctx.impl.backward_rows(*args)
            shape = (ctx.num_rows, grad.shape[0], grad.shape[3])
            grad_weight = torch.sparse_coo_tensor(
                rows[None], row_grads, shape, is_coalesced=True, check_invariants=False
            )
        else:
            update: FusedUpdate = ctx.fused
            with torch.no_grad():
                ctx.impl.backward_fused_(
                    ctx.weight, update.state, *args, update.optimizer, update.lr, update.eps
                )
        return grad_weight, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public entry point: validates once, then dispatches.


def _raise_out_of_range(indices, field, vocab, bad, segment_offsets, B):
    """Raises IndexError naming the first out-of-range id, its field and its sample."""
    j = int(bad.nonzero()[0, 0]) if bad.dim() == 1 else None
    if segment_offsets is None:
        b, f = (int(x) for x in bad.nonzero()[0])
        value = int(indices[b, f])
    else:
        f = int(field[j])
        segment = int(torch.searchsorted(segment_offsets, j, right=True)) - 1
        b, value = segment % B, int(indices[j])
    raise IndexError(
        f"indices: field {f} (sample {b}) has id {value}, outside [0, {int(vocab[f])})"
    )


def _check_range(indices, segment_offsets, table_offsets, B, F):
    vocab = table_offsets.diff()  # (F,)
    if segment_offsets is None:
        field = None
        limit = vocab[None, :]  # (1, F)
    else:
        per_field = segment_offsets[::B].diff() if B > 0 else vocab.new_zeros(F)  # (F,)
        field = torch.repeat_interleave(torch.arange(F, device=indices.device), per_field)
        limit = vocab[field]
    bad = (indices < 0) | (indices >= limit)
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "hmoe.ops.multi_embedding: index out of range")
    elif bool(bad.any()):
        _raise_out_of_range(indices, field, vocab, bad, segment_offsets, B)


def _validate(weight, indices, segment_offsets, table_offsets, pooling):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise ValueError(f"weight must be a (N, K, D) tensor, got {getattr(weight, 'shape', weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if table_offsets.dtype != torch.int64 or table_offsets.dim() != 1 or table_offsets.numel() < 2:
        raise ValueError(
            f"table_offsets must be a 1-D int64 tensor of F + 1 >= 2 entries, got "
            f"{table_offsets.dtype} {tuple(table_offsets.shape)}"
        )
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {tuple(POOLING)}, got {pooling!r}")
    for name, t in (("indices", indices), ("table_offsets", table_offsets),
                    ("segment_offsets", segment_offsets)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    F = table_offsets.numel() - 1
    if segment_offsets is None:
        if indices.dim() != 2 or indices.shape[1] != F:
            raise ValueError(f"indices must be (B, F={F}), got shape {tuple(indices.shape)}")
        return indices.shape[0], F
    if segment_offsets.dtype != torch.int64 or segment_offsets.dim() != 1:
        raise ValueError(f"segment_offsets must be 1-D int64, got {segment_offsets.dtype} "
                         f"{tuple(segment_offsets.shape)}")
    if indices.dim() != 1:
        raise ValueError(f"jagged indices must be 1-D (nnz,), got shape {tuple(indices.shape)}")
    if (segment_offsets.numel() - 1) % F != 0:
        raise ValueError(f"segment_offsets must hold F * B + 1 entries (F = {F}), got "
                         f"{segment_offsets.numel()}")
    return (segment_offsets.numel() - 1) // F, F


def multi_embedding(
    weight: torch.Tensor,
    indices: torch.Tensor,
    table_offsets: torch.Tensor,
    *,
    segment_offsets: torch.Tensor | None = None,
    pooling: str = "sum",
    grad: str = "dense",
    fused_update: FusedUpdate | None = None,
) -> torch.Tensor:
    """Looks up every field and set at once; returns (K, B, F, D). See the module docstring.

    Args:
        weight: (N, K, D) all tables, all sets.
        indices: (B, F) per-field local ids, or (nnz,) jagged values with ``segment_offsets``.
        table_offsets: (F + 1,) int64 first row of each field, then N.
        segment_offsets: (F·B + 1,) int64 offsets of the field-major jagged segments.
        pooling: "sum" or "mean" over a jagged segment.
        grad: "dense" (weight.grad, any optimizer), "sparse" (a sparse COO weight.grad) or
            "fused" (``fused_update`` is applied to weight in backward; no weight.grad).
    """
    B, F = _validate(weight, indices, segment_offsets, table_offsets, pooling)
    if grad not in ("dense", "sparse", "fused"):
        raise ValueError(f"grad must be 'dense', 'sparse' or 'fused', got {grad!r}")
    if (grad == "fused") != (fused_update is not None):
        raise ValueError("grad='fused' needs fused_update, and fused_update needs grad='fused'")
    backend_name = _backend.select(OP.name, weight.device.type)
    if segment_offsets is not None:
        _check_segments(segment_offsets, indices.numel())
    if backend_name != "cpu":  # the CPU kernel checks these itself, with the same messages
        _check_table_offsets(table_offsets, weight.shape[0])
        _check_range(indices, segment_offsets, table_offsets, B, F)
    code = POOLING[pooling]
    if backend_name == "reference" and grad == "dense":
        return multi_embedding_ref(weight, indices, segment_offsets, table_offsets, code)
    if backend_name in ("cpu", "cuda") and grad == "dense":
        return torch.ops.hmoe.multi_embedding(weight, indices, segment_offsets, table_offsets, code)
    mode = fused_update if grad == "fused" else grad
    return _Lookup.apply(weight, indices, segment_offsets, table_offsets, code,
                         implementation(backend_name), mode)


def _check_table_offsets(table_offsets, num_rows):
    """The fields must tile [0, N) in order, or an in-range local id could leave the table."""
    if torch.compiler.is_compiling():
        return
    first, last = int(table_offsets[0]), int(table_offsets[-1])
    if first != 0:
        raise ValueError(f"table_offsets must start at 0, got {first}")
    if bool((table_offsets.diff() < 0).any()):
        raise ValueError("table_offsets must be non-decreasing")
    if last != num_rows:
        raise ValueError(f"table_offsets must end at the number of rows ({num_rows}), got {last}")


def _check_segments(segment_offsets, nnz):
    if torch.compiler.is_compiling():
        return
    if int(segment_offsets[0]) != 0 or int(segment_offsets[-1]) != nnz:
        raise ValueError(f"segment_offsets must start at 0 and end at indices.numel() = {nnz}, "
                         f"got {int(segment_offsets[0])} and {int(segment_offsets[-1])}")
    if bool((segment_offsets.diff() < 0).any()):
        raise ValueError("segment_offsets must be non-decreasing (lengths must be >= 0)")
