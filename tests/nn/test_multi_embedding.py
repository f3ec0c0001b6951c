"""hmoe.nn.MultiEmbedding: the layer's contract, its three gradient modes, torch.compile."""

import copy

import pytest
import torch

import hmoe
from hmoe.nn import MultiEmbedding
from hmoe.optim import FusedRowWiseAdagrad, FusedSGD

VOCAB = [4, 1, 7, 13, 2]
BACKENDS = [b for b in ("reference", "cpu") if hmoe.ops.reasons("multi_embedding", "cpu")[b] is None]


def random_ids(vocab, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, v, (B,), generator=g) for v in vocab], dim=1)


def test_layout_and_output_shape():
    layer = MultiEmbedding(VOCAB, dim=6, num_sets=3)
    assert layer.weight.shape == (sum(VOCAB), 3, 6)
    assert layer.offsets.tolist() == [0, 4, 5, 12, 25, 27]
    ids = random_ids(VOCAB, 9)
    out = layer(ids)
    assert out.shape == (3, 9, 5, 6)
    # Field f's id i is row offsets[f] + i; plane k is set k.
    torch.testing.assert_close(out[2, 4, 3], layer.weight[12 + ids[4, 3], 2])
    assert "offsets" in layer.state_dict()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(vocab_sizes=[], dim=4), "vocab_sizes must be a non-empty"),
        (dict(vocab_sizes=[3, 0], dim=4), "vocab_sizes must be a non-empty"),
        (dict(vocab_sizes=[3], dim=0), "dim and num_sets must be >= 1"),
        (dict(vocab_sizes=[3], dim=4, pooling="max"), "pooling must be"),
        (dict(vocab_sizes=[3], dim=4, sparse=True, fused_optimizer=FusedSGD(lr=0.1)), "not both"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiEmbedding(**kwargs)


def test_fused_optimizer_arguments_are_checked():
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        FusedSGD(lr=-1.0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        FusedRowWiseAdagrad(lr=0.1, eps=0.0)
    with pytest.raises(TypeError, match="fused_optimizer must be"):
        MultiEmbedding([3], 4, fused_optimizer=torch.optim.SGD)


def sgd_step_dense(layer, ids, grad_out, lr):
    """One plain dense SGD step, the behaviour every other mode must reproduce."""
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    layer(ids).backward(grad_out)
    opt.step()
    return layer.weight.detach()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sparse_gradient_matches_dense(backend_name):
    ids = random_ids(VOCAB, 40)
    grad_out = torch.randn(2, 40, 5, 3)
    dense = MultiEmbedding(VOCAB, 3, num_sets=2)
    sparse = copy.deepcopy(dense)
    sparse.sparse = True
    with hmoe.ops.backend(backend_name):
        sparse(ids).backward(grad_out)
        assert sparse.weight.grad.is_sparse
        dense(ids).backward(grad_out)
        torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
        # and it drives torch's sparse-capable SGD to the same weights as a dense step
        torch.optim.SGD(sparse.parameters(), lr=0.5).step()
        torch.optim.SGD(dense.parameters(), lr=0.5).step()
    torch.testing.assert_close(sparse.weight, dense.weight)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fused_sgd_matches_dense_sgd_and_leaves_no_grad(backend_name):
    ids = random_ids(VOCAB, 40)
    grad_out = torch.randn(2, 40, 5, 3)
    dense = MultiEmbedding(VOCAB, 3, num_sets=2)
    fused = copy.deepcopy(dense)
    fused.fused_optimizer = FusedSGD(lr=0.3)
    with hmoe.ops.backend(backend_name):
        expected = sgd_step_dense(dense, ids, grad_out, lr=0.3)
        fused(ids).backward(grad_out)
    assert fused.weight.grad is None
    torch.testing.assert_close(fused.weight.detach(), expected)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fused_rowwise_adagrad_over_steps(backend_name):
    torch.manual_seed(3)
    vocab, K, D, lr, eps = [5, 3], 2, 4, 0.2, 1e-6
    layer = MultiEmbedding(vocab, D, num_sets=K, fused_optimizer=FusedRowWiseAdagrad(lr=lr, eps=eps))
    weight = layer.weight.detach().clone().double()
    state = torch.zeros(sum(vocab), K, dtype=torch.float64)
    for step in range(3):
        ids = random_ids(vocab, 16, seed=step)
        grad_out = torch.randn(K, 16, 2, D)
        with hmoe.ops.backend(backend_name):
            layer(ids).backward(grad_out)
        # By hand: the dense row gradient, then row-wise Adagrad on the rows that were used.
        w = weight.clone().requires_grad_()
        hmoe.ops.multi_embedding_ref(w, ids, None, layer.offsets, 0).backward(grad_out.double())
        used = w.grad.abs().sum(dim=2) > 0  # (N, K)
        state += torch.where(used, w.grad.square().mean(dim=2), 0)
        weight -= torch.where(used[..., None], lr * w.grad / (state.sqrt() + eps)[..., None], 0)
    torch.testing.assert_close(layer.weight.detach().double(), weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.optimizer_state.double(), state, atol=1e-6, rtol=1e-5)
    assert "optimizer_state" in layer.state_dict()


def test_fused_optimizer_idle_without_grad():
    layer = MultiEmbedding(VOCAB, 3, fused_optimizer=FusedSGD(lr=1.0))
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer(random_ids(VOCAB, 4))
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_forward_jagged(backend_name, pooling):
    layer = MultiEmbedding([5, 3], 4, num_sets=2, pooling=pooling)
    values = torch.tensor([1, 2, 3, 0, 1, 2])  # field 0: [1, 2], [3]; field 1: [], [0, 1, 2]
    lengths = torch.tensor([[2, 1], [0, 3]])
    with hmoe.ops.backend(backend_name):
        out = layer.forward_jagged(values, lengths)
    w = layer.weight.detach()
    scale = (lambda n: 1.0 / n) if pooling == "mean" else (lambda n: 1.0)
    torch.testing.assert_close(out[:, 0, 0], (w[1] + w[2]) * scale(2))
    torch.testing.assert_close(out[:, 1, 0], w[3])
    torch.testing.assert_close(out[:, 0, 1], torch.zeros(2, 4))
    torch.testing.assert_close(out[:, 1, 1], (w[5] + w[6] + w[7]) * scale(3))


@pytest.mark.parametrize(
    "values,lengths,error,message",
    [
        (torch.tensor([1, 2]), torch.tensor([[1, 0], [0, 0]]), ValueError, "lengths sum to 1 but values holds 2"),
        (torch.tensor([1]), torch.tensor([[2, -1], [0, 0]]), ValueError, "lengths must be >= 0"),
        (torch.tensor([1]), torch.tensor([1]), ValueError, r"lengths must be \(F=2, B\)"),
        (torch.tensor([1]), torch.tensor([[1.0], [0.0]]), TypeError, "lengths must be int32 or int64"),
        (torch.tensor([[1]]), torch.tensor([[1], [0]]), ValueError, r"values must be 1-D"),
    ],
)
def test_forward_jagged_rejects_bad_lengths(values, lengths, error, message):
    layer = MultiEmbedding([5, 3], 4)
    with pytest.raises(error, match=message):
        layer.forward_jagged(values, lengths)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_compile_fullgraph(backend_name):
    torch._dynamo.reset()
    layer = MultiEmbedding(VOCAB, 4, num_sets=2)
    ids = random_ids(VOCAB, 11)
    with hmoe.ops.backend(backend_name):
        expected = layer(ids)
        expected.sum().backward()
        expected_grad = layer.weight.grad.clone()
        layer.weight.grad = None
        compiled = torch.compile(layer, fullgraph=True)
        out = compiled(ids)
        out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer.weight.grad, expected_grad)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_forward_rows_matches_float64_gather_forward_and_backward(backend_name):
    """forward_rows over global_rows of the fields next to extra rows of one field (a behaviour
    sequence) equals a float64 gather of weight, and so does the accumulated gradient."""
    layer = MultiEmbedding(VOCAB, dim=5, num_sets=3)
    ids = random_ids(VOCAB, 11, seed=3)
    seq = torch.randint(0, VOCAB[3], (11, 6), generator=torch.Generator().manual_seed(4))
    rows = torch.cat([layer.global_rows(ids), seq + int(layer.offsets[3])], dim=1)  # (11, 11)
    upstream = torch.randn(3, 11, 11, 5, dtype=torch.float64)
    with hmoe.ops.backend(backend_name):
        out = layer.forward_rows(rows)
        (out.double() * upstream).sum().backward()
    weight64 = layer.weight.detach().double().requires_grad_()
    expected = weight64[rows].movedim(2, 0)  # (K, 11, 11, D)
    (expected * upstream).sum().backward()
    assert out.shape == (3, 11, 11, 5)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad.double(), weight64.grad, rtol=1e-6, atol=1e-6)
    # The categorical part is forward's output.
    torch.testing.assert_close(out[:, :, :5], layer(ids), rtol=0, atol=0)


def test_global_rows_checks_each_fields_range():
    layer = MultiEmbedding(VOCAB, dim=2)
    ids = random_ids(VOCAB, 4)
    ids[2, 1] = 1  # field 1 has one row: id 1 would be field 2's row 0 in the global table
    with pytest.raises(IndexError, match=r"field 1 \(sample 2\) has id 1, outside \[0, 1\)"):
        layer.global_rows(ids)
    ids[2, 1] = -1
    with pytest.raises(IndexError, match="field 1"):
        layer.global_rows(ids)
    with pytest.raises(ValueError, match=r"ids must be \(B, F=5\)"):
        layer.global_rows(ids[:, :3])
    with pytest.raises(TypeError, match="int32 or int64"):
        layer.global_rows(ids.float())
