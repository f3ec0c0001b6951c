"""Triton kernels of multi_embedding against the float64 reference.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set below before triton or hmoe is imported, because both read it at
import): tiny shapes only, float32/float16/float64. Run them on a GPU with TRITON_INTERPRET=0.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

import hmoe  # noqa: E402
from hmoe.kernels import multi_embedding_triton as kernels  # noqa: E402
from hmoe.ops.multi_embedding import (  # noqa: E402
    implementation,
    multi_embedding_backward_fused_ref_,
    multi_embedding_backward_ref,
    multi_embedding_backward_rows_ref,
    multi_embedding_ref,
    sort_lookups,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

pytestmark = pytest.mark.triton

VOCAB = [4, 1, 7]  # the 1-row field makes every lookup of it hit the same row
SUM, MEAN = 0, 1
SGD, ROWWISE_ADAGRAD = 0, 1
TOL = dict(atol=1e-5, rtol=1e-5)


def make_lookups(vocab, B, K, D, *, jagged, index_dtype=torch.int64, dtype=torch.float32,
                 max_length=3, seed=0):
    """weight (N, K, D), ids (B, F) or jagged values (nnz,), segment_offsets or None, offsets."""
    gen = torch.Generator().manual_seed(seed)
    F, vocab_t = len(vocab), torch.tensor(vocab)
    table_offsets = torch.tensor([0, *vocab]).cumsum(0)  # (F + 1,)
    weight = torch.randn(int(table_offsets[-1]), K, D, generator=gen, dtype=torch.float64)
    segment_offsets = None
    if not jagged:
        ids = (torch.rand(B, F, generator=gen) * vocab_t).long()  # (B, F)
    else:
        lengths = torch.randint(0, max_length + 1, (F * B,), generator=gen)  # (F·B,)
        if B > 0:  # always an empty and a longest segment
            lengths[0], lengths[-1] = 0, max_length
        segment_offsets = torch.zeros(F * B + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=segment_offsets[1:])
        field = torch.arange(F).repeat_interleave(B).repeat_interleave(lengths)  # (nnz,)
        ids = (torch.rand(field.numel(), generator=gen) * vocab_t[field]).long()
        segment_offsets = segment_offsets.to(DEVICE)
    return (weight.to(DEVICE, dtype), ids.to(DEVICE, index_dtype), segment_offsets,
            table_offsets.to(DEVICE))


def upstream_grad(B, K, D, F=len(VOCAB), dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(K, B, F, D, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


# --------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("D", [3, 4])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_forward_single_hot(D, index_dtype):
    weight, ids, _, offsets = make_lookups(VOCAB, 5, 2, D, jagged=False, index_dtype=index_dtype)
    out = kernels.multi_embedding_forward(weight, ids, None, offsets, SUM)
    assert out.shape == (2, 5, 3, D) and out.dtype == weight.dtype
    expected = multi_embedding_ref(weight.double(), ids, None, offsets, SUM)
    torch.testing.assert_close(out.double(), expected, **TOL)


@pytest.mark.parametrize("pooling", [SUM, MEAN])
@pytest.mark.parametrize("D,index_dtype", [(3, torch.int32), (4, torch.int64)])
def test_forward_jagged(pooling, D, index_dtype):
    weight, ids, seg, offsets = make_lookups(VOCAB, 5, 2, D, jagged=True, index_dtype=index_dtype)
    out = kernels.multi_embedding_forward(weight, ids, seg, offsets, pooling)
    expected = multi_embedding_ref(weight.double(), ids, seg, offsets, pooling)
    torch.testing.assert_close(out.double(), expected, **TOL)
    assert (out[:, 0, 0] == 0).all()  # segment 0 (field 0, sample 0) is empty: zeros, no NaN


def test_forward_several_programs():
    """K·D = 132 pads to 256 lanes, so 111 slots span several programs with masked tails."""
    weight, ids, seg, offsets = make_lookups([9, 2, 30], 37, 4, 33, jagged=True, max_length=5)
    out = kernels.multi_embedding_forward(weight, ids, seg, offsets, MEAN)
    expected = multi_embedding_ref(weight.double(), ids, seg, offsets, MEAN)
    torch.testing.assert_close(out.double(), expected, **TOL)


@pytest.mark.parametrize(
    "dtype,pooling,tol",
    [(torch.float16, MEAN, 2e-3), (torch.bfloat16, MEAN, 2e-2), (torch.float64, SUM, 1e-12),
     (torch.float64, MEAN, 1e-12)],
)
def test_forward_other_dtypes(dtype, pooling, tol):
    weight, ids, seg, offsets = make_lookups(VOCAB, 5, 2, 4, jagged=True, dtype=dtype)
    out = kernels.multi_embedding_forward(weight, ids, seg, offsets, pooling)
    assert out.dtype == dtype
    expected = multi_embedding_ref(weight.double(), ids, seg, offsets, pooling)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_forward_empty():
    weight, ids, _, offsets = make_lookups(VOCAB, 0, 2, 3, jagged=False)
    assert kernels.multi_embedding_forward(weight, ids, None, offsets, SUM).shape == (2, 0, 3, 3)
    weight, ids, seg, offsets = make_lookups(VOCAB, 0, 2, 3, jagged=True)
    assert kernels.multi_embedding_forward(weight, ids, seg, offsets, MEAN).shape == (2, 0, 3, 3)
    # B > 0 but every segment empty (nnz = 0): zeros.
    seg = torch.zeros(3 * 4 + 1, dtype=torch.int64, device=DEVICE)
    out = kernels.multi_embedding_forward(weight, ids[:0], seg, offsets, MEAN)
    assert out.shape == (2, 4, 3, 3) and (out == 0).all()


# --------------------------------------------------------------------------------------------
# Backward: row gradients (write mode) and the fused optimizers


BACKWARD_CASES = [(False, SUM, torch.int64), (True, SUM, torch.int32), (True, MEAN, torch.int64)]


@pytest.mark.parametrize("jagged,pooling,index_dtype", BACKWARD_CASES)
def test_backward_rows(jagged, pooling, index_dtype):
    weight, ids, seg, offsets = make_lookups(VOCAB, 5, 2, 3, jagged=jagged, index_dtype=index_dtype)
    grad = upstream_grad(5, 2, 3)
    run_rows, run_starts, segments = sort_lookups(ids, seg, offsets)
    sums = grad.new_empty(run_rows.numel(), 2, 3)  # (U, K, D)
    kernels.reduce_runs(grad, segments, run_starts, run_rows, seg, pooling, sums)
    rows, expected = multi_embedding_backward_rows_ref(grad.double(), ids, seg, offsets, pooling)
    assert torch.equal(run_rows, rows)
    torch.testing.assert_close(sums.double(), expected, **TOL)
    # The dense backward of the Triton backend scatters those sums into (N, K, D).
    dense = implementation("triton").backward(grad, ids, seg, offsets, pooling, weight.shape[0])
    expected_dense = multi_embedding_backward_ref(
        grad.double(), ids, seg, offsets, pooling, weight.shape[0]
    )
    torch.testing.assert_close(dense.double(), expected_dense, **TOL)


def test_backward_rows_several_programs():
    weight, ids, seg, offsets = make_lookups([9, 2, 30], 37, 4, 33, jagged=True, max_length=5)
    grad = upstream_grad(37, 4, 33)
    run_rows, run_starts, segments = sort_lookups(ids, seg, offsets)
    sums = grad.new_empty(run_rows.numel(), 4, 33)
    kernels.reduce_runs(grad, segments, run_starts, run_rows, seg, MEAN, sums)
    _, expected = multi_embedding_backward_rows_ref(grad.double(), ids, seg, offsets, MEAN)
    torch.testing.assert_close(sums.double(), expected, **TOL)


@pytest.mark.parametrize("optimizer", [SGD, ROWWISE_ADAGRAD])
@pytest.mark.parametrize("jagged,pooling,index_dtype", BACKWARD_CASES)
def test_backward_fused(optimizer, jagged, pooling, index_dtype):
    weight, ids, seg, offsets = make_lookups(
        VOCAB, 5, 2, 4, jagged=jagged, index_dtype=index_dtype
    )
    grad = upstream_grad(5, 2, 4)
    gen = torch.Generator().manual_seed(2)
    state = torch.rand(weight.shape[0], 2, generator=gen).to(DEVICE)  # (N, K)
    if optimizer == SGD:
        state = state[:0]
    lr, eps = 0.1, 1e-8
    expected_weight, expected_state = weight.double(), state.double()
    multi_embedding_backward_fused_ref_(expected_weight, expected_state, grad.double(), ids, seg,
                                        offsets, pooling, optimizer, lr, eps)
    run_rows, run_starts, segments = sort_lookups(ids, seg, offsets)
    kernels.reduce_runs(grad, segments, run_starts, run_rows, seg, pooling, weight,
                        optimizer=optimizer, state=state, lr=lr, eps=eps)
    torch.testing.assert_close(weight.double(), expected_weight, **TOL)
    torch.testing.assert_close(state.double(), expected_state, **TOL)


def test_backward_empty():
    weight, ids, _, offsets = make_lookups(VOCAB, 0, 2, 3, jagged=False)
    grad = upstream_grad(0, 2, 3)
    run_rows, run_starts, segments = sort_lookups(ids, None, offsets)
    assert run_rows.numel() == 0
    before = weight.clone()
    kernels.reduce_runs(grad, segments, run_starts, run_rows, None, SUM, weight,
                        optimizer=SGD, lr=0.1)
    assert torch.equal(weight, before)
    rows, sums = implementation("triton").backward_rows(grad, ids, None, offsets, SUM)
    assert rows.shape == (0,) and sums.shape == (0, 2, 3)


# --------------------------------------------------------------------------------------------
# Through the public API: hmoe.nn.MultiEmbedding with the Triton backend


def _require_triton_backend():
    reason = hmoe.ops.reasons("multi_embedding", DEVICE)["triton"]
    if reason is not None:  # e.g. hmoe was imported before TRITON_INTERPRET was set
        pytest.skip(reason)


def _step(backend_name, ids, lengths=None, **layer_kwargs):
    """One forward + backward of a fresh layer (same init every call); returns (out, layer)."""
    torch.manual_seed(0)
    layer = hmoe.nn.MultiEmbedding(VOCAB, dim=3, num_sets=2, device=DEVICE, **layer_kwargs)
    with hmoe.ops.backend(backend_name):
        out = layer(ids) if lengths is None else layer.forward_jagged(ids, lengths)
    (out * upstream_grad(out.shape[1], 2, 3)).sum().backward()
    return out, layer


def test_layer_dense_grad_matches_reference():
    _require_triton_backend()
    _, ids, _, _ = make_lookups(VOCAB, 5, 2, 3, jagged=False, index_dtype=torch.int32)
    out, layer = _step("triton", ids)
    expected_out, expected = _step("reference", ids)
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(layer.weight.grad, expected.weight.grad, **TOL)


def test_layer_sparse_grad_matches_reference():
    _require_triton_backend()
    _, ids, _, _ = make_lookups(VOCAB, 5, 2, 3, jagged=False)
    _, layer = _step("triton", ids, sparse=True)
    _, expected = _step("reference", ids)
    assert layer.weight.grad.is_sparse
    torch.testing.assert_close(layer.weight.grad.to_dense(), expected.weight.grad, **TOL)


@pytest.mark.parametrize(
    "fused", [hmoe.optim.FusedSGD(lr=0.1), hmoe.optim.FusedRowWiseAdagrad(lr=0.1)]
)
def test_layer_fused_optimizer_matches_reference(fused):
    _require_triton_backend()
    _, values, seg, _ = make_lookups(VOCAB, 5, 2, 3, jagged=True)
    lengths = seg.diff().reshape(len(VOCAB), 5)  # (F, B)
    _, layer = _step("triton", values, lengths, pooling="mean", fused_optimizer=fused)
    _, expected = _step("reference", values, lengths, pooling="mean", fused_optimizer=fused)
    assert layer.weight.grad is None
    torch.testing.assert_close(layer.weight.detach(), expected.weight.detach(), **TOL)
    torch.testing.assert_close(layer.optimizer_state, expected.optimizer_state, **TOL)
