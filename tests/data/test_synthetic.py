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
    ({"interaction_rank": -1}, "interaction_rank"),
    ({"interaction_rank": 2.5}, "interaction_rank"),
    ({"interaction_scale": float("nan")}, "interaction_scale"),
    ({"interaction_scale": -1.0}, "interaction_scale"),
    ({"task_conflict": 1.5}, "task_conflict"),
])
def test_bad_config_values_name_the_key(changes, key):
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{key}: must be"):
        SyntheticConfig(**changes)


def test_planted_interactions_change_only_the_labels_and_are_what_the_truth_says():
    """interaction_rank > 0 adds scale·<P_u, Q_c>/sqrt(r) to click's logit and the
    task_conflict-mixed <P'_u, Q_c> to conversion's: features and their draws stay the same
    (a random stream of their own), only the labels and the truths move; the factors have the
    documented correlation 1 - kappa between the tasks."""
    base = dataclasses.replace(SMALL, num_rows=20_000)
    plain = generate(base)
    planted = generate(dataclasses.replace(base, interaction_rank=8, interaction_scale=2.0,
                                           task_conflict=0.5))
    for key in ("categorical", "numeric", "seq/hist_ads", "exposure_count", "true/like"):
        np.testing.assert_array_equal(planted.splits["train"][key], plain.splits["train"][key],
                                      err_msg=key)
    assert not np.array_equal(planted.splits["train"]["true/click"],
                              plain.splits["train"]["true/click"])
    truth = planted.ground_truth
    assert truth.interaction_user.shape == (base.num_users + 1, 8)
    assert truth.interaction_category.shape == (base.num_categories, 8)
    assert truth.interaction_scale == 2.0
    assert not truth.interaction_user[0].any()  # id 0 (out of vocabulary) has no factors
    users, mixed = truth.interaction_user[1:].ravel(), truth.conversion_interaction_user[1:].ravel()
    assert np.corrcoef(users, mixed)[0, 1] == pytest.approx(0.5, abs=0.05)
    assert mixed.std() == pytest.approx(1.0, abs=0.05)  # each term keeps its scale

    # The click logit's planted term, recomputed from the truth, explains the truth's change:
    # logit(true/click) moves by exactly the term plus the re-fitted intercept.
    columns = planted.splits["train"]
    schema = planted.schema
    user = columns["categorical"][:, schema.categorical_index("user_id")]
    category = columns["categorical"][:, schema.categorical_index("ad_category")]
    term = 2.0 / np.sqrt(8) * np.einsum("nr,nr->n", truth.interaction_user[user],
                                        truth.interaction_category[category - 1])
    assert term.std() == pytest.approx(2.0, rel=0.15)

    def logit(p):
        p = p.astype(np.float64)
        return np.log(p) - np.log1p(-p)

    moved = logit(columns["true/click"]) - logit(plain.splits["train"]["true/click"])
    shift = moved - term
    assert shift.std() < 1e-3  # a constant: the intercept re-fitted to the click rate


def test_without_interactions_the_world_is_unchanged_and_the_truth_is_empty():
    truth = generate(SMALL).ground_truth
    assert truth.interaction_user.shape == (0, 0) and truth.interaction_scale == 0.0
    none = generate(dataclasses.replace(SMALL, task_conflict=1.0))  # rank 0: no effect
    assert _equal_worlds(none, generate(SMALL))


def test_planted_interactions_survive_save_and_load(tmp_path):
    world = generate(dataclasses.replace(SMALL, interaction_rank=4))
    world.save(tmp_path / "world")
    loaded = load_world(tmp_path / "world").ground_truth
    np.testing.assert_array_equal(loaded.interaction_user, world.ground_truth.interaction_user)
    assert loaded.interaction_scale == world.ground_truth.interaction_scale == 1.0
