"""hmoe.nn.MNSE: the layer around hmoe.ops.mnse (codes, missing values, clamping, compile)."""

import importlib

import pytest
import torch

import hmoe
from hmoe.nn import MNSE

ops_mnse = importlib.import_module("hmoe.ops.mnse")


def test_shapes_and_parameters():
    layer = MNSE(4, 48, 10**6)
    assert layer.num_digits == (20, 13, 7)
    assert layer.weight.shape == (4, 2 * 20 + 3 * 13 + 10 * 7, 16)
    assert layer.missing.shape == (4, 48)
    assert layer(torch.randint(0, 10**6, (7, 4))).shape == (7, 4, 48)
    layer = MNSE(3, 16, [5, 100, 7], bases=(2, 10), mode="sum", num_sets=4)
    assert layer.weight.shape == (3, 2 * 7 + 10 * 3, 4, 16)
    assert layer(torch.randint(0, 6, (5, 3))).shape == (4, 5, 3, 16)


@pytest.mark.parametrize("num_sets", [1, 4])
@pytest.mark.parametrize("mode", ["concat", "sum"])
def test_forward_is_the_op_on_its_weight(num_sets, mode):
    layer = MNSE(3, 12, [50, 999, 3], mode=mode, num_sets=num_sets, dtype=torch.float64)
    codes = torch.tensor([[0, 999, 3], [50, 0, 1], [17, 512, 2]])
    weight = layer.weight if num_sets > 1 else layer.weight.unsqueeze(2)
    expected = ops_mnse.mnse_ref(weight, codes, layer.bases, layer.num_digits, ops_mnse.MODES[mode])
    out = layer(codes)
    torch.testing.assert_close(out, expected if num_sets > 1 else expected[0])


@pytest.mark.parametrize("num_sets", [1, 3])
def test_nan_selects_the_fields_missing_vector(num_sets):
    layer = MNSE(2, 6, 100, num_sets=num_sets, dtype=torch.float64)
    codes = torch.tensor([[float("nan"), 3.7], [12.0, float("nan")]])
    out = layer(codes)
    missing = layer.missing if num_sets > 1 else layer.missing[None]
    out = out if num_sets > 1 else out[None]
    torch.testing.assert_close(out[:, 0, 0], missing[:, 0])
    torch.testing.assert_close(out[:, 1, 1], missing[:, 1])
    # Floats are floored: 3.7 is code 3.
    torch.testing.assert_close(out[:, 0, 1], (layer(torch.tensor([[0, 3]])) if num_sets > 1
                                              else layer(torch.tensor([[0, 3]]))[None])[:, 0, 1])
    out.sum().backward()
    assert layer.missing.grad.abs().sum() > 0
    assert torch.isfinite(layer.weight.grad).all()


def test_codes_above_max_are_clamped_and_counted():
    layer = MNSE(2, 6, [10, 20], dtype=torch.float64)
    out = layer(torch.tensor([[11, 20], [500, 21]]))
    torch.testing.assert_close(out, layer(torch.tensor([[10, 20], [10, 20]])))
    assert int(layer.num_clipped) == 3
    layer(torch.tensor([[1e12, float("nan")]]))  # a huge float clamps too, NaN is not "above"
    assert int(layer.num_clipped) == 4
    layer(torch.tensor([[10.5, 20.9]]))  # floored first: codes 10 and 20 are in range
    assert int(layer.num_clipped) == 4
    assert "num_clipped" in layer.state_dict() and "max_values" in layer.state_dict()


def test_strict_mode_raises_naming_field_and_value():
    layer = MNSE(2, 6, [10, 20], strict=True)
    layer(torch.tensor([[10, 20]]))
    with pytest.raises(ValueError, match=r"field 1 \(sample 1\) has code 25, above max_values\[1\] = 20"):
        layer(torch.tensor([[0, 0], [3, 25]]))


@pytest.mark.parametrize("codes,shown", [(torch.tensor([[0, -1]]), "-1"), (torch.tensor([[0.0, -0.5]]), "-0.5")])
def test_negative_codes_raise(codes, shown):
    with pytest.raises(ValueError, match=f"codes must be >= 0.*got {shown}"):
        MNSE(2, 6, 10)(codes)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_digits=(3, 2, 1)), r"base 2 with 3 digits writes codes up to 7, below max_values 100"),
        (dict(bases=(1, 10)), "bases must be a non-empty sequence of integers >= 2"),
        (dict(dim=10), r"dim \(10\) must be divisible by len\(bases\) \(3\)"),
        (dict(max_values=[5, -1]), "max_values must be 2 integers >= 0"),
        (dict(mode="mean"), "mode must be one of"),
    ],
)
def test_layer_refuses_to_build(kwargs, message):
    args = dict(num_fields=2, dim=12, max_values=100) | kwargs
    with pytest.raises(ValueError, match=message):
        MNSE(**args)


def test_wrong_codes_shape_or_dtype():
    layer = MNSE(2, 6, 10)
    with pytest.raises(ValueError, match=r"codes must be \(B, F=2\)"):
        layer(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="codes must be int32, int64 or floating point"):
        layer(torch.zeros(3, 2, dtype=torch.bool))


def test_v_zero_and_v_max_use_the_extreme_rows():
    layer = MNSE(1, 2, 8, bases=(2,), mode="sum", dtype=torch.float64)  # 4 binary digits
    with torch.no_grad():
        layer.weight.copy_(torch.arange(8, dtype=torch.float64)[None, :, None].expand(1, 8, 2))
    # 0 = 0000 -> rows 0, 2, 4, 6; 8 = 1000 -> rows 0, 2, 4, 7.
    assert layer(torch.tensor([[0]]))[0, 0, 0].item() == 0 + 2 + 4 + 6
    assert layer(torch.tensor([[8]]))[0, 0, 0].item() == 0 + 2 + 4 + 7


@pytest.mark.parametrize("float_codes", [False, True])
def test_torch_compile_fullgraph(float_codes):
    torch._dynamo.reset()
    layer = MNSE(3, 12, 1000, dtype=torch.float64)
    codes = torch.randint(0, 1000, (9, 3))
    if float_codes:
        codes = codes.double()
        codes[2, 1] = float("nan")
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(codes), layer(codes))
    compiled(codes).sum().backward()
    assert layer.weight.grad is not None


def test_trains_with_any_optimizer():
    torch.manual_seed(0)
    layer = MNSE(1, 6, 255, bases=(2, 4))
    head = torch.nn.Linear(6, 1)
    codes = torch.randint(0, 256, (512, 1))
    target = (codes.float() / 255.0 - 0.5) ** 2  # a smooth function of the value
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=0.05)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(head(layer(codes)[:, 0]), target)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.2 * first
