r"""Triton kernels of the MNSE digit-code embedding (math: hmoe/ops/mnse.py).

Field f's table holds R = Σ_j b_j·K_j rows of K·E values (weight (F, R, K, E)); base j's block
starts at row start_j, and digit i of code v in base b selects row start_j + i·b + digit_i(v),
digit_i(v) = (v // b^i) mod b. ``bases`` and ``num_digits`` are compile-time constants
(constexpr tuples), so every loop over bases and digit positions unrolls and every division is
by a constant; the digits are computed in registers, never stored.

Forward, ``mnse_forward`` -> out (K, B, F, len(bases)·E) ("concat") or (K, B, F, E) ("sum"):
one launch; a program owns BLOCK_B samples of one field and a chunk of the K·E row. For each
base it gathers the K_b selected rows (the table is tiny, so they come from cache), sums them
in float32 (float64 for float64 weights) and stores that base's E columns ("concat"), or adds
the bases and stores once ("sum"). Missing codes (-1) load nothing and store zeros.

Backward, ``mnse_backward`` -> d weight (F, R, K, E): a heavy-contention scatter into few rows,
done without atomics. A program owns one (chunk of samples, field, set, E-block) and, base by
base, walks its chunk BLOCK_B samples at a time: a (BLOCK_B, b·K_b) one-hot ``hit`` tile marks
the rows each sample selects, and

    acc[r, :] += Σ_{samples s} where(hit[s, r], g[s, :], 0)        # tl.sum over axis 0

accumulates, for every digit position i and digit value d at once, the grad slice of the
samples whose digit i equals d (every selected row gets weight 1). Each program writes its
sums to a private slice of a (num_chunks, F, R, K, E) float32 (float64) buffer, which torch
reduces over chunks (``.sum(0)`` of a fixed-shape tensor, a fixed order): deterministic.

The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Loops
whose bound is a tensor are ``while`` loops (the interpreter cannot turn one into a ``range``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["mnse_backward", "mnse_forward"]

# Elements of one program's tile: (BLOCK_B, BLOCK_KE) forward, (BLOCK_B, b·K_b, BLOCK_E) backward.
# Sized so the unrolled gathers / one-hot sums fit in registers: compiled for sm_90 with bases
# (2, 3, 10) and 39 digits, 4x larger tiles spill (ptxas: 255 registers + stack).
_TILE_ELEMENTS = 1024
_BACKWARD_TILE_ELEMENTS = 4096
_MAX_SAMPLES_PER_PROGRAM = 64
_MAX_ROW_LANES = 1024  # a wider K·E row is split over programs (grid axis 2)
_MAX_E_LANES = 128  # likewise E in the backward
# Backward chunks: aim at about this many programs, but give each at least _MIN_CHUNK samples
# so the partial buffer stays small next to the gradient it reduces.
_TARGET_PROGRAMS = 1024
_MIN_CHUNK = 256


def _acc_type(dtype: torch.dtype):
    """Accumulate in float32, or float64 for float64 tensors (the reference's precision)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _layout(bases: Sequence[int], num_digits: Sequence[int]):
    """(bases, num_digits, block starts, R) as tuples of Python ints, ready to be constexprs."""
    bases, num_digits = tuple(int(b) for b in bases), tuple(int(k) for k in num_digits)
    assert len(bases) == len(num_digits) > 0
    starts = [0]
    for b, k in zip(bases, num_digits):
        starts.append(starts[-1] + b * k)
    return bases, num_digits, tuple(starts[:-1]), starts[-1]


def _pow2_at_most(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (max(1, n).bit_length() - 1)


# --------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_kernel(
    weight_ptr,  # (F, R, K, E) contiguous
    codes_ptr,  # (B, F) contiguous, int32 or int64; -1 = missing
    out_ptr,  # (K, B, F, C) contiguous, C = NUM_BASES·E (concat) or E (sum)
    B, F, E, KE, C, plane,  # plane = B·F·C, the stride of k in out
    BASES: tl.constexpr, NUM_DIGITS: tl.constexpr, STARTS: tl.constexpr,
    NUM_BASES: tl.constexpr, R: tl.constexpr,
    SUM: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_KE: tl.constexpr,
):
    f = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # samples (rows)
    s_mask = s < B
    col = tl.program_id(2) * BLOCK_KE + tl.arange(0, BLOCK_KE)  # k·E + e (columns)
    col_mask = col < KE
    k = (col // E).to(tl.int64)
    e = col % E

    code = tl.load(codes_ptr + s * F + f, mask=s_mask, other=-1)
    load_mask = (code >= 0)[:, None] & col_mask[None, :]  # missing codes read nothing
    store_mask = s_mask[:, None] & col_mask[None, :]
    v = tl.maximum(code, 0)  # codes' own width: int32 digits stay int32
    table = weight_ptr + f * (R * KE) + col[None, :]  # field f's rows, this program's columns
    out = out_ptr + k[None, :] * plane + (s * F + f)[:, None] * C + e[None, :]

    total = tl.zeros([BLOCK_B, BLOCK_KE], dtype=ACC)
    for j in tl.static_range(NUM_BASES):
        acc = _gather_base(table, v, load_mask, KE, BASES[j], NUM_DIGITS[j], STARTS[j], ACC)
        if SUM:
            total += acc
        else:  # base j owns columns [j·E, (j + 1)·E) of out
            tl.store(out + j * E, acc.to(out_ptr.dtype.element_ty), mask=store_mask)
    if SUM:
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _gather_base(table, v, mask, KE, BASE: tl.constexpr, DIGITS: tl.constexpr,
                 START: tl.constexpr, ACC: tl.constexpr):
    """Σ over the DIGITS digit positions i of row START + i·BASE + digit_i(v) of the table tile
    (rows of ``v``, columns of ``table``), accumulated in ACC; masked lanes add zeros."""
    acc = tl.zeros(mask.shape, dtype=ACC)
    rest = v
    for i in tl.static_range(DIGITS):
        row = START + i * BASE + rest % BASE  # in [0, R) by construction
        rest = rest // BASE
        acc += tl.load(table + row.to(tl.int64)[:, None] * KE, mask=mask, other=0.0).to(ACC)
    return acc


def mnse_forward(
    weight: torch.Tensor,
    codes: torch.Tensor,
    bases: Sequence[int],
    num_digits: Sequence[int],
    mode: int,
) -> torch.Tensor:
    """MNSE lookup of every field, set and base in one launch; see the module docstring.

    Args:
        weight: (F, R, K, E) tables, R = Σ_j bases[j]·num_digits[j].
        codes: (B, F) int32 or int64 codes in [-1, min_j b_j^K_j), already validated.
        bases, num_digits: the numeral systems and their digit counts.
        mode: 0 concat -> (K, B, F, len(bases)·E), 1 sum -> (K, B, F, E).
    """
    F, R, K, E = weight.shape
    B = codes.shape[0]
    bases, num_digits, starts, rows = _layout(bases, num_digits)
    assert rows == R and mode in (0, 1) and tuple(codes.shape) == (B, F)
    C = len(bases) * E if mode == 0 else E
    out = weight.new_empty(K, B, F, C)
    if out.numel() == 0:
        return out

    weight, codes = weight.contiguous(), codes.contiguous()
    KE = K * E
    BLOCK_KE = min(triton.next_power_of_2(KE), _MAX_ROW_LANES)
    BLOCK_B = min(_MAX_SAMPLES_PER_PROGRAM, max(1, _TILE_ELEMENTS // BLOCK_KE),
                  triton.next_power_of_2(B))
    grid = (triton.cdiv(B, BLOCK_B), F, triton.cdiv(KE, BLOCK_KE))
    _forward_kernel[grid](
        weight, codes, out,
        B, F, E, KE, C, B * F * C,
        BASES=bases, NUM_DIGITS=num_digits, STARTS=starts, NUM_BASES=len(bases), R=R,
        SUM=mode == 1, ACC=_acc_type(weight.dtype), BLOCK_B=BLOCK_B, BLOCK_KE=BLOCK_KE,
    )
    return out


# --------------------------------------------------------------------------------------------
# Backward: per-chunk masked sums into a private partial buffer, then a fixed-order reduction.


@triton.jit
def _backward_kernel(
    grad_ptr,  # (K, B, F, C) contiguous
    codes_ptr,  # (B, F) contiguous, int32 or int64; -1 = missing
    partial_ptr,  # (num_chunks, F, R, K, E) contiguous, float32 / float64
    B, F, K, E, C, plane, chunk, num_e_blocks,  # plane = B·F·C; chunk: samples per program
    BASES: tl.constexpr, NUM_DIGITS: tl.constexpr, STARTS: tl.constexpr,
    ROW_LANES: tl.constexpr,  # next_power_of_2(b·K_b) per base
    NUM_BASES: tl.constexpr, R: tl.constexpr,
    SUM: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)  # chunk of samples
    f = tl.program_id(1).to(tl.int64)
    k = (tl.program_id(2) // num_e_blocks).to(tl.int64)
    e = (tl.program_id(2) % num_e_blocks) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    first = c * chunk
    end = tl.minimum(first + chunk, B)
    grad = grad_ptr + k * plane + f * C + e[None, :]  # + s·F·C + column of the base
    partial = partial_ptr + (c * F + f) * (R * K * E) + k * E + e[None, :]  # + row·K·E

    for j in tl.static_range(NUM_BASES):
        if SUM:
            columns = grad  # every base reads the whole E-wide gradient
        else:
            columns = grad + j * E  # base j's gradient is columns [j·E, (j + 1)·E)
        _sum_base(columns, codes_ptr + f, partial, first, end, F, C, K * E, e_mask,
                  BASES[j], NUM_DIGITS[j], STARTS[j], ROW_LANES[j], ACC, BLOCK_B, BLOCK_E)


@triton.jit
def _sum_base(grad, codes_ptr, partial, first, end, F, C, KE, e_mask, BASE: tl.constexpr,
              DIGITS: tl.constexpr, START: tl.constexpr, ROW_LANES: tl.constexpr,
              ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """One base's block of rows: for every digit position i and value d (row START + i·BASE + d,
    lane r = i·BASE + d), the ACC sum of the gradient of samples [first, end) whose digit i is
    d, stored at ``partial`` + row·KE. ``codes_ptr`` points at this field's column."""
    r = tl.arange(0, ROW_LANES)
    lanes = tl.arange(0, BLOCK_B)
    acc = tl.zeros([ROW_LANES, BLOCK_E], dtype=ACC)
    s0 = first
    while s0 < end:  # the chunk in a fixed order: deterministic
        s = s0 + lanes
        s_mask = s < end
        code = tl.load(codes_ptr + s * F, mask=s_mask, other=-1)
        rest = tl.maximum(code, 0)
        # hit[s, r]: sample s selects lane r (one lane per digit position).
        hit = tl.zeros([BLOCK_B, ROW_LANES], dtype=tl.int1)
        for i in tl.static_range(DIGITS):
            hit = hit | (r[None, :] == (i * BASE + rest % BASE)[:, None])
            rest = rest // BASE
        hit = hit & (code >= 0)[:, None]  # missing codes select nothing
        g = tl.load(grad + (s * F * C)[:, None], mask=s_mask[:, None] & e_mask[None, :],
                    other=0.0).to(ACC)
        acc += tl.sum(tl.where(hit[:, :, None], g[:, None, :], 0.0), axis=0)
        s0 += BLOCK_B
    rows = (START + r).to(tl.int64)
    tl.store(partial + rows[:, None] * KE, acc, mask=(r < BASE * DIGITS)[:, None] & e_mask[None, :])


def mnse_backward(
    grad: torch.Tensor,
    codes: torch.Tensor,
    bases: Sequence[int],
    num_digits: Sequence[int],
    mode: int,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """d weight (F, R, K, E) of ``mnse_forward``, deterministic; see the module docstring.

    Args:
        grad: (K, B, F, len(bases)·E) (mode 0, concat) or (K, B, F, E) (mode 1, sum).
        codes, bases, num_digits, mode: as given to ``mnse_forward``.
        chunk: samples per program (rounded up to a multiple of the sample block, which it
            caps); None picks one from the shape. Tests set it to exercise several chunks.
    Returns:
        (F, R, K, E) in grad's dtype, summed in float32 (float64 for float64 grad).
    """
    K, B, F, C = grad.shape
    bases, num_digits, starts, R = _layout(bases, num_digits)
    assert mode in (0, 1) and tuple(codes.shape) == (B, F)
    E = C // len(bases) if mode == 0 else C
    assert mode == 1 or C == len(bases) * E
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if B == 0 or grad.numel() == 0:
        return grad.new_zeros(F, R, K, E)

    grad, codes = grad.contiguous(), codes.contiguous()
    BLOCK_E = min(triton.next_power_of_2(E), _MAX_E_LANES)
    num_e_blocks = triton.cdiv(E, BLOCK_E)
    row_lanes = tuple(triton.next_power_of_2(b * k) for b, k in zip(bases, num_digits))
    BLOCK_B = min(_MAX_SAMPLES_PER_PROGRAM,
                  _pow2_at_most(_BACKWARD_TILE_ELEMENTS // (max(row_lanes) * BLOCK_E)),
                  triton.next_power_of_2(B))
    if chunk is None:
        programs_per_chunk = F * K * num_e_blocks
        chunk = max(_MIN_CHUNK, triton.cdiv(B, max(1, _TARGET_PROGRAMS // programs_per_chunk)))
    else:
        BLOCK_B = min(BLOCK_B, _pow2_at_most(chunk))
    chunk = triton.cdiv(max(1, min(chunk, B)), BLOCK_B) * BLOCK_B
    num_chunks = triton.cdiv(B, chunk)

    partial = torch.empty(num_chunks, F, R, K, E, dtype=acc_dtype, device=grad.device)
    grid = (num_chunks, F, K * num_e_blocks)
    _backward_kernel[grid](
        grad, codes, partial,
        B, F, K, E, C, B * F * C, chunk, num_e_blocks,
        BASES=bases, NUM_DIGITS=num_digits, STARTS=starts, ROW_LANES=row_lanes,
        NUM_BASES=len(bases), R=R,
        SUM=mode == 1, ACC=_acc_type(grad.dtype), BLOCK_B=BLOCK_B, BLOCK_E=BLOCK_E,
    )
    grad_weight = partial[0] if num_chunks == 1 else partial.sum(0)
    return grad_weight.to(grad.dtype)
