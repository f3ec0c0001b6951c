"""hmoe.ops.mnse on the CUDA C++ backend against the float64 reference.

Skipped without a CUDA device. On a machine with one, a CUDA backend that is not available
(hmoe._C built without CUDA) fails loudly instead of skipping, so a broken build cannot pass.

Inputs are drawn on the CPU, in float64 for the reference, and copied to the GPU. Low-precision
weights (bf16, fp16) are compared with the reference evaluated on the same rounded values, within
their rounding (about 1e-2 relative). No hypothesis here: the GPU machine does not have it.
"""

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

import hmoe

# The module, not the function of the same name that hmoe.ops re-exports.
mn = importlib.import_module("hmoe.ops.mnse")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
MODES = {"concat": 0, "sum": 1}
# (bases, largest code): num_digits follow from the largest code, as in hmoe.nn.MNSE.
BASES = [((2, 3, 10), 999), ((7,), 500), ((2,), 1000)]
TOLERANCE = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


@pytest.fixture(autouse=True)
def cuda_backend_available():
    reason = hmoe.ops.reasons("mnse", "cuda")["cuda"]
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the CUDA backend cannot run: {reason}")


def digits_for(bases, max_value):
    return [mn.digits_needed(max_value, b) for b in bases]


def make_case(F, B, K, E, bases, num_digits, seed=0, *, dtype=torch.float32,
              index_dtype=torch.int64):
    """CPU tensors: weight (F, R, K, E) rounded to dtype, and codes (B, F) drawn from
    [-1, limit), limit = min_b b^K_b, with limit - 1, -1 (missing) and 0 always present (as many
    of them, in that order, as B * F allows)."""
    g = torch.Generator().manual_seed(seed)
    R = mn.num_rows(bases, num_digits)
    weight = torch.randn(F, R, K, E, generator=g, dtype=torch.float64).to(dtype)
    limit = min(b ** k for b, k in zip(bases, num_digits))
    codes = torch.randint(-1, limit, (B, F), generator=g, dtype=torch.int64)
    if B * F > 0:
        specials = torch.tensor([limit - 1, -1, 0])[: B * F]
        where = torch.randperm(B * F, generator=g)[: len(specials)]
        codes.view(-1)[where] = specials
    return weight, codes.to(index_dtype)


def random_grad(shape, dtype, seed=1):
    """A float64 gradient whose values are exactly representable in dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **TOLERANCE[dtype])


def check_op(F, B, K, E, bases, num_digits, mode, dtype=torch.float32, index_dtype=torch.int64,
             seed=0):
    """torch.ops.hmoe.mnse and mnse_backward on CUDA against the float64 reference."""
    weight, codes = make_case(F, B, K, E, bases, num_digits, seed, dtype=dtype,
                              index_dtype=index_dtype)
    code = MODES[mode]
    expected = mn.mnse_ref(weight.double(), codes, bases, num_digits, code)
    codes_d = codes.to(DEVICE)
    out = torch.ops.hmoe.mnse(weight.to(DEVICE), codes_d, bases, num_digits, code)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_cuda
    assert_close(out, expected, dtype)

    grad = random_grad(expected.shape, dtype, seed + 1)
    grad_weight = torch.ops.hmoe.mnse_backward(grad.to(device=DEVICE, dtype=dtype), codes_d,
                                               bases, num_digits, code)
    expected_grad = mn.mnse_backward_ref(grad, codes, bases, num_digits, code)
    assert grad_weight.shape == weight.shape and grad_weight.dtype == dtype
    assert_close(grad_weight, expected_grad, dtype)


# ---- forward and backward ops against the reference ------------------------------------------

@pytest.mark.parametrize("B", [1, 37, 1000])
@pytest.mark.parametrize("F,K", [(1, 1), (5, 1), (5, 4)])
@pytest.mark.parametrize("E", [1, 3, 16])
@pytest.mark.parametrize("bases,max_value", BASES)
@pytest.mark.parametrize("mode", ["concat", "sum"])
def test_ops_match_ref_float32(B, F, K, E, bases, max_value, mode):
    check_op(F, B, K, E, bases, digits_for(bases, max_value), mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B,F,K,E", [(37, 5, 4, 16), (1000, 1, 1, 3)])
@pytest.mark.parametrize("mode", ["concat", "sum"])
def test_ops_match_ref_other_dtypes(dtype, index_dtype, B, F, K, E, mode):
    bases, max_value = BASES[0]
    check_op(F, B, K, E, bases, digits_for(bases, max_value), mode, dtype, index_dtype)


# Shapes that take the other code paths: a forward table too large for shared memory (read
# through L1/L2) with a backward split into column slices; a field whose rows do not fit one
# vector column in shared memory (backward accumulates in global memory); codes above 2^32
# (64-bit digit division) with a power-of-two base (shifts); many chunks of samples; E = 8
# (16-byte vectors only for 2-byte types).
@pytest.mark.parametrize("F,B,K,E,bases,num_digits", [
    (2, 300, 4, 48, (2, 3, 10), (10, 7, 3)),
    (3, 70, 2, 16, (1000,), (3,)),
    (2, 100, 2, 3, (3, 1024), (38, 6)),
    (2, 5000, 1, 4, (2, 3, 10), (10, 7, 3)),
    (3, 41, 3, 8, (5, 2), (4, 9)),
])
@pytest.mark.parametrize("mode", ["concat", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_match_ref_other_paths(F, B, K, E, bases, num_digits, mode, dtype):
    check_op(F, B, K, E, bases, num_digits, mode, dtype)


def test_eight_bases_and_one_digit():
    bases = (2, 3, 4, 5, 6, 7, 8, 9)
    check_op(3, 53, 2, 5, bases, [1] * 8, "concat")
    check_op(3, 53, 2, 5, bases, digits_for(bases, 700), "sum", seed=3)


def test_all_codes_missing_gives_zeros():
    bases, num_digits = (2, 3, 10), (10, 7, 3)
    weight, _ = make_case(4, 9, 2, 16, bases, num_digits)
    codes = torch.full((9, 4), -1, device=DEVICE)
    out = torch.ops.hmoe.mnse(weight.to(DEVICE), codes, bases, num_digits, 0)
    assert out.shape == (2, 9, 4, 48) and torch.count_nonzero(out) == 0
    grad = torch.randn(2, 9, 4, 48, device=DEVICE)
    assert torch.count_nonzero(torch.ops.hmoe.mnse_backward(grad, codes, bases, num_digits, 0)) == 0


def misaligned_copy(t):
    """t on the GPU, contiguous but one element past a 16-byte boundary (no 16-byte vectors)."""
    storage = torch.zeros(t.numel() + 1, dtype=t.dtype, device=DEVICE)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def test_misaligned_tensors_take_the_scalar_path():
    bases, num_digits = (2, 3, 10), (10, 7, 3)
    weight, codes = make_case(5, 37, 2, 16, bases, num_digits)  # E alone would allow vectors
    codes_d = codes.to(DEVICE)
    out = torch.ops.hmoe.mnse(misaligned_copy(weight.to(DEVICE)), codes_d, bases, num_digits, 1)
    assert_close(out, mn.mnse_ref(weight.double(), codes, bases, num_digits, 1), torch.float32)
    grad = random_grad(out.shape, torch.float32)
    grad_weight = torch.ops.hmoe.mnse_backward(misaligned_copy(grad.float().to(DEVICE)), codes_d,
                                               bases, num_digits, 1)
    assert_close(grad_weight, mn.mnse_backward_ref(grad, codes, bases, num_digits, 1),
                 torch.float32)


def test_non_contiguous_inputs():
    bases, num_digits = (7,), (4,)
    weight, codes = make_case(3, 29, 2, 6, bases, num_digits)
    w = weight.to(DEVICE).transpose(2, 3).contiguous().transpose(2, 3)  # (F, R, K, E), strided
    codes_d = codes.t().contiguous().to(DEVICE).t()
    assert not w.is_contiguous() and not codes_d.is_contiguous()
    out = torch.ops.hmoe.mnse(w, codes_d, bases, num_digits, 0)
    assert_close(out, mn.mnse_ref(weight.double(), codes, bases, num_digits, 0), torch.float32)
    grad = random_grad(out.shape, torch.float32)
    grad_d = grad.float().to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
    assert_close(torch.ops.hmoe.mnse_backward(grad_d, codes_d, bases, num_digits, 0),
                 mn.mnse_backward_ref(grad, codes, bases, num_digits, 0), torch.float32)


# ---- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_deterministic(mode, dtype):
    """Thousands of samples hit the same few rows: the sum order must not depend on scheduling."""
    bases, num_digits = (2, 3, 10), (10, 7, 3)
    _, codes = make_case(3, 20000, 2, 16, bases, num_digits)
    codes_d = codes.to(DEVICE)
    width = 48 if mode == 0 else 16
    grad = torch.randn(2, 20000, 3, width, device=DEVICE).to(dtype)
    first = torch.ops.hmoe.mnse_backward(grad, codes_d, bases, num_digits, mode)
    for _ in range(3):
        again = torch.ops.hmoe.mnse_backward(grad, codes_d, bases, num_digits, mode)
        assert torch.equal(first, again)


# ---- the public function, autograd and the op registration ------------------------------------

@pytest.mark.parametrize("mode", ["concat", "sum"])
@pytest.mark.parametrize("B", [1, 37, 1000])
def test_public_function_matches_reference_backend(mode, B):
    bases, num_digits = (2, 3, 10), (10, 7, 3)
    weight, codes = make_case(5, B, 4, 3, bases, num_digits)
    codes_d = codes.to(DEVICE)
    w_ref = weight.to(DEVICE).requires_grad_()
    with hmoe.ops.backend("reference"):
        expected = mn.mnse(w_ref, codes_d, bases, num_digits, mode)
    direct = torch.ops.hmoe.mnse(weight.to(DEVICE), codes_d, bases, num_digits, MODES[mode])
    torch.testing.assert_close(direct, expected.detach(), **TOLERANCE[torch.float32])

    w = weight.to(DEVICE).requires_grad_()
    with hmoe.ops.backend("cuda"):
        out = mn.mnse(w, codes_d, bases, num_digits, mode)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.detach(), expected.detach(), **TOLERANCE[torch.float32])
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(w.grad, w_ref.grad, **TOLERANCE[torch.float32])


def test_gradcheck_float64():
    bases, num_digits = (2, 3), (3, 2)
    weight, codes = make_case(2, 6, 2, 3, bases, num_digits, dtype=torch.float64)
    w = weight.to(DEVICE).requires_grad_()
    codes_d = codes.to(DEVICE)
    for mode in (0, 1):
        assert torch.autograd.gradcheck(
            lambda t: torch.ops.hmoe.mnse(t, codes_d, bases, num_digits, mode), (w,))


@pytest.mark.parametrize("mode", [0, 1])
def test_opcheck(mode):
    bases, num_digits = (2, 3, 10), (4, 3, 2)
    weight, codes = make_case(3, 11, 2, 4, bases, num_digits)
    w = weight.to(DEVICE).requires_grad_()
    codes_d = codes.to(DEVICE)
    torch.library.opcheck(torch.ops.hmoe.mnse.default, (w, codes_d, list(bases), list(num_digits),
                                                        mode))
    grad = torch.randn(2, 11, 3, 12 if mode == 0 else 4, device=DEVICE)
    torch.library.opcheck(torch.ops.hmoe.mnse_backward.default,
                          (grad, codes_d, list(bases), list(num_digits), mode))


# ---- edge cases and bad input ----------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_empty_batch(mode, index_dtype):
    bases, num_digits = (2, 3, 10), (10, 7, 3)
    weight, codes = make_case(5, 0, 2, 4, bases, num_digits, index_dtype=index_dtype)
    w = weight.to(DEVICE).requires_grad_()
    codes_d = codes.to(DEVICE)
    out = torch.ops.hmoe.mnse(w, codes_d, bases, num_digits, mode)
    assert out.shape == (2, 0, 5, 12 if mode == 0 else 4)
    grad_weight = torch.ops.hmoe.mnse_backward(torch.zeros_like(out), codes_d, bases,
                                               num_digits, mode)
    assert grad_weight.shape == w.shape and torch.count_nonzero(grad_weight) == 0
    with hmoe.ops.backend("cuda"):
        out = mn.mnse(w, codes_d, bases, num_digits, "sum" if mode else "concat")
    out.sum().backward()
    assert w.grad.shape == w.shape and torch.count_nonzero(w.grad) == 0


def test_host_checks_raise_clear_errors():
    bases, num_digits = (2, 3), (3, 2)
    weight, codes = make_case(2, 4, 1, 3, bases, num_digits)
    w, c = weight.to(DEVICE), codes.to(DEVICE)
    op = torch.ops.hmoe.mnse
    with pytest.raises(ValueError, match="rows per field"):
        op(w[:, :-1], c, bases, num_digits, 0)
    with pytest.raises(ValueError, match="mode"):
        op(w, c, bases, num_digits, 2)
    with pytest.raises(ValueError, match="codes must be"):
        op(w, c[:, :1], bases, num_digits, 0)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        op(w, c.float(), bases, num_digits, 0)
    with pytest.raises(RuntimeError, match="must be on"):
        op(w, codes, bases, num_digits, 0)
    many = [2] * 9
    with pytest.raises(ValueError, match="at most 8 bases"):
        op(torch.zeros(2, 18, 1, 3, device=DEVICE), c, many, [1] * 9, 0)
    with pytest.raises(ValueError, match="len\\(bases\\) \\* E"):
        torch.ops.hmoe.mnse_backward(torch.zeros(1, 4, 2, 5, device=DEVICE), c, bases,
                                     num_digits, 0)
    # The public function rejects codes below -1 before any kernel runs.
    with pytest.raises(ValueError, match="codes must be >= 0"):
        mn.mnse(w, torch.full_like(c, -2), bases, num_digits)


@pytest.mark.parametrize("op", ["mnse", "mnse_backward"])
def test_code_below_minus_one_fires_device_assert(op):
    """Straight to the op (no Python check): the kernel must report the code and assert, never
    read out of bounds. A device-side assert kills the CUDA context, hence a subprocess."""
    script = textwrap.dedent(f"""
        import torch, hmoe
        codes = torch.tensor([[0, 1], [2, -5], [3, 0]], device="cuda")
        if "{op}" == "mnse":
            torch.ops.hmoe.mnse(torch.randn(2, 4, 1, 3, device="cuda"), codes, [2], [2], 0)
        else:
            torch.ops.hmoe.mnse_backward(torch.randn(1, 3, 2, 3, device="cuda"), codes, [2], [2], 0)
        torch.cuda.synchronize()
        print("no error")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no error" not in output, output
    assert "field 1 (sample 1) has code -5" in output, output


def test_make_case_covers_special_codes():
    """The helper itself: the largest code, missing and zero are always drawn."""
    bases, num_digits = (2, 3, 10), (10, 7, 3)
    _, codes = make_case(5, 37, 1, 1, bases, num_digits)
    limit = min(b ** k for b, k in zip(bases, num_digits))
    values = set(codes.view(-1).tolist())
    assert {-1, 0, limit - 1} <= values and max(values) < limit
    assert digits_for(bases, 999) == list(num_digits)
