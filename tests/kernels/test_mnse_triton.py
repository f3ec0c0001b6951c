"""Triton kernels of mnse against the float64 reference.

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
from hmoe.kernels import mnse_triton as kernels  # noqa: E402
from hmoe.ops.mnse import (  # noqa: E402
    MODES,
    digits_needed,
    mnse_backward_ref,
    mnse_ref,
    num_rows,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

pytestmark = pytest.mark.triton

CONCAT, SUM = MODES["concat"], MODES["sum"]
TOL = dict(atol=1e-12, rtol=1e-12)  # float64 kernels against the float64 reference


def largest_code(bases, num_digits):
    """The largest code every base can write: min_b b^K_b - 1."""
    return min(b ** k for b, k in zip(bases, num_digits)) - 1


def make_case(F, B, K, E, bases, max_value, *, dtype=torch.float64, code_dtype=torch.int64,
              seed=0):
    """weight (F, R, K, E), codes (B, F) in [-1, max] with -1, 0 and max planted, num_digits."""
    gen = torch.Generator().manual_seed(seed)
    num_digits = tuple(digits_needed(max_value, b) for b in bases)
    weight = torch.randn(F, num_rows(bases, num_digits), K, E, generator=gen,
                         dtype=torch.float64)
    codes = torch.randint(-1, max_value + 1, (B, F), generator=gen)
    if B >= 3:
        codes[0, 0], codes[1, F - 1], codes[2, F // 2] = -1, 0, max_value
    return weight.to(DEVICE, dtype), codes.to(DEVICE, code_dtype), num_digits


def upstream_grad(K, B, F, C, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(K, B, F, C, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def out_dim(E, bases, mode):
    return len(bases) * E if mode == CONCAT else E


# --------------------------------------------------------------------------------------------
# Kernels against the reference, float64


# (bases, max_value): max_value = 26 = 222 in base 3 (every digit the top value), and
# 48 = 66 in base 7; both are the largest code the bases can write (largest_code).
BASES_CASES = [((2, 3, 10), 26), ((7,), 48)]


@pytest.mark.parametrize("bases,max_value", BASES_CASES)
@pytest.mark.parametrize("K,E,code_dtype", [(1, 1, torch.int32), (3, 5, torch.int64)])
@pytest.mark.parametrize("mode", [CONCAT, SUM])
def test_forward_backward_match_reference(bases, max_value, K, E, code_dtype, mode):
    F, B = 2, 7
    weight, codes, nd = make_case(F, B, K, E, bases, max_value, code_dtype=code_dtype)
    assert max_value == largest_code(bases, nd)
    out = kernels.mnse_forward(weight, codes, bases, nd, mode)
    assert out.shape == (K, B, F, out_dim(E, bases, mode)) and out.dtype == weight.dtype
    torch.testing.assert_close(out, mnse_ref(weight, codes, bases, nd, mode), **TOL)
    assert (out[:, 0, 0] == 0).all()  # code -1: zeros

    grad = upstream_grad(K, B, F, out.shape[3])
    expected = mnse_backward_ref(grad, codes, bases, nd, mode)
    # One chunk (the default for tiny B); chunk=3: blocks of 2 samples, chunks of 4 (2 blocks),
    # so 2 chunks, the last one short.
    for chunk in (None, 3):
        grad_weight = kernels.mnse_backward(grad, codes, bases, nd, mode, chunk=chunk)
        assert grad_weight.shape == weight.shape and grad_weight.dtype == grad.dtype
        torch.testing.assert_close(grad_weight, expected, **TOL)


def test_rows_span_several_programs(monkeypatch):
    """Lane caps shrunk so tiny shapes take every split: K·E = 15 over 2 column programs
    forward, E = 5 over 2 E-blocks per set backward; B = 11 over several sample blocks."""
    monkeypatch.setattr(kernels, "_MAX_ROW_LANES", 8)
    monkeypatch.setattr(kernels, "_MAX_E_LANES", 4)
    monkeypatch.setattr(kernels, "_TILE_ELEMENTS", 32)
    bases, F, B, K, E = (7, 2), 2, 11, 3, 5
    weight, codes, nd = make_case(F, B, K, E, bases, 48)
    for mode in (CONCAT, SUM):
        out = kernels.mnse_forward(weight, codes, bases, nd, mode)
        torch.testing.assert_close(out, mnse_ref(weight, codes, bases, nd, mode), **TOL)
        grad = upstream_grad(K, B, F, out.shape[3])
        torch.testing.assert_close(kernels.mnse_backward(grad, codes, bases, nd, mode, chunk=8),
                                   mnse_backward_ref(grad, codes, bases, nd, mode), **TOL)


@pytest.mark.parametrize("code_dtype,bases,max_value", [
    (torch.int32, (2,), 2**31 - 1),  # 31 binary digits, int32 arithmetic to the top
    (torch.int64, (10, 3), 10**15),  # past 32 bits
])
def test_large_codes(code_dtype, bases, max_value):
    weight, codes, nd = make_case(2, 5, 2, 3, bases, max_value, code_dtype=code_dtype)
    for mode in (CONCAT, SUM):
        out = kernels.mnse_forward(weight, codes, bases, nd, mode)
        torch.testing.assert_close(out, mnse_ref(weight, codes, bases, nd, mode), **TOL)
        grad = upstream_grad(2, 5, 2, out.shape[3])
        torch.testing.assert_close(kernels.mnse_backward(grad, codes, bases, nd, mode),
                                   mnse_backward_ref(grad, codes, bases, nd, mode), **TOL)


# --------------------------------------------------------------------------------------------
# Other dtypes: float32 accumulation, output in the input's dtype


@pytest.mark.parametrize("dtype,tol", [
    (torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 4e-2),
])
def test_low_precision(dtype, tol):
    bases, F, B, K, E = (2, 3, 10), 3, 7, 2, 5
    weight, codes, nd = make_case(F, B, K, E, bases, 26, dtype=dtype)
    for mode in (CONCAT, SUM):
        out = kernels.mnse_forward(weight, codes, bases, nd, mode)
        assert out.dtype == dtype
        expected = mnse_ref(weight.double(), codes, bases, nd, mode)
        # Inputs are exact in dtype and sums are float32: the only error is the final rounding.
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
        grad = upstream_grad(K, B, F, out.shape[3], dtype=dtype)
        grad_weight = kernels.mnse_backward(grad, codes, bases, nd, mode, chunk=2)
        assert grad_weight.dtype == dtype
        torch.testing.assert_close(
            grad_weight.double(), mnse_backward_ref(grad.double(), codes, bases, nd, mode),
            atol=tol, rtol=tol,
        )


# --------------------------------------------------------------------------------------------
# Edge cases


def test_empty_batch():
    bases = (2, 3, 10)
    weight, codes, nd = make_case(3, 0, 2, 5, bases, 26)
    for mode in (CONCAT, SUM):
        C = out_dim(5, bases, mode)
        assert kernels.mnse_forward(weight, codes, bases, nd, mode).shape == (2, 0, 3, C)
        grad_weight = kernels.mnse_backward(upstream_grad(2, 0, 3, C), codes, bases, nd, mode)
        assert grad_weight.shape == weight.shape and (grad_weight == 0).all()


def test_all_missing():
    bases = (2, 3, 10)
    weight, codes, nd = make_case(3, 4, 2, 5, bases, 26, code_dtype=torch.int32)
    codes.fill_(-1)
    out = kernels.mnse_forward(weight, codes, bases, nd, CONCAT)
    assert (out == 0).all()
    grad_weight = kernels.mnse_backward(upstream_grad(2, 4, 3, 15), codes, bases, nd, CONCAT)
    assert (grad_weight == 0).all()


def test_backward_deterministic():
    """Float32 sums over many chunks: bitwise equal run to run, close across chunkings."""
    bases, F, B, K, E = (2, 3, 10), 2, 37, 2, 3
    weight, codes, nd = make_case(F, B, K, E, bases, 26, dtype=torch.float32)
    grad = upstream_grad(K, B, F, E, dtype=torch.float32)
    first = kernels.mnse_backward(grad, codes, bases, nd, SUM, chunk=4)
    assert torch.equal(first, kernels.mnse_backward(grad, codes, bases, nd, SUM, chunk=4))
    torch.testing.assert_close(first, kernels.mnse_backward(grad, codes, bases, nd, SUM),
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Through the public API: hmoe.ops.mnse with the Triton backend, autograd included


def _require_triton_backend():
    reason = hmoe.ops.reasons("mnse", DEVICE)["triton"]
    if reason is not None:  # e.g. hmoe was imported before TRITON_INTERPRET was set
        pytest.skip(reason)


def _step(backend_name, weight, codes, bases, num_digits, mode):
    w = weight.clone().requires_grad_()
    with hmoe.ops.backend(backend_name):
        out = hmoe.ops.mnse(w, codes, bases, num_digits, mode)
    (out * upstream_grad(*out.shape)).sum().backward()
    return out.detach(), w.grad


@pytest.mark.parametrize("mode", ["concat", "sum"])
def test_op_matches_reference_backend(mode):
    _require_triton_backend()
    bases = (2, 3, 10)
    weight, codes, nd = make_case(3, 7, 2, 5, bases, 26, code_dtype=torch.int32)
    out, grad_weight = _step("triton", weight, codes, bases, nd, mode)
    expected_out, expected_grad = _step("reference", weight, codes, bases, nd, mode)
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(grad_weight, expected_grad, **TOL)
