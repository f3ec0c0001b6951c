"""hmoe.nn.TemporalInterest: the layer over the op — both input forms agree, the ablation
switches do what they say, torch.compile(fullgraph=True) works, and bad input is refused."""

import pytest
import torch
from torch import nn

import hmoe
from hmoe.nn import MultiEmbedding, TemporalInterest
from hmoe.ops.tim_attention import tim_attention_ref

BACKENDS = ["reference"] + (["cpu"] if hmoe.ops.reasons("tim_attention", "cpu")["cpu"] is None
                            else [])


def batch(B=6, L=9, D=12, P=10, N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N, (B, L), generator=g)
    positions = torch.randint(1, P + 1, (B, L), generator=g)
    lengths = torch.tensor([0, 1, L, 4, 7, 3][:B])
    target = torch.randn(B, D, generator=g)
    return ids, positions, lengths, target


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ids_equals_forward_on_the_gathered_rows(backend):
    layer = TemporalInterest(12, 10, num_heads=2)
    items = nn.Embedding(40, 12)
    ids, positions, lengths, target = batch()
    with hmoe.ops.backend(backend):
        fused, alpha = layer.forward_ids(ids, items, target, positions, lengths,
                                         return_attention=True)
        gathered, alpha2 = layer(items(ids), target, positions, lengths, return_attention=True)
    torch.testing.assert_close(fused, gathered)
    torch.testing.assert_close(alpha, alpha2)
    assert alpha.shape == (6, 2, 9)
    torch.testing.assert_close(alpha.sum(-1)[lengths > 0], torch.ones(5, 2))

    fused.sum().backward()
    grad_fused = items.weight.grad.clone()
    items.weight.grad = None
    layer.zero_grad()
    with hmoe.ops.backend(backend):
        layer(items(ids), target, positions, lengths).sum().backward()
    torch.testing.assert_close(grad_fused, items.weight.grad)


def test_forward_ids_reads_a_multi_embedding_set_in_place():
    emb = MultiEmbedding([40], dim=12, num_sets=3)
    layer = TemporalInterest(12, 10)
    ids, positions, lengths, target = batch()
    table = emb.weight[:, 1]  # (N, D) view with row stride 3 * 12
    u = layer.forward_ids(ids, table, target, positions, lengths)
    expected = layer(emb(ids.reshape(-1, 1))[1].reshape(6, 9, 12), target, positions, lengths)
    torch.testing.assert_close(u, expected)
    u.sum().backward()
    assert emb.weight.grad[:, [0, 2]].abs().sum() == 0  # only set 1 was read
    assert emb.weight.grad[:, 1].abs().sum() > 0


def test_the_layer_is_the_formula():
    layer = TemporalInterest(8, 5, num_heads=2)
    g = torch.Generator().manual_seed(1)
    behaviors = torch.randn(3, 4, 8, generator=g)
    target = torch.randn(3, 8, generator=g)
    positions = torch.randint(1, 6, (3, 4), generator=g)
    lengths = torch.tensor([4, 2, 0])
    u = layer(behaviors, target, positions, lengths)
    P = layer.position_embedding.detach()
    e = behaviors + P[positions]  # (B, L, D)
    v = target + P[0]
    for b, n in enumerate(lengths.tolist()):
        expected = torch.zeros(8)
        for h in range(2):
            cols = slice(4 * h, 4 * h + 4)
            scores = (e[b, :n, cols] @ v[b, cols]) / 2.0  # sqrt(D / H) = 2
            expected[cols] = (torch.softmax(scores, 0)[:, None] * e[b, :n, cols] * v[b, cols]).sum(0)
        torch.testing.assert_close(u[b], expected)


def test_ablations():
    ids, positions, lengths, target = batch()
    behaviors = torch.randn(6, 9, 12)
    no_time = TemporalInterest(12, 10, temporal_encoding=False)
    assert not any(p is no_time.position_embedding for p in no_time.parameters())
    zero = torch.zeros(11, 12)
    expected = tim_attention_ref(behaviors.reshape(54, 12), None, target, zero, positions,
                                 lengths, 1)[0]
    torch.testing.assert_close(no_time(behaviors, target, None, lengths), expected)
    torch.testing.assert_close(no_time(behaviors, target, positions, lengths), expected)

    no_target = TemporalInterest(12, 10, target_aware=False)
    full = TemporalInterest(12, 10)
    full.load_state_dict(no_target.state_dict())
    _, _, pooled = tim_attention_ref(behaviors.reshape(54, 12), None, target,
                                     full.position_embedding.detach(), positions, lengths, 1)
    torch.testing.assert_close(no_target(behaviors, target, positions, lengths), pooled)
    assert not torch.allclose(full(behaviors, target, positions, lengths), pooled)
    with pytest.raises(ValueError, match="positions"):
        full(behaviors, target, None, lengths)


def test_padding_with_nan_is_never_read():
    layer = TemporalInterest(12, 10)
    ids, positions, lengths, target = batch()
    behaviors = torch.randn(6, 9, 12, requires_grad=True)
    padded = torch.arange(9) >= lengths[:, None]
    dirty = torch.where(padded[..., None], float("nan"), behaviors)
    dirty_positions = positions.masked_fill(padded, 10**6)
    u = layer(dirty, target, dirty_positions, lengths)
    torch.testing.assert_close(u, layer(behaviors, target, positions, lengths))
    u.sum().backward()
    assert not behaviors.grad.isnan().any() and not layer.position_embedding.grad.isnan().any()
    assert not behaviors.grad[padded].any()


def test_torch_compile_fullgraph():
    layer = TemporalInterest(12, 10, num_heads=3)
    ids, positions, lengths, target = batch()
    behaviors = torch.randn(6, 9, 12)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(behaviors, target, positions, lengths),
                               layer(behaviors, target, positions, lengths))


def test_state_dict_round_trip():
    layer = TemporalInterest(12, 10)
    other = TemporalInterest(12, 10)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.position_embedding, layer.position_embedding)
    assert "position_embedding" not in TemporalInterest(12, 10, temporal_encoding=False).state_dict()


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=0, max_position=3), "dim"),
    (dict(dim=12, max_position=0), "max_position"),
    (dict(dim=12, max_position=3, num_heads=5), "num_heads"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemporalInterest(**kwargs)


def test_bad_calls():
    layer = TemporalInterest(12, 10)
    ids, positions, lengths, target = batch()
    with pytest.raises(ValueError, match="behaviors"):
        layer(torch.randn(6, 9), target, positions, lengths)
    with pytest.raises(ValueError, match="D=12"):
        layer(torch.randn(6, 9, 8), target, positions, lengths)
    with pytest.raises(ValueError, match="target"):
        layer(torch.randn(6, 9, 12), target[:5], positions, lengths)
    with pytest.raises(ValueError, match="items"):
        layer.forward_ids(ids, torch.randn(40, 8), target, positions, lengths)
    with pytest.raises(IndexError, match="ids"):
        layer.forward_ids(ids + 40, nn.Embedding(40, 12), target, positions, lengths)
    with pytest.raises(IndexError, match="positions"):
        layer(torch.randn(6, 9, 12), target, positions + 10, lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sparse_embedding_gets_a_sparse_gradient_of_the_rows_read(backend):
    layer = TemporalInterest(12, 10)
    ids, positions, lengths, target = batch()
    dense, sparse = nn.Embedding(40, 12), nn.Embedding(40, 12, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    padded = torch.arange(9) >= lengths[:, None]
    dirty_ids = ids.masked_fill(padded, 10**6)  # padding is never read, not even for the grad
    with hmoe.ops.backend(backend):
        layer.forward_ids(ids, dense, target, positions, lengths).sum().backward()
        layer.forward_ids(dirty_ids, sparse, target, positions, lengths).sum().backward()
    assert sparse.weight.grad.is_sparse and not dense.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    read = set(ids[~padded].tolist())
    assert set(sparse.weight.grad.coalesce().indices()[0].tolist()) == read
    torch.optim.SGD(sparse.parameters(), lr=0.1).step()  # a torch optimizer takes it
