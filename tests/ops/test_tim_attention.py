"""hmoe.ops.tim_attention: the CPU C++ backend (and the reference's own properties) against the
float64 reference, forward and backward, on irregular shapes; gradcheck, opcheck, the padding
independence and identity properties, determinism and the bad-input matrix."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hmoe

ta = importlib.import_module("hmoe.ops.tim_attention")

CPU_REASON = hmoe.ops.reasons("tim_attention", "cpu")["cpu"]
needs_cpu_kernel = pytest.mark.skipif(CPU_REASON is not None, reason=str(CPU_REASON))
BACKENDS = ["reference"] + (["cpu"] if CPU_REASON is None else [])


def make_case(B, L, D, H, P, *, gather, seed=0, dtype=torch.float64, index_dtype=torch.int64,
              table_rows=23, stride_sets=1, lengths=None):
    """Inputs of one call; padded steps hold NaN rows and out-of-range ids and positions."""
    g = torch.Generator().manual_seed(seed)
    if gather:
        full = torch.randn(table_rows, stride_sets, D, generator=g, dtype=torch.float64).to(dtype)
        rows = full[:, stride_sets - 1]  # (N, D), row stride stride_sets * D
        ids = torch.randint(0, table_rows, (B, L), generator=g).to(index_dtype)
    else:
        rows = torch.randn(B * L, D, generator=g, dtype=torch.float64).to(dtype)
        ids = None
    target = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    table = torch.randn(P + 1, D, generator=g, dtype=torch.float64).to(dtype)
    positions = torch.randint(1, P + 1, (B, L), generator=g).to(index_dtype)
    if lengths is None:
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        lengths[0] = 0
        if B > 1:
            lengths[1] = L
        if B > 2:
            lengths[2] = min(1, L)
    padded = torch.arange(L) >= lengths[:, None]  # (B, L)
    positions = positions.masked_fill(padded, P + 7)
    if gather:
        ids = ids.masked_fill(padded, table_rows + 5)
    else:
        rows = rows.view(B, L, D).masked_fill(padded[..., None], float("nan")).view(B * L, D)
    return rows, ids, target, table, positions, lengths, H


def run(backend, args):
    with hmoe.ops.backend(backend):
        return ta.tim_attention(*args)


SHAPES = [  # B, L, D, H, P
    (37, 13, 24, 3, 9),
    (5, 1, 8, 1, 4),
    (9, 30, 64, 2, 40),
    (3, 7, 6, 6, 2),
]


@needs_cpu_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cpu_forward_and_backward_match_the_float64_reference(shape, gather, index_dtype):
    args = make_case(*shape, gather=gather, index_dtype=index_dtype, stride_sets=3)
    rows, ids, target, table, positions, lengths, H = args
    expected = ta.tim_attention_ref(*args)
    got = torch.ops.hmoe.tim_attention(*args)
    for name, e, x in zip(("out", "alpha", "pooled"), expected, got):
        torch.testing.assert_close(x, e, atol=1e-12, rtol=1e-12, msg=lambda m: f"{name}: {m}")
    g = torch.Generator().manual_seed(9)
    grad_out = torch.randn(target.shape, generator=g, dtype=torch.float64)
    grad_pooled = torch.randn(target.shape, generator=g, dtype=torch.float64)
    expected = ta.tim_attention_backward_ref(grad_out, grad_pooled, *args)
    got = torch.ops.hmoe.tim_attention_backward(grad_out, grad_pooled, rows, ids, target, table,
                                                positions, lengths, got[1], got[2], H)
    for name, e, x in zip(("grad_rows", "grad_target", "grad_position"), expected, got):
        torch.testing.assert_close(x, e, atol=1e-12, rtol=1e-12, msg=lambda m: f"{name}: {m}")
    assert not got[0].isnan().any()


@needs_cpu_kernel
@pytest.mark.parametrize("gather", [False, True])
def test_cpu_float32_matches_the_reference(gather):
    args = make_case(17, 11, 16, 2, 5, gather=gather, dtype=torch.float32)
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)
    for x, e in zip(torch.ops.hmoe.tim_attention(*args), ta.tim_attention_ref(*args64)):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), e, atol=1e-5, rtol=1e-5)


@needs_cpu_kernel
def test_cpu_bfloat16_matches_the_reference_on_the_rounded_values():
    args = make_case(6, 9, 16, 2, 5, gather=True, dtype=torch.bfloat16)
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)
    out, alpha, pooled = torch.ops.hmoe.tim_attention(*args)
    assert out.dtype == torch.bfloat16 and alpha.dtype == pooled.dtype == torch.float32
    e_out, e_alpha, e_pooled = ta.tim_attention_ref(*args64)
    torch.testing.assert_close(out.double(), e_out, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(alpha.double(), e_alpha, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled.double(), e_pooled, atol=1e-5, rtol=1e-5)


def _grads(backend, args, seed=3):
    rows, ids, target, table, positions, lengths, H = args
    leaves = [t.detach().clone().requires_grad_(True) for t in (rows, target, table)]
    out, _, pooled = run(backend, (leaves[0], ids, leaves[1], leaves[2], positions, lengths, H))
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + \
        (pooled * torch.randn(pooled.shape, generator=g, dtype=pooled.dtype)).sum()
    loss.backward()
    return [out.detach(), pooled.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gather", [False, True])
def test_autograd_of_the_public_function_matches_the_reference(backend, gather):
    # The reference fed clean inputs (padding zeroed, ids and positions in range) is the
    # plain formula: every backend on the dirty inputs must give its values and gradients.
    args = make_case(11, 9, 12, 3, 6, gather=gather, stride_sets=2)
    rows, ids, target, table, positions, lengths, H = args
    padded = torch.arange(9) >= lengths[:, None]
    clean_positions = positions.masked_fill(padded, 1)
    if gather:
        clean = (rows, ids.masked_fill(padded, 0), target, table, clean_positions, lengths, H)
    else:
        clean = (rows.nan_to_num(0.0), None, target, table, clean_positions, lengths, H)
    got, expected = _grads(backend, args), _grads("reference", clean)
    for x, e in zip(got, expected):
        assert not x.isnan().any()
        torch.testing.assert_close(x, e, atol=1e-12, rtol=1e-12)


@needs_cpu_kernel
@pytest.mark.parametrize("gather", [False, True])
def test_gradcheck(gather):
    rows, ids, target, table, positions, lengths, H = make_case(4, 5, 6, 2, 3, gather=gather,
                                                                table_rows=7)
    rows = rows.nan_to_num(0.0)

    def fn(rows_, target_, table_):
        with hmoe.ops.backend("cpu"):
            out, _, pooled = ta.tim_attention(rows_, ids, target_, table_, positions, lengths, H)
        return out, pooled

    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (rows, target, table))
    assert torch.autograd.gradcheck(fn, inputs)


@needs_cpu_kernel
@pytest.mark.parametrize("gather", [False, True])
def test_opcheck(gather):
    args = make_case(5, 4, 8, 2, 3, gather=gather, dtype=torch.float32)
    rows, ids, target, table, positions, lengths, H = args
    args = (rows.nan_to_num(0.0).requires_grad_(True), ids, target.requires_grad_(True),
            table.requires_grad_(True), positions, lengths, H)
    torch.library.opcheck(torch.ops.hmoe.tim_attention.default, args)


@needs_cpu_kernel
def test_position_gradient_is_deterministic_across_threads():
    args = make_case(300, 40, 16, 2, 5, gather=True, dtype=torch.float32, table_rows=500)
    rows, ids, target, table, positions, lengths, H = args
    _, alpha, pooled = torch.ops.hmoe.tim_attention(*args)
    grad = torch.randn(target.shape)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            results.append(torch.ops.hmoe.tim_attention_backward(
                grad, grad.clone(), rows, ids, target, table, positions, lengths, alpha, pooled, H))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_scores_give_the_target_times_the_mean(backend):
    B, L, D, P = 6, 8, 10, 4
    g = torch.Generator().manual_seed(5)
    table = torch.randn(P + 1, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    v = target + table[0]  # (B, D)
    z = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    z -= (z * v[:, None]).sum(-1, keepdim=True) / (v * v).sum(-1)[:, None, None] * v[:, None]
    positions = torch.full((B, L), 3)
    behaviors = z + v[:, None] - table[3]  # ẽ_i = z_i + ṽ: every score is |ṽ|² / sqrt(D)
    lengths = torch.tensor([1, 2, 3, 5, 8, 8])
    out, alpha, pooled = run(backend, (behaviors.reshape(B * L, D), None, target, table,
                                       positions, lengths, 1))
    valid = (torch.arange(L) < lengths[:, None]).double()  # (B, L)
    mean = ((z + v[:, None]) * valid[..., None]).sum(1) / lengths[:, None]
    torch.testing.assert_close(alpha[:, 0], valid / lengths[:, None], atol=1e-12, rtol=0)
    torch.testing.assert_close(pooled, mean)
    torch.testing.assert_close(out, v * mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_zero_gives_zeros(backend):
    args = make_case(4, 6, 8, 2, 3, gather=True, lengths=torch.zeros(4, dtype=torch.int64))
    out, alpha, pooled = run(backend, args)
    assert not out.any() and not alpha.any() and not pooled.any()
    grads = _grads(backend, args)
    assert all(not g.isnan().any() for g in grads)
    assert not grads[2].any()  # no step read: no gradient to any row


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_influences_the_result(backend):
    base = make_case(8, 10, 12, 2, 5, gather=False)
    rows, ids, target, table, positions, lengths, H = base
    padded = (torch.arange(10) >= lengths[:, None]).reshape(-1)  # (B·L,)
    other_rows = rows.clone()
    other_rows[padded] = torch.randn(int(padded.sum()), 12, dtype=torch.float64) * 1e3
    other_positions = positions.masked_fill(torch.arange(10) >= lengths[:, None], 1)
    first = run(backend, base)
    second = run(backend, (other_rows, ids, target, table, other_positions, lengths, H))
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 9), L=st.integers(1, 17), heads=st.sampled_from([1, 2, 3]),
       dh=st.integers(1, 6), P=st.integers(1, 12), gather=st.booleans(),
       seed=st.integers(0, 2**16))
def test_hypothesis_cpu_matches_reference(B, L, heads, dh, P, gather, seed):
    if CPU_REASON is not None:
        pytest.skip(CPU_REASON)
    args = make_case(B, L, heads * dh, heads, P, gather=gather, seed=seed)
    for x, e in zip(run("cpu", args), ta.tim_attention_ref(*args)):
        torch.testing.assert_close(x, e, atol=1e-12, rtol=1e-12)
    for x, e in zip(_grads("cpu", args), _grads("reference", args)):
        torch.testing.assert_close(x, e, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Bad input: clear Python errors naming the argument.


def _good():
    return list(make_case(4, 5, 8, 2, 3, gather=True, lengths=torch.tensor([0, 5, 2, 3])))


def _with(index, value):
    args = _good()
    args[index] = value
    return args


BAD = {
    "lengths above L": (_with(5, torch.tensor([0, 6, 2, 3])), ValueError, "lengths"),
    "negative lengths": (_with(5, torch.tensor([0, -1, 2, 3])), ValueError, "lengths"),
    "lengths float": (_with(5, torch.ones(4)), TypeError, "lengths"),
    "lengths wrong shape": (_with(5, torch.ones(3, dtype=torch.int64)), ValueError, "lengths"),
    "position 0 at a valid step": (_with(4, torch.zeros(4, 5, dtype=torch.int64)), IndexError,
                                   "positions"),
    "position above P": (_with(4, torch.full((4, 5), 4)), IndexError, "positions"),
    "id out of range": (_with(1, torch.full((4, 5), 23)), IndexError, "ids"),
    "negative id": (_with(1, torch.full((4, 5), -1)), IndexError, "ids"),
    "ids wrong shape": (_with(1, torch.zeros(4, 4, dtype=torch.int64)), ValueError, "ids"),
    "positions wrong batch": (_with(4, torch.ones(3, 5, dtype=torch.int64)), ValueError,
                              "positions"),
    "target wrong dim": (_with(2, torch.zeros(4, 6, dtype=torch.float64)), ValueError, "rows"),
    "target 1-d": (_with(2, torch.zeros(8, dtype=torch.float64)), ValueError, "target"),
    "dtype mismatch": (_with(2, torch.zeros(4, 8)), TypeError, "target"),
    "table too short": (_with(3, torch.zeros(1, 8, dtype=torch.float64)), ValueError,
                        "position_embedding"),
    "heads do not divide D": (_with(6, 3), ValueError, "num_heads"),
    "integer rows": (_with(0, torch.zeros(23, 8, dtype=torch.int64)), TypeError, "rows"),
    "pre-gathered rows of the wrong count": (_with(1, None), ValueError, "rows"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_naming_the_argument(backend, case):
    args, error, name = BAD[case]
    with pytest.raises(error, match=name):
        run(backend, args)


@needs_cpu_kernel
def test_the_compiled_op_checks_indices_itself():
    rows, ids, target, table, positions, lengths, H = _good()
    bad_ids = ids.clone()
    bad_ids[1, 0] = 99
    with pytest.raises(IndexError, match=r"ids\[1, 0\] = 99"):
        torch.ops.hmoe.tim_attention(rows, bad_ids, target, table, positions, lengths, H)
    with pytest.raises(IndexError, match="lengths"):
        torch.ops.hmoe.tim_attention(rows, ids, target, table, positions, lengths + 9, H)
