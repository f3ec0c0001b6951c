"""The synthetic ads world (hmoe.data.synthetic): determinism, layout, calibrated rates, the
conversion funnel, repeated exposures, the planted sequence effect, save/load, bad configs."""

import dataclasses

import numpy as np
import pytest

from hmoe.data import SyntheticConfig, check_columns, generate, load_world
from hmoe.data.synthetic import SPLITS

CONFIG = SyntheticConfig(num_rows=60_000, seed=3)
SMALL = SyntheticConfig(num_rows=4_000, num_users=300, num_ads=600, num_advertisers=60, seed=1)


@pytest.fixture(scope="module")
def world():
    return generate(CONFIG)


@pytest.fixture(scope="module")
def rows(world):
    """Every split concatenated (the rows are i.i.d. given the catalog)."""
    return {key: np.concatenate([world.splits[s][key] for s in SPLITS])
            for key in world.splits["train"]}


def _equal_worlds(a, b) -> bool:
    if a.schema != b.schema or a.splits.keys() != b.splits.keys():
        return False
    return all(np.array_equal(a.splits[s][k], b.splits[s][k], equal_nan=True)
               for s in a.splits for k in a.splits[s])


def test_determinism_by_seed():
    first, again = generate(SMALL), generate(SMALL)
    assert _equal_worlds(first, again)
    np.testing.assert_array_equal(first.ground_truth.user_interests,
                                  again.ground_truth.user_interests)
    other = generate(dataclasses.replace(SMALL, seed=2))
    assert not np.array_equal(first.splits["train"]["categorical"],
                              other.splits["train"]["categorical"])


def test_splits_follow_the_layout_and_the_fractions(world):
    n = CONFIG.num_rows
    sizes = {s: len(world.splits[s]["labels"]) for s in SPLITS}
    assert sizes == {"train": n - 2 * int(0.1 * n), "valid": int(0.1 * n), "test": int(0.1 * n)}
    for split in SPLITS:
        columns = world.splits[split]
        check_columns(columns, world.schema)
        assert columns["categorical"].dtype == np.int64
        assert columns["numeric"].dtype == np.float32
        assert columns["labels"].dtype == np.float32
        assert columns["seq/hist_ads"].shape[1] == CONFIG.max_len
        np.testing.assert_array_equal(columns["group_id"], columns["categorical"][:, 0])
    assert world.schema.tasks == ("click", "conversion", "like")
    assert all(f.vocab_size is not None for f in world.schema.categorical)


def test_observed_rates_match_the_config(rows):
    rates = rows["labels"].mean(0)
    assert rates[0] == pytest.approx(CONFIG.click_rate, abs=0.006)
    assert rates[1] == pytest.approx(CONFIG.conversion_rate, abs=0.003)
    assert rates[2] == pytest.approx(CONFIG.like_rate, abs=0.004)


def test_conversion_only_after_a_click_and_truths_are_probabilities(rows):
    click, conversion = rows["labels"][:, 0], rows["labels"][:, 1]
    assert (conversion <= click).all() and conversion.sum() > 0
    for task in ("click", "conversion", "like"):
        truth = rows[f"true/{task}"]
        assert ((truth > 0) & (truth < 1)).all()
    assert (rows["true/conversion"] <= rows["true/click"]).all()


def test_repeated_exposures_raise_the_observed_rate(rows):
    """Observed click = clicked at least once in k exposures: P = 1 - (1 - p)^k > p."""
    k = rows["exposure_count"]
    click, p = rows["labels"][:, 0], rows["true/click"].astype(np.float64)
    repeated = k > 1
    assert repeated.mean() == pytest.approx(CONFIG.repeat_rate, abs=0.01)
    assert k.min() == 1 and k.max() <= CONFIG.max_exposures
    assert k[repeated].mean() == pytest.approx(CONFIG.mean_repeated_exposures, abs=0.1)
    # The repeated rows click about k times as often as the per-exposure truth says ...
    assert click[repeated].mean() > 1.8 * p[repeated].mean()
    assert click[repeated].mean() == pytest.approx(
        (1 - (1 - p[repeated]) ** k[repeated]).mean(), rel=0.1)
    # ... while single exposures match it.
    assert click[~repeated].mean() == pytest.approx(p[~repeated].mean(), rel=0.1)
    assert click[repeated].mean() > 1.8 * click[~repeated].mean()


def _recent_match(columns) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose 3 most recent behaviours include the target's category, rows with no
    behaviour in it at all)."""
    target = columns["categorical"][:, 2]  # ad_category
    categories = columns["seq/hist_categories"]
    positions = columns["seq/hist_categories/positions"]
    same = (categories == target[:, None]) & (positions >= 1)
    return (same & (positions <= 3)).any(1), ~same.any(1)


def test_planted_sequence_effect_is_detectable(rows):
    recent, none = _recent_match(rows)
    click = rows["labels"][:, 0]
    assert recent.mean() > 0.1 and none.mean() > 0.1
    assert click[recent].mean() > 3 * click[none].mean()
    # The ground truth says so: a same-category behaviour at rank 1 adds w_seq to the logit.
    truth = generate(SMALL).ground_truth
    correlation = truth.correlation_map(1)
    assert correlation.shape == (SMALL.num_categories, SMALL.max_len)
    assert correlation[0, 0] == pytest.approx(SMALL.sequence_weight)
    assert correlation[0, 0] > correlation[0, 10] > 0  # decays with the distance
    with pytest.raises(ValueError, match="target_category must be a category id"):
        truth.correlation_map(0)


def test_without_the_sequence_weight_the_effect_vanishes():
    control = generate(dataclasses.replace(CONFIG, num_rows=40_000, sequence_weight=0.0))
    columns = control.splits["train"]
    recent, none = _recent_match(columns)
    click = columns["labels"][:, 0]
    assert click[recent].mean() == pytest.approx(click[none].mean(), rel=0.25)


def test_zero_length_histories_and_ranks(rows):
    lengths = rows["seq/hist_ads/lengths"]
    assert (lengths == 0).mean() == pytest.approx(0.05, abs=0.01)
    assert lengths.max() <= CONFIG.max_len
    positions = rows["seq/hist_ads/positions"]
    has = lengths > 0
    np.testing.assert_array_equal(positions[has, 0], lengths[has])  # oldest step: rank = length
    nonempty = np.flatnonzero(has)
    last = positions[nonempty, lengths[nonempty] - 1]
    assert (last == 1).all()  # the most recent behaviour has rank 1


def test_save_load_round_trip(tmp_path):
    world = generate(SMALL)
    world.save(tmp_path / "world")
    loaded = load_world(tmp_path / "world")
    assert loaded.config == world.config
    assert _equal_worlds(loaded, world)
    for field in dataclasses.fields(world.ground_truth):
        np.testing.assert_array_equal(np.asarray(getattr(loaded.ground_truth, field.name)),
                                      np.asarray(getattr(world.ground_truth, field.name)))


@pytest.mark.parametrize("changes, key", [
    ({"num_rows": 0}, "num_rows"),
    ({"num_users": -1}, "num_users"),
    ({"num_categories": 3}, "num_categories"),
    ({"num_ads": 10}, "num_ads"),
    ({"interests_per_user": 0}, "interests_per_user"),
    ({"click_rate": 1.5}, "click_rate"),
    ({"conversion_rate": 0.2}, "conversion_rate"),
    ({"like_rate": 0.0}, "like_rate"),
    ({"repeat_rate": -0.1}, "repeat_rate"),
    ({"mean_repeated_exposures": 1.5}, "mean_repeated_exposures"),
    ({"decay_scale": 0}, "decay_scale"),
    ({"sequence_weight": float("inf")}, "sequence_weight"),
    ({"target_interest_fraction": 0.95}, "target_interest_fraction"),
    ({"valid_fraction": 0.6, "test_fraction": 0.5}, "valid_fraction"),
    ({"pretrained_dim": -2}, "pretrained_dim"),
    ({"days": 0}, "days"),
    ({"interest_drift": -0.1}, "interest_drift"),
    ({"interest_weight": float("nan")}, "interest_weight"),
    ({"new_ad_fraction": 1.0}, "new_ad_fraction"),
    ({"retired_ad_fraction": -0.1}, "retired_ad_fraction"),
])
def test_bad_config_values_name_the_key(changes, key):
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{key}: must be"):
        SyntheticConfig(**changes)
