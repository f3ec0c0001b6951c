r"""TIM target attention: the Temporal Interest Module's attention with temporal encoding.

"Ads Recommendation in a Collapsed and Entangled World" (Pan et al. 2024, section 3.1). For a
sample with behaviours e_i (i < length), their target-relative positions p_i in [1, P] and the
target v, with a position table PE (P + 1, D) whose row 0 belongs to the target:

    ẽ_i = e_i + PE[p_i],        ṽ = v + PE[0]                               (temporal encoding)
    s_{h,i} = ⟨ẽ_i^h, ṽ^h⟩ / sqrt(D / H)                 per head h (D split into H blocks)
    α_{h,i} = softmax over i < length of s_{h,i}                           (B, H, L)
    m^h = Σ_i α_{h,i} ẽ_i^h                                                (B, D): ``pooled``
    u^h = ṽ^h ⊙ m^h  = Σ_i α_{h,i} (ẽ_i^h ⊙ ṽ^h)                            (B, D): ``out``

The target is factored out of the values (u = ṽ ⊙ m), so the kernels keep α (B, H, L) and m
(B, D) for backward and never a (B, L, D) intermediate. Steps i >= length are padding: they are
never read, so whatever they hold (NaN, ids out of range) cannot reach the result, and a sample of
length 0 gives α = 0, m = 0, u = 0.

Behaviours come as ``rows`` (N, D) (any row stride, unit column stride) and optional ``ids``
(B, L): with ids, step i of sample b reads row ids[b, i] (the fused gather straight from an item
table); without, ``rows`` is the pre-gathered (B·L, D) and step (b, i) reads row b·L + i.

Backward, with g = d out and g_m = d pooled (both (B, D)), c = 1 / sqrt(D / H):

    dm = g ⊙ ṽ + g_m
    ds_{h,i} = α_{h,i} (⟨dm^h, ẽ_i^h⟩ - ⟨dm^h, m^h⟩)
    dẽ_i = α_i dm + c · ds_i ṽ            -> grad_rows[b, i] and PE[p_i]
    dṽ = g ⊙ m + c · Σ_i ds_i ẽ_i         -> d target and PE[0]

one pass over the steps. ``grad_rows`` is (B, L, D), zero at padding; the public function turns
it into the gradient of ``rows`` (itself, or a sum into the table rows by id). The position
table's gradient is summed in a fixed order (deterministic).

Fused update (``fused=FusedUpdate(...)``, ids given): backward applies SGD or row-wise Adagrad
(hmoe.optim) to the table rows read, in place, with each row's gradient summed over the steps
that read it — the same step as the optimizer on the dense gradient — and leaves the table no
``.grad``. The CPU kernel sorts the steps by row and walks the table once; other backends compose
their backward with a per-row sum and the update (hmoe.ops.multi_embedding.apply_fused_update).

Dtypes: rows, target and the position table share one floating dtype (float32 / float64; bf16 and
fp16 on CUDA and Triton, accumulated in float32); α and m are float32 (float64 for float64).
positions, lengths and ids are int32 or int64.
"""

from __future__ import annotations

import math

import torch

from hmoe.ops import _backend, _extension
from hmoe.ops.multi_embedding import FusedUpdate, apply_fused_update

__all__ = ["tim_attention", "tim_attention_backward_fused_ref_", "tim_attention_backward_ref",
           "tim_attention_ref"]

OP = _backend.register_op("tim_attention", has_triton=True)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of α and m: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Reference: readable, differentiable, the spec.


def _valid(lengths: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L) True at steps i < lengths[b]."""
    return torch.arange(L, device=lengths.device) < lengths.long()[:, None]


def _attend(behaviors, target, position_embedding, positions, lengths, num_heads):
    """The math of the module docstring on gathered behaviours (B, L, D): (out, alpha, pooled)."""
    B, L, D = behaviors.shape
    H, Dh = num_heads, D // num_heads
    valid = _valid(lengths, L)  # (B, L)
    safe_positions = torch.where(valid, positions.long(), 0)
    e = behaviors + position_embedding[safe_positions]  # (B, L, D)
    e = torch.where(valid[..., None], e, 0.0)  # padding may hold NaN: never let it through
    v = target + position_embedding[0]  # (B, D)
    e_h, v_h = e.view(B, L, H, Dh), v.view(B, H, Dh)
    scores = torch.einsum("blhd,bhd->bhl", e_h, v_h) / math.sqrt(Dh)  # (B, H, L)
    lowest = torch.finfo(scores.dtype).min
    scores = scores.masked_fill(~valid[:, None, :], lowest)
    alpha = torch.softmax(scores, dim=-1) * valid[:, None, :]  # length 0: all zero
    pooled = torch.einsum("bhl,blhd->bhd", alpha, e_h).reshape(B, D)  # (B, D)
    return v * pooled, alpha, pooled


def tim_attention_ref(rows, ids, target, position_embedding, positions, lengths, num_heads):
    """(out (B, D), alpha (B, H, L), pooled (B, D)) in plain PyTorch."""
    B, L = positions.shape
    if ids is None:
        behaviors = rows.reshape(B, L, rows.shape[1])
    else:
        behaviors = rows[torch.where(_valid(lengths, L), ids.long(), 0)]  # (B, L, D)
    out, alpha, pooled = _attend(behaviors, target, position_embedding, positions, lengths,
                                 num_heads)
    stats = stats_dtype(rows.dtype)
    return out, alpha.to(stats), pooled.to(stats)


def tim_attention_backward_ref(grad_out, grad_pooled, rows, ids, target, position_embedding,
                               positions, lengths, num_heads):
    """(grad_rows (B, L, D), grad_target (B, D), grad_position_embedding (P + 1, D)): the
    vector-Jacobian product of tim_attention_ref, grad_rows per gathered step."""
    B, L = positions.shape
    D = rows.shape[1]
    if ids is None:
        gathered = rows.reshape(B, L, D)
    else:
        gathered = rows[torch.where(_valid(lengths, L), ids.long(), 0)]
    with torch.enable_grad():
        behaviors = gathered.detach().requires_grad_(True)
        target_ = target.detach().requires_grad_(True)
        table = position_embedding.detach().requires_grad_(True)
        out, _, pooled = _attend(behaviors, target_, table, positions, lengths, num_heads)
        grads = torch.autograd.grad((out, pooled), (behaviors, target_, table),
                                    (grad_out, grad_pooled.to(pooled.dtype)), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g
                 for g, x in zip(grads, (behaviors, target_, table)))


def _fused_from(backward_op):
    """A tim_attention_backward_fused_ implementation from a backward one: the per-step row
    gradients summed per distinct row, then the optimizer step on those rows."""
    def backward_fused_(table, state, grad_out, grad_pooled, ids, target, position_embedding,
                        positions, lengths, alpha, pooled, num_heads, optimizer, lr, eps):
        grad_rows, grad_target, grad_position = backward_op(
            grad_out, grad_pooled, table, ids, target, position_embedding, positions, lengths,
            alpha, pooled, num_heads)
        B, L, D = grad_rows.shape
        steps = _valid(lengths, L).reshape(-1).nonzero().squeeze(1)  # (S,)
        rows, inverse = torch.unique(ids.reshape(-1)[steps].long(), return_inverse=True)  # (U,)
        summed = grad_rows.new_zeros(rows.numel(), D).index_add_(
            0, inverse, grad_rows.reshape(B * L, D)[steps])  # (U, D)
        with torch.no_grad():
            apply_fused_update(table.unsqueeze(1), state.unsqueeze(1) if state.numel() else state,
                               rows, summed.unsqueeze(1), optimizer, lr, eps)
        return grad_target, grad_position
    return backward_fused_


def tim_attention_backward_fused_ref_(table, state, grad_out, grad_pooled, ids, target,
                                      position_embedding, positions, lengths, alpha, pooled,
                                      num_heads, optimizer, lr, eps):
    """Applies the fused update to ``table`` (N, D) (and the row-wise ``state`` (N,)) in place;
    returns (grad_target (B, D), grad_position_embedding (P + 1, D))."""
    return _fused_from(_reference_backward)(table, state, grad_out, grad_pooled, ids, target,
                                            position_embedding, positions, lengths, alpha,
                                            pooled, num_heads, optimizer, lr, eps)


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled op.


def _rows_gradient(grad_rows, rows, ids, lengths, sparse):
    """The gradient of ``rows`` (N, D) from the per-step gradient (B, L, D): itself without ids;
    with ids, a dense sum into the table rows, or (sparse) a sparse COO tensor of the valid
    steps' rows, as nn.Embedding(sparse=True) gives."""
    B, L, D = grad_rows.shape
    if ids is None:
        return grad_rows.reshape(B * L, D)
    valid = _valid(lengths, L)
    if sparse:  # index_select of the valid steps: faster than a boolean mask on CPU
        steps = valid.reshape(-1).nonzero().squeeze(1)  # (S,)
        indices = ids.reshape(-1).index_select(0, steps).long()[None]  # (1, S)
        values = grad_rows.reshape(B * L, D).index_select(0, steps)  # (S, D)
        return torch.sparse_coo_tensor(indices, values, rows.shape, check_invariants=False)
    safe = torch.where(valid, ids.long(), 0).reshape(-1)  # padding: zero grads into row 0
    grad = grad_rows.new_zeros(rows.shape[0], D)
    # index_put_ with accumulate sorts by row on CUDA (index_add_ there uses float atomics):
    # the table gradient is deterministic on every device.
    return grad.index_put_((safe,), grad_rows.reshape(B * L, D), accumulate=True)


def _setup_context(ctx, inputs, output):
    rows, ids, target, position_embedding, positions, lengths, num_heads = inputs
    _, alpha, pooled = output
    ctx.save_for_backward(rows, ids, target, position_embedding, positions, lengths, alpha, pooled)
    ctx.num_heads = num_heads
    ctx.mark_non_differentiable(alpha)


def _backward_with(backward_op, sparse=False, first=0):
    """The autograd backward over ``backward_op`` (a tim_attention_backward implementation);
    ``first`` is the index of ``rows`` among the inputs whose needs_input_grad ctx holds."""
    def backward(ctx, grad_out, grad_alpha, grad_pooled):
        rows, ids, target, position_embedding, positions, lengths, alpha, pooled = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(target)
        if grad_pooled is None:
            grad_pooled = torch.zeros_like(pooled)
        grad_rows, grad_target, grad_position = backward_op(
            grad_out.contiguous(), grad_pooled.contiguous(), rows, ids, target,
            position_embedding, positions, lengths, alpha, pooled, ctx.num_heads)
        needs = ctx.needs_input_grad[first:]
        return (_rows_gradient(grad_rows, rows, ids, lengths, sparse) if needs[0] else None, None,
                grad_target if needs[2] else None, grad_position if needs[3] else None,
                None, None, None)
    return backward


if _extension.has_schema("tim_attention"):

    @torch.library.register_fake("hmoe::tim_attention")
    def _(rows, ids, target, position_embedding, positions, lengths, num_heads):
        B, L = positions.shape
        stats = stats_dtype(rows.dtype)
        return (target.new_empty(target.shape), target.new_empty(B, num_heads, L, dtype=stats),
                target.new_empty(target.shape, dtype=stats))

    @torch.library.register_fake("hmoe::tim_attention_backward")
    def _(grad_out, grad_pooled, rows, ids, target, position_embedding, positions, lengths, alpha,
          pooled, num_heads):
        B, L = positions.shape
        return (rows.new_empty(B, L, rows.shape[1]), target.new_empty(target.shape),
                position_embedding.new_empty(position_embedding.shape))

    @torch.library.register_fake("hmoe::tim_attention_backward_fused_")
    def _(table, state, grad_out, grad_pooled, ids, target, position_embedding, positions,
          lengths, alpha, pooled, num_heads, optimizer, lr, eps):
        return target.new_empty(target.shape), position_embedding.new_empty(position_embedding.shape)

    torch.library.register_autograd(
        "hmoe::tim_attention", _backward_with(torch.ops.hmoe.tim_attention_backward),
        setup_context=_setup_context)


def _reference_backward(grad_out, grad_pooled, rows, ids, target, position_embedding,
                        positions, lengths, alpha, pooled, num_heads):
    return tim_attention_backward_ref(grad_out, grad_pooled, rows, ids, target,
                                      position_embedding, positions, lengths, num_heads)


def _implementation(backend_name):
    """(forward, backward, backward_fused_) of a backend, with the compiled ops' signatures."""
    if backend_name == "reference":
        return tim_attention_ref, _reference_backward, tim_attention_backward_fused_ref_
    if backend_name == "triton":
        from hmoe.kernels import tim_attention_triton

        backward = tim_attention_triton.tim_attention_backward
        return tim_attention_triton.tim_attention_forward, backward, _fused_from(backward)
    ops = torch.ops.hmoe
    if backend_name == "cpu":
        return ops.tim_attention, ops.tim_attention_backward, ops.tim_attention_backward_fused_
    return ops.tim_attention, ops.tim_attention_backward, _fused_from(ops.tim_attention_backward)


class _TIMFunction(torch.autograd.Function):
    """The op through an explicit autograd.Function: the Triton backend (its kernels are not a
    registered op), sparse row gradients and the fused update, on any backend. ``grad_mode``:
    "dense", "sparse" or a FusedUpdate."""

    @staticmethod
    def forward(ctx, backend_name, grad_mode, rows, ids, target, position_embedding, positions,
                lengths, num_heads):
        forward_op, backward_op, backward_fused_op = _implementation(backend_name)
        inputs = (rows, ids, target, position_embedding, positions, lengths, num_heads)
        output = forward_op(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.fused = grad_mode if isinstance(grad_mode, FusedUpdate) else None
        ctx.backward_fused_op = backward_fused_op
        ctx.backward = _backward_with(backward_op, grad_mode == "sparse", first=2)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_alpha, grad_pooled):
        if ctx.fused is None:
            return (None, None) + ctx.backward(ctx, grad_out, grad_alpha, grad_pooled)
        table, ids, target, position_embedding, positions, lengths, alpha, pooled = \
            ctx.saved_tensors
        grad_out = torch.zeros_like(target) if grad_out is None else grad_out.contiguous()
        grad_pooled = torch.zeros_like(pooled) if grad_pooled is None else grad_pooled.contiguous()
        update = ctx.fused
        with torch.no_grad():
            grad_target, grad_position = ctx.backward_fused_op(
                table, update.state, grad_out, grad_pooled, ids, target, position_embedding,
                positions, lengths, alpha, pooled, ctx.num_heads, update.optimizer, update.lr,
                update.eps)
        needs = ctx.needs_input_grad[2:]
        return (None, None, None, None, grad_target if needs[2] else None,
                grad_position if needs[3] else None, None, None, None)


# --------------------------------------------------------------------------------------------
# Public entry point: validates once, then dispatches.


def _check_int(name, t, shape):
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _first_bad(mask: torch.Tensor) -> tuple[int, int]:
    b, i = (int(x) for x in mask.nonzero()[0])
    return b, i


def _validate(rows, ids, target, position_embedding, positions, lengths, num_heads):
    for name, t in (("rows", rows), ("target", target), ("position_embedding", position_embedding)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.dtype != rows.dtype:
            raise TypeError(f"{name} is {t.dtype} but rows is {rows.dtype}: one dtype for all")
        if t.device != rows.device:
            raise ValueError(f"{name} is on {t.device} but rows is on {rows.device}")
    if target.dim() != 2:
        raise ValueError(f"target must be (B, D), got shape {tuple(target.shape)}")
    B, D = target.shape
    if D == 0:
        raise ValueError("target must have D >= 1 columns, got shape (B, 0)")
    if rows.dim() != 2 or rows.shape[1] != D:
        raise ValueError(f"rows must be (N, D={D}), got shape {tuple(rows.shape)}")
    if position_embedding.dim() != 2 or position_embedding.shape[1] != D or \
            position_embedding.shape[0] < 2:
        raise ValueError(f"position_embedding must be (P + 1, D={D}) with P >= 1, got shape "
                         f"{tuple(position_embedding.shape)}")
    if not isinstance(num_heads, int) or num_heads < 1 or D % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of D={D}, got {num_heads!r}")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[0] != B:
        raise ValueError(f"positions must be (B={B}, L), got shape "
                         f"{tuple(getattr(positions, 'shape', ()))}")
    L = positions.shape[1]
    _check_int("positions", positions, (B, L))
    _check_int("lengths", lengths, (B,))
    if ids is not None:
        _check_int("ids", ids, (B, L))
        if rows.shape[0] == 0:
            raise ValueError("rows must have at least one row when ids are given")
    elif rows.shape[0] != B * L:
        raise ValueError(f"without ids, rows must be the pre-gathered (B·L={B * L}, D) "
                         f"behaviours, got shape {tuple(rows.shape)}")
    for name, t in (("positions", positions), ("lengths", lengths), ("ids", ids)):
        if t is not None and t.device != rows.device:
            raise ValueError(f"{name} is on {t.device} but rows is on {rows.device}")


def _check_values(rows, ids, positions, lengths, max_position):
    """Host-side range checks of every index a kernel will read (valid steps only)."""
    B, L = positions.shape
    if B == 0:
        return
    low, high = int(lengths.min()), int(lengths.max())
    if low < 0 or high > L:
        b = int(((lengths < 0) | (lengths > L)).nonzero()[0])
        raise ValueError(f"lengths must lie in [0, L={L}], got lengths[{b}] = {int(lengths[b])}")
    valid = _valid(lengths, L)
    bad = valid & ((positions < 1) | (positions > max_position))
    if bool(bad.any()):
        b, i = _first_bad(bad)
        raise IndexError(f"positions must lie in [1, {max_position}] at valid steps, got "
                         f"positions[{b}, {i}] = {int(positions[b, i])}")
    if ids is not None:
        bad = valid & ((ids < 0) | (ids >= rows.shape[0]))
        if bool(bad.any()):
            b, i = _first_bad(bad)
            raise IndexError(f"ids must lie in [0, {rows.shape[0]}) (the table's rows) at valid "
                             f"steps, got ids[{b}, {i}] = {int(ids[b, i])}")


def _check_fused(fused, rows, ids, sparse_grad):
    if not isinstance(fused, FusedUpdate):
        raise TypeError(f"fused must be a hmoe.ops.FusedUpdate, got {type(fused).__name__}")
    if ids is None:
        raise ValueError("fused needs ids: the update is applied to the table rows they read")
    if sparse_grad:
        raise ValueError("sparse_grad and fused exclude each other: a fused update leaves no gradient")
    if rows.stride(1) != 1:
        raise ValueError(f"fused needs a table with unit column stride, got strides {rows.stride()}")
    if fused.optimizer == 1:  # row-wise Adagrad
        state = fused.state
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != (rows.shape[0],) or \
                state.dtype != stats_dtype(rows.dtype) or state.device != rows.device:
            raise ValueError(f"fused.state must be a ({rows.shape[0]},) {stats_dtype(rows.dtype)} "
                             f"tensor on {rows.device} (one accumulator per table row), got "
                             f"{getattr(state, 'shape', None)} {getattr(state, 'dtype', None)}")


def tim_attention(
    rows: torch.Tensor,
    ids: torch.Tensor | None,
    target: torch.Tensor,
    position_embedding: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    num_heads: int = 1,
    *,
    sparse_grad: bool = False,
    fused: FusedUpdate | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIM attention of the module docstring: (out (B, D), alpha (B, H, L), pooled (B, D)).

    rows (N, D) with ids (B, L), or the pre-gathered behaviours (B·L, D) with ids None; target
    (B, D); position_embedding (P + 1, D); positions (B, L) in [1, P] and lengths (B,) in
    [0, L]; values at steps i >= lengths[b] are never read. out and pooled are differentiable
    (rows, target, position_embedding); alpha is not. With ids and ``sparse_grad``, the
    gradient of rows is a sparse COO tensor of the rows read (rows must then be a leaf table,
    such as nn.Embedding(sparse=True).weight, not a view). With ids and ``fused``, backward
    applies the update to ``rows`` in place (see the module docstring) and gives it no gradient.
    """
    _validate(rows, ids, target, position_embedding, positions, lengths, num_heads)
    if fused is not None:  # before any copy: the update must reach the caller's table
        _check_fused(fused, rows, ids, sparse_grad)
    if not torch.compiler.is_compiling():
        _check_values(rows, ids, positions, lengths, position_embedding.shape[0] - 1)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    if ids is not None and ids.dtype != positions.dtype:  # the kernels take one index dtype
        ids, positions = ids.long(), positions.long()
    args = (rows, None if ids is None else ids.contiguous(), target.contiguous(),
            position_embedding.contiguous(), positions.contiguous(),
            lengths.to(torch.int64).contiguous(), num_heads)
    backend_name = _backend.select(OP.name, rows.device.type)
    if fused is not None:
        return _TIMFunction.apply(backend_name, fused, *args)
    grad_mode = "sparse" if sparse_grad and ids is not None else "dense"
    if backend_name == "triton" or grad_mode == "sparse":
        return _TIMFunction.apply(backend_name, grad_mode, *args)
    if backend_name == "reference":
        return tim_attention_ref(*args)
    return torch.ops.hmoe.tim_attention(*args)
