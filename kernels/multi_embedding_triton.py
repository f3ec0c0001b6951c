r"""Triton kernels of the fused multi-embedding lookup (math: hmoe/ops/multi_embedding.py).

All F fields' tables and all K embedding sets live in one weight (N, K, D); field f owns rows
[o_f, o_{f+1}) with ``table_offsets = (o_0, ..., o_F)`` (F + 1,). A lookup therefore reads one
K·D-wide contiguous row and writes K planes of the output (Pan et al. 2024, section 4.1).

Forward, ``multi_embedding_forward`` -> out (K, B, F, D):

    single-hot  indices (B, F):  out[k, b, f, :] = weight[o_f + indices[b, f], k, :]
    jagged      indices (nnz,), segment s = f·B + b holds indices[seg[s] : seg[s+1]]:
                out[k, b, f, :] = c_s · Σ_j weight[o_f + indices[j], k, :]
                c_s = 1 (sum) or 1 / length (mean; an empty segment gives zeros)

One launch covers every field and set: a program owns BLOCK_S output slots b·F + f and the
whole K·D row (BLOCK_E lanes), so each gathered row is read once, wide.

Backward, ``reduce_runs``: the lookups sorted by row (``hmoe.ops.multi_embedding.sort_lookups``)
form U runs of equal rows; run u sums, in its fixed sorted order and in float32,

    g[u, k, :] = Σ_{lookups i of run u} c_{s_i} · grad[k, b_i, f_i, :]                 # (U, K, D)

and then writes g (a row gradient), or applies SGD / row-wise Adagrad to the run's weight row
in place. Runs own distinct rows, so there are no atomics and the result is deterministic.

The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). The
interpreter cannot turn a loaded scalar into a Python ``range`` bound, so data-dependent loops
are written as ``while`` loops, which compile to the same scf.while on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["multi_embedding_forward", "reduce_runs"]

# Elements of one program's tile; a row wider than this gets one slot per program.
_TILE_ELEMENTS = 4096
_MAX_ROWS_PER_PROGRAM = 64

_WRITE, _SGD, _ROWWISE_ADAGRAD = 0, 1, 2  # reduce_runs modes (optimizer code + 1)


def _acc_type(dtype: torch.dtype):
    """Accumulate in float32, or float64 for float64 tensors (the reference's precision)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows_per_program(num_items: int, row_lanes: int) -> int:
    """Power-of-two count of items (slots or runs) per program for rows of row_lanes lanes."""
    per_program = max(1, min(_MAX_ROWS_PER_PROGRAM, _TILE_ELEMENTS // row_lanes))
    return min(per_program, triton.next_power_of_2(num_items))


@triton.jit
def _in_bounds(rows, valid, num_rows):
    """Rows of masked-off lanes become 0 and the rest are clamped into [0, num_rows), so no
    lane can ever address outside the weight (ids were validated by the caller)."""
    return tl.where(valid, tl.minimum(tl.maximum(rows, 0), num_rows - 1), 0)


# --------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_kernel(
    weight_ptr,  # (N, K, D) contiguous
    indices_ptr,  # (B, F) or (nnz,), int32 or int64
    segment_offsets_ptr,  # (F·B + 1,) int64; unused when not JAGGED
    table_offsets_ptr,  # (F + 1,) int64
    out_ptr,  # (K, B, F, D) contiguous
    B, F, N, D, KD, plane,  # plane = B·F·D, the stride of k in out
    JAGGED: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # This program's output slots b·F + f (rows of the tile) and the K·D row (columns).
    slots = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    slot_mask = slots < B * F
    f = slots % F
    b = slots // F
    e = tl.arange(0, BLOCK_E)  # e = k·D + d, the offset inside a weight row
    e_mask = e < KD
    first_row = tl.load(table_offsets_ptr + f, mask=slot_mask, other=0)  # o_f

    if JAGGED:
        # Segment f·B + b: sum its rows; lanes whose segment is shorter idle (masked).
        segment = f * B + b
        begin = tl.load(segment_offsets_ptr + segment, mask=slot_mask, other=0)
        length = tl.load(segment_offsets_ptr + segment + 1, mask=slot_mask, other=0) - begin
        acc = tl.zeros([BLOCK_S, BLOCK_E], dtype=ACC)
        max_length = tl.max(length, axis=0)
        j = 0
        while j < max_length:
            valid = j < length
            ids = tl.load(indices_ptr + begin + j, mask=valid, other=0).to(tl.int64)
            rows = _in_bounds(first_row + ids, valid, N)
            values = tl.load(
                weight_ptr + rows[:, None] * KD + e[None, :],
                mask=valid[:, None] & e_mask[None, :], other=0.0,
            )
            acc += values.to(ACC)
            j += 1
        if MEAN:
            acc = acc / tl.maximum(length, 1).to(ACC)[:, None]  # empty segment: 0 / 1
        values = acc
    else:
        # Single-hot: one row per slot, copied as is (no arithmetic, so no accumulator).
        ids = tl.load(indices_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
        rows = _in_bounds(first_row + ids, slot_mask, N)
        values = tl.load(
            weight_ptr + rows[:, None] * KD + e[None, :],
            mask=slot_mask[:, None] & e_mask[None, :], other=0.0,
        )

    # out[k, b, f, d] sits at k·plane + (b·F + f)·D + d: K strided planes per slot.
    k = (e // D).to(tl.int64)
    d = e % D
    out_offsets = k[None, :] * plane + slots[:, None] * D + d[None, :]
    tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty),
             mask=slot_mask[:, None] & e_mask[None, :])


def multi_embedding_forward(
    weight: torch.Tensor,
    indices: torch.Tensor,
    segment_offsets: torch.Tensor | None,
    table_offsets: torch.Tensor,
    pooling: int,
) -> torch.Tensor:
    """(K, B, F, D) lookup of every field and set in one launch; see the module docstring.

    Args:
        weight: (N, K, D) all tables, all sets.
        indices: (B, F) local ids, or (nnz,) jagged values when ``segment_offsets`` is given;
            int32 or int64, already validated to lie inside their field's table.
        segment_offsets: (F·B + 1,) int64 offsets of the field-major segments, or None.
        table_offsets: (F + 1,) int64 first row of each field, then N.
        pooling: 0 sum, 1 mean (jagged only).
    """
    N, K, D = weight.shape
    F = table_offsets.numel() - 1
    jagged = segment_offsets is not None
    B = (segment_offsets.numel() - 1) // F if jagged else indices.shape[0]
    out = weight.new_empty(K, B, F, D)
    if out.numel() == 0:
        return out
    if indices.numel() == 0:  # jagged with every segment empty
        return out.zero_()
    if N == 0:
        raise IndexError("indices: every table is empty (N = 0) but there are lookups")

    weight, indices = weight.contiguous(), indices.contiguous()
    table_offsets = table_offsets.contiguous()
    segment_offsets = segment_offsets.contiguous() if jagged else table_offsets  # dummy pointer
    BLOCK_E = triton.next_power_of_2(K * D)
    BLOCK_S = _rows_per_program(B * F, BLOCK_E)
    grid = (triton.cdiv(B * F, BLOCK_S),)
    _forward_kernel[grid](
        weight, indices, segment_offsets, table_offsets, out,
        B, F, N, D, K * D, B * F * D,
        JAGGED=jagged, MEAN=jagged and pooling == 1, ACC=_acc_type(weight.dtype),
        BLOCK_S=BLOCK_S, BLOCK_E=BLOCK_E,
    )
    return out


# --------------------------------------------------------------------------------------------
# Backward: reduce each run of equal rows once, then write it or update the row in place.


@triton.jit
def _reduce_runs_kernel(
    grad_ptr,  # (K, B, F, D) contiguous
    segments_ptr,  # (M,) int64 segment of every lookup, sorted by row
    run_starts_ptr,  # (U + 1,) int64
    run_rows_ptr,  # (U,) int64
    segment_offsets_ptr,  # (F·B + 1,) int64; read only when MEAN
    target_ptr,  # (U, K, D) row gradients, or the (N, K, D) weight to update
    state_ptr,  # (N, K) row-wise Adagrad accumulators; read only in that mode
    lr, eps,
    U, B, F, N, K, D, plane,  # plane = B·F·D, the stride of k in grad
    JAGGED: tl.constexpr, MEAN: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Tile: BLOCK_U runs × K sets × D values, so per-(row, set) reductions are one tl.sum.
    runs = (tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)).to(tl.int64)
    run_mask = runs < U
    start = tl.load(run_starts_ptr + runs, mask=run_mask, other=0)
    length = tl.load(run_starts_ptr + runs + 1, mask=run_mask, other=0) - start
    k = tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    kd_mask = (k[:, None] < K) & (d[None, :] < D)  # (BLOCK_K, BLOCK_D)
    grad_columns = k[:, None].to(tl.int64) * plane + d[None, :]  # grad[k, ·, ·, d]

    # Sum the run's lookups in their sorted order (deterministic); short runs idle, masked.
    acc = tl.zeros([BLOCK_U, BLOCK_K, BLOCK_D], dtype=ACC)
    max_length = tl.max(length, axis=0)
    j = 0
    while j < max_length:
        valid = j < length
        segment = tl.load(segments_ptr + start + j, mask=valid, other=0)
        if JAGGED:
            slot = (segment % B) * F + segment // B  # segment f·B + b -> slot b·F + f
        else:
            slot = segment
        g = tl.load(
            grad_ptr + slot[:, None, None] * D + grad_columns[None, :, :],
            mask=valid[:, None, None] & kd_mask[None, :, :], other=0.0,
        ).to(ACC)
        if MEAN:
            # A lookup's segment has at least this one value, so the length is >= 1.
            seg_begin = tl.load(segment_offsets_ptr + segment, mask=valid, other=0)
            seg_end = tl.load(segment_offsets_ptr + segment + 1, mask=valid, other=1)
            g = g / tl.maximum(seg_end - seg_begin, 1).to(ACC)[:, None, None]
        acc += g
        j += 1

    mask = run_mask[:, None, None] & kd_mask[None, :, :]
    row_offsets = (k[:, None] * D + d[None, :])[None, :, :]  # k·D + d inside a (K, D) row
    if MODE == 0:  # write the row gradient of run u
        tl.store(target_ptr + runs[:, None, None] * (K * D) + row_offsets,
                 acc.to(target_ptr.dtype.element_ty), mask=mask)
    else:  # update weight[row] in place; no other program touches this row
        rows = _in_bounds(tl.load(run_rows_ptr + runs, mask=run_mask, other=0), run_mask, N)
        weight_ptrs = target_ptr + rows[:, None, None] * (K * D) + row_offsets
        weight = tl.load(weight_ptrs, mask=mask, other=0.0).to(ACC)
        if MODE == 2:
            # Row-wise Adagrad: one accumulator per (row, set), fed the mean square over d.
            state_ptrs = state_ptr + rows[:, None] * K + k[None, :]
            state_mask = run_mask[:, None] & (k[None, :] < K)
            state = tl.load(state_ptrs, mask=state_mask, other=0.0).to(ACC)
            state += tl.sum(acc * acc, axis=2) / D  # (BLOCK_U, BLOCK_K)
            tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=state_mask)
            step = lr / (tl.sqrt(state) + eps)
            weight -= step[:, :, None] * acc
        else:  # SGD
            weight -= lr * acc
        tl.store(weight_ptrs, weight.to(target_ptr.dtype.element_ty), mask=mask)


def reduce_runs(
    grad: torch.Tensor,
    segments: torch.Tensor,
    run_starts: torch.Tensor,
    run_rows: torch.Tensor,
    segment_offsets: torch.Tensor | None,
    pooling: int,
    target: torch.Tensor,
    *,
    optimizer: int | None = None,
    state: torch.Tensor | None = None,
    lr: float = 0.0,
    eps: float = 0.0,
) -> None:
    """Sums each run's gradient and writes it to ``target`` or applies an optimizer to it.

    Args:
        grad: (K, B, F, D) gradient of the lookup's output.
        segments, run_starts, run_rows: (M,), (U + 1,), (U,) int64 from ``sort_lookups``.
        segment_offsets: (F·B + 1,) int64 for jagged lookups (mean pooling reads lengths), or None.
        pooling: 0 sum, 1 mean (jagged only).
        target: optimizer None: (U, K, D) output for the row gradients; otherwise the
            contiguous (N, K, D) weight, updated in place.
        optimizer: None (write), 0 SGD (weight[row] -= lr·g) or 1 row-wise Adagrad
            (state[row, k] += mean_d g²; weight[row, k] -= lr·g / (sqrt(state[row, k]) + eps)).
        state: (N, K) contiguous accumulators for row-wise Adagrad.
    """
    K, B, F, D = grad.shape
    U = run_rows.numel()
    if U == 0:
        return
    if optimizer not in (None, 0, 1):
        raise ValueError(
            f"optimizer must be None, 0 (SGD) or 1 (row-wise Adagrad), got {optimizer}"
        )
    if not target.is_contiguous():
        raise ValueError(f"target must be contiguous, got strides {target.stride()}")
    mode = _WRITE if optimizer is None else optimizer + 1
    N = target.shape[0]
    if mode == _ROWWISE_ADAGRAD:
        if state is None or tuple(state.shape) != (N, K) or not state.is_contiguous():
            raise ValueError(f"state must be a contiguous (N, K) = ({N}, {K}) tensor, got "
                             f"{None if state is None else tuple(state.shape)}")
    else:
        state = target  # dummy pointer, never read
    jagged = segment_offsets is not None

    grad = grad.contiguous()
    BLOCK_K, BLOCK_D = triton.next_power_of_2(K), triton.next_power_of_2(D)
    BLOCK_U = _rows_per_program(U, BLOCK_K * BLOCK_D)
    grid = (triton.cdiv(U, BLOCK_U),)
    _reduce_runs_kernel[grid](
        grad, segments.contiguous(), run_starts.contiguous(), run_rows.contiguous(),
        segment_offsets.contiguous() if jagged else run_starts,  # dummy pointer when unused
        target, state, float(lr), float(eps),
        U, B, F, N, K, D, B * F * D,
        JAGGED=jagged, MEAN=jagged and pooling == 1, MODE=mode, ACC=_acc_type(target.dtype),
        BLOCK_U=BLOCK_U, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
    )
