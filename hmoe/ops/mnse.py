r"""Multiple Numeral Systems Encoding (MNSE): an integer code as digits in several bases.

"Ads Recommendation in a Collapsed and Entangled World" (Pan et al. 2024, section 3.2): a numeric
feature, quantised to a non-negative integer code v, is written in each base b of ``bases``
(default (2, 3, 10)) with K_b digits (``num_digits``, enough for the largest code). Digit k
(k = 0 the least significant) with value d = (v // b^k) mod b selects row k·b + d of that base's
block of rows; the blocks of all bases stack per field, base j's starting at
``start_j = Σ_{i<j} b_i·K_{b_i}``, so the table of one field has R = Σ_j b_j·K_{b_j} rows.

With weight (F, R, K, E) (K embedding sets, the set axis before E as in multi_embedding) and
codes (B, F):

    h_j[k, b, f, :] = Σ_{digit i < K_{b_j}} weight[f, start_j + i·b_j + digit_i(codes[b, f]), k, :]
    mode "concat" (0): out[k, b, f, :] = [h_0 | h_1 | ...]        (K, B, F, len(bases)·E)
    mode "sum"    (1): out[k, b, f, :] = h_0 + h_1 + ...          (K, B, F, E)

A code of -1 means "missing": it selects no rows and its output is zero (hmoe.nn.MNSE adds a
learned per-field vector there). The kernels keep only a code's low K_b digits in each base;
``mnse`` rejects codes that do not fit (at least min_b b^K_b) before they reach a kernel. Nearby codes share their high-order digits and so share
summands, which keeps the order of the values visible to the model.

Backward: d weight[f, r, k, :] = Σ over (b, digit) selecting row r of field f of the matching
slice of grad. The tables are tiny and every sample hits the same few rows, so kernels sum into
private copies and reduce them in a fixed order (deterministic).

Dtypes: float32 / float64 weights (bfloat16 / float16 with float32 accumulation), codes int32 or
int64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hmoe.ops import _backend, _extension

__all__ = ["MODES", "block_starts", "digits_needed", "mnse", "mnse_backward_ref", "mnse_ref",
           "num_rows"]

OP = _backend.register_op("mnse", has_triton=True)
MODES = {"concat": 0, "sum": 1}
MISSING = -1
MAX_BASES = 8  # the CUDA kernel passes bases by value in a fixed-size struct


def digits_needed(max_value: int, base: int) -> int:
    """K_b: the number of base-``base`` digits of ``max_value`` (at least 1)."""
    if base < 2:
        raise ValueError(f"bases must be >= 2, got {base}")
    if max_value < 0:
        raise ValueError(f"max_value must be >= 0, got {max_value}")
    digits = 1
    while base ** digits <= max_value:
        digits += 1
    return digits


def block_starts(bases: Sequence[int], num_digits: Sequence[int]) -> list[int]:
    """First row of each base's block, then R."""
    starts = [0]
    for b, k in zip(bases, num_digits):
        starts.append(starts[-1] + b * k)
    return starts


def num_rows(bases: Sequence[int], num_digits: Sequence[int]) -> int:
    """R = Σ_b b·K_b rows per field."""
    return block_starts(bases, num_digits)[-1]


# --------------------------------------------------------------------------------------------
# Reference: readable, differentiable, the spec.


def _digit_rows(codes, bases, num_digits):
    """(B, F, Σ K_b) row of each digit of each code, in base order; missing codes give row 0."""
    v = codes.long().clamp(min=0)
    starts = block_starts(bases, num_digits)
    rows = []
    for j, (b, kb) in enumerate(zip(bases, num_digits)):
        power = 1
        for i in range(kb):
            rows.append(starts[j] + i * b + torch.div(v, power, rounding_mode="floor") % b)
            power *= b
    return torch.stack(rows, dim=-1)


def mnse_ref(weight, codes, bases, num_digits, mode):
    """The math of the module docstring in plain PyTorch: (K, B, F, len(bases)·E or E)."""
    F, R, K, E = weight.shape
    B = codes.shape[0]
    rows = _digit_rows(codes, bases, num_digits)  # (B, F, S), S = Σ K_b
    fields = torch.arange(F, device=codes.device)[None, :, None]
    picked = weight[fields, rows]  # (B, F, S, K, E)
    present = (codes != MISSING).to(weight.dtype)[:, :, None, None, None]
    picked = picked * present
    parts, s = [], 0
    for kb in num_digits:
        parts.append(picked[:, :, s:s + kb].sum(dim=2))  # (B, F, K, E)
        s += kb
    out = torch.cat(parts, dim=-1) if mode == MODES["concat"] else torch.stack(parts).sum(0)
    return out.permute(2, 0, 1, 3).contiguous()  # (K, B, F, ·)


def mnse_backward_ref(grad, codes, bases, num_digits, mode):
    """d weight (F, R, K, E): the vector-Jacobian product of mnse_ref."""
    K = grad.shape[0]
    F = codes.shape[1]
    E = grad.shape[3] // len(bases) if mode == MODES["concat"] else grad.shape[3]
    weight = torch.zeros(F, num_rows(bases, num_digits), K, E, dtype=grad.dtype,
                         device=grad.device, requires_grad=True)
    with torch.enable_grad():
        out = mnse_ref(weight, codes, bases, num_digits, mode)
        (grad_weight,) = torch.autograd.grad(out, weight, grad)
    return grad_weight


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled op.


def _out_dim(E, bases, mode):
    return len(bases) * E if mode == MODES["concat"] else E


if _extension.has_schema("mnse"):

    @torch.library.register_fake("hmoe::mnse")
    def _(weight, codes, bases, num_digits, mode):
        F, R, K, E = weight.shape
        return weight.new_empty(K, codes.shape[0], codes.shape[1], _out_dim(E, bases, mode))

    @torch.library.register_fake("hmoe::mnse_backward")
    def _(grad, codes, bases, num_digits, mode):
        K = grad.shape[0]
        E = grad.shape[3] // len(bases) if mode == MODES["concat"] else grad.shape[3]
        return grad.new_empty(codes.shape[1], num_rows(bases, num_digits), K, E)

    def _setup_context(ctx, inputs, output):
        weight, codes, bases, num_digits, mode = inputs
        ctx.save_for_backward(codes)
        ctx.args = (list(bases), list(num_digits), mode)

    def _backward(ctx, grad):
        (codes,) = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = torch.ops.hmoe.mnse_backward(grad.contiguous(), codes, *ctx.args)
        return grad_weight, None, None, None, None

    torch.library.register_autograd("hmoe::mnse", _backward, setup_context=_setup_context)


class _TritonMNSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, codes, bases, num_digits, mode):
        from hmoe.kernels import mnse_triton

        ctx.save_for_backward(codes)
        ctx.args = (tuple(bases), tuple(num_digits), mode)
        return mnse_triton.mnse_forward(weight, codes, bases, num_digits, mode)

    @staticmethod
    def backward(ctx, grad):
        from hmoe.kernels import mnse_triton

        (codes,) = ctx.saved_tensors
        grad_weight = mnse_triton.mnse_backward(grad.contiguous(), codes, *ctx.args)
        return grad_weight, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public entry point: validates once, then dispatches.


def _validate(weight, codes, bases, num_digits, mode):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a (F, R, K, E) tensor, got {getattr(weight, 'shape', weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if codes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"codes must be int32 or int64, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[1] != weight.shape[0]:
        raise ValueError(f"codes must be (B, F={weight.shape[0]}), got shape {tuple(codes.shape)}")
    if codes.device != weight.device:
        raise ValueError(f"codes is on {codes.device} but weight is on {weight.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if len(bases) == 0 or len(bases) != len(num_digits):
        raise ValueError(f"bases and num_digits must be non-empty and of one length, got "
                         f"{tuple(bases)} and {tuple(num_digits)}")
    if len(bases) > MAX_BASES:
        raise ValueError(f"at most {MAX_BASES} bases, got {len(bases)}")
    if any(not 2 <= b < 2**31 for b in bases) or any(k < 1 for k in num_digits):
        raise ValueError(f"bases must be in [2, 2**31) and num_digits >= 1, got {tuple(bases)} "
                         f"and {tuple(num_digits)}")
    if any(k * math.log2(b) > 62 for b, k in zip(bases, num_digits)):
        raise ValueError("num_digits too large: b ** num_digits must fit in 62 bits")
    R = num_rows(bases, num_digits)
    if weight.shape[1] != R:
        raise ValueError(f"weight has {weight.shape[1]} rows per field but bases {tuple(bases)} "
                         f"with num_digits {tuple(num_digits)} need R = {R}")


def mnse(
    weight: torch.Tensor,
    codes: torch.Tensor,
    bases: Sequence[int],
    num_digits: Sequence[int],
    mode: str = "concat",
) -> torch.Tensor:
    """MNSE lookup of the module docstring: weight (F, R, K, E), codes (B, F) -> (K, B, F, ·).

    codes must lie in [-1, min_b b^K_b): -1 is missing; larger codes would lose their high
    digits, so they raise (hmoe.nn.MNSE clamps to its max_values before calling this).
    """
    bases, num_digits = [int(b) for b in bases], [int(k) for k in num_digits]
    _validate(weight, codes, bases, num_digits, mode)
    if not torch.compiler.is_compiling() and codes.numel() > 0:
        limit = min(b ** k for b, k in zip(bases, num_digits))
        low, high = int(codes.min()), int(codes.max())
        if low < MISSING:
            raise ValueError(f"codes must be >= 0 (or -1 for missing), got {low}")
        if high >= limit:
            raise ValueError(f"codes must be < {limit} (the largest code every base can write "
                             f"with num_digits {tuple(num_digits)}), got {high}")
    code = MODES[mode]
    backend_name = _backend.select(OP.name, weight.device.type)
    if backend_name == "reference":
        return mnse_ref(weight, codes, bases, num_digits, code)
    if backend_name == "triton":
        return _TritonMNSE.apply(weight, codes, bases, num_digits, code)
    return torch.ops.hmoe.mnse(weight, codes, bases, num_digits, code)
