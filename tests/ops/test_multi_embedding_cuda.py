"""hmoe.ops.multi_embedding on the CUDA C++ backend against the float64 reference.

Skipped without a CUDA device. On a machine with one, a CUDA backend that is not available
(hmoe._C built without CUDA) fails loudly instead of skipping, so a broken build cannot pass.

Inputs are drawn on the CPU, in float64 for the reference, and copied to the GPU. Low-precision
weights (bf16) are compared with the reference evaluated on the same bf16-rounded values, within
bf16's rounding (about 1e-2 relative).
"""

import importlib

import pytest
import torch

import hmoe

# The module, not the function of the same name that hmoe.ops re-exports.
me = importlib.import_module("hmoe.ops.multi_embedding")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = [4, 1, 7, 13, 2]
# (vocab, B, K, D): irregular sizes (scalar fallback, D = 13), a 16-byte vectorised D = 16, and
# rows wider than one pass of a warp (K * D = 512 fp32 values; D = 300 > a pass, scalar loads).
SHAPES = [(VOCAB, 37, 3, 13), ([3, 9, 5], 37, 2, 16)]
WIDE_SHAPES = [([6, 3], 11, 8, 64), ([5, 2], 9, 2, 300)]
TOLERANCE = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def cuda_backend_available():
    reason = hmoe.ops.reasons("multi_embedding", "cuda")["cuda"]
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the CUDA backend cannot run: {reason}")


def make_case(vocab, B, K, D, *, jagged=False, max_len=4, dtype=torch.float32,
              index_dtype=torch.int64, seed=0):
    """CPU tensors: weight (N, K, D) rounded to dtype, ids, segment_offsets (or None) and
    table_offsets. Jagged lengths are drawn in [0, max_len], so empty segments occur."""
    g = torch.Generator().manual_seed(seed)
    F = len(vocab)
    weight = torch.randn(sum(vocab), K, D, generator=g, dtype=torch.float64).to(dtype)
    table_offsets = torch.tensor([0] + list(vocab)).cumsum(0)
    if not jagged:
        ids = torch.stack([torch.randint(0, v, (B,), generator=g) for v in vocab], dim=1)
        return weight, ids.reshape(B, F).to(index_dtype), None, table_offsets
    lengths = torch.randint(0, max_len + 1, (F, B), generator=g)
    values = torch.cat(
        [torch.randint(0, vocab[f], (int(lengths[f].sum()),), generator=g) for f in range(F)]
    )
    segment_offsets = torch.zeros(F * B + 1, dtype=torch.long)
    segment_offsets[1:] = lengths.reshape(-1).cumsum(0)
    return weight, values.to(index_dtype), segment_offsets, table_offsets


def to_cuda(*tensors):
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def random_grad(shape, dtype, seed=1):
    """A float64 gradient whose values are exactly representable in dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **TOLERANCE[dtype])


# ---- forward and dense gradient through the public function and autograd -------------------

@pytest.mark.parametrize("vocab,B,K,D", SHAPES + WIDE_SHAPES)
@pytest.mark.parametrize("jagged,pooling", [(False, "sum"), (True, "sum"), (True, "mean")])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_forward_and_dense_backward_match_ref(vocab, B, K, D, jagged, pooling, dtype, index_dtype):
    weight, ids, seg, offsets = make_case(vocab, B, K, D, jagged=jagged, dtype=dtype,
                                          index_dtype=index_dtype)
    code = me.POOLING[pooling]
    expected = me.multi_embedding_ref(weight.double(), ids, seg, offsets, code)
    w = weight.to(DEVICE).requires_grad_()
    ids_d, seg_d, offsets_d = to_cuda(ids, seg, offsets)
    with hmoe.ops.backend("cuda"):
        out = me.multi_embedding(w, ids_d, offsets_d, segment_offsets=seg_d, pooling=pooling)
    assert out.shape == (K, B, len(vocab), D) and out.dtype == dtype and out.is_cuda
    assert_close(out, expected, dtype)

    grad = random_grad(out.shape, dtype)
    out.backward(grad.to(device=DEVICE, dtype=dtype))
    expected_grad = me.multi_embedding_backward_ref(grad, ids, seg, offsets, code, w.shape[0])
    assert w.grad.dtype == dtype
    assert_close(w.grad, expected_grad, dtype)


def misaligned_copy(t):
    """t on the GPU, contiguous but one float past a 16-byte boundary (no 16-byte loads)."""
    storage = torch.zeros(t.numel() + 1, dtype=t.dtype, device=DEVICE)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("jagged", [False, True])
def test_misaligned_tensors_take_the_scalar_path(jagged):
    vocab, B, K, D = VOCAB, 37, 3, 16  # D alone would allow 16-byte vectors
    weight, ids, seg, offsets = make_case(vocab, B, K, D, jagged=jagged)
    ids_d, seg_d, offsets_d = to_cuda(ids, seg, offsets)
    w = misaligned_copy(weight.to(DEVICE))
    out = torch.ops.hmoe.multi_embedding(w, ids_d, seg_d, offsets_d, 1)
    assert_close(out, me.multi_embedding_ref(weight.double(), ids, seg, offsets, 1), torch.float32)

    grad = random_grad(out.shape, torch.float32)
    grad_d = misaligned_copy(grad.float().to(DEVICE))
    dense = torch.ops.hmoe.multi_embedding_backward(grad_d, ids_d, seg_d, offsets_d, 1, w.shape[0])
    expected = me.multi_embedding_backward_ref(grad, ids, seg, offsets, 1, w.shape[0])
    assert_close(dense, expected, torch.float32)
    torch.ops.hmoe.multi_embedding_backward_fused_(w, torch.empty(0, device=DEVICE), grad_d, ids_d,
                                                   seg_d, offsets_d, 1, 0, 0.5, 0.0)
    assert_close(w, weight.double() - 0.5 * expected, torch.float32)


# ---- the three backward ops called directly -------------------------------------------------

@pytest.mark.parametrize("vocab,B,K,D", SHAPES + WIDE_SHAPES)
@pytest.mark.parametrize("jagged,pooling", [(False, "sum"), (True, "sum"), (True, "mean")])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_backward_ops_match_ref(vocab, B, K, D, jagged, pooling, dtype):
    weight, ids, seg, offsets = make_case(vocab, B, K, D, jagged=jagged, dtype=dtype)
    code = me.POOLING[pooling]
    impl = me.implementation("cuda")
    grad = random_grad((K, B, len(vocab), D), dtype)
    grad_d = grad.to(device=DEVICE, dtype=dtype)
    ids_d, seg_d, offsets_d = to_cuda(ids, seg, offsets)

    dense = impl.backward(grad_d, ids_d, seg_d, offsets_d, code, weight.shape[0])
    assert_close(dense, me.multi_embedding_backward_ref(grad, ids, seg, offsets, code,
                                                        weight.shape[0]), dtype)

    rows, row_grads = impl.backward_rows(grad_d, ids_d, seg_d, offsets_d, code)
    ref_rows, ref_grads = me.multi_embedding_backward_rows_ref(grad, ids, seg, offsets, code)
    torch.testing.assert_close(rows.cpu(), ref_rows)
    assert row_grads.shape == ref_grads.shape
    assert_close(row_grads, ref_grads, dtype)

    for optimizer, lr, eps in ((0, 0.1, 0.0), (1, 0.05, 1e-3)):
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.rand(weight.shape[0], K, dtype=acc_dtype) if optimizer == 1 else torch.empty(0)
        w_ref, state_ref = weight.double(), state.double().clone()
        me.multi_embedding_backward_fused_ref_(w_ref, state_ref, grad, ids, seg, offsets, code,
                                               optimizer, lr, eps)
        w, state_d = weight.to(DEVICE), state.to(DEVICE)
        impl.backward_fused_(w, state_d, grad_d, ids_d, seg_d, offsets_d, code, optimizer, lr, eps)
        assert_close(w, w_ref, dtype)
        torch.testing.assert_close(state_d.double().cpu(), state_ref, atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    """Many lookups per row: the sum order must not depend on scheduling."""
    weight, ids, seg, offsets = make_case([3, 2], 5000, 2, 8, jagged=True, max_len=6)
    grad = torch.randn(2, 5000, 2, 8, device=DEVICE)
    ids_d, seg_d, offsets_d = to_cuda(ids, seg, offsets)
    first = torch.ops.hmoe.multi_embedding_backward(grad, ids_d, seg_d, offsets_d, 0, weight.shape[0])
    for _ in range(3):
        again = torch.ops.hmoe.multi_embedding_backward(grad, ids_d, seg_d, offsets_d, 0,
                                                        weight.shape[0])
        assert torch.equal(first, again)


# ---- edge cases: empty segments, empty batches ----------------------------------------------

@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_all_segments_empty_gives_zeros(pooling):
    weight, values, seg, offsets = make_case(VOCAB, 6, 2, 4, jagged=True, max_len=0)
    assert values.numel() == 0
    w = weight.to(DEVICE).requires_grad_()
    values_d, seg_d, offsets_d = to_cuda(values, seg, offsets)
    with hmoe.ops.backend("cuda"):
        out = me.multi_embedding(w, values_d, offsets_d, segment_offsets=seg_d, pooling=pooling)
    assert out.shape == (2, 6, 5, 4) and torch.count_nonzero(out) == 0
    out.sum().backward()
    assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("jagged", [False, True])
def test_empty_batch(jagged):
    weight, ids, seg, offsets = make_case(VOCAB, 0, 2, 4, jagged=jagged)
    w = weight.to(DEVICE).requires_grad_()
    ids_d, seg_d, offsets_d = to_cuda(ids, seg, offsets)
    with hmoe.ops.backend("cuda"):
        out = me.multi_embedding(w, ids_d, offsets_d, segment_offsets=seg_d)
    assert out.shape == (2, 0, 5, 4)
    out.sum().backward()
    assert torch.count_nonzero(w.grad) == 0

    impl = me.implementation("cuda")
    grad = torch.zeros(2, 0, 5, 4, device=DEVICE)
    rows, row_grads = impl.backward_rows(grad, ids_d, seg_d, offsets_d, 0)
    assert rows.shape == (0,) and row_grads.shape == (0, 2, 4)
    before = w.detach().clone()
    state = torch.ones(w.shape[0], 2, device=DEVICE)
    impl.backward_fused_(w.detach(), state, grad, ids_d, seg_d, offsets_d, 0, 1, 0.1, 1e-8)
    assert torch.equal(w.detach(), before) and torch.equal(state, torch.ones_like(state))


# ---- through hmoe.nn.MultiEmbedding: sparse gradient and fused optimizers -------------------

def _module_pair(**kwargs):
    """The same MultiEmbedding on the GPU (cuda backend) and the CPU (reference backend)."""
    torch.manual_seed(0)
    cpu = hmoe.nn.MultiEmbedding(VOCAB, 13, num_sets=3, init_std=1.0, **kwargs)
    gpu = hmoe.nn.MultiEmbedding(VOCAB, 13, num_sets=3, device=DEVICE, **kwargs)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def _step(module, backend_name, jagged_inputs, grad):
    values, lengths = (t.to(module.weight.device) for t in jagged_inputs)
    with hmoe.ops.backend(backend_name):
        out = module.forward_jagged(values, lengths)
    out.backward(grad.to(device=out.device, dtype=out.dtype))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sparse=True),
        dict(fused_optimizer=hmoe.optim.FusedSGD(lr=0.1)),
        dict(fused_optimizer=hmoe.optim.FusedRowWiseAdagrad(lr=0.1, eps=1e-3)),
        dict(pooling="mean", fused_optimizer=hmoe.optim.FusedRowWiseAdagrad(lr=0.1, eps=1e-3)),
    ],
)
def test_module_matches_reference(kwargs):
    cpu, gpu = _module_pair(**kwargs)
    B = 37
    lengths = torch.randint(0, 4, (len(VOCAB), B), generator=torch.Generator().manual_seed(3))
    values = torch.cat([torch.randint(0, v, (int(lengths[f].sum()),)) for f, v in enumerate(VOCAB)])
    grad = random_grad((3, B, len(VOCAB), 13), torch.float32)
    for _ in range(2):  # two steps: the second sees the first one's optimizer state
        _step(cpu, "reference", (values, lengths), grad)
        _step(gpu, "cuda", (values, lengths), grad)
    if kwargs.get("sparse"):
        assert gpu.weight.grad.is_sparse
        assert_close(gpu.weight.grad.to_dense(), cpu.weight.grad.to_dense(), torch.float32)
    assert_close(gpu.weight.detach(), cpu.weight.detach(), torch.float32)
    assert_close(gpu.optimizer_state, cpu.optimizer_state, torch.float32)
