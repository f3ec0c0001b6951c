"""hmoe.ops.tim_attention with a fused optimizer update: the item table rows read are updated in
backward exactly as the optimizer would update them from the dense table gradient; the CPU
kernel against the float64 composition on irregular inputs (duplicate ids, padding with
out-of-range ids, lengths 0, 1 and L), SGD and row-wise Adagrad, a strided table view,
thread-count determinism, and the bad-input cases."""

import importlib

import pytest
import torch

import hmoe
from hmoe.ops import FusedUpdate
from hmoe.optim import FusedRowWiseAdagrad, FusedSGD

ta = importlib.import_module("hmoe.ops.tim_attention")

CPU_REASON = hmoe.ops.reasons("tim_attention", "cpu")["cpu"]
BACKENDS = ["reference"] + (["cpu"] if CPU_REASON is None else [])
SGD, ADAGRAD = 0, 1


def make_inputs(B, L, D, H, P, N, *, seed=0, dtype=torch.float64, stride_sets=1):
    """A table view (N, D) (row stride stride_sets·D), ids with many duplicates, padding holding
    out-of-range ids and positions, lengths including 0, 1 and L."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(N, stride_sets, D, generator=g, dtype=torch.float64).to(dtype)
    table = full[:, stride_sets - 1]
    ids = torch.randint(0, N, (B, L), generator=g)
    target = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    pe = torch.randn(P + 1, D, generator=g, dtype=torch.float64).to(dtype)
    positions = torch.randint(1, P + 1, (B, L), generator=g)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[0], lengths[1 % B], lengths[2 % B] = 0, L, 1
    padded = torch.arange(L) >= lengths[:, None]
    ids, positions = ids.masked_fill(padded, N + 3), positions.masked_fill(padded, P + 5)
    grads = (torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype),
             torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype))
    return full, table, ids, target, pe, positions, lengths, H, grads


def expected_step(table, ids, target, pe, positions, lengths, H, grads, optimizer, lr, eps,
                  state):
    """The update from the dense table gradient of the reference (float64 autograd)."""
    table_ = table.detach().clone().requires_grad_(True)
    target_ = target.detach().clone().requires_grad_(True)
    pe_ = pe.detach().clone().requires_grad_(True)
    with hmoe.ops.backend("reference"):
        out, _, pooled = ta.tim_attention(table_, ids, target_, pe_, positions, lengths, H)
    torch.autograd.backward((out, pooled), grads)
    g = table_.grad  # (N, D) dense, zero for rows never read
    new_state = state.clone()
    step = torch.full((table.shape[0], 1), lr, dtype=torch.float64)
    if optimizer == ADAGRAD:
        used = torch.zeros(table.shape[0], dtype=torch.bool)
        valid = torch.arange(ids.shape[1]) < lengths[:, None]
        used[ids[valid]] = True
        new_state[used] += g[used].double().square().mean(1).to(state.dtype)
        step = (lr / (new_state.double().sqrt() + eps))[:, None]
    return (table.double() - step * g.double()), new_state, target_.grad, pe_.grad


def fused_step(backend, table, ids, target, pe, positions, lengths, H, grads, optimizer, lr, eps,
               state):
    target_ = target.detach().clone().requires_grad_(True)
    pe_ = pe.detach().clone().requires_grad_(True)
    update = FusedUpdate(optimizer, lr, eps, state)
    with hmoe.ops.backend(backend):
        out, _, pooled = ta.tim_attention(table, ids, target_, pe_, positions, lengths, H,
                                          fused=update)
    torch.autograd.backward((out, pooled), grads)
    return target_.grad, pe_.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", [SGD, ADAGRAD])
@pytest.mark.parametrize("shape", [(37, 13, 24, 3, 9, 11), (5, 1, 8, 1, 4, 3), (19, 40, 16, 2, 50, 500)])
def test_fused_update_equals_the_optimizer_on_the_dense_gradient(backend, optimizer, shape):
    full, table, ids, target, pe, positions, lengths, H, grads = make_inputs(*shape, stride_sets=3)
    others = full[:, :2].clone()  # the other planes of the (N, K, D) table must not change
    state = torch.rand(table.shape[0], dtype=torch.float64)
    lr, eps = 0.3, 1e-6
    want_table, want_state, want_target, want_pe = expected_step(
        table, ids, target, pe, positions, lengths, H, grads, optimizer, lr, eps, state)
    got_target, got_pe = fused_step(backend, table, ids, target, pe, positions, lengths, H, grads,
                                    optimizer, lr, eps, state)
    torch.testing.assert_close(table, want_table, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(full[:, :2], others, atol=0, rtol=0)
    torch.testing.assert_close(got_target, want_target, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_pe, want_pe, atol=1e-12, rtol=1e-12)
    if optimizer == ADAGRAD:
        torch.testing.assert_close(state, want_state, atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(CPU_REASON is not None, reason=str(CPU_REASON))
def test_cpu_fused_float32_matches_the_float64_step():
    full, table, ids, target, pe, positions, lengths, H, grads = make_inputs(64, 30, 32, 2, 30, 200)
    state = torch.zeros(table.shape[0], dtype=torch.float32)
    want_table, want_state, want_target, _ = expected_step(
        table, ids, target, pe, positions, lengths, H, grads, ADAGRAD, 0.1, 1e-8,
        state.double())
    t32 = table.float().clone()
    got_target, _ = fused_step("cpu", t32, ids, target.float(), pe.float(), positions, lengths, H,
                               tuple(x.float() for x in grads), ADAGRAD, 0.1, 1e-8, state)
    torch.testing.assert_close(t32.double(), want_table, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.double(), want_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_target.double(), want_target, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(CPU_REASON is not None, reason=str(CPU_REASON))
def test_cpu_fused_is_bitwise_deterministic_across_thread_counts():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            # 3000 valid steps over 100 rows: several chunks, each row read many times
            full, table, ids, target, pe, positions, lengths, H, grads = make_inputs(
                120, 50, 16, 1, 50, 100, dtype=torch.float32)
            got_target, got_pe = fused_step("cpu", table, ids, target, pe, positions, lengths, H,
                                            grads, SGD, 0.05, 0.0, torch.empty(0))
            results.append((table.clone(), got_target, got_pe))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_id_raises_before_any_row_changes(backend):
    full, table, ids, target, pe, positions, lengths, H, grads = make_inputs(9, 6, 8, 1, 6, 20)
    ids = ids.clone()
    ids[1, 2] = 20  # lengths[1] = L: a valid step
    before = table.clone()
    with pytest.raises(IndexError, match=r"ids\[1, 2\] = 20"):
        fused_step(backend, table, ids, target, pe, positions, lengths, H, grads, SGD, 0.1, 0.0,
                   torch.empty(0))
    assert torch.equal(table, before)


def test_fused_argument_errors_name_the_problem():
    full, table, ids, target, pe, positions, lengths, H, grads = make_inputs(4, 5, 8, 1, 5, 10)
    args = (table, ids, target, pe, positions, lengths, H)
    with pytest.raises(TypeError, match="FusedUpdate"):
        ta.tim_attention(*args, fused=FusedSGD(lr=0.1))
    with pytest.raises(ValueError, match="needs ids"):
        ta.tim_attention(target.new_zeros(20, 8), None, target, pe, positions, lengths, H,
                         fused=FusedUpdate(SGD, 0.1, 0.0, torch.empty(0)))
    with pytest.raises(ValueError, match="exclude each other"):
        ta.tim_attention(*args, sparse_grad=True, fused=FusedUpdate(SGD, 0.1, 0.0, torch.empty(0)))
    with pytest.raises(ValueError, match=r"fused.state must be a \(10,\)"):
        ta.tim_attention(*args, fused=FusedUpdate(ADAGRAD, 0.1, 1e-8, torch.zeros(9)))
    with pytest.raises(ValueError, match="unit column stride"):
        ta.tim_attention(table.t().contiguous().t(), *args[1:],
                         fused=FusedUpdate(SGD, 0.1, 0.0, torch.empty(0)))


def test_layer_forward_ids_with_a_fused_optimizer_trains_the_table():
    torch.manual_seed(0)
    layer = hmoe.nn.TemporalInterest(16, max_position=10, num_heads=2).double()
    items = torch.nn.Embedding(50, 16).double()
    ids = torch.randint(0, 50, (8, 10))
    positions = torch.randint(1, 11, (8, 10))
    lengths = torch.randint(0, 11, (8,))
    target = torch.randn(8, 16, dtype=torch.float64)
    reference = items.weight.detach().clone().requires_grad_(True)
    u = layer.forward_ids(ids, reference, target, positions, lengths)
    u.square().sum().backward()
    want = reference.detach() - 0.2 * reference.grad
    u = layer.forward_ids(ids, items, target, positions, lengths, fused_optimizer=FusedSGD(0.2))
    layer.zero_grad()
    u.square().sum().backward()
    assert items.weight.grad is None
    torch.testing.assert_close(items.weight.detach(), want, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="optimizer_state"):
        layer.forward_ids(ids, items, target, positions, lengths,
                          fused_optimizer=FusedRowWiseAdagrad(0.1))
    state = torch.zeros(50, dtype=torch.float64)
    u = layer.forward_ids(ids, items, target, positions, lengths,
                          fused_optimizer=FusedRowWiseAdagrad(0.1), optimizer_state=state)
    u.sum().backward()
    assert bool((state > 0).any())
