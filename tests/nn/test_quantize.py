"""hmoe.nn quantizers: raw numeric features -> MNSE codes (formulas, NaN, clamping, state)."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmoe.nn import MNSE, AffineQuantizer, LogQuantizer, QuantileQuantizer

NAN = float("nan")
FEW = settings(max_examples=40, deadline=None)


def same(actual, expected):
    """Codes equal, NaN where expected is NaN."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype),
                               equal_nan=True, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# AffineQuantizer


def test_affine_hand_computed():
    q = AffineQuantizer(lo=[0.0, -1.0], step=[0.5, 2.0], max_value=[10, 3])
    x = torch.tensor([[1.3, -1.0], [0.49, 2.9], [-5.0, 100.0], [NAN, 0.0], [5.0, NAN]])
    # (1.3 - 0) / 0.5 = 2.6; (2.9 + 1) / 2 = 1.95; -5 -> 0; 100 -> 3 (clamped); 5 / 0.5 = 10.
    same(q(x), [[2, 0], [0, 1], [0, 3], [NAN, 0], [10, NAN]])
    assert q.max_values == [10, 3]
    assert q.num_fields == 2


def test_affine_scalars_need_num_fields_and_broadcast():
    with pytest.raises(ValueError, match="num_fields"):
        AffineQuantizer(0.0, 1.0, 5)
    q = AffineQuantizer(0.0, 1.0, 5, num_fields=3)
    same(q(torch.tensor([[0.5, 7.0, float("inf")], [-float("inf"), 4.99, 5.0]])),
         [[0, 5, 5], [0, 4, 5]])
    assert q.max_values == [5, 5, 5]


def test_affine_dtypes():
    q = AffineQuantizer(0.0, 2.0, 100, num_fields=2)
    ints = torch.tensor([[3, 8]])
    assert q(ints).dtype == torch.float32
    same(q(ints), [[1, 4]])
    assert q(ints.double()).dtype == torch.float64
    assert q(ints.to(torch.bfloat16)).dtype == torch.float32  # bf16 cannot hold codes > 256


@FEW
@given(lo=st.floats(-1e3, 1e3), step=st.floats(1e-3, 1e3), max_value=st.integers(0, 10**6),
       values=st.lists(st.floats(-1e6, 1e6) | st.just(NAN), min_size=1, max_size=20))
def test_affine_matches_the_formula(lo, step, max_value, values):
    q = AffineQuantizer(lo, step, max_value, num_fields=1)
    codes = q(torch.tensor(values, dtype=torch.float64)[:, None])[:, 0]
    expected = [NAN if math.isnan(v) else min(max(math.floor((v - lo) / step), 0), max_value)
                for v in values]
    same(codes, expected)


def test_affine_bad_arguments():
    for step in (0.0, -1.0, [1.0, 0.0], float("nan")):
        with pytest.raises(ValueError, match="step"):
            AffineQuantizer(0.0, step, 5, num_fields=2)
    with pytest.raises(ValueError, match="max_value"):
        AffineQuantizer(0.0, 1.0, -1, num_fields=2)
    with pytest.raises(ValueError, match="max_value"):
        AffineQuantizer(0.0, 1.0, 2.5, num_fields=2)
    with pytest.raises(ValueError, match="one length F, got lo: 3, step: 2"):
        AffineQuantizer([0.0, 1.0, 2.0], [1.0, 1.0], 5)
    with pytest.raises(ValueError, match="step must be a scalar or 2 values"):
        AffineQuantizer(0.0, [1.0, 1.0, 1.0], 5, num_fields=2)
    with pytest.raises(ValueError, match="lo"):
        AffineQuantizer(float("inf"), 1.0, 5, num_fields=1)


def test_bad_input_names_x():
    q = AffineQuantizer(0.0, 1.0, 5, num_fields=2)
    with pytest.raises(ValueError, match=r"x must be \(B, F=2\).*\(4,\)"):
        q(torch.zeros(4))
    with pytest.raises(ValueError, match=r"x must be \(B, F=2\).*\(4, 3\)"):
        q(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="x must be"):
        q(torch.zeros(4, 2, dtype=torch.bool))


def test_empty_batch():
    q = AffineQuantizer(0.0, 1.0, 5, num_fields=2)
    assert q(torch.zeros(0, 2)).shape == (0, 2)


# --------------------------------------------------------------------------------------------
# LogQuantizer


def test_log_criteo_hand_computed():
    q = LogQuantizer(1)
    x = [0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 10.0, 100.0, 1e6, -3.0, NAN]
    # ln(2.5)^2 = 0.84, ln(3)^2 = 1.21, ln(10)^2 = 5.30, ln(100)^2 = 21.2, ln(1e6)^2 = 190.9.
    same(q(torch.tensor(x)[:, None])[:, 0], [0, 1, 1, 2, 0, 1, 5, 21, 190, 0, NAN])
    assert q.max_values == [math.floor(math.log(torch.finfo(torch.float32).max) ** 2)] == [7871]


def test_log1p_hand_computed_and_clamped():
    q = LogQuantizer(2, "log1p", scale=2.0, max_value=[100, 10])
    # 2·ln(2) = 1.39, 2·ln(11) = 4.80, 2·ln(1001) = 13.8 -> clamped to 10 in field 1.
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [10.0, 10.0], [1000.0, 1000.0], [-1.0, NAN]])
    same(q(x), [[0, 0], [1, 1], [4, 4], [13, 10], [0, NAN]])
    assert q.max_values == [100, 10]
    assert LogQuantizer(1, "log1p", scale=3.0).max_values == [math.floor(88.72283935546875 * 3)]


@FEW
@given(values=st.lists(st.floats(-1e9, 1e9) | st.just(NAN), min_size=1, max_size=20))
def test_log_criteo_matches_the_formula(values):
    codes = LogQuantizer(1, max_value=300)(torch.tensor(values, dtype=torch.float64)[:, None])
    expected = [NAN if math.isnan(v) else
                min(math.floor(math.log(v) ** 2) if v > 2 else math.floor(max(v, 0)), 300)
                for v in values]
    same(codes[:, 0], expected)


def test_log_bad_arguments():
    with pytest.raises(ValueError, match="transform"):
        LogQuantizer(1, "log2")
    with pytest.raises(ValueError, match="scale"):
        LogQuantizer(1, "log1p", scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        LogQuantizer(1, "criteo", scale=2.0)
    with pytest.raises(ValueError, match="max_value"):
        LogQuantizer(2, max_value=[1, 2, 3])
    with pytest.raises(ValueError, match=r"x must be \(B, F=3\)"):
        LogQuantizer(3)(torch.zeros(2, 2))


# --------------------------------------------------------------------------------------------
# QuantileQuantizer


def test_quantile_hand_computed():
    data = torch.stack([torch.arange(100.0), torch.arange(100.0) * 2], dim=1)  # (100, 2)
    q = QuantileQuantizer(4).fit(data)
    # Linear interpolation at q·99 = 24.75, 49.5, 74.25.
    expected = torch.tensor([[24.75, 49.5, 74.25], [49.5, 99.0, 148.5]], dtype=torch.float64)
    torch.testing.assert_close(q.boundaries, expected)
    x = torch.tensor([[24.0, 49.5], [24.75, 49.0], [50.0, 1e9], [99.0, -1e9], [-10.0, NAN]])
    same(q(x), [[0, 1], [1, 0], [2, 3], [3, 0], [0, NAN]])
    assert q.max_values == [3, 3] and q.num_fields == 2


def test_quantile_fit_ignores_nan_and_matches_torch():
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(500, 3, generator=generator, dtype=torch.float64)
    data[::3, 1] = NAN
    data[5, 2] = float("inf")
    q = QuantileQuantizer(8).fit(data)
    probabilities = torch.arange(1, 8, dtype=torch.float64) / 8
    finite = torch.where(torch.isfinite(data), data, NAN)
    torch.testing.assert_close(q.boundaries, torch.nanquantile(finite, probabilities, dim=0).T)


@FEW
@given(num_bins=st.integers(2, 20), seed=st.integers(0, 2**16))
def test_quantile_codes_in_range_and_roughly_balanced(num_bins, seed):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(400, 2, generator=generator)
    q = QuantileQuantizer(num_bins).fit(data)
    codes = q(data)
    assert codes.min() >= 0 and codes.max() <= num_bins - 1
    assert torch.equal(codes, codes.floor())
    counts = torch.bincount(codes[:, 0].long(), minlength=num_bins)
    assert counts.max() <= 400 / num_bins + 2  # equal-frequency bins on distinct values


def test_quantile_unfitted_raises():
    q = QuantileQuantizer(4)
    with pytest.raises(RuntimeError, match="not fitted"):
        q(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="fit"):
        q.max_values
    q = QuantileQuantizer(4, num_fields=3)
    assert q.max_values == [3, 3, 3]
    with pytest.raises(RuntimeError, match="not fitted"):
        q(torch.zeros(2, 3))
    fitted = QuantileQuantizer(4, num_fields=3).fit(torch.randn(20, 3))
    fitted.load_state_dict(q.state_dict())  # an unfitted state unfits
    with pytest.raises(RuntimeError, match="not fitted"):
        fitted(torch.zeros(2, 3))


def test_quantile_state_dict_round_trip():
    data = torch.randn(300, 3) * torch.tensor([1.0, 10.0, 100.0])
    data[::4, 0] = NAN
    fitted = QuantileQuantizer(16).fit(data)
    buffer = io.BytesIO()
    torch.save(fitted.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert set(state) == {"boundaries", "fitted"}
    x = torch.randn(50, 3) * 20
    x[3, 1] = NAN
    for fresh in (QuantileQuantizer(16), QuantileQuantizer(16, num_fields=3)):
        fresh.load_state_dict(state)
        same(fresh(x), fitted(x))
        assert fresh.max_values == [15] * 3
    with pytest.raises(RuntimeError, match="boundaries"):
        QuantileQuantizer(16, num_fields=2).load_state_dict(state)


def test_quantile_fit_checks():
    with pytest.raises(ValueError, match="num_bins"):
        QuantileQuantizer(1)
    with pytest.raises(ValueError, match=r"x must be \(B, F=2\)"):
        QuantileQuantizer(4, num_fields=2).fit(torch.zeros(10, 3))
    data = torch.randn(10, 2)
    data[:, 1] = NAN
    with pytest.raises(ValueError, match="field 1 has no finite values"):
        QuantileQuantizer(4).fit(data)


def test_buffers_keep_float64_under_half():
    data = torch.randn(200, 2, dtype=torch.float64) * 1000 + 0.123456789
    q = QuantileQuantizer(32).fit(data)
    before = q(data)
    q.half()
    assert q.boundaries.dtype == torch.float64
    same(q(data), before)
    assert AffineQuantizer(0.1, 0.3, 9, num_fields=1).bfloat16().step.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Into MNSE


def test_codes_feed_mnse_without_clipping():
    data = torch.rand(64, 3) * 1000
    data[::5, 2] = NAN
    for q in (AffineQuantizer(0.0, 10.0, 99, num_fields=3), LogQuantizer(3),
              QuantileQuantizer(10).fit(data)):
        mnse = MNSE(3, 12, q.max_values)
        out = mnse(q(data))
        assert out.shape == (64, 3, 12) and torch.isfinite(out).all()
        assert int(mnse.num_clipped) == 0
        torch.testing.assert_close(out[0, 2], mnse.missing[2])
