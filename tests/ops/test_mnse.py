"""hmoe.ops.mnse: every CPU-runnable backend against the float64 reference.

The Triton kernels are tested under TRITON_INTERPRET=1 in tests/kernels/, the CUDA kernels in
test_mnse_cuda.py (skipped without a GPU).
"""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hmoe

ops_mnse = importlib.import_module("hmoe.ops.mnse")
mnse, mnse_ref, mnse_backward_ref = ops_mnse.mnse, ops_mnse.mnse_ref, ops_mnse.mnse_backward_ref
MODES = ops_mnse.MODES

CPU_BACKENDS = [b for b in ("reference", "cpu") if hmoe.ops.reasons("mnse", "cpu")[b] is None]
needs_cpu_kernel = pytest.mark.skipif(
    hmoe.ops.reasons("mnse", "cpu")["cpu"] is not None, reason="hmoe._C has no mnse CPU kernel"
)


def make_case(F, B, K, E, bases, max_value, *, dtype=torch.float64, code_dtype=torch.int64,
              missing=True, seed=0):
    """Random weight (F, R, K, E) and codes (B, F) in [0, max_value], with 0, max and -1 planted."""
    g = torch.Generator().manual_seed(seed)
    num_digits = [ops_mnse.digits_needed(max_value, b) for b in bases]
    R = ops_mnse.num_rows(bases, num_digits)
    weight = torch.randn(F, R, K, E, generator=g, dtype=torch.float64).to(dtype)
    codes = torch.randint(0, max_value + 1, (B, F), generator=g)
    if B >= 3:
        codes[0, 0], codes[1, -1] = 0, max_value
        if missing:
            codes[2, F // 2] = -1
    return weight, codes.to(code_dtype), bases, num_digits


def run(backend_name, *args, **kwargs):
    with hmoe.ops.backend(backend_name):
        return mnse(*args, **kwargs)


SHAPES = [  # (F, B, K, E, bases, max_value): irregular sizes
    (5, 37, 1, 3, (2, 3, 10), 1000),
    (1, 9, 4, 16, (7,), 48),
    (3, 300, 2, 1, (2,), 2**20),
    (2, 5, 1, 8, (10, 2), 0),
]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("F,B,K,E,bases,max_value", SHAPES)
@pytest.mark.parametrize("mode", ["concat", "sum"])
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64])
def test_mnse_matches_reference(backend_name, F, B, K, E, bases, max_value, mode, code_dtype):
    weight, codes, bases, nd = make_case(F, B, K, E, bases, max_value, code_dtype=code_dtype)
    w = weight.clone().requires_grad_()
    out = run(backend_name, w, codes, bases, nd, mode)
    width = len(bases) * E if mode == "concat" else E
    assert out.shape == (K, B, F, width)
    torch.testing.assert_close(out, mnse_ref(weight, codes, bases, nd, MODES[mode]), rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    expected = mnse_backward_ref(grad, codes, bases, nd, MODES[mode])
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-12)


def test_reference_selects_the_papers_rows():
    # v = 13 in base 3 with 3 digits: 13 = 1 + 1*3 + 1*9 -> rows 0*3+1, 1*3+1, 2*3+1.
    F, R, E = 1, 9, 1
    weight = torch.arange(R, dtype=torch.float64).reshape(F, R, 1, E) ** 2  # row r holds r^2
    out = mnse_ref(weight, torch.tensor([[13]]), [3], [3], MODES["sum"])
    assert out.item() == 1 + 16 + 49
    # Two bases concatenated: base 2 block first (rows 0..7), base 10 block next (rows 8..9 + ...).
    weight = torch.arange(2 * 4 + 10 * 1, dtype=torch.float64).reshape(1, -1, 1, 1)
    out = mnse_ref(weight, torch.tensor([[5]]), [2, 10], [4, 1], MODES["concat"])  # 5 = 0b0101
    assert out.flatten().tolist() == [(0 * 2 + 1) + (1 * 2 + 0) + (2 * 2 + 1) + (3 * 2 + 0), 8 + 5]


@needs_cpu_kernel
@pytest.mark.parametrize("mode", [0, 1])
def test_mnse_backward_is_deterministic_across_thread_counts(mode):
    weight, codes, bases, nd = make_case(4, 5000, 2, 8, (2, 3, 10), 10**6, dtype=torch.float32)
    width = 3 * 8 if mode == 0 else 8
    grad = torch.randn(2, 5000, 4, width)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.hmoe.mnse_backward(grad, codes, bases, nd, mode))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    torch.testing.assert_close(results[0].double(), mnse_backward_ref(grad.double(), codes, bases, nd, mode),
                               rtol=1e-4, atol=1e-3)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_mnse_low_precision(dtype, tol):
    weight, codes, bases, nd = make_case(3, 50, 2, 5, (2, 3, 10), 999, dtype=dtype)
    out = torch.ops.hmoe.mnse(weight, codes, bases, nd, 0)
    assert out.dtype == dtype
    expected = mnse_ref(weight.double(), codes, bases, nd, 0)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 4)


@needs_cpu_kernel
@pytest.mark.parametrize("mode", [0, 1])
def test_mnse_gradcheck(mode):
    weight, codes, bases, nd = make_case(2, 6, 2, 3, (2, 3), 20)
    w = weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: torch.ops.hmoe.mnse(x, codes, bases, nd, mode), (w,))


@needs_cpu_kernel
def test_mnse_opcheck():
    weight, codes, bases, nd = make_case(3, 11, 2, 4, (2, 3, 10), 500)
    torch.library.opcheck(torch.ops.hmoe.mnse, (weight.requires_grad_(), codes, list(bases), nd, 0))
    grad = torch.randn(2, 11, 3, 12, dtype=torch.float64)
    torch.library.opcheck(torch.ops.hmoe.mnse_backward, (grad, codes, list(bases), nd, 1 - 1))


@settings(max_examples=30, deadline=None)
@given(
    bases=st.lists(st.integers(2, 12), min_size=1, max_size=3, unique=True),
    max_value=st.integers(0, 10**7),
    B=st.integers(0, 40),
    F=st.integers(1, 4),
    K=st.integers(1, 3),
    E=st.integers(1, 6),
    mode=st.sampled_from(["concat", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_mnse_hypothesis(bases, max_value, B, F, K, E, mode, seed):
    weight, codes, bases, nd = make_case(F, B, K, E, tuple(bases), max_value, seed=seed)
    expected = mnse_ref(weight, codes, bases, nd, MODES[mode])
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected_grad = mnse_backward_ref(grad, codes, bases, nd, MODES[mode])
    for backend_name in CPU_BACKENDS:
        w = weight.clone().requires_grad_()
        out = run(backend_name, w, codes, bases, nd, mode)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        out.backward(grad)
        torch.testing.assert_close(w.grad, expected_grad, rtol=1e-12, atol=1e-12)


def _shared_rows(backend_name, a, c, bases, nd):
    """How many summands codes a and c share, read off the op itself: with row r of the table
    the unit vector e_r (mode "sum"), a code's output is the indicator of its selected rows."""
    R = ops_mnse.num_rows(bases, nd)
    weight = torch.eye(R, dtype=torch.float64).reshape(1, R, 1, R)
    out = run(backend_name, weight, torch.tensor([[a], [c]]), bases, nd, "sum")[0, :, 0]  # (2, R)
    return int(round(float(out[0] @ out[1])))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@settings(max_examples=40, deadline=None)
@given(a=st.integers(0, 10**6), c=st.integers(0, 10**6))
def test_order_property(backend_name, a, c):
    """Codes share exactly the summands of the digit positions where they agree, so codes that
    agree on their top m digits in base b share at least m of that base's summands."""
    bases = (2, 3, 10)
    nd = [ops_mnse.digits_needed(10**6, b) for b in bases]
    agree, at_least = 0, 0
    for b, k in zip(bases, nd):
        da = [(a // b**i) % b for i in range(k)]
        dc = [(c // b**i) % b for i in range(k)]
        agree += sum(x == y for x, y in zip(da, dc))
        top = 0
        while top < k and da[k - 1 - top] == dc[k - 1 - top]:
            top += 1
        at_least += top
    shared = _shared_rows(backend_name, a, c, bases, nd)
    assert shared == agree >= at_least


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_nearby_codes_share_more_summands_than_distant_ones(backend_name):
    g = torch.Generator().manual_seed(0)
    bases, nd = (2, 3, 10), [20, 13, 7]
    anchors = torch.randint(0, 10**6 - 1000, (50,), generator=g).tolist()
    near = sum(_shared_rows(backend_name, a, a + 7, bases, nd) for a in anchors)
    far = sum(_shared_rows(backend_name, a, (a + 500_000) % 10**6, bases, nd) for a in anchors)
    assert near > far


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_mnse_rejects_codes_below_missing(backend_name):
    weight, codes, bases, nd = make_case(3, 6, 1, 2, (2, 10), 99)
    codes[4, 1] = -5
    with pytest.raises(ValueError, match="codes must be >= 0 \\(or -1 for missing\\), got -5"):
        run(backend_name, weight, codes, bases, nd)


@needs_cpu_kernel
def test_mnse_kernel_names_the_bad_code():
    weight, codes, bases, nd = make_case(3, 6, 1, 2, (2, 10), 99)
    codes[4, 1] = -5
    with pytest.raises(IndexError, match=r"field 1 \(sample 4\) has code -5"):
        torch.ops.hmoe.mnse(weight, codes, bases, nd, 0)
    with pytest.raises(IndexError, match=r"field 1 \(sample 4\) has code -5"):
        torch.ops.hmoe.mnse_backward(torch.zeros(1, 6, 3, 4, dtype=weight.dtype), codes, bases, nd, 0)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_mnse_rejects_codes_the_digits_cannot_write(backend_name):
    weight, codes, bases, nd = make_case(2, 6, 1, 2, (2, 10), 99)  # base 2: 7 digits, < 128
    codes[0, 0] = 128
    with pytest.raises(ValueError, match="codes must be < 100"):
        run(backend_name, weight, codes, bases, nd)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: a.update(codes=a["codes"].float()), TypeError, "codes must be int32 or int64"),
        (lambda a: a.update(codes=a["codes"][:, :1]), ValueError, r"codes must be \(B, F=2\)"),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, r"weight must be a \(F, R, K, E\)"),
        (lambda a: a.update(weight=a["weight"].long()), TypeError, "weight must be floating point"),
        (lambda a: a.update(num_digits=[7]), ValueError, "of one length"),
        (lambda a: a.update(num_digits=[8, 2]), ValueError, "need R = 36"),
        (lambda a: a.update(bases=[1, 10]), ValueError, r"bases must be in \[2, 2\*\*31\)"),
        (lambda a: a.update(bases=list(range(2, 11)), num_digits=[1] * 9), ValueError, "at most 8 bases"),
        (lambda a: a.update(mode="max"), ValueError, "mode must be one of"),
    ],
)
def test_mnse_rejects_bad_arguments(change, error, message):
    weight, codes, bases, nd = make_case(2, 6, 1, 2, (2, 10), 99)
    args = dict(weight=weight, codes=codes, bases=list(bases), num_digits=nd, mode="concat")
    change(args)
    with pytest.raises(error, match=message):
        mnse(**args)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_mnse_empty_batch(backend_name):
    weight, codes, bases, nd = make_case(3, 0, 2, 4, (2, 3), 50)
    w = weight.clone().requires_grad_()
    out = run(backend_name, w, codes, bases, nd, "concat")
    assert out.shape == (2, 0, 3, 8)
    out.sum().backward()
    assert torch.count_nonzero(w.grad) == 0
