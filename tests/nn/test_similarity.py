"""hmoe.nn.SimilarityEncoder and hmoe.nn.SimHashID: pre-trained vectors as MNSE features."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmoe.nn import MNSE, SimHashID, SimilarityEncoder
from hmoe.nn.similarity import cosine_similarity

FEW = settings(max_examples=30, deadline=None)


# --------------------------------------------------------------------------------------------
# cosine_similarity


@FEW
@given(seed=st.integers(0, 2**16), dim=st.integers(1, 16), scale=st.floats(1e-3, 1e3))
def test_cosine_matches_torch_and_is_bounded(seed, dim, scale):
    generator = torch.Generator().manual_seed(seed)
    u, v = torch.randn(2, 8, dim, generator=generator, dtype=torch.float64) * scale
    s = cosine_similarity(u, v)
    assert s.shape == (8,) and s.abs().max() <= 1
    torch.testing.assert_close(s, torch.nn.functional.cosine_similarity(u, v, dim=-1))


def test_cosine_of_zero_vectors_is_zero():
    u = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [1e-30, 0.0]])
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [1e-30, 0.0]])
    s = cosine_similarity(u, v)
    assert not torch.isnan(s).any()
    assert s[:3].tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# SimilarityEncoder


def test_shapes():
    encoder = SimilarityEncoder(12)
    u, v = torch.randn(2, 5, 8)
    assert encoder(u, v).shape == (5, 1, 12)
    assert encoder.mnse.max_values.tolist() == [1023] and encoder.mnse.bases == (2, 3, 10)
    encoder = SimilarityEncoder(8, resolution=17, bases=(2, 3), mode="sum", num_fields=3,
                                num_sets=4)
    u, v = torch.randn(2, 5, 3, 6)
    assert encoder(u, v).shape == (4, 5, 3, 8)
    assert encoder(u[:0], v[:0]).shape == (4, 0, 3, 8)


@pytest.mark.parametrize("resolution", [2, 11, 1024])
def test_codes_identical_opposite_orthogonal_zero(resolution):
    encoder = SimilarityEncoder(6, resolution=resolution)
    u = torch.randn(7, 5)
    top = resolution - 1
    assert encoder.codes(u, u * 3.0).tolist() == [[top]] * 7
    assert encoder.codes(u, -u).tolist() == [[0]] * 7
    middle = round(top / 2)  # round half to even, like torch.round
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert encoder.codes(orthogonal, orthogonal.flip(0)).tolist() == [[middle]] * 2
    zero = torch.zeros(7, 5)
    assert encoder.codes(zero, u).tolist() == [[middle]] * 7
    out = encoder(zero, zero)
    assert torch.isfinite(out).all()


def test_quantisation_formula():
    encoder = SimilarityEncoder(6, resolution=101)
    angles = torch.linspace(0, math.pi, 50, dtype=torch.float64)
    u = torch.stack([torch.ones_like(angles), torch.zeros_like(angles)], dim=1)
    v = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    expected = torch.round((torch.cos(angles) + 1) / 2 * 100)
    torch.testing.assert_close(encoder.codes(u, v)[:, 0], expected)


def test_nan_vector_uses_the_missing_vector():
    encoder = SimilarityEncoder(6)
    u = torch.randn(3, 4)
    u[1, 2] = float("nan")
    out = encoder(u, torch.randn(3, 4))
    torch.testing.assert_close(out[1, 0], encoder.mnse.missing[0])


def test_gradients_reach_mnse_only():
    encoder = SimilarityEncoder(6)
    u = torch.randn(4, 5, requires_grad=True)
    v = torch.randn(4, 5)
    encoder(u, v).square().sum().backward()
    assert encoder.mnse.weight.grad is not None and encoder.mnse.weight.grad.abs().sum() > 0
    assert u.grad is None  # the similarity is quantised: nothing flows back


def test_tables_are_frozen_buffers_and_match_vectors():
    generator = torch.Generator().manual_seed(3)
    users = torch.randn(10, 8, generator=generator)
    items = torch.randn(20, 8, generator=generator)
    encoder = SimilarityEncoder(6, user_table=users, item_table=items)
    names = [name for name, _ in encoder.named_parameters()]
    assert names == ["mnse.weight", "mnse.missing"]
    assert not encoder.user_table_0.requires_grad and "item_table_0" in encoder.state_dict()
    user_ids, item_ids = torch.tensor([0, 9, 3]), torch.tensor([19, 0, 7])
    out = encoder(user_ids, item_ids)
    assert out.shape == (3, 1, 6)
    by_vector = SimilarityEncoder(6)
    by_vector.mnse.load_state_dict(encoder.mnse.state_dict())
    torch.testing.assert_close(out, by_vector(users[user_ids], items[item_ids]))
    out.sum().backward()
    assert encoder.user_table_0.grad is None and encoder.mnse.weight.grad is not None
    users.add_(1.0)  # the encoder holds its own copy
    torch.testing.assert_close(encoder(user_ids, item_ids), out)


def test_several_table_pairs():
    tables_u = [torch.randn(5, 4), torch.randn(6, 3)]
    tables_i = [torch.randn(7, 4), torch.randn(8, 3)]
    encoder = SimilarityEncoder(6, user_table=tables_u, item_table=tables_i)
    assert encoder.num_fields == 2
    user_ids, item_ids = torch.tensor([[4, 5], [0, 0]]), torch.tensor([[6, 7], [1, 2]])
    codes = encoder.codes(user_ids, item_ids)
    expected = torch.stack([cosine_similarity(tables_u[f][user_ids[:, f]],
                                              tables_i[f][item_ids[:, f]]) for f in range(2)], 1)
    torch.testing.assert_close(codes, torch.round((expected + 1) / 2 * 1023))
    assert encoder(user_ids, item_ids).shape == (2, 2, 6)


def test_bad_input():
    encoder = SimilarityEncoder(6, user_table=torch.randn(5, 4), item_table=torch.randn(7, 4))
    with pytest.raises(ValueError, match=r"item: field 0 has id 7, outside \[0, 7\)"):
        encoder(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(ValueError, match="user: field 0 has id -1"):
        encoder(torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(TypeError, match="user must be int32 or int64 ids"):
        encoder(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="batch"):
        encoder(torch.tensor([0, 1]), torch.tensor([0]))
    plain = SimilarityEncoder(6, num_fields=2)
    with pytest.raises(ValueError, match=r"user must be .*\(B, F=2, D\)"):
        plain(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="one shape"):
        plain(torch.randn(3, 2, 4), torch.randn(3, 2, 5))
    with pytest.raises(TypeError, match="user must be a floating point"):
        plain(torch.zeros(3, 2, 4, dtype=torch.long), torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="resolution"):
        SimilarityEncoder(6, resolution=1)
    with pytest.raises(ValueError, match="both"):
        SimilarityEncoder(6, user_table=torch.randn(5, 4))
    with pytest.raises(ValueError, match="one width"):
        SimilarityEncoder(6, user_table=torch.randn(5, 4), item_table=torch.randn(5, 3))


# --------------------------------------------------------------------------------------------
# SimHashID


def test_simhash_deterministic_per_seed():
    x = torch.randn(32, 16)
    a, b, c = SimHashID(16, 24, seed=7), SimHashID(16, 24, seed=7), SimHashID(16, 24, seed=8)
    torch.manual_seed(123)  # the global RNG plays no part
    d = SimHashID(16, 24, seed=7)
    assert torch.equal(a.projection, b.projection) and torch.equal(a.projection, d.projection)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a.projection, c.projection)
    assert (a(x) != c(x)).float().mean() > 0.9
    assert "projection" in a.state_dict()


@FEW
@given(num_bits=st.integers(1, 62), seed=st.integers(0, 2**16))
def test_simhash_ids_are_the_bits(num_bits, seed):
    hasher = SimHashID(5, num_bits, seed=seed)
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(seed))
    ids = hasher(x)
    assert ids.dtype == torch.int64 and ids.shape == (20,)
    assert ids.min() >= 0 and ids.max() <= hasher.max_value == 2**num_bits - 1
    bits = (ids[:, None] >> torch.arange(num_bits)) & 1  # binary digits, least significant first
    assert torch.equal(bits.bool(), hasher.bits(x))


def test_simhash_locality():
    generator = torch.Generator().manual_seed(0)
    hasher = SimHashID(32, 32, seed=1)
    base = torch.randn(500, 32, generator=generator)
    near = base + 0.1 * torch.randn(500, 32, generator=generator)
    unrelated = torch.randn(500, 32, generator=generator)

    def hamming(a, b):
        return (hasher.bits(a) != hasher.bits(b)).sum(-1).double().mean()

    d_near, d_far = hamming(base, near), hamming(base, unrelated)
    assert d_near < d_far / 4
    # Expected bit flips: num_bits · angle / π.
    assert abs(float(d_far) - 16) < 2


def test_simhash_into_mnse():
    hasher = SimHashID(8, 12)
    x = torch.randn(6, 3, 8)
    ids = hasher(x)
    assert ids.shape == (6, 3)
    mnse = MNSE(3, 4, hasher.max_value, bases=(2,))
    assert mnse.num_digits == (12,)
    assert mnse(ids).shape == (6, 3, 4) and int(mnse.num_clipped) == 0


def test_simhash_keeps_projection_under_half():
    hasher = SimHashID(8, 16)
    x = torch.randn(10, 8)
    ids = hasher(x)
    hasher.half()
    assert hasher.projection.dtype == torch.float32
    assert torch.equal(hasher(x), ids)


def test_simhash_bad_input():
    with pytest.raises(ValueError, match="num_bits"):
        SimHashID(4, 63)
    with pytest.raises(ValueError, match="num_bits"):
        SimHashID(4, 0)
    with pytest.raises(ValueError, match="in_dim"):
        SimHashID(0, 4)
    hasher = SimHashID(4, 8)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., D=4\)"):
        hasher(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating point"):
        hasher(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        hasher(torch.tensor([[0.0, float("nan"), 1.0, 2.0]]))
