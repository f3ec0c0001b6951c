"""Triton kernels of tim_attention against the float64 reference.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set below before triton or hmoe is imported, because both read it at
import): tiny shapes only. Run them on a GPU with TRITON_INTERPRET=0.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

import hmoe  # noqa: E402
from hmoe.kernels import tim_attention_triton as kernels  # noqa: E402
from hmoe.ops.tim_attention import (  # noqa: E402
    tim_attention,
    tim_attention_backward_ref,
    tim_attention_ref,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

pytestmark = pytest.mark.triton

TOL = dict(atol=1e-12, rtol=1e-12)  # float64 kernels against the float64 reference
NUM_TABLE_ROWS = 11


def make_case(B, L, D, P, lengths, form, *, index_dtype=torch.int64, dtype=torch.float64,
              seed=0):
    """(rows, ids, target, position_embedding, positions, lengths) on DEVICE.

    form "gathered": rows (B·L, D), ids None; "table": ids into an (11, D) table; "strided":
    ids into w[:, 1, :] of an (11, 3, D) w, whose other two slices hold NaN (a read past a
    row's D columns would show). Padding steps hold poison: NaN rows, ids and positions out of
    range (negative and too large), so any read of them breaks the result."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    assert lengths.shape == (B,)
    valid = torch.arange(L) < lengths[:, None]  # (B, L)
    positions = torch.randint(1, P + 1, (B, L), generator=gen)
    positions[~valid] = torch.tensor([P + 100, -3]).repeat(B * L)[: int((~valid).sum())]
    if form == "gathered":
        rows, ids = torch.randn(B * L, D, generator=gen, dtype=torch.float64), None
        rows.view(B, L, D)[~valid] = float("nan")
    else:
        ids = torch.randint(0, NUM_TABLE_ROWS, (B, L), generator=gen)
        ids[~valid] = torch.tensor([NUM_TABLE_ROWS + 1000, -5]).repeat(B * L)[
            : int((~valid).sum())]
        if form == "table":
            rows = torch.randn(NUM_TABLE_ROWS, D, generator=gen, dtype=torch.float64)
        else:
            assert form == "strided"
            w = torch.full((NUM_TABLE_ROWS, 3, D), float("nan"), dtype=torch.float64)
            w[:, 1] = torch.randn(NUM_TABLE_ROWS, D, generator=gen, dtype=torch.float64)
            rows = w.to(DEVICE, dtype)[:, 1, :]
            assert rows.stride(0) == 3 * D
        ids = ids.to(DEVICE, index_dtype)
    target = torch.randn(B, D, generator=gen, dtype=torch.float64)
    position_embedding = torch.randn(P + 1, D, generator=gen, dtype=torch.float64)
    if rows.device.type != DEVICE or rows.dtype != dtype:
        rows = rows.to(DEVICE, dtype)
    return (rows, ids, target.to(DEVICE, dtype), position_embedding.to(DEVICE, dtype),
            positions.to(DEVICE, index_dtype), lengths.to(DEVICE))


def upstream(B, D, dtype=torch.float64, seed=1):
    """(grad_out in dtype, grad_pooled in the stats dtype)."""
    gen = torch.Generator().manual_seed(seed)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(B, D, generator=gen, dtype=torch.float64).to(DEVICE, dtype),
            torch.randn(B, D, generator=gen, dtype=torch.float64).to(DEVICE, stats))


def _double(args):
    return tuple(t.double() if t is not None and t.is_floating_point() else t for t in args)


def check_case(args, num_heads, *, chunk=None, tol=TOL):
    """Forward and backward of the kernels against the float64 reference; padding exactly 0."""
    rows, ids, target, position_embedding, positions, lengths = args
    B, D = target.shape
    L = positions.shape[1]
    stats = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out, alpha, pooled = kernels.tim_attention_forward(*args, num_heads, chunk=chunk)
    assert out.shape == (B, D) and out.dtype == rows.dtype
    assert alpha.shape == (B, num_heads, L) and alpha.dtype == stats
    assert pooled.shape == (B, D) and pooled.dtype == stats
    expected = tim_attention_ref(*_double(args), num_heads)
    for got, want in zip((out, alpha, pooled), expected):
        torch.testing.assert_close(got.double(), want, **tol)
    padding = torch.arange(L, device=lengths.device) >= lengths[:, None]  # (B, L)
    assert (alpha.permute(0, 2, 1)[padding] == 0).all()
    empty = lengths == 0
    assert (out[empty] == 0).all() and (pooled[empty] == 0).all()

    grad_out, grad_pooled = upstream(B, D, rows.dtype)
    grads = kernels.tim_attention_backward(grad_out, grad_pooled, *args, alpha, pooled,
                                           num_heads, chunk=chunk)
    expected = tim_attention_backward_ref(grad_out.double(), grad_pooled.double(),
                                          *_double(args), num_heads)
    shapes = ((B, L, D), (B, D), tuple(position_embedding.shape))
    for got, want, shape in zip(grads, expected, shapes):
        assert got.shape == shape and got.dtype == rows.dtype
        torch.testing.assert_close(got.double(), want, **tol)
    assert (grads[0][padding] == 0).all()
    return (out, alpha, pooled), grads


# --------------------------------------------------------------------------------------------
# Kernels against the reference, float64


# (B, L, D, H, P, lengths, form, index dtype): irregular D and heads (Dh = 4, 8, 3), lengths
# 0, 1 and L, both forms, a strided table, int32 and int64 indices.
CASES = [
    (5, 7, 12, 3, 9, [0, 1, 7, 3, 5], "gathered", torch.int64),
    (5, 7, 12, 3, 4, [7, 0, 2, 1, 6], "table", torch.int32),
    (4, 6, 8, 1, 6, [6, 1, 0, 4], "strided", torch.int64),
    (3, 5, 6, 2, 3, [2, 5, 0], "table", torch.int64),
]


@pytest.mark.parametrize("B,L,D,H,P,lengths,form,index_dtype", CASES)
def test_matches_reference(B, L, D, H, P, lengths, form, index_dtype):
    args = make_case(B, L, D, P, lengths, form, index_dtype=index_dtype)
    # One chunk per sample (the default for short L), then chunks of 2 steps: several programs
    # per sample, the last chunk short, chunks past a sample's length empty, merged by the
    # log-sum-exp combine.
    for chunk in (None, 2):
        check_case(args, H, chunk=chunk)


def test_split_by_default_heuristic(monkeypatch):
    """The shape-derived chunk splits a sample once _MIN_CHUNK allows it (here 3 steps)."""
    monkeypatch.setattr(kernels, "_MIN_CHUNK", 3)
    assert kernels._tiling(5, 7, 12, 3, None)[2:] == (2, 4, 2)  # BLOCK_L 2, 2 chunks of 4
    args = make_case(5, 7, 12, 7, [7, 3, 0, 5, 1], "table")
    check_case(args, 3)


def test_chunk_of_one_step_and_int32_lengths():
    """chunk=1: every step its own program, one-lane tiles; lengths given as int32."""
    rows, ids, target, pe, positions, lengths = make_case(3, 4, 4, 5, [4, 0, 3], "gathered",
                                                          index_dtype=torch.int32)
    check_case((rows, ids, target, pe, positions, lengths.int()), 2, chunk=1)


def test_float32():
    args = make_case(4, 6, 10, 5, [6, 2, 0, 5], "table", dtype=torch.float32)
    for chunk in (None, 4):
        check_case(args, 5, chunk=chunk, tol=dict(atol=1e-5, rtol=1e-5))


@pytest.mark.skipif(INTERPRET, reason="the interpreter has no bf16 / fp16 kernels")
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_low_precision(dtype, tol):
    args = make_case(6, 40, 64, 30, [40, 0, 1, 17, 39, 8], "strided", dtype=dtype)
    for chunk in (None, 16):
        check_case(args, 4, chunk=chunk, tol=dict(atol=tol, rtol=tol))


# --------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("B,L,lengths", [(0, 5, []), (3, 0, [0, 0, 0]), (3, 4, [0, 0, 0])])
def test_no_steps(B, L, lengths):
    """Empty batch, L = 0, every length 0: zeros and no NaN, forward and backward."""
    args = make_case(B, L, 6, 3, lengths, "table")
    (out, alpha, pooled), grads = check_case(args, 2)
    for t in (out, alpha, pooled) + grads:
        assert (t == 0).all()


def test_position_gradient_deterministic():
    """Float32 with many steps per position (P = 3) over several chunks: the position table's
    gradient is bitwise equal run to run."""
    args = make_case(6, 9, 8, 3, [9, 8, 0, 9, 4, 1], "table", dtype=torch.float32)
    out, alpha, pooled = kernels.tim_attention_forward(*args, 2, chunk=4)
    grad_out, grad_pooled = upstream(6, 8, torch.float32)
    runs = [kernels.tim_attention_backward(grad_out, grad_pooled, *args, alpha, pooled, 2,
                                           chunk=4) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# --------------------------------------------------------------------------------------------
# Bad input: the launchers name the argument


def test_bad_inputs(monkeypatch):
    rows, ids, target, pe, positions, lengths = make_case(2, 3, 6, 3, [3, 1], "table")
    with pytest.raises(ValueError, match="num_heads"):
        kernels.tim_attention_forward(rows, ids, target, pe, positions, lengths, 4)
    with pytest.raises(TypeError, match="target"):
        kernels.tim_attention_forward(rows, ids, target.float(), pe, positions, lengths, 2)
    with pytest.raises(TypeError, match="ids"):
        kernels.tim_attention_forward(rows, ids.int(), target, pe, positions, lengths, 2)
    with pytest.raises(ValueError, match="rows"):
        kernels.tim_attention_forward(rows.t().contiguous().t(), ids, target, pe, positions,
                                      lengths, 2)
    with pytest.raises(ValueError, match="positions"):
        kernels.tim_attention_forward(rows, ids, target, pe, positions[:, :2], lengths, 2)
    with pytest.raises(ValueError, match="pre-gathered"):
        kernels.tim_attention_forward(rows, None, target, pe, positions, lengths, 2)
    out, alpha, pooled = kernels.tim_attention_forward(rows, ids, target, pe, positions,
                                                       lengths, 2)
    with pytest.raises(ValueError, match="alpha"):
        kernels.tim_attention_backward(target, pooled, rows, ids, target, pe, positions,
                                       lengths, alpha[:, :1], pooled, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need the interpreter
    with pytest.raises(ValueError, match="CUDA"):
        kernels.tim_attention_forward(rows.cpu(), ids.cpu(), target.cpu(), pe.cpu(),
                                      positions.cpu(), lengths.cpu(), 2)


# --------------------------------------------------------------------------------------------
# Through the public API: hmoe.ops.tim_attention with the Triton backend, autograd included


def _require_triton_backend():
    reason = hmoe.ops.reasons("tim_attention", DEVICE)["triton"]
    if reason is not None:  # e.g. hmoe was imported before TRITON_INTERPRET was set
        pytest.skip(reason)


def _step(backend_name, form, ids_dtype):
    """out, pooled and the gradients of the table (w for the strided form), target and PE."""
    rows, ids, target, pe, positions, lengths = make_case(4, 5, 8, 6, [5, 0, 2, 1], form)
    if form == "strided":
        leaf = torch.full((rows.shape[0], 3, rows.shape[1]), float("nan"), dtype=rows.dtype,
                          device=rows.device)
        leaf[:, 1] = rows
        leaf.requires_grad_()  # w (11, 3, D); its slices 0 and 2 hold NaN
        rows = leaf[:, 1, :]
    else:
        leaf = rows = rows.clone().requires_grad_()
    if ids is not None:
        ids = ids.to(ids_dtype)  # int32 ids with int64 positions: the op unifies them
    target, pe = target.clone().requires_grad_(), pe.clone().requires_grad_()
    with hmoe.ops.backend(backend_name):
        out, alpha, pooled = tim_attention(rows, ids, target, pe, positions, lengths, 2)
    grad_out, grad_pooled = upstream(4, 8)
    ((out * grad_out).sum() + (pooled * grad_pooled).sum()).backward()
    return out.detach(), alpha, pooled.detach(), leaf.grad, target.grad, pe.grad


@pytest.mark.parametrize("form,ids_dtype", [("gathered", None), ("table", torch.int64),
                                            ("strided", torch.int32)])
def test_op_matches_reference_backend(form, ids_dtype):
    _require_triton_backend()
    got = _step("triton", form, ids_dtype)
    expected = _step("reference", form, ids_dtype)
    assert not got[1].requires_grad
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, equal_nan=True, **TOL)
