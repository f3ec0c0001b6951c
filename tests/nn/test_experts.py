"""hmoe.nn.experts: MLP, GwPFM, IPNN, CrossLayerV2, DCNv2 and FlatDNN."""

import pytest
import torch

from hmoe.nn.experts import MLP, CrossLayerV2, DCNv2, FlatDNN, GwPFM, IPNN

B, F, D = 3, 4, 6  # batch, fields, embedding width of the small cases
HIDDEN = (5, 3)
# torch.compile checks use aot_eager: it traces the full graph in seconds on CPU.
BACKEND = "aot_eager"


def make_expert(name):
    torch.manual_seed(0)
    if name == "gwpfm":
        return GwPFM(F, D, field_groups=(0, 1, 1, 2), hidden=HIDDEN)  # G = 3, d = 2
    if name == "ipnn":
        return IPNN(F, D, hidden=HIDDEN)
    if name == "dcn_stacked":
        return DCNv2(F, D, num_cross=2, hidden=HIDDEN)
    if name == "dcn_parallel_lowrank":
        return DCNv2(F, D, num_cross=2, low_rank=3, structure="parallel", hidden=HIDDEN)
    return FlatDNN(F, D, hidden=HIDDEN)


EXPERTS = ["gwpfm", "ipnn", "dcn_stacked", "dcn_parallel_lowrank", "flat"]


def make_x(batch=B, fields=F, dim=D, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, fields, dim, generator=generator, dtype=dtype)


def randomise_r(module):
    with torch.no_grad():
        module.r.copy_(torch.randn(module.r.shape) + 1.0)


# --------------------------------------------------------------------------------------------
# GwPFM


def test_gwpfm_one_group_is_a_weighted_fm():
    module = GwPFM(F, D, field_groups=(0,) * F, hidden=HIDDEN).double()
    with torch.no_grad():
        module.r.fill_(1.7)
    x = make_x()
    expected = torch.zeros(B, D, dtype=torch.float64)
    for i in range(F):
        for j in range(i + 1, F):
            expected += x[:, i] * x[:, j]
    fm_identity = (x.sum(1) ** 2 - (x ** 2).sum(1)) / 2  # (B, D)
    torch.testing.assert_close(expected, fm_identity)
    torch.testing.assert_close(module.interaction(x), 1.7 * expected)


def test_gwpfm_one_group_per_field_is_ffm_like():
    d = 2
    module = GwPFM(F, F * d, field_groups=range(F), hidden=HIDDEN).double()
    randomise_r(module)
    x = make_x(dim=F * d)
    r_sym = (module.r + module.r.T) / 2
    expected = torch.zeros(B, d, dtype=torch.float64)
    for i in range(F):
        for j in range(i + 1, F):
            v_i = x[:, i, j * d:(j + 1) * d]  # part of field i for field j's group (g(j) = j)
            v_j = x[:, j, i * d:(i + 1) * d]
            expected += r_sym[i, j] * v_i * v_j
    torch.testing.assert_close(module.interaction(x), expected.detach())


def test_gwpfm_general_groups_match_double_loop():
    groups = (2, 0, 1, 0)  # unordered ids; G = 3
    d = 2
    module = GwPFM(F, 3 * d, field_groups=groups, hidden=HIDDEN).double()
    randomise_r(module)
    x = make_x(dim=3 * d)
    r = module.r.detach()
    expected = torch.zeros(B, d, dtype=torch.float64)
    for i in range(F):
        for j in range(i + 1, F):
            gi, gj = groups[i], groups[j]
            v_i = x[:, i, gj * d:(gj + 1) * d]
            v_j = x[:, j, gi * d:(gi + 1) * d]
            expected += (r[gi, gj] + r[gj, gi]) / 2 * v_i * v_j
    torch.testing.assert_close(module.interaction(x), expected)
    # symmetric use: transposing r changes nothing
    before = module.interaction(x)
    with torch.no_grad():
        module.r.copy_(module.r.T.clone())
    torch.testing.assert_close(module.interaction(x), before)


def test_gwpfm_r_starts_at_one_and_unused_entries_get_no_gradient():
    module = GwPFM(F, D, field_groups=(0, 1, 1, 2), hidden=HIDDEN).double()
    assert torch.equal(module.r, torch.ones(3, 3, dtype=torch.float64))
    module.interaction(make_x()).sum().backward()
    # group 0 and group 2 hold one field each: no (0,0) or (2,2) pair exists
    used = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert (module.r.grad[used] != 0).all()
    assert (module.r.grad[~used] == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(field_groups=(0, 1, 1)), "field_groups"),
    (dict(field_groups=(0, 2, 2, 0)), "field_groups"),
    (dict(field_groups=(0, 1, 2, 3)), "dim"),  # 6 not divisible by G = 4
])
def test_gwpfm_bad_groups(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GwPFM(F, D, hidden=HIDDEN, **kwargs)


# --------------------------------------------------------------------------------------------
# IPNN


def test_ipnn_inner_products_and_features_match_loop():
    module = IPNN(F, D, hidden=HIDDEN).double()
    x = make_x()
    expected = torch.stack([(x[:, i] * x[:, j]).sum(-1)
                            for i in range(F) for j in range(i + 1, F)], dim=1)  # (B, P)
    torch.testing.assert_close(module.inner_products(x), expected)
    first = module.mlp.layers[0]
    features = torch.cat([x.reshape(B, F * D), expected], dim=1)
    torch.testing.assert_close(module(x), module.mlp(features))
    assert first.in_features == F * D + F * (F - 1) // 2


# --------------------------------------------------------------------------------------------
# DCN V2


@pytest.mark.parametrize("low_rank", [None, 2])
def test_cross_layer_formula(low_rank):
    N = 5
    layer = CrossLayerV2(N, low_rank=low_rank).double()
    with torch.no_grad():
        layer.bias.normal_()
    generator = torch.Generator().manual_seed(2)
    x0, xl = (torch.randn(B, N, generator=generator, dtype=torch.float64) for _ in range(2))
    if low_rank is None:
        W = layer.weight
    else:
        W = layer.u @ layer.v.T
        assert torch.linalg.matrix_rank(W.detach()) == low_rank
    expected = torch.stack([x0[b] * (W @ xl[b] + layer.bias) + xl[b] for b in range(B)])
    torch.testing.assert_close(layer(x0, xl), expected)


def test_dcnv2_stacked_and_parallel_compose_as_documented():
    x = make_x()
    stacked = make_expert("dcn_stacked").double()
    x0 = x.reshape(B, F * D)
    crossed = stacked.cross_layers[1](x0, stacked.cross_layers[0](x0, x0))
    torch.testing.assert_close(stacked.cross(x), crossed)
    torch.testing.assert_close(stacked(x), stacked.mlp(crossed))
    parallel = make_expert("dcn_parallel_lowrank").double()
    out = parallel(x)
    assert out.shape == (B, HIDDEN[-1])
    expected = parallel.output(torch.cat([parallel.cross(x), parallel.mlp(x0)], dim=1))
    torch.testing.assert_close(out, expected)


def test_dcnv2_bad_arguments():
    with pytest.raises(ValueError, match="structure"):
        DCNv2(F, D, structure="side")
    with pytest.raises(ValueError, match="num_cross"):
        DCNv2(F, D, num_cross=0)
    with pytest.raises(ValueError, match="low_rank"):
        CrossLayerV2(4, low_rank=0)


# --------------------------------------------------------------------------------------------
# Every expert


@pytest.mark.parametrize("name", EXPERTS)
def test_shape_nonnegative_and_gradients(name):
    module = make_expert(name).double()
    x = make_x(batch=8).requires_grad_()
    out = module(x)
    assert out.shape == (8, module.out_dim) == (8, HIDDEN[-1])
    assert (out >= 0).all()
    # a linear read-out of random sign so dead ReLUs in one sample do not hide a parameter
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64)
    (out * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # r's entries of group pairs without a field pair stay at 0 (tested above); the rest move
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", EXPERTS)
def test_compile_matches_eager(name):
    module = make_expert(name)
    x = make_x(dtype=torch.float32)
    compiled = torch.compile(module, backend=BACKEND, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))


@pytest.mark.parametrize("name", EXPERTS)
@pytest.mark.parametrize("shape", [(B, F + 1, D), (B, F, D + 1), (F, D), (B, 1, F, D)])
def test_bad_input_shape_names_x(name, shape):
    module = make_expert(name)
    with pytest.raises(ValueError, match=r"^x must be \(B, F=4, D=6\)"):
        module(torch.randn(shape))


@pytest.mark.parametrize("name", EXPERTS)
def test_integer_input_is_a_type_error(name):
    with pytest.raises(TypeError, match="x must be a floating-point"):
        make_expert(name)(torch.zeros(B, F, D, dtype=torch.long))


def count(module):
    return sum(p.numel() for p in module.parameters())


def mlp_params(in_dim, hidden=HIDDEN):
    widths = (in_dim, *hidden)
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def test_parameter_counts():
    assert mlp_params(10) == 10 * 5 + 5 + 5 * 3 + 3
    N, P = F * D, F * (F - 1) // 2
    assert count(MLP(10, HIDDEN)) == mlp_params(10)
    assert count(make_expert("gwpfm")) == 3 * 3 + mlp_params(D // 3)  # r (G, G) + MLP on d
    assert count(make_expert("ipnn")) == mlp_params(N + P)
    assert count(make_expert("dcn_stacked")) == 2 * (N * N + N) + mlp_params(N)
    assert count(make_expert("dcn_parallel_lowrank")) == (
        2 * (2 * N * 3 + N) + mlp_params(N) + (N + HIDDEN[-1]) * HIDDEN[-1] + HIDDEN[-1])
    assert count(make_expert("flat")) == mlp_params(N)


def test_mlp_validation_and_dropout_keeps_relu_output():
    with pytest.raises(ValueError, match="hidden"):
        MLP(4, ())
    with pytest.raises(ValueError, match="dropout"):
        MLP(4, (3,), dropout=1.0)
    mlp = MLP(4, (7, 3), dropout=0.5).train()
    assert mlp.out_dim == 3
    assert (mlp(torch.randn(16, 4)) >= 0).all()
