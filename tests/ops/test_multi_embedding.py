"""hmoe.ops.multi_embedding: every CPU-runnable backend against the float64 reference.

The Triton kernels are tested under TRITON_INTERPRET=1 in tests/kernels/, the CUDA kernels in
test_multi_embedding_cuda.py (skipped without a GPU).
"""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hmoe
# The module, not the function of the same name that hmoe.ops re-exports.
me = importlib.import_module("hmoe.ops.multi_embedding")

CPU_BACKENDS = [b for b in ("reference", "cpu") if hmoe.ops.reasons("multi_embedding", "cpu")[b] is None]
needs_cpu_kernel = pytest.mark.skipif(
    hmoe.ops.reasons("multi_embedding", "cpu")["cpu"] is not None, reason="hmoe._C not built"
)


def make_case(vocab, B, K, D, *, jagged=False, max_len=4, dtype=torch.float32, index_dtype=torch.int64,
              seed=0):
    """Random weight, ids and offsets; jagged cases draw lengths in [0, max_len] (zeros included)."""
    g = torch.Generator().manual_seed(seed)
    F = len(vocab)
    weight = torch.randn(sum(vocab), K, D, generator=g, dtype=torch.float64).to(dtype)
    table_offsets = torch.tensor([0] + list(vocab)).cumsum(0)
    if not jagged:
        ids = torch.stack([torch.randint(0, v, (B,), generator=g) for v in vocab], dim=1)
        return weight, ids.to(index_dtype), None, table_offsets
    lengths = torch.randint(0, max_len + 1, (F, B), generator=g)
    values = torch.cat([torch.randint(0, vocab[f], (int(lengths[f].sum()),), generator=g) for f in range(F)])
    segment_offsets = torch.zeros(F * B + 1, dtype=torch.long)
    segment_offsets[1:] = lengths.reshape(-1).cumsum(0)
    return weight, values.to(index_dtype), segment_offsets, table_offsets


VOCAB = [4, 1, 7, 13, 2]
SHAPES = [  # (vocab, B, K, D): irregular sizes that hit every remainder
    (VOCAB, 37, 3, 13),
    ([3, 9], 8, 1, 16),
    ([50], 5, 4, 1),
]


def run(backend_name, fn, *args, **kwargs):
    with hmoe.ops.backend(backend_name):
        return fn(*args, **kwargs)


def grad_of(grad_shape, seed=1):
    return torch.randn(grad_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("vocab,B,K,D", SHAPES)
@pytest.mark.parametrize("jagged,pooling", [(False, "sum"), (True, "sum"), (True, "mean")])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_multi_embedding_matches_ref(backend_name, vocab, B, K, D, jagged, pooling, index_dtype):
    weight, ids, seg, offsets = make_case(vocab, B, K, D, jagged=jagged, index_dtype=index_dtype)
    expected = me.multi_embedding_ref(weight.double(), ids, seg, offsets, me.POOLING[pooling])
    w = weight.clone().requires_grad_()
    out = run(backend_name, me.multi_embedding, w, ids, offsets, segment_offsets=seg, pooling=pooling)
    assert out.shape == (K, B, len(vocab), D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # Dense gradient through autograd against the explicit reference backward.
    grad = grad_of(out.shape)
    out.backward(grad.float())
    expected_grad = me.multi_embedding_backward_ref(grad, ids, seg, offsets, me.POOLING[pooling], w.shape[0])
    torch.testing.assert_close(w.grad.double(), expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("jagged,pooling", [(False, "sum"), (True, "mean")])
def test_multi_embedding_backward_ops_match_ref(backend_name, jagged, pooling):
    vocab, B, K, D = VOCAB, 37, 3, 13
    weight, ids, seg, offsets = make_case(vocab, B, K, D, jagged=jagged)
    code = me.POOLING[pooling]
    impl = me.implementation(backend_name)
    grad = grad_of((K, B, len(vocab), D))
    # Sparse rows: sorted unique rows and their summed gradients.
    rows, row_grads = impl.backward_rows(grad.float(), ids, seg, offsets, code)
    ref_rows, ref_grads = me.multi_embedding_backward_rows_ref(grad, ids, seg, offsets, code)
    torch.testing.assert_close(rows, ref_rows)
    torch.testing.assert_close(row_grads.double(), ref_grads, atol=1e-5, rtol=1e-5)
    # Fused SGD and row-wise Adagrad: the updated weight and state.
    for optimizer, lr, eps in ((0, 0.1, 0.0), (1, 0.05, 1e-3)):
        w, w_ref = weight.clone(), weight.double()
        state = torch.rand(w.shape[0], K) if optimizer == 1 else torch.empty(0)
        state_ref = state.double().clone()
        impl.backward_fused_(w, state, grad.float(), ids, seg, offsets, code, optimizer, lr, eps)
        me.multi_embedding_backward_fused_ref_(w_ref, state_ref, grad, ids, seg, offsets, code, optimizer, lr, eps)
        torch.testing.assert_close(w.double(), w_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.double(), state_ref, atol=1e-5, rtol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("jagged", [False, True])
def test_multi_embedding_backward_is_deterministic_across_thread_counts(jagged):
    # Few rows, many lookups each: every row's sum has a long, order-sensitive chain.
    weight, ids, seg, offsets = make_case([3, 2, 5], 500, 2, 8, jagged=jagged, max_len=3)
    grad = torch.randn(2, 500, 3, 8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.hmoe.multi_embedding_backward(grad, ids, seg, offsets, 0, weight.shape[0]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_cpu_kernel
@pytest.mark.parametrize("jagged,pooling", [(False, 0), (True, 0), (True, 1)])
@pytest.mark.parametrize("optimizer", [0, 1])
def test_fused_update_is_deterministic_across_thread_counts(jagged, pooling, optimizer):
    weight, ids, seg, offsets = make_case([3, 2, 5], 300, 2, 8, jagged=jagged, max_len=3)
    grad = torch.randn(2, 300, 3, 8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            w, state = weight.clone(), torch.zeros(weight.shape[:2])
            torch.ops.hmoe.multi_embedding_backward_fused_(w, state, grad, ids, seg, offsets, pooling,
                                                           optimizer, 0.1, 1e-8)
            results.append(w)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    sgd = weight.double() - 0.1 * me.multi_embedding_backward_ref(grad.double(), ids, seg, offsets, pooling,
                                                                  weight.shape[0])
    if optimizer == 0:
        torch.testing.assert_close(results[0].double(), sgd, rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("jagged", [False, True])
def test_fused_update_with_a_bad_id_changes_nothing(jagged):
    weight, ids, seg, offsets = make_case(VOCAB, 40, 2, 4, jagged=jagged)
    ids.view(-1)[-1] = 99
    w = weight.clone()
    grad = torch.randn(2, 40, len(VOCAB), 4)
    for optimizer in (0, 1):
        with pytest.raises(IndexError, match="has id 99"):
            torch.ops.hmoe.multi_embedding_backward_fused_(w, torch.zeros(w.shape[:2]), grad, ids, seg,
                                                           offsets, 0, optimizer, 0.1, 1e-8)
        assert torch.equal(w, weight)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_embedding_low_precision(dtype):
    weight, ids, seg, offsets = make_case(VOCAB, 37, 3, 16, jagged=True, dtype=dtype)
    out = torch.ops.hmoe.multi_embedding(weight, ids, seg, offsets, 0)
    expected = me.multi_embedding_ref(weight.double(), ids, seg, offsets, 0)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@needs_cpu_kernel
@pytest.mark.parametrize("jagged,pooling", [(False, 0), (True, 0), (True, 1)])
def test_multi_embedding_gradcheck(jagged, pooling):
    weight, ids, seg, offsets = make_case([3, 1, 4], 4, 2, 3, jagged=jagged, max_len=3, dtype=torch.float64)
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w: torch.ops.hmoe.multi_embedding(w, ids, seg, offsets, pooling), (weight,)
    )


@needs_cpu_kernel
@pytest.mark.parametrize("jagged", [False, True])
def test_multi_embedding_opcheck(jagged):
    weight, ids, seg, offsets = make_case([3, 1, 4], 6, 2, 5, jagged=jagged)
    grad = torch.randn(2, 6, 3, 5)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    ops = torch.ops.hmoe
    torch.library.opcheck(ops.multi_embedding, (weight.requires_grad_(), ids, seg, offsets, 1), test_utils=utils)
    torch.library.opcheck(ops.multi_embedding_backward, (grad, ids, seg, offsets, 1, weight.shape[0]), test_utils=utils)
    # Data-dependent output size and in-place mutation: schema and fake-tensor checks.
    torch.library.opcheck(ops.multi_embedding_backward_rows, (grad, ids, seg, offsets, 1),
                          test_utils=("test_schema", "test_faketensor"))
    state = torch.zeros(weight.shape[0], 2)
    torch.library.opcheck(ops.multi_embedding_backward_fused_,
                          (weight.detach().clone(), state, grad, ids, seg, offsets, 1, 1, 0.1, 1e-8),
                          test_utils=("test_schema", "test_faketensor"))


@settings(max_examples=40, deadline=None)
@given(
    vocab=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    B=st.integers(0, 9),
    K=st.integers(1, 3),
    D=st.integers(1, 9),
    max_len=st.integers(0, 5),
    pooling=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_multi_embedding_hypothesis(vocab, B, K, D, max_len, pooling, seed):
    for jagged in (False, True):
        weight, ids, seg, offsets = make_case(vocab, B, K, D, jagged=jagged, max_len=max_len, seed=seed)
        expected = me.multi_embedding_ref(weight.double(), ids, seg, offsets, pooling)
        grad = grad_of(expected.shape, seed)
        expected_grad = me.multi_embedding_backward_ref(grad, ids, seg, offsets, pooling, weight.shape[0])
        for backend_name in CPU_BACKENDS:
            impl = me.implementation(backend_name)
            out = impl.forward(weight, ids, seg, offsets, pooling)
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
            got = impl.backward(grad.float(), ids, seg, offsets, pooling, weight.shape[0])
            torch.testing.assert_close(got.double(), expected_grad, atol=1e-5, rtol=1e-5)


# ---- bad input: a clear Python exception naming the argument --------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("bad_id", [7, -1, 1 << 40])
def test_multi_embedding_rejects_out_of_range_ids(backend_name, bad_id):
    weight, ids, _, offsets = make_case(VOCAB, 6, 2, 4)
    ids[3, 2] = bad_id  # field 2 has 7 rows
    with pytest.raises(IndexError, match=rf"field 2 \(sample 3\) has id {bad_id}, outside \[0, 7\)"):
        run(backend_name, me.multi_embedding, weight, ids, offsets)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_multi_embedding_rejects_out_of_range_jagged_ids(backend_name):
    weight, values, seg, offsets = make_case(VOCAB, 6, 2, 4, jagged=True, max_len=2)
    field_of_last = 4  # the last value belongs to the last field with values
    values[-1] = 2  # field 4 has 2 rows
    with pytest.raises(IndexError, match=rf"field {field_of_last} \(sample \d\) has id 2, outside \[0, 2\)"):
        run(backend_name, me.multi_embedding, weight, values, offsets, segment_offsets=seg)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: a.update(indices=a["indices"].float()), TypeError, "indices must be int32 or int64"),
        (lambda a: a.update(indices=a["indices"][:, :3]), ValueError, r"indices must be \(B, F=5\)"),
        (lambda a: a.update(indices=a["indices"][0]), ValueError, r"indices must be \(B, F=5\)"),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, r"weight must be a \(N, K, D\) tensor"),
        (lambda a: a.update(weight=a["weight"].long()), TypeError, "weight must be floating point"),
        (lambda a: a.update(table_offsets=a["table_offsets"].int()), ValueError, "table_offsets must be"),
        (lambda a: a.update(pooling="max"), ValueError, "pooling must be one of"),
        (lambda a: a.update(grad="fused"), ValueError, "grad='fused' needs fused_update"),
    ],
)
def test_multi_embedding_rejects_bad_arguments(change, error, message):
    weight, ids, _, offsets = make_case(VOCAB, 6, 2, 4)
    args = dict(weight=weight, indices=ids, table_offsets=offsets)
    change(args)
    with pytest.raises(error, match=message):
        me.multi_embedding(**args)


def test_multi_embedding_rejects_bad_segments():
    weight, values, seg, offsets = make_case(VOCAB, 6, 2, 4, jagged=True)
    with pytest.raises(ValueError, match="segment_offsets must hold F \\* B \\+ 1"):
        me.multi_embedding(weight, values, offsets, segment_offsets=seg[:-1])
    with pytest.raises(ValueError, match="must start at 0 and end at indices.numel"):
        me.multi_embedding(weight, values[:-1], offsets, segment_offsets=seg)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize(
    "offsets,message",
    [
        ([1, 5, 6, 13, 26, 28], "table_offsets must start at 0, got 1"),
        ([0, 5, 4, 13, 26, 27], "table_offsets must be non-decreasing"),
        ([0, 4, 5, 12, 25, 26], r"table_offsets must end at the number of rows \(27\), got 26"),
    ],
)
def test_multi_embedding_rejects_table_offsets_that_do_not_tile_weight(backend_name, offsets, message):
    # Every local id is in range for these offsets, so only this check keeps rows inside weight.
    weight, ids, _, _ = make_case(VOCAB, 6, 2, 4)
    ids = torch.zeros_like(ids)
    with pytest.raises(ValueError, match=message):
        run(backend_name, me.multi_embedding, weight, ids, torch.tensor(offsets))


def test_forced_backend_that_cannot_run_says_why():
    weight, ids, _, offsets = make_case(VOCAB, 6, 2, 4)
    with pytest.raises(hmoe.ops.BackendUnavailable, match="backend 'cuda' cannot run multi_embedding on cpu"):
        run("cuda", me.multi_embedding, weight, ids, offsets)
    with pytest.raises(ValueError, match="backend must be one of"):
        with hmoe.ops.backend("fast"):
            pass


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("jagged", [False, True])
def test_multi_embedding_empty_batch(backend_name, jagged):
    weight, ids, seg, offsets = make_case(VOCAB, 0, 2, 4, jagged=jagged)
    w = weight.clone().requires_grad_()
    out = run(backend_name, me.multi_embedding, w, ids, offsets, segment_offsets=seg)
    assert out.shape == (2, 0, 5, 4)
    out.sum().backward()
    assert torch.count_nonzero(w.grad) == 0
