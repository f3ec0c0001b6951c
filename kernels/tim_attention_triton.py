r"""Triton kernels of TIM target attention (math: hmoe/ops/tim_attention.py).

For sample b with behaviours e_i (i < length_b), positions p_i and target v, per head h:

    ẽ_i = e_i + PE[p_i],   ṽ = v + PE[0],   s_{h,i} = ⟨ẽ_i^h, ṽ^h⟩ / sqrt(Dh)
    α_{h,i} = softmax_{i < length} s_{h,i},   m^h = Σ_i α_{h,i} ẽ_i^h,   out = ṽ ⊙ m

The target is factored out of the values, so only α (B, H, L) and m = ``pooled`` (B, D) are
kept for backward. Layout: D = H·Dh splits into heads; a program holds a (BLOCK_L, BLOCK_H,
BLOCK_DH) tile of steps × heads × head columns (BLOCK_H, BLOCK_DH the next powers of two of H and
Dh, masked), so a per-head dot product is one ``tl.sum(axis=2)``. A step's row and its position
row are gathered once, together (rows[ids[b, i]] or rows[b·L + i], with any row stride, plus
PE[p_i]); steps i >= length are masked out of every load (rows, ids and positions), so padding
never reaches the result.

Forward, ``tim_attention_forward`` -> (out (B, D), alpha (B, H, L), pooled (B, D)): the steps
of a sample are cut into C chunks of ``chunk`` steps and program (b, k) (grid (B, C)) runs an
online softmax over chunk k, BLOCK_L steps at a time, keeping per head a running max μ, a
sum-exp ℓ and the unnormalised acc = Σ_i exp(s_i − μ) ẽ_i; it writes the raw scores s into
``alpha``.

- One chunk per sample (the usual case): the program finishes alone: m = acc / ℓ, out = ṽ ⊙ m,
  and a second pass over its own raw scores writes α = exp(s − μ) / ℓ.
- Several chunks (long sequences): each program writes its (μ_k, ℓ_k, acc_k) per head to small
  (B, C, H) / (B, C, D) buffers; torch merges them with log-sum-exp, μ = max_k μ_k,
  ℓ = Σ_k e^{μ_k − μ} ℓ_k, m = Σ_k e^{μ_k − μ} acc_k / ℓ (an empty chunk has μ_k = −∞ and
  weighs 0), and ``_normalize_kernel`` (b, k) rewrites chunk k's raw scores as
  α = exp(s − μ) / ℓ.

Length 0 gives ℓ = 0 and 1/ℓ is taken as 0: out = pooled = α = 0, no NaN.

Backward, ``tim_attention_backward``, with g = d out, g_m = d pooled, c = 1 / sqrt(Dh):

    dm = g ⊙ ṽ + g_m,   ds_{h,i} = α_{h,i} (⟨dm^h, ẽ_i^h⟩ − ⟨dm^h, m^h⟩)
    dẽ_i = α_i dm + c · ds_i ṽ,   dṽ = g ⊙ m + c · Σ_i ds_i ẽ_i

one pass over the steps: program (b, k) regathers ẽ_i of its chunk, writes dẽ_i to ``grad_rows``
(zeros at padding) and its share of c·Σ_i ds_i ẽ_i to a (B, C, D) buffer that torch sums over
chunks in a fixed order. The position table's gradient, row p = Σ of dẽ_i over valid steps with
p_i = p and row 0 = Σ_b dṽ_b, is deterministic without atomics: the valid steps are sorted by
position (a stable sort, so the order is fixed), and ``_position_grad_kernel`` gives each
position one program that sums its run of float32 (float64) dẽ rows in that sorted order.

The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests; float64
and float32 only, tiny shapes). Loops whose bound is a tensor are ``while`` loops (the
interpreter cannot turn one into a ``range``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["tim_attention_backward", "tim_attention_forward"]

# Elements of one (BLOCK_L, BLOCK_H, BLOCK_DH) tile, and the most steps a tile holds.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_L = 64
# Chunking: aim at about this many programs, but give each at least _MIN_CHUNK steps, so a
# sample is split only when the batch alone cannot fill the device (and then into long chunks).
_TARGET_PROGRAMS = 1024
_MIN_CHUNK = 256
# Position gradient: steps summed per iteration × columns per program.
_POSITION_TILE_ELEMENTS = 2048
_MAX_POSITION_COLUMNS = 64

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INDICES = (torch.int32, torch.int64)


def _acc_type(dtype: torch.dtype):
    """Accumulate in float32, or float64 for float64 tensors (the reference's precision)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of α, m and every partial buffer: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow2_at_most(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (max(1, n).bit_length() - 1)


def _tiling(B: int, L: int, D: int, H: int, chunk: int | None):
    """(BLOCK_H, BLOCK_DH, BLOCK_L, chunk, num_chunks) for B samples of L >= 1 steps.

    ``chunk`` (steps per program) None picks one from the shape; the chunk caps BLOCK_L, so
    tests can force several chunks on a short sequence. The chunk is rounded up to a multiple
    of BLOCK_L and capped at L."""
    BLOCK_H, BLOCK_DH = triton.next_power_of_2(H), triton.next_power_of_2(D // H)
    BLOCK_L = min(_MAX_BLOCK_L, _pow2_at_most(_TILE_ELEMENTS // (BLOCK_H * BLOCK_DH)),
                  triton.next_power_of_2(L))
    if chunk is None:
        chunk = max(_MIN_CHUNK, triton.cdiv(L, max(1, _TARGET_PROGRAMS // max(B, 1))))
    elif chunk < 1:
        raise ValueError(f"chunk must be a positive number of steps, got {chunk}")
    BLOCK_L = min(BLOCK_L, _pow2_at_most(chunk))
    chunk = triton.cdiv(min(chunk, L), BLOCK_L) * BLOCK_L
    return BLOCK_H, BLOCK_DH, BLOCK_L, chunk, triton.cdiv(L, chunk)


# --------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _head_columns(HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_DH: tl.constexpr):
    """(BLOCK_H, BLOCK_DH) column offsets h·Dh + j of the heads, their mask, and the head mask."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_DH)
    col = h[:, None] * HEAD_DIM + j[None, :]
    col_mask = (h < HEADS)[:, None] & (j < HEAD_DIM)[None, :]
    return col, col_mask, h < HEADS


@triton.jit
def _load_target(target_ptr, pe_ptr, b, col, col_mask, D, ACC: tl.constexpr):
    """ṽ = target[b] + PE[0] as a (BLOCK_H, BLOCK_DH) ACC tile (zeros off the mask)."""
    v = tl.load(target_ptr + b * D + col, mask=col_mask, other=0.0).to(ACC)
    return v + tl.load(pe_ptr + col, mask=col_mask, other=0.0).to(ACC)


@triton.jit
def _load_steps(rows_ptr, ids_ptr, pe_ptr, positions_ptr, b, i, valid, col, col_mask,
                L, N, P, D, row_stride, IDS: tl.constexpr, ACC: tl.constexpr):
    """ẽ_i = rows[row_i] + PE[p_i] for steps i (BLOCK_L,) of sample b: a (BLOCK_L, BLOCK_H,
    BLOCK_DH) ACC tile, zeros at invalid steps, whose ids, positions and rows are never read.
    Indices are clamped into their tables (the caller validated them; this only guarantees that
    no lane can address outside)."""
    step = b * L + i  # (BLOCK_L,) int64
    if IDS:
        row = tl.load(ids_ptr + step, mask=valid, other=0).to(tl.int64)
        row = tl.minimum(tl.maximum(row, 0), N - 1)
    else:
        row = step
    position = tl.load(positions_ptr + step, mask=valid, other=0).to(tl.int64)
    position = tl.minimum(tl.maximum(position, 0), P)
    mask = valid[:, None, None] & col_mask[None, :, :]
    e = tl.load(rows_ptr + (row * row_stride)[:, None, None] + col[None, :, :], mask=mask,
                other=0.0).to(ACC)
    e += tl.load(pe_ptr + (position * D)[:, None, None] + col[None, :, :], mask=mask,
                 other=0.0).to(ACC)
    return e


@triton.jit
def _write_alpha(alpha_ptr, b, first, stop, length, L, top, inv_sum, head_mask,
                 HEADS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rewrites steps [first, stop) of sample b's raw scores in alpha (B, H, L) as
    α = exp(s − top) · inv_sum per head (top, inv_sum: (BLOCK_H,)); padding steps get 0."""
    h = tl.arange(0, BLOCK_H)
    lanes = tl.arange(0, BLOCK_L)
    row = alpha_ptr + b * (HEADS * L) + h[None, :] * L  # (1, BLOCK_H): alpha[b, h, ·]
    i0 = first
    while i0 < stop:
        i = i0 + lanes
        in_chunk = (i < stop)[:, None] & head_mask[None, :]
        valid = (i < length)[:, None] & in_chunk
        s = tl.load(row + i[:, None], mask=valid, other=0.0)
        shifted = tl.where(valid, s - top[None, :], float("-inf"))  # exp(-inf) = 0 at padding
        a = tl.exp(shifted) * inv_sum[None, :]
        tl.store(row + i[:, None], a.to(alpha_ptr.dtype.element_ty), mask=in_chunk)
        i0 += BLOCK_L


@triton.jit
def _inverse(total):
    """1 / total, and 0 where total is 0 (a sample or chunk with no valid step)."""
    return tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)


# --------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_kernel(
    rows_ptr,  # (N, D), row stride row_stride, unit column stride
    ids_ptr,  # (B, L) contiguous, same int dtype as positions; unused when not IDS
    target_ptr,  # (B, D) contiguous
    pe_ptr,  # (P + 1, D) contiguous
    positions_ptr,  # (B, L) contiguous
    lengths_ptr,  # (B,)
    out_ptr,  # (B, D) input dtype
    alpha_ptr,  # (B, H, L) stats dtype: raw scores, then α
    pooled_ptr,  # (B, D) stats dtype; written when not SPLIT
    chunk_max_ptr, chunk_sum_ptr,  # (B, C, H) stats dtype; written when SPLIT
    chunk_acc_ptr,  # (B, C, D) stats dtype; written when SPLIT
    L, N, P, D, row_stride, chunk, num_chunks,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, IDS: tl.constexpr, SPLIT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    col, col_mask, head_mask = _head_columns(HEADS, HEAD_DIM, BLOCK_H, BLOCK_DH)
    length = tl.load(lengths_ptr + b).to(tl.int64)
    first = k * chunk
    stop = tl.minimum(first + chunk, L)  # the chunk's steps, padding included
    end = tl.minimum(stop, length)  # its valid steps
    scale = 1.0 / tl.sqrt(tl.full([], HEAD_DIM, ACC))
    v = _load_target(target_ptr, pe_ptr, b, col, col_mask, D, ACC)  # (BLOCK_H, BLOCK_DH)
    lanes = tl.arange(0, BLOCK_L)
    h = tl.arange(0, BLOCK_H)
    score_row = alpha_ptr + b * (HEADS * L) + h[None, :] * L  # (1, BLOCK_H)

    # Online softmax per head over the chunk's valid steps, BLOCK_L at a time. Every tile holds
    # at least one valid step, so the running max is finite after the first one and
    # exp(-inf - max) = 0 rescales the empty start.
    top = tl.full([BLOCK_H], float("-inf"), ACC)
    total = tl.zeros([BLOCK_H], dtype=ACC)
    acc = tl.zeros([BLOCK_H, BLOCK_DH], dtype=ACC)
    i0 = first
    while i0 < end:
        i = i0 + lanes
        valid = i < end
        e = _load_steps(rows_ptr, ids_ptr, pe_ptr, positions_ptr, b, i, valid, col, col_mask,
                        L, N, P, D, row_stride, IDS, ACC)  # (BLOCK_L, BLOCK_H, BLOCK_DH)
        s = tl.sum(e * v[None, :, :], axis=2) * scale  # (BLOCK_L, BLOCK_H)
        s_mask = valid[:, None] & head_mask[None, :]
        tl.store(score_row + i[:, None], s.to(alpha_ptr.dtype.element_ty), mask=s_mask)
        s = tl.where(valid[:, None], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=0))
        rescale = tl.exp(top - new_top)
        p = tl.exp(s - new_top[None, :])  # (BLOCK_L, BLOCK_H), 0 at invalid steps
        total = total * rescale + tl.sum(p, axis=0)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * e, axis=0)
        top = new_top
        i0 += BLOCK_L

    if SPLIT:  # the combine merges the chunks (torch), then _normalize_kernel writes α
        stats = (b * num_chunks + k) * HEADS + h
        tl.store(chunk_max_ptr + stats, top.to(chunk_max_ptr.dtype.element_ty), mask=head_mask)
        tl.store(chunk_sum_ptr + stats, total.to(chunk_sum_ptr.dtype.element_ty), mask=head_mask)
        tl.store(chunk_acc_ptr + (b * num_chunks + k) * D + col,
                 acc.to(chunk_acc_ptr.dtype.element_ty), mask=col_mask)
    else:  # the only chunk: finish the sample here
        inv_total = _inverse(total)
        top = tl.where(total > 0, top, 0.0)  # length 0: no -inf into exp
        m = acc * inv_total[:, None]
        tl.store(pooled_ptr + b * D + col, m.to(pooled_ptr.dtype.element_ty), mask=col_mask)
        tl.store(out_ptr + b * D + col, (v * m).to(out_ptr.dtype.element_ty), mask=col_mask)
        # Same program, same addresses: the barrier orders the score stores before the reads.
        tl.debug_barrier()
        _write_alpha(alpha_ptr, b, first, stop, length, L, top, inv_total, head_mask,
                     HEADS, BLOCK_L, BLOCK_H)


@triton.jit
def _normalize_kernel(
    alpha_ptr,  # (B, H, L) raw scores -> α
    lengths_ptr,  # (B,)
    top_ptr, inv_sum_ptr,  # (B, H): the sample's max and 1 / sum-exp per head
    L, chunk,
    HEADS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    head_mask = h < HEADS
    length = tl.load(lengths_ptr + b).to(tl.int64)
    top = tl.load(top_ptr + b * HEADS + h, mask=head_mask, other=0.0)
    inv_sum = tl.load(inv_sum_ptr + b * HEADS + h, mask=head_mask, other=0.0)
    first = k * chunk
    _write_alpha(alpha_ptr, b, first, tl.minimum(first + chunk, L), length, L, top, inv_sum,
                 head_mask, HEADS, BLOCK_L, BLOCK_H)


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but rows is on {device}")


def _check_tensor(name, t, shape, dtypes, device, contiguous=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {dtypes}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _check_device(name, t, device)
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _check_inputs(rows, ids, target, position_embedding, positions, lengths, num_heads):
    """Shapes, dtypes, devices and layouts of the contract; returns (B, L, D, P)."""
    if not isinstance(rows, torch.Tensor) or rows.dtype not in _FLOATS:
        raise TypeError(f"rows must be a float32 / float64 / float16 / bfloat16 tensor, got "
                        f"{getattr(rows, 'dtype', type(rows).__name__)}")
    device = rows.device
    if device.type != "cuda" and not (device.type == "cpu"
                                      and os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"rows is on {device}: the Triton kernels take CUDA tensors, or CPU "
                         "tensors under TRITON_INTERPRET=1")
    if rows.dim() != 2 or (rows.shape[0] > 0 and rows.stride(1) != 1) or \
            (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        raise ValueError(f"rows must be (N, D) with unit column stride and row stride >= D, got "
                         f"shape {tuple(rows.shape)}, strides {rows.stride()}")
    if not isinstance(target, torch.Tensor) or target.dim() != 2:
        raise ValueError(f"target must be (B, D), got "
                         f"{tuple(getattr(target, 'shape', ())) or type(target).__name__}")
    B, D = target.shape
    if D == 0 or rows.shape[1] != D:
        raise ValueError(f"rows must be (N, D) with D = target.shape[1] = {D} >= 1, got shape "
                         f"{tuple(rows.shape)}")
    if not isinstance(num_heads, int) or num_heads < 1 or D % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of D={D}, got {num_heads!r}")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
        raise ValueError(f"positions must be (B, L), got "
                         f"{tuple(getattr(positions, 'shape', ())) or type(positions).__name__}")
    L = positions.shape[1]
    _check_tensor("target", target, (B, D), (rows.dtype,), device)
    if not isinstance(position_embedding, torch.Tensor) or position_embedding.dim() != 2 or \
            position_embedding.shape[0] < 1:
        raise ValueError(f"position_embedding must be (P + 1, D={D}), got "
                         f"{tuple(getattr(position_embedding, 'shape', ()))}")
    P = position_embedding.shape[0] - 1
    _check_tensor("position_embedding", position_embedding, (P + 1, D), (rows.dtype,), device)
    _check_tensor("positions", positions, (B, L), _INDICES, device)
    _check_tensor("lengths", lengths, (B,), _INDICES, device)
    if ids is None:
        if rows.shape[0] != B * L:
            raise ValueError(f"without ids, rows must be the pre-gathered (B·L={B * L}, D) "
                             f"behaviours, got shape {tuple(rows.shape)}")
    else:
        _check_tensor("ids", ids, (B, L), (positions.dtype,), device)
        if rows.shape[0] == 0 and B * L > 0:
            raise ValueError("rows must have at least one row when ids are given")
    return B, L, D, P


def tim_attention_forward(
    rows: torch.Tensor,
    ids: torch.Tensor | None,
    target: torch.Tensor,
    position_embedding: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    num_heads: int,
    *,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, D), alpha (B, H, L), pooled (B, D)) of TIM attention; see the module docstring.

    Args:
        rows: (N, D) behaviour rows (unit column stride, any row stride >= D): a table indexed
            by ``ids``, or the pre-gathered (B·L, D) behaviours when ``ids`` is None.
        ids: None or (B, L) contiguous, the dtype of ``positions``.
        target: (B, D); position_embedding: (P + 1, D); positions: (B, L) int32 / int64;
            lengths: (B,) in [0, L]. Indices at valid steps already validated by the caller.
        num_heads: H, a divisor of D.
        chunk: steps per program (rounded up to a multiple of the step block, which it caps);
            None picks one from the shape. A sample longer than one chunk is split over
            programs and merged with log-sum-exp; tests set it to exercise that path.
    Returns:
        out in the input dtype; alpha and pooled in float32 (float64 for float64 inputs).
    """
    B, L, D, P = _check_inputs(rows, ids, target, position_embedding, positions, lengths,
                               num_heads)
    H = num_heads
    stats = _stats_dtype(rows.dtype)
    if B == 0 or L == 0:  # no steps: every sample has length 0
        return (target.new_zeros(B, D), target.new_zeros(B, H, L, dtype=stats),
                target.new_zeros(B, D, dtype=stats))

    # Every step of alpha, and out and pooled of every sample, are written by the kernels.
    out = target.new_empty(B, D)
    alpha = target.new_empty(B, H, L, dtype=stats)
    pooled = target.new_empty(B, D, dtype=stats)
    BLOCK_H, BLOCK_DH, BLOCK_L, chunk, num_chunks = _tiling(B, L, D, H, chunk)
    split = num_chunks > 1
    if split:
        chunk_max = torch.empty(B, num_chunks, H, dtype=stats, device=rows.device)
        chunk_sum = torch.empty_like(chunk_max)
        chunk_acc = torch.empty(B, num_chunks, D, dtype=stats, device=rows.device)
    else:
        chunk_max = chunk_sum = chunk_acc = pooled  # dummy pointers, never written
    _forward_kernel[(B, num_chunks)](
        rows, positions if ids is None else ids, target, position_embedding, positions, lengths,
        out, alpha, pooled, chunk_max, chunk_sum, chunk_acc,
        L, rows.shape[0], P, D, rows.stride(0), chunk, num_chunks,
        HEADS=H, HEAD_DIM=D // H, IDS=ids is not None, SPLIT=split, ACC=_acc_type(rows.dtype),
        BLOCK_L=BLOCK_L, BLOCK_H=BLOCK_H, BLOCK_DH=BLOCK_DH,
    )
    if not split:
        return out, alpha, pooled

    # Log-sum-exp combine of the chunks, on (B, C, H) and (B, C, D) buffers, in a fixed order.
    top = chunk_max.amax(1)  # (B, H); -inf for a sample of length 0
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(chunk_max - top[:, None])  # (B, C, H); an empty chunk weighs 0
    total = (weight * chunk_sum).sum(1)  # (B, H)
    inv_total = torch.where(total > 0, 1.0 / torch.where(total > 0, total, 1.0), 0.0)
    acc = (weight[..., None] * chunk_acc.view(B, num_chunks, H, D // H)).sum(1)  # (B, H, Dh)
    pooled = (acc * inv_total[..., None]).reshape(B, D)
    v = target.to(stats) + position_embedding[0].to(stats)
    out = (v * pooled).to(rows.dtype)
    _normalize_kernel[(B, num_chunks)](
        alpha, lengths, top.contiguous(), inv_total.contiguous(), L, chunk,
        HEADS=H, BLOCK_L=BLOCK_L, BLOCK_H=BLOCK_H,
    )
    return out, alpha, pooled


# --------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _backward_kernel(
    grad_out_ptr,  # (B, D) input dtype
    grad_pooled_ptr,  # (B, D) stats dtype
    rows_ptr, ids_ptr, target_ptr, pe_ptr, positions_ptr, lengths_ptr,  # as forward
    alpha_ptr,  # (B, H, L) stats dtype
    pooled_ptr,  # (B, D) stats dtype
    grad_rows_ptr,  # (B, L, D) input dtype
    steps_ptr,  # (B, L, D) stats dtype copy of dẽ; written when STEPS_COPY
    grad_v_ptr,  # (B, C, D) stats dtype: chunk k's share of dṽ
    L, N, P, D, row_stride, chunk, num_chunks,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, IDS: tl.constexpr, STEPS_COPY: tl.constexpr,
    ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    col, col_mask, head_mask = _head_columns(HEADS, HEAD_DIM, BLOCK_H, BLOCK_DH)
    length = tl.load(lengths_ptr + b).to(tl.int64)
    first = k * chunk
    stop = tl.minimum(first + chunk, L)
    scale = 1.0 / tl.sqrt(tl.full([], HEAD_DIM, ACC))
    v = _load_target(target_ptr, pe_ptr, b, col, col_mask, D, ACC)  # (BLOCK_H, BLOCK_DH)
    g = tl.load(grad_out_ptr + b * D + col, mask=col_mask, other=0.0).to(ACC)
    m = tl.load(pooled_ptr + b * D + col, mask=col_mask, other=0.0).to(ACC)
    dm = g * v + tl.load(grad_pooled_ptr + b * D + col, mask=col_mask, other=0.0).to(ACC)
    dm_m = tl.sum(dm * m, axis=1)  # (BLOCK_H,) ⟨dm^h, m^h⟩
    lanes = tl.arange(0, BLOCK_L)
    h = tl.arange(0, BLOCK_H)
    alpha_row = alpha_ptr + b * (HEADS * L) + h[None, :] * L  # (1, BLOCK_H)

    grad_v = tl.zeros([BLOCK_H, BLOCK_DH], dtype=ACC)  # Σ_i ds_i ẽ_i over the chunk
    i0 = first
    while i0 < stop:  # padding steps too: they get zero gradients
        i = i0 + lanes
        in_chunk = i < stop
        valid = in_chunk & (i < length)
        e = _load_steps(rows_ptr, ids_ptr, pe_ptr, positions_ptr, b, i, valid, col, col_mask,
                        L, N, P, D, row_stride, IDS, ACC)  # (BLOCK_L, BLOCK_H, BLOCK_DH)
        a = tl.load(alpha_row + i[:, None], mask=valid[:, None] & head_mask[None, :],
                    other=0.0).to(ACC)  # (BLOCK_L, BLOCK_H)
        ds = a * (tl.sum(e * dm[None, :, :], axis=2) - dm_m[None, :])
        de = a[:, :, None] * dm[None, :, :] + (scale * ds)[:, :, None] * v[None, :, :]
        de = tl.where(valid[:, None, None], de, 0.0)
        offsets = ((b * L + i) * D)[:, None, None] + col[None, :, :]
        mask = in_chunk[:, None, None] & col_mask[None, :, :]
        tl.store(grad_rows_ptr + offsets, de.to(grad_rows_ptr.dtype.element_ty), mask=mask)
        if STEPS_COPY:
            tl.store(steps_ptr + offsets, de.to(steps_ptr.dtype.element_ty), mask=mask)
        grad_v += tl.sum(ds[:, :, None] * e, axis=0)
        i0 += BLOCK_L

    grad_v = scale * grad_v + tl.where(k == 0, g * m, 0.0)  # g ⊙ m once, in chunk 0
    tl.store(grad_v_ptr + (b * num_chunks + k) * D + col,
             grad_v.to(grad_v_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _position_grad_kernel(
    steps_ptr,  # (B·L, D) stats dtype: dẽ per step
    order_ptr,  # (M,) int64: flat step b·L + i, sorted by position (stable)
    run_starts_ptr,  # (P + 2,) int64: position p's steps are order[run_starts[p] : [p + 1]]
    out_ptr,  # (P + 1, D) stats dtype
    D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(run_starts_ptr + p)
    end = tl.load(run_starts_ptr + p + 1)
    lanes = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    j = start
    while j < end:  # the run in its sorted order, BLOCK_R steps a time: deterministic
        r = j + lanes
        r_mask = r < end
        step = tl.load(order_ptr + r, mask=r_mask, other=0)
        acc += tl.load(steps_ptr + (step * D)[:, None] + d[None, :],
                       mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        j += BLOCK_R
    tl.store(out_ptr + p * D + d, tl.sum(acc, axis=0), mask=d_mask)


def _position_gradient(steps, positions, lengths, P):
    """(P + 1, D) stats-dtype Σ of dẽ rows (steps (B, L, D)) by position over valid steps, each
    position summed by one program in the order of a stable sort: deterministic."""
    B, L, D = steps.shape
    valid = torch.arange(L, device=positions.device) < lengths.long()[:, None]  # (B, L)
    keys = torch.where(valid, positions.long().clamp(0, P), P + 1).reshape(-1)  # padding last
    sorted_keys, order = torch.sort(keys, stable=True)
    run_starts = torch.searchsorted(
        sorted_keys, torch.arange(P + 2, device=keys.device, dtype=sorted_keys.dtype))
    grad = steps.new_empty(P + 1, D)
    BLOCK_D = min(triton.next_power_of_2(D), _MAX_POSITION_COLUMNS)
    BLOCK_R = max(1, min(_POSITION_TILE_ELEMENTS // BLOCK_D, triton.next_power_of_2(B * L)))
    _position_grad_kernel[(P + 1, triton.cdiv(D, BLOCK_D))](
        steps, order, run_starts, grad, D, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return grad


def tim_attention_backward(
    grad_out: torch.Tensor,
    grad_pooled: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor | None,
    target: torch.Tensor,
    position_embedding: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    alpha: torch.Tensor,
    pooled: torch.Tensor,
    num_heads: int,
    *,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_rows (B, L, D), grad_target (B, D), grad_position_embedding (P + 1, D)).

    Args:
        grad_out: (B, D) gradient of out, the input dtype.
        grad_pooled: (B, D) gradient of pooled (cast to the stats dtype).
        rows ... num_heads: as given to ``tim_attention_forward``.
        alpha, pooled: its (B, H, L) and (B, D) stats-dtype outputs.
        chunk: steps per program, as in the forward (it need not match it).
    Returns:
        grad_rows per gathered step (exactly 0 at padding), and the gradients of target and the
        position table, all in the input dtype; the position table's is deterministic.
    """
    B, L, D, P = _check_inputs(rows, ids, target, position_embedding, positions, lengths,
                               num_heads)
    H = num_heads
    stats = _stats_dtype(rows.dtype)
    _check_tensor("grad_out", grad_out, (B, D), (rows.dtype,), rows.device)
    if not isinstance(grad_pooled, torch.Tensor) or not grad_pooled.is_floating_point():
        raise TypeError(f"grad_pooled must be a floating-point tensor, got "
                        f"{getattr(grad_pooled, 'dtype', type(grad_pooled).__name__)}")
    grad_pooled = grad_pooled.to(stats).contiguous()
    _check_tensor("grad_pooled", grad_pooled, (B, D), (stats,), rows.device)
    _check_tensor("alpha", alpha, (B, H, L), (stats,), rows.device)
    _check_tensor("pooled", pooled, (B, D), (stats,), rows.device)

    if B == 0 or L == 0:
        # No steps: dṽ = g ⊙ m (m = 0 at length 0), and only position row 0 gets a gradient.
        grad_v = grad_out.to(stats) * pooled
        grad_pe = position_embedding.new_zeros(P + 1, D)
        grad_pe[0] = grad_v.sum(0).to(rows.dtype)
        return rows.new_zeros(B, L, D), grad_v.to(rows.dtype), grad_pe

    grad_rows = rows.new_empty(B, L, D)  # every step written, zeros at padding
    BLOCK_H, BLOCK_DH, BLOCK_L, chunk, num_chunks = _tiling(B, L, D, H, chunk)
    steps_copy = rows.dtype != stats  # fp16 / bf16: keep an exact copy of dẽ for the table
    steps = torch.empty(B, L, D, dtype=stats, device=rows.device) if steps_copy else grad_rows
    grad_v = torch.empty(B, num_chunks, D, dtype=stats, device=rows.device)
    _backward_kernel[(B, num_chunks)](
        grad_out, grad_pooled, rows, positions if ids is None else ids, target,
        position_embedding, positions, lengths, alpha, pooled, grad_rows, steps, grad_v,
        L, rows.shape[0], P, D, rows.stride(0), chunk, num_chunks,
        HEADS=H, HEAD_DIM=D // H, IDS=ids is not None, STEPS_COPY=steps_copy,
        ACC=_acc_type(rows.dtype), BLOCK_L=BLOCK_L, BLOCK_H=BLOCK_H, BLOCK_DH=BLOCK_DH,
    )
    grad_v = grad_v[:, 0] if num_chunks == 1 else grad_v.sum(1)  # (B, D), a fixed order
    grad_pe = _position_gradient(steps, positions, lengths, P)
    grad_pe[0] += grad_v.sum(0)
    return grad_rows, grad_v.to(rows.dtype), grad_pe.to(rows.dtype)
