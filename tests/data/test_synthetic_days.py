"""The synthetic world over days (hmoe.data.synthetic, ``SyntheticConfig.days``): a one-day world
is what it was before days existed; timestamps in time order; new ads only from their birth day,
retired ads never after their last day; histories before their row; the chunked writer in time
order; drifting interests move the planted click probabilities."""

import dataclasses
import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from hmoe.data import SyntheticConfig, check_columns, generate, load_world, write_world
from hmoe.data.schema import dump_schema
from hmoe.data.synthetic import SECONDS_PER_DAY, SPLITS, GroundTruth
from hmoe.train.metrics import auc

DAYS = SyntheticConfig(num_rows=20_000, num_users=300, num_ads=800, num_advertisers=60,
                       max_len=12, days=5, seed=4)

# Fields of the ground truth that existed before days, and digests of one-day worlds computed
# by the code before days existed (commit 16e8510): every split column, those fields and the
# schema.
_OLD_TRUTH = ("relation", "decay", "sequence_weight", "ad_category", "ad_advertiser",
              "advertiser_category", "user_interests", "user_interest_weights",
              "user_purchase_category", "field_click_effect", "field_conversion_effect",
              "field_like_effect", "click_intercept", "conversion_intercept", "like_intercept")
_BEFORE_DAYS = [
    (SyntheticConfig(num_rows=4_000, num_users=300, num_ads=600, num_advertisers=60, seed=1),
     "432a555315b191dad3396bc792986066b16af698bf725b886d990727341f72ea"),
    # several chunks, and calibration cut inside the fourth
    (SyntheticConfig(num_rows=210_000, num_users=500, num_ads=800, num_advertisers=50, max_len=6,
                     pretrained_dim=0, num_low_card_fields=5, num_numeric=6, seed=7),
     "af4635fe4fd4c55ce543e0469bae9c9c28a45228c29b7e026b6c3133ebaa459e"),
]


def _digest(world) -> str:
    digest = hashlib.sha256()
    for split in sorted(world.splits):
        for key in sorted(world.splits[split]):
            values = np.ascontiguousarray(world.splits[split][key])
            digest.update(f"{split}/{key}/{values.dtype.str}/{values.shape}".encode())
            digest.update(values.tobytes())
    for name in _OLD_TRUTH:
        values = np.ascontiguousarray(np.asarray(getattr(world.ground_truth, name)))
        digest.update(f"{name}/{values.dtype.str}/{values.shape}".encode())
        digest.update(values.tobytes())
    digest.update(dump_schema(world.schema).encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world():
    return generate(DAYS)


def _day(columns) -> np.ndarray:
    return columns["timestamp"] // SECONDS_PER_DAY


def _avx512_dispatch() -> list[str]:
    """numpy's AVX-512 dispatch targets on this build (names differ across numpy versions)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as umath
    return [t for t in getattr(umath, "__cpu_dispatch__", ()) if "AVX512" in t or t == "X86_V4"]


_NO_AVX512 = "HMOE_TEST_NO_AVX512"


@pytest.mark.parametrize("config, expected", _BEFORE_DAYS)
def test_a_one_day_world_is_bit_for_bit_what_it_was(config, expected, request):
    # The digests were recorded with numpy's AVX2 code paths; its AVX-512 exp / log / tanh
    # differ in the last bits, so on an AVX-512 machine this test reruns itself in a process
    # where numpy dispatches no AVX-512 code.
    targets = _avx512_dispatch()
    if targets and not os.environ.get(_NO_AVX512):
        env = {**os.environ, _NO_AVX512: "1", "NPY_DISABLE_CPU_FEATURES": " ".join(targets)}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::{request.node.name}"], env=env, text=True,
                              capture_output=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        return
    one_day = generate(config)
    assert _digest(one_day) == expected
    truth = one_day.ground_truth
    assert truth.days == 1 and truth.interest_weight == 0.0
    assert (truth.ad_birth_day == 0).all() and (truth.ad_last_day == 0).all()
    np.testing.assert_array_equal(truth.user_interests_by_day, truth.user_interests[None])
    for split in SPLITS:  # no timestamp column: the splits hold exactly what they held
        assert "timestamp" not in one_day.splits[split]


def test_timestamps_are_sorted_within_each_split_and_span_the_days(world):
    for split in SPLITS:
        columns = world.splits[split]
        check_columns(columns, world.schema)
        times = columns["timestamp"]
        assert times.dtype == np.int64
        assert (np.diff(times) >= 0).all(), split
        assert times.min() >= 0 and times.max() < DAYS.days * SECONDS_PER_DAY
        per_day = np.bincount(_day(columns), minlength=DAYS.days)
        fraction = {"train": 0.8, "valid": 0.1, "test": 0.1}[split]
        np.testing.assert_array_equal(per_day, int(DAYS.num_rows / DAYS.days * fraction))
    train = world.splits["train"]
    # the hour feature is the timestamp's hour, and a day's rows spread over all of it
    hour = train["numeric"][:, 3]
    np.testing.assert_array_equal(hour, train["timestamp"] % SECONDS_PER_DAY // 3600)
    assert set(np.unique(hour)) == set(range(24))


def test_ads_are_served_only_between_birth_and_last_day(world):
    truth = world.ground_truth
    new, retired = truth.ad_birth_day > 0, truth.ad_last_day < DAYS.days - 1
    assert new.sum() == int(DAYS.new_ad_fraction * DAYS.num_ads)
    assert retired.sum() == int(DAYS.retired_ad_fraction * DAYS.num_ads)
    assert (truth.ad_last_day >= truth.ad_birth_day).all()
    assert not (new | retired)[1:DAYS.num_categories + 1].any()  # one ad per category stays
    ids = np.arange(len(new))
    assert (np.diff(truth.ad_birth_day[new]) >= 0).all() and ids[new].min() > ids[~new].max()
    rows = {key: np.concatenate([world.splits[s][key] for s in SPLITS])
            for key in ("categorical", "timestamp")}
    ads, day = rows["categorical"][:, 1], _day(rows)
    assert truth.served(ads, day).all()
    assert (truth.ad_birth_day[ads] <= day).all() and (truth.ad_last_day[ads] >= day).all()
    # new ads do show up (from their birth day), retired ones before their end
    first_seen = np.full(len(new), -1)
    order = np.argsort(day, kind="stable")[::-1]
    first_seen[ads[order]] = day[order]
    served_new = new & (first_seen >= 0)
    assert served_new.sum() > 0.8 * new.sum()
    assert (first_seen[served_new] >= truth.ad_birth_day[served_new]).all()
    assert (first_seen[served_new] == truth.ad_birth_day[served_new]).mean() > 0.5
    assert np.isin(ids[retired], ads).mean() > 0.8


def test_histories_hold_only_ads_served_before_the_row(world):
    truth = world.ground_truth
    for split in SPLITS:
        columns = world.splits[split]
        lengths, history = columns["seq/hist_ads/lengths"], columns["seq/hist_ads"]
        valid = np.arange(history.shape[1])[None, :] < lengths[:, None]  # (N, L)
        day = np.broadcast_to(_day(columns)[:, None], history.shape)[valid]
        ads = history[valid]
        assert (ads > 0).all()
        birth = truth.ad_birth_day[ads]
        # born on an earlier day (day-0 ads: before the log began) and not yet retired
        assert ((birth < day) | (birth == 0)).all(), split
        assert (truth.ad_last_day[ads] >= day).all()
        np.testing.assert_array_equal(columns["seq/hist_categories"][valid],
                                      truth.ad_category[ads])
    later = world.splits["train"]
    born_later = truth.ad_birth_day[later["seq/hist_ads"]] > 0
    assert born_later.any()  # new ads enter histories too, the day after their birth


def test_interests_walk_and_the_planted_click_follows_the_day(world):
    truth = world.ground_truth
    D, C = DAYS.days, DAYS.num_categories
    np.testing.assert_array_equal(truth.user_interests_by_day[0], truth.user_interests)
    shift = truth.user_interest_shift  # (D, U + 1)
    assert shift.shape == (D, DAYS.num_users + 1) and not shift[0].any()
    steps = np.diff(shift[:, 1:], axis=0)
    assert steps.std() == pytest.approx(DAYS.interest_drift, rel=0.1)
    moved = np.mod(truth.user_interests[None, 1:] - 1
                   + np.rint(shift[:, 1:, None]).astype(np.int64), C) + 1
    np.testing.assert_array_equal(truth.user_interests_by_day[:, 1:], moved)
    assert (truth.user_interests_by_day[-1, 1:] != truth.user_interests[1:]).any(1).mean() > 0.4

    # The click logit is the interest-free one plus w_int · a_d(user, target category): the same
    # world without the term has the same rows and differs by exactly that (and intercepts).
    assert truth.interest_weight == DAYS.click_interest_weight == 3.0
    flat = generate(dataclasses.replace(DAYS, interest_weight=0.0))
    for split in SPLITS:
        columns, other = world.splits[split], flat.splits[split]
        np.testing.assert_array_equal(columns["categorical"], other["categorical"])
        users, categories = columns["categorical"][:, 0], columns["categorical"][:, 2]
        affinity = truth.interest_affinity(users, categories, _day(columns))

        def logit(p):
            p = p.astype(np.float64)
            return np.log(p) - np.log1p(-p)

        rest = logit(columns["true/click"]) - logit(other["true/click"]) \
            - truth.interest_weight * affinity
        expected = truth.click_intercept - flat.ground_truth.click_intercept
        np.testing.assert_allclose(rest, expected, atol=2e-3)

    # Scored with day-0 interests, the last day's rows lose planted AUC; day 0's do not.
    columns = world.splits["train"]
    users, categories, day = columns["categorical"][:, 0], columns["categorical"][:, 2], \
        _day(columns)
    p = columns["true/click"].astype(np.float64)
    stale_shift = truth.interest_weight * (truth.interest_affinity(users, categories, 0)
                                           - truth.interest_affinity(users, categories, day))
    stale = p / (p + (1 - p) * np.exp(-stale_shift))  # σ(logit p + shift)
    assert not stale_shift[day == 0].any()
    last = day == D - 1
    assert np.abs(stale_shift[last]).mean() > 0.3
    observed = 1 - (1 - p) ** columns["exposure_count"]
    assert _expected_auc(stale, observed, last) < _expected_auc(p, observed, last) - 0.005


def _expected_auc(scores, probability, mask) -> float:
    """The AUC of ``scores`` against labels drawn with ``probability`` (each row a positive of
    weight P and a negative of weight 1 - P): no label noise."""
    n = int(mask.sum())
    return auc(np.tile(scores[mask], 2), np.repeat([1.0, 0.0], n),
               np.concatenate([probability[mask], 1 - probability[mask]]))


def test_the_chunked_writer_writes_days_in_time_order(tmp_path, monkeypatch):
    """Chunks far smaller than a day (cut at split and day boundaries) and small row groups: the
    files come in time order and hold the in-memory world, ground truth included."""
    monkeypatch.setattr("hmoe.data.synthetic._CHUNK_ROWS", 1_700)
    expected = generate(DAYS)
    write_world(DAYS, tmp_path / "world", row_group_rows=900)
    loaded = load_world(tmp_path / "world")
    assert loaded.config == DAYS and loaded.schema == expected.schema
    expected.save(tmp_path / "saved")  # the in-memory world's files hold the same
    saved = load_world(tmp_path / "saved")
    for split in SPLITS:
        for key, values in expected.splits[split].items():
            np.testing.assert_array_equal(saved.splits[split][key], values, err_msg=key)
    for split in SPLITS:
        assert loaded.splits[split].keys() == expected.splits[split].keys()
        for key, values in expected.splits[split].items():
            np.testing.assert_array_equal(loaded.splits[split][key], values, err_msg=key)
            assert loaded.splits[split][key].dtype == values.dtype, key
        metadata = pq.ParquetFile(tmp_path / "world" / f"{split}.parquet").metadata
        column = metadata.schema.to_arrow_schema().get_field_index("timestamp")
        bounds = [(metadata.row_group(g).column(column).statistics.min,
                   metadata.row_group(g).column(column).statistics.max)
                  for g in range(metadata.num_row_groups)]
        assert len(bounds) >= {"train": 4 * DAYS.days}.get(split, DAYS.days)
        assert all(low <= high for low, high in bounds)
        assert all(high <= low for (_, high), (low, _) in itertools.pairwise(bounds))
    for field in dataclasses.fields(GroundTruth):
        np.testing.assert_array_equal(np.asarray(getattr(loaded.ground_truth, field.name)),
                                      np.asarray(getattr(expected.ground_truth, field.name)),
                                      err_msg=field.name)


def test_ground_truth_saved_before_days_loads_as_one_day(tmp_path):
    truth = generate(_BEFORE_DAYS[0][0]).ground_truth
    np.savez(tmp_path / "old.npz", **{name: np.asarray(getattr(truth, name))
                                      for name in _OLD_TRUTH})
    old = GroundTruth.load(tmp_path / "old.npz")
    assert old.days == 1 and old.interest_weight == 0.0
    for field in dataclasses.fields(GroundTruth):
        np.testing.assert_array_equal(np.asarray(getattr(old, field.name)),
                                      np.asarray(getattr(truth, field.name)), err_msg=field.name)


@pytest.mark.slow
def test_day_zero_interests_lose_auc_day_after_day(capsys):
    """The default 7-day world, no training: per day, the planted click probability (the day's
    interests) against the same with day-0 interests, as expected AUCs (no label noise) and
    AUCs on the drawn labels. This loss is what online learning can win back."""
    world = generate(SyntheticConfig(num_rows=140_000, days=7, seed=0))
    truth, columns = world.ground_truth, world.splits["train"]
    users, categories, day = columns["categorical"][:, 0], columns["categorical"][:, 2], \
        _day(columns)
    p = columns["true/click"].astype(np.float64)
    stale_shift = truth.interest_weight * (truth.interest_affinity(users, categories, 0)
                                           - truth.interest_affinity(users, categories, day))
    stale = p / (p + (1 - p) * np.exp(-stale_shift))
    observed = 1 - (1 - p) ** columns["exposure_count"]
    click = columns["labels"][:, 0]
    gaps = []
    lines = [("day  rows   new-ad rows  expected AUC: today's  day-0's  (gap)   "
              "label AUC: today's  day-0's")]
    new_ad = truth.ad_birth_day[columns["categorical"][:, 1]] > 0
    for d in range(truth.days):
        m = day == d
        today, frozen = _expected_auc(p, observed, m), _expected_auc(stale, observed, m)
        gaps.append(today - frozen)
        lines.append(f"{d:3d}  {m.sum():5d}  {new_ad[m].mean():11.3f}"
                     f"  {today:20.4f}  {frozen:7.4f}  ({gaps[-1]:.4f})  "
                     f"{auc(p[m], click[m]):17.4f}  {auc(stale[m], click[m]):7.4f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert gaps[0] == 0.0
    assert gaps[-1] > 0.01 and gaps[-1] > gaps[1]
