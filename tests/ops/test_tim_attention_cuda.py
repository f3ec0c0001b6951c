"""hmoe.ops.tim_attention on the CUDA C++ backend against the float64 reference.

Skipped without a CUDA device. On a machine with one, a CUDA backend that is not available
(hmoe._C built without CUDA) fails loudly instead of skipping, so a broken build cannot pass.

Inputs are drawn on the CPU, in float64, rounded to the dtype under test, and copied to the GPU;
the reference runs in float64 on the same rounded values, so low-precision results are compared
within their own rounding (about 1e-2 relative for bf16). Padded steps (i >= lengths[b]) hold
NaN rows, ids far outside the table and positions outside [1, P]: the kernels must never read
them. No hypothesis here: the GPU machine does not have it.
"""

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

import hmoe

# The module, not the function of the same name that hmoe.ops re-exports.
ta = importlib.import_module("hmoe.ops.tim_attention")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
TOLERANCE = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}
BAD_ID = 10**9  # what padded steps hold in ids: reading one would fault


@pytest.fixture(autouse=True)
def cuda_backend_available():
    reason = hmoe.ops.reasons("tim_attention", "cuda")["cuda"]
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the CUDA backend cannot run: {reason}")


def make_case(B, L, D, H, *, P=None, dtype=torch.float32, gather=False, N=50, K=1, k=0,
              index_dtype=torch.int64, lengths=None, seed=0):
    """CPU tensors (rows, ids, target, position_embedding, positions, lengths).

    Lengths are drawn in [0, L] with 0, 1 and L always present (as B allows). Without gather,
    rows is the pre-gathered (B·L, D) with NaN at padded steps; with gather, rows is the column
    slice table[:, k, :] of an (N, K, D) table (row stride K·D) and ids hold BAD_ID at padding.
    Positions at padding lie outside [1, P]."""
    g = torch.Generator().manual_seed(seed)
    P = P or max(L, 1) + 3
    if lengths is None:
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        specials = torch.tensor([0, 1, L])[:B]
        lengths[: len(specials)] = specials.clamp(max=L)
    lengths = lengths.long()
    valid = torch.arange(L) < lengths[:, None]
    positions = torch.randint(1, P + 1, (B, L), generator=g)
    junk = torch.randint(-5, 5, (B, L), generator=g) * 10**6
    positions = torch.where(valid, positions, junk)
    target = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    position_embedding = torch.randn(P + 1, D, generator=g, dtype=torch.float64).to(dtype)
    if gather:
        table = torch.randn(N, K, D, generator=g, dtype=torch.float64).to(dtype)
        rows = table[:, k, :]
        ids = torch.randint(0, N, (B, L), generator=g)
        ids = torch.where(valid, ids, torch.full_like(ids, BAD_ID)).to(index_dtype)
    else:
        rows = torch.randn(B * L, D, generator=g, dtype=torch.float64).to(dtype)
        rows.view(B, L, D)[~valid] = float("nan")
        ids = None
    return rows, ids, target, position_embedding, positions.to(index_dtype), lengths


def to_cuda(*tensors):
    """Copies to the GPU with the same strides and storage offset (a column slice of a wider
    table stays one: same row stride, same alignment). The rest of the storage holds NaN."""
    out = []
    for t in tensors:
        if t is None or t.is_contiguous():
            out.append(None if t is None else t.to(DEVICE))
            continue
        size = t.untyped_storage().nbytes() // t.element_size()
        storage = torch.full((size,), float("nan"), dtype=t.dtype, device=DEVICE)
        view = storage.as_strided(t.shape, t.stride(), t.storage_offset())
        view.copy_(t)
        out.append(view)
    return tuple(out)


def double(*tensors):
    return tuple(None if t is None else (t.double() if t.is_floating_point() else t)
                 for t in tensors)


def random_like(shape, dtype, seed):
    """A float64 tensor whose values are exactly representable in dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **TOLERANCE[dtype])


def check_op(B, L, D, H, dtype=torch.float32, seed=0, **kw):
    """torch.ops.hmoe.tim_attention and tim_attention_backward on CUDA against the reference."""
    case = make_case(B, L, D, H, dtype=dtype, seed=seed, **kw)
    rows, ids, target, pe, positions, lengths = case
    stats = ta.stats_dtype(dtype)
    valid = (torch.arange(L) < lengths[:, None]).to(DEVICE)
    args = to_cuda(*case)
    assert args[0].stride() == rows.stride()

    out, alpha, pooled = torch.ops.hmoe.tim_attention(*args, H)
    out_r, alpha_r, pooled_r = ta.tim_attention_ref(*double(*case), H)
    assert out.shape == (B, D) and out.dtype == dtype and out.device.type == DEVICE
    assert alpha.shape == (B, H, L) and alpha.dtype == stats
    assert pooled.shape == (B, D) and pooled.dtype == stats
    for t in (out, alpha, pooled):
        assert not t.isnan().any()  # padding (NaN rows) never leaks
    assert torch.all(alpha.permute(0, 2, 1)[~valid] == 0)
    empty = (lengths == 0).to(DEVICE)
    assert torch.all(out[empty] == 0) and torch.all(pooled[empty] == 0)
    assert_close(out, out_r, dtype)
    assert_close(alpha, alpha_r, dtype)
    assert_close(pooled, pooled_r, dtype)

    grad_out = random_like((B, D), dtype, seed + 1)
    grad_pooled = random_like((B, D), stats, seed + 2)
    grads = torch.ops.hmoe.tim_attention_backward(
        grad_out.to(DEVICE, dtype), grad_pooled.to(DEVICE, stats), *args[:6], alpha, pooled, H)
    expected = ta.tim_attention_backward_ref(grad_out, grad_pooled, *double(*case), H)
    grad_rows, grad_target, grad_pe = grads
    assert grad_rows.shape == (B, L, D) and grad_target.shape == (B, D)
    assert grad_pe.shape == pe.shape
    for t in grads:
        assert t.dtype == dtype and not t.isnan().any()
    assert torch.all(grad_rows[~valid] == 0)
    for actual, want in zip(grads, expected):
        assert_close(actual, want, dtype)
    return args, alpha, pooled


# ---- forward and backward ops against the reference ------------------------------------------

# (B, L, D, H): irregular sizes (D = 24 in three heads), D = 64 in one head (16-byte vectors),
# a D without vectors (13), one head per element (H = D), long sequences split into chunks
# (L = 1000: four chunks; L = 300: a last chunk of 44 steps), a wide row (D = 300).
SHAPES = [(37, 13, 24, 3), (16, 40, 64, 1), (5, 9, 13, 1), (6, 9, 16, 16), (8, 1000, 24, 3),
          (4, 300, 16, 2), (3, 11, 300, 5)]


@pytest.mark.parametrize("B,L,D,H", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gather", [False, True], ids=["pregathered", "gather"])
def test_ops_match_ref(B, L, D, H, dtype, gather):
    check_op(B, L, D, H, dtype, gather=gather)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("gather", [False, True], ids=["pregathered", "gather"])
def test_index_dtypes(index_dtype, gather):
    check_op(37, 13, 24, 3, gather=gather, index_dtype=index_dtype)
    check_op(4, 600, 8, 2, gather=gather, index_dtype=index_dtype, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_float16_and_odd_shapes(dtype):
    check_op(37, 13, 24, 3, dtype, gather=True)
    check_op(7, 5, 8, 8, dtype, seed=1)
    check_op(9, 17, 40, 5, dtype, gather=True, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,k", [(3, 1), (2, 0), (4, 3)])
def test_table_with_row_stride(dtype, K, k):
    """ids into a column slice weight[:, k, :] of an (N, K, D) table: row stride K·D > D."""
    args, _, _ = check_op(37, 13, 24, 3, dtype, gather=True, K=K, k=k)
    assert args[0].stride(0) == K * 24
    check_op(11, 70, 64, 2, dtype, gather=True, K=K, k=k, seed=4)


def misaligned(t):
    """t on the GPU, contiguous but one element past a 16-byte boundary (no 16-byte vectors)."""
    storage = torch.zeros(t.numel() + 1, dtype=t.dtype, device=DEVICE)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def test_misaligned_rows_take_the_scalar_path():
    case = make_case(37, 13, 24, 3, gather=True)
    args = list(to_cuda(*case))
    args[0], args[3] = misaligned(args[0]), misaligned(args[3])
    out, alpha, pooled = torch.ops.hmoe.tim_attention(*args, 3)
    out_r, alpha_r, pooled_r = ta.tim_attention_ref(*double(*case), 3)
    for actual, want in ((out, out_r), (alpha, alpha_r), (pooled, pooled_r)):
        assert_close(actual, want, torch.float32)
    g, gm = random_like((37, 24), torch.float32, 1), random_like((37, 24), torch.float32, 2)
    grads = torch.ops.hmoe.tim_attention_backward(g.float().to(DEVICE), gm.float().to(DEVICE),
                                                  *args, alpha, pooled, 3)
    for actual, want in zip(grads, ta.tim_attention_backward_ref(g, gm, *double(*case), 3)):
        assert_close(actual, want, torch.float32)


@pytest.mark.parametrize("L", [1, 13, 600])
def test_lengths_zero_one_and_full(L):
    B = 6
    lengths = torch.tensor([0, 1, L, 0, L, 1]).clamp(max=L)
    check_op(B, L, 16, 2, lengths=lengths)
    check_op(B, L, 16, 2, lengths=lengths, gather=True)


def test_all_lengths_zero_give_zeros():
    B, L, D, H = 5, 7, 16, 2
    case = make_case(B, L, D, H, gather=True, lengths=torch.zeros(B, dtype=torch.long))
    args = to_cuda(*case)
    out, alpha, pooled = torch.ops.hmoe.tim_attention(*args, H)
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(alpha) == 0
    assert torch.count_nonzero(pooled) == 0
    grads = torch.ops.hmoe.tim_attention_backward(torch.randn(B, D, device=DEVICE),
                                                  torch.randn(B, D, device=DEVICE), *args,
                                                  alpha, pooled, H)
    for t in grads:
        assert torch.count_nonzero(t) == 0


def test_empty_sequence_and_batch():
    for B, L in ((3, 0), (0, 5)):
        case = make_case(B, L, 8, 2, lengths=torch.zeros(B, dtype=torch.long))
        args = to_cuda(*case)
        out, alpha, pooled = torch.ops.hmoe.tim_attention(*args, 2)
        assert out.shape == (B, 8) and alpha.shape == (B, 2, L) and pooled.shape == (B, 8)
        assert torch.count_nonzero(out) == 0 and torch.count_nonzero(pooled) == 0
        grad_rows, grad_target, grad_pe = torch.ops.hmoe.tim_attention_backward(
            torch.ones(B, 8, device=DEVICE), torch.ones(B, 8, device=DEVICE), *args, alpha,
            pooled, 2)
        assert grad_rows.shape == (B, L, 8) and grad_target.shape == (B, 8)
        assert grad_pe.shape == args[3].shape and torch.count_nonzero(grad_pe) == 0


# ---- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_gradient_is_deterministic(dtype):
    """Thousands of steps share a few positions: the sums must not depend on scheduling."""
    B, L, D, H = 3000, 40, 64, 2
    case = make_case(B, L, D, H, P=6, dtype=dtype, gather=True, N=1000)
    args = to_cuda(*case)
    out, alpha, pooled = torch.ops.hmoe.tim_attention(*args, H)
    g = torch.randn(B, D, device=DEVICE).to(dtype)
    gm = torch.randn(B, D, device=DEVICE)
    first = torch.ops.hmoe.tim_attention_backward(g, gm, *args, alpha, pooled, H)
    for _ in range(3):
        again_fwd = torch.ops.hmoe.tim_attention(*args, H)
        for a, b in zip(again_fwd, (out, alpha, pooled)):
            assert torch.equal(a, b)
        again = torch.ops.hmoe.tim_attention_backward(g, gm, *args, alpha, pooled, H)
        for a, b in zip(again, first):
            assert torch.equal(a, b)
    expected = ta.tim_attention_backward_ref(g.double().cpu(), gm.double().cpu(),
                                             *double(*case), H)
    assert_close(first[2], expected[2], dtype)


# ---- the public function, autograd and the op registration ------------------------------------

@pytest.mark.parametrize("gather", [False, True], ids=["pregathered", "gather"])
@pytest.mark.parametrize("B,L,D,H", [(37, 13, 24, 3), (4, 600, 16, 2)])
def test_autograd_matches_reference_backend(gather, B, L, D, H):
    case = make_case(B, L, D, H, gather=gather, K=2, k=1)
    rows, ids, target, pe, positions, lengths = to_cuda(*case)
    if gather:  # the gradient reaches the full (N, K, D) table through the column slice
        table = torch.randn(rows.shape[0], 2, D, device=DEVICE)
        table[:, 1, :] = rows
        leaves = lambda t: (t[:, 1, :],)  # noqa: E731
    else:
        table = torch.nan_to_num(rows).requires_grad_()  # NaN padding would poison .grad sums
        leaves = lambda t: (t,)  # noqa: E731
    results = {}
    for name in ("reference", "cuda"):
        tb = table.detach().clone().requires_grad_()
        t_ = target.detach().clone().requires_grad_()
        p_ = pe.detach().clone().requires_grad_()
        with hmoe.ops.backend(name):
            out, alpha, pooled = ta.tim_attention(*leaves(tb), ids, t_, p_, positions, lengths, H)
        g = torch.linspace(-1, 1, B * D, device=DEVICE).view(B, D)
        (out * g).sum().add((pooled * g.flip(0)).sum()).backward()
        results[name] = (out.detach(), alpha, pooled.detach(), tb.grad, t_.grad, p_.grad)
    for actual, want in zip(results["cuda"], results["reference"]):
        torch.testing.assert_close(actual, want, **TOLERANCE[torch.float32])


def test_gradcheck_float64():
    case = make_case(4, 5, 6, 2, dtype=torch.float64, gather=True, N=7)
    rows, ids, target, pe, positions, lengths = to_cuda(*case)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (rows, target, pe))

    def f(r, t, p):
        out, _, pooled = torch.ops.hmoe.tim_attention(r, ids, t, p, positions, lengths, 2)
        return out, pooled

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("gather", [False, True], ids=["pregathered", "gather"])
def test_opcheck(gather):
    case = make_case(5, 7, 8, 2, gather=gather, N=9)
    rows, ids, target, pe, positions, lengths = to_cuda(*case)
    rows = torch.nan_to_num(rows).requires_grad_()
    target, pe = target.requires_grad_(), pe.requires_grad_()
    args = (rows, ids, target, pe, positions, lengths, 2)
    torch.library.opcheck(torch.ops.hmoe.tim_attention.default, args)
    with torch.no_grad():
        _, alpha, pooled = torch.ops.hmoe.tim_attention(*args)
    grad_args = (torch.randn(5, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE),
                 rows.detach(), ids, target.detach(), pe.detach(), positions, lengths, alpha,
                 pooled, 2)
    torch.library.opcheck(torch.ops.hmoe.tim_attention_backward.default, grad_args)


# ---- bad input -------------------------------------------------------------------------------

def test_host_checks_raise_clear_errors():
    args = list(to_cuda(*make_case(4, 5, 8, 2, gather=True)))
    op = torch.ops.hmoe.tim_attention
    errors = (RuntimeError, ValueError)
    with pytest.raises(errors, match="num_heads"):
        op(*args, 3)
    bad = list(args)
    bad[2] = args[2].double()
    with pytest.raises(errors, match="target must be"):
        op(*bad, 2)
    bad = list(args)
    bad[1] = args[1].int()  # ids and positions of different dtypes
    with pytest.raises(errors, match="ids must have the dtype of positions"):
        op(*bad, 2)
    bad = list(args)
    bad[3] = args[3][:, :4]
    with pytest.raises(errors, match="position_embedding must be"):
        op(*bad, 2)
    bad = list(args)
    bad[1] = None  # pre-gathered rows must be (B·L, D)
    with pytest.raises(errors, match="pre-gathered"):
        op(*bad, 2)
    bad = list(args)
    bad[4] = args[4].cpu()
    with pytest.raises(errors, match="must be on"):
        op(*bad, 2)


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_bad_id_fires_device_assert(op):
    """Straight to the op (no Python range check): the kernel must report the id and assert,
    never read out of bounds. A device-side assert kills the CUDA context, hence a subprocess."""
    script = textwrap.dedent(f"""
        import torch, hmoe
        d = "cuda"
        rows = torch.randn(5, 4, device=d)
        ids = torch.tensor([[0, 1, 2], [3, 4, 123456]], device=d)
        target, pe = torch.randn(2, 4, device=d), torch.randn(4, 4, device=d)
        positions = torch.ones(2, 3, dtype=torch.long, device=d)
        lengths = torch.tensor([3, 3], device=d)
        args = (rows, ids, target, pe, positions, lengths, 1)
        if "{op}" == "forward":
            torch.ops.hmoe.tim_attention(*args)
        else:
            g = torch.randn(2, 4, device=d)
            torch.ops.hmoe.tim_attention_backward(g, g, *args[:6], torch.rand(2, 1, 3, device=d),
                                                  g, 1)
        torch.cuda.synchronize()
        print("no error")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no error" not in output, output
    assert "ids[1, 2] = 123456" in output, output


def test_make_case_marks_padding():
    """The helper itself: padding holds NaN rows, bad ids and positions outside [1, P]."""
    rows, ids, _, pe, positions, lengths = make_case(6, 9, 4, 1)
    valid = torch.arange(9) < lengths[:, None]
    assert {0, 1, 9} <= set(lengths.tolist())
    assert rows.view(6, 9, 4)[~valid].isnan().all() and not rows.view(6, 9, 4)[valid].isnan().any()
    P = pe.shape[0] - 1
    assert ((positions[valid] >= 1) & (positions[valid] <= P)).all()
    assert not ((positions[~valid] >= 1) & (positions[~valid] <= P)).any()
    _, ids, _, _, _, lengths = make_case(6, 9, 4, 1, gather=True)
    valid = torch.arange(9) < lengths[:, None]
    assert (ids[~valid] == BAD_ID).all() and (ids[valid] < 50).all()
