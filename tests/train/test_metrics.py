"""hmoe.train.metrics against brute force: pairwise AUC counts (with ties), a python loop over
groups for gAUC, and the defining properties of NE and calibration."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmoe.train import (MetricAccumulator, auc, calibration, calibration_error, evaluate, gauc,
                        logloss, normalized_entropy)
from hmoe.train import metrics as metrics_module  # private helpers, for the streaming checks


def brute_auc(scores, labels, weight=None):
    weight = [1.0] * len(scores) if weight is None else weight
    numerator = denominator = 0.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if labels[i] == 1 and labels[j] == 0:
                pair = weight[i] * weight[j]
                numerator += pair * (1.0 if scores[i] > scores[j] else
                                     0.5 if scores[i] == scores[j] else 0.0)
                denominator += pair
    return numerator / denominator if denominator else math.nan


def brute_gauc(scores, labels, groups):
    numerator = total = 0.0
    for group in set(groups):
        members = [k for k in range(len(scores)) if groups[k] == group]
        group_labels = [labels[k] for k in members]
        if 0 < sum(group_labels) < len(members):
            numerator += len(members) * brute_auc([scores[k] for k in members], group_labels)
            total += len(members)
    return numerator / total if total else math.nan


# ------------------------------------------------------------------------------ AUC

def test_auc_by_hand_with_ties():
    # pairs (pos, neg): (0.8, 0.1) 1, (0.8, 0.4) 1, (0.4, 0.1) 1, (0.4, 0.4) ½  -> 3.5 / 4
    assert auc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auc([0.5, 0.5, 0.5], [0, 1, 0]) == pytest.approx(0.5)
    assert auc([3.0, 1.0], [1, 0]) == 1.0 and auc([1.0, 3.0], [1, 0]) == 0.0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1),
                          st.sampled_from([0.0, 0.5, 1.0, 3.0])), min_size=1, max_size=40))
def test_auc_equals_brute_force_pair_count(rows):
    scores = [float(s) for s, _, _ in rows]  # few distinct values: many ties
    labels = [y for _, y, _ in rows]
    weight = [w for _, _, w in rows]
    expected = brute_auc(scores, labels)
    if math.isnan(expected):
        assert math.isnan(auc(scores, labels))
    else:
        assert auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    expected_weighted = brute_auc(scores, labels, weight)
    if math.isnan(expected_weighted):
        assert math.isnan(auc(scores, labels, weight))
    else:
        assert auc(scores, labels, weight) == pytest.approx(expected_weighted, abs=1e-12)


def test_auc_matches_rank_formula_on_large_data():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=20000), 2)  # ties
    labels = (rng.random(20000) < 0.1 + 0.1 * (scores > 0)).astype(float)
    # average ranks, Mann-Whitney
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = labels.sum(), (1 - labels).sum()
    expected = (ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auc_edge_cases():
    assert math.isnan(auc([0.1, 0.9], [1, 1]))
    assert math.isnan(auc([0.1, 0.9], [0, 0]))
    assert math.isnan(auc([], []))
    assert math.isnan(auc([0.1, 0.9], [1, 0], [0.0, 1.0]))  # positives weigh nothing


def test_auc_accepts_torch_tensors():
    scores, labels = torch.rand(100, dtype=torch.bfloat16), (torch.rand(100) < 0.5)
    assert auc(scores, labels) == pytest.approx(
        brute_auc(scores.float().tolist(), labels.long().tolist()), abs=1e-12)


# ------------------------------------------------------------------------------ gAUC

@pytest.mark.parametrize("seed", range(4))
def test_gauc_equals_loop_over_groups(seed):
    rng = np.random.default_rng(seed)
    n = 400
    groups = rng.integers(0, 30, size=n)
    scores = np.round(rng.random(n), 1)  # ties within groups
    labels = (rng.random(n) < 0.3).astype(float)
    expected = brute_gauc(scores.tolist(), labels.tolist(), groups.tolist())
    assert gauc(scores, labels, groups) == pytest.approx(expected, abs=1e-12)
    # group ids of another type, in another order
    names = np.array([f"user{g:03d}" for g in groups])
    assert gauc(scores, labels, names) == pytest.approx(expected, abs=1e-12)


def test_gauc_by_hand():
    # group a: AUC 1 over 3 impressions; group b: AUC 0 over 2; group c (one class) skipped
    scores = [0.9, 0.1, 0.2, 0.3, 0.8, 0.5]
    labels = [1, 0, 0, 0, 1, 1]
    groups = ["a", "a", "a", "b", "b", "c"]
    scores[4] = 0.1  # b: positive 0.1 below negative 0.3
    assert gauc(scores, labels, groups) == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)


def test_gauc_edge_cases():
    assert math.isnan(gauc([0.1, 0.2], [1, 0], [0, 1]))  # no group has both classes
    assert math.isnan(gauc([], [], []))
    with pytest.raises(ValueError, match="groups must have N=2"):
        gauc([0.1, 0.2], [1, 0], [0])


# ------------------------------------------------------------------------------ probabilities

def test_logloss_by_hand():
    p, y = [0.9, 0.2, 0.6], [1, 0, 0]
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3
    assert logloss(p, y) == pytest.approx(expected, rel=1e-12)
    weighted = -(2 * math.log(0.9) + math.log(0.8)) / 3
    assert logloss(p, y, [2.0, 1.0, 0.0]) == pytest.approx(weighted, rel=1e-12)
    assert logloss([0.0, 1.0], [1, 0]) == pytest.approx(-math.log(1e-15), rel=1e-4)


def test_ne_of_the_base_rate_predictor_is_one():
    rng = np.random.default_rng(1)
    labels = (rng.random(5000) < 0.03).astype(float)
    base_rate = labels.mean()
    assert normalized_entropy(np.full(5000, base_rate), labels) == pytest.approx(1.0, rel=1e-12)
    weight = rng.random(5000)
    weighted_rate = np.dot(weight, labels) / weight.sum()
    assert normalized_entropy(np.full(5000, weighted_rate), labels, weight) == pytest.approx(
        1.0, rel=1e-12)
    # a predictor with signal beats it
    informative = np.where(labels == 1, 0.3, 0.02)
    assert normalized_entropy(informative, labels) < 1.0
    assert math.isnan(normalized_entropy([0.2, 0.3], [0, 0]))


def test_calibration_of_a_calibrated_predictor():
    rng = np.random.default_rng(2)
    p = rng.beta(1, 20, size=200000)
    labels = (rng.random(200000) < p).astype(float)
    assert calibration(p, labels) == pytest.approx(1.0, abs=0.02)
    assert calibration_error(p, labels) < 0.005
    assert calibration(2 * p, labels) == pytest.approx(2.0, abs=0.05)
    assert math.isnan(calibration([0.1, 0.2], [0, 0]))


def test_ece_by_hand():
    # bins of width 0.5: {0.2, 0.4} with labels {0, 1}: |0.3 − 0.5|; {0.9, 1.0} with {1, 1}:
    # |0.95 − 1|; each bin holds half the weight.
    p, y = [0.2, 0.4, 0.9, 1.0], [0, 1, 1, 1]
    assert calibration_error(p, y, n_bins=2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.05)


def test_empty_probability_metrics_are_nan():
    for metric in (logloss, normalized_entropy, calibration, calibration_error):
        assert math.isnan(metric([], []))


@pytest.mark.parametrize("scores, labels, match", [
    ([0.1, 0.2], [1], "labels must have N=2"),
    ([0.1, float("nan")], [1, 0], "scores must not be NaN"),
    ([0.1, 1.2], [1, 0], r"probabilities in \[0, 1\], found 1.2"),
    ([0.1, 0.2], [1, 2], "labels must be 0 or 1, found 2.0 at index 1"),
    ([0.1, 0.2], [1, float("nan")], "labels must be 0 or 1, found nan"),
    ([[0.1, 0.2]], [[1, 0]], r"scores must be \(N,\)"),
])
def test_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        logloss(scores, labels)


def test_bad_weight():
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        auc([0.1, 0.2], [1, 0], [1.0, -2.0])


# ------------------------------------------------------------------------------ evaluate

def _two_task_data(n=3000, seed=3):
    rng = np.random.default_rng(seed)
    labels = np.stack([(rng.random(n) < 0.2), (rng.random(n) < 0.05)], 1).astype(float)
    scores = {"click": np.clip(0.2 + 0.2 * (labels[:, 0] - 0.2) + 0.1 * rng.random(n), 0, 1),
              "convert": rng.random(n) * 0.1}
    groups = rng.integers(0, 100, size=n)
    return scores, labels, groups


def test_evaluate_reports_every_metric_per_task():
    scores, labels, groups = _two_task_data()
    results = evaluate(scores, labels, ["click", "convert"], groups=groups)
    assert set(results) == {"click", "convert"}
    for column, task in enumerate(["click", "convert"]):
        metrics = results[task]
        assert set(metrics) == {"auc", "gauc", "logloss", "ne", "calibration", "ece",
                                "positive_rate", "count"}
        y = labels[:, column]
        assert metrics["auc"] == auc(scores[task], y)
        assert metrics["gauc"] == gauc(scores[task], y, groups)
        assert metrics["logloss"] == logloss(scores[task], y)
        assert metrics["ne"] == normalized_entropy(scores[task], y)
        assert metrics["calibration"] == calibration(scores[task], y)
        assert metrics["ece"] == calibration_error(scores[task], y)
        assert metrics["positive_rate"] == pytest.approx(y.mean())
        assert metrics["count"] == len(y)
    assert "gauc" not in evaluate(scores, labels, ["click", "convert"])["click"]


def test_evaluate_errors_name_the_task():
    scores, labels, _ = _two_task_data()
    with pytest.raises(ValueError, match="no entry for task 'convert'"):
        evaluate({"click": scores["click"]}, labels, ["click", "convert"])
    with pytest.raises(ValueError, match=r"labels must be \(N, T=3\)"):
        evaluate(scores, labels, ["click", "convert", "like"])
    bad = dict(scores, convert=scores["convert"] + 2)
    with pytest.raises(ValueError, match="task 'convert': scores must be probabilities"):
        evaluate(bad, labels, ["click", "convert"])


# ------------------------------------------------------------------------------ accumulator

def test_accumulator_equals_evaluate_on_the_concatenation():
    scores, labels, groups = _two_task_data()
    tasks = ["click", "convert"]
    accumulator = MetricAccumulator(tasks)
    for start in range(0, len(labels), 512):
        rows = slice(start, start + 512)
        accumulator.update({task: torch.from_numpy(scores[task][rows]).float() for task in tasks},
                           torch.from_numpy(labels[rows]).float(), torch.from_numpy(groups[rows]))
    assert len(accumulator) == len(labels)
    expected = evaluate({t: scores[t].astype(np.float32) for t in tasks}, labels, tasks,
                        groups=groups)
    result = accumulator.compute()
    for task in tasks:
        for name, value in expected[task].items():
            assert result[task][name] == pytest.approx(value, rel=1e-12)
    accumulator.reset()
    assert len(accumulator) == 0
    empty = accumulator.compute()
    assert math.isnan(empty["click"]["auc"]) and empty["click"]["count"] == 0


def test_accumulator_from_logits():
    logits = torch.tensor([-800.0, -2.0, 0.0, 3.0, 800.0])
    labels = torch.tensor([[0.0], [0.0], [1.0], [1.0], [1.0]])
    accumulator = MetricAccumulator(["click"], from_logits=True)
    accumulator.update({"click": logits}, labels)
    probabilities = torch.sigmoid(logits.double()).numpy()
    assert accumulator.compute()["click"]["logloss"] == pytest.approx(
        logloss(probabilities, labels[:, 0]), rel=1e-12)


def test_accumulator_inconsistent_batches():
    accumulator = MetricAccumulator(["click"])
    accumulator.update({"click": torch.rand(4)}, torch.ones(4, 1), groups=torch.arange(4))
    with pytest.raises(ValueError, match="groups must be given with every batch or with none"):
        accumulator.update({"click": torch.rand(4)}, torch.ones(4, 1))
    with pytest.raises(ValueError, match="3 scores for 4 label rows"):
        accumulator.update({"click": torch.rand(3)}, torch.ones(4, 1), groups=torch.arange(4))
    with pytest.raises(ValueError, match="no entry for task 'click'"):
        accumulator.update({}, torch.ones(4, 1), groups=torch.arange(4))


# ------------------------------------------------------------------------------ streaming

def _ctr_data(n, seed, groups=None):
    """Logits ~ N(−2.5, 1.5²), labels ~ Bernoulli(σ(logit)): CTR ≈ 0.14, like a click model."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-2.5, 1.5, n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(float)
    return rng, logits, labels


def _uneven_chunks(rng, n, largest=7000):
    """Row slices of irregular sizes (some empty, some single rows) covering range(n)."""
    start = 0
    while start < n:
        size = int(rng.choice([0, 1, rng.integers(2, 50), rng.integers(50, largest)]))
        yield slice(start, min(n, start + size))
        start += size


def _sigmoid(logits):
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # as the accumulator's from_logits


@pytest.mark.parametrize("from_logits, weighted", [(True, False), (False, True)])
def test_binned_auc_within_the_reported_bound(from_logits, weighted):
    n = 250_000
    rng, logits, labels = _ctr_data(n, seed=10)
    scores = logits if from_logits else _sigmoid(logits)
    weight = rng.exponential(size=n) if weighted else None
    accumulator = MetricAccumulator(["click"], from_logits=from_logits, exact_max_rows=30_000)
    coarse = MetricAccumulator(["click"], from_logits=from_logits, exact_max_rows=0, auc_bins=64)
    for rows in _uneven_chunks(rng, n):
        batch_weight = None if weight is None else weight[rows]
        for acc in (accumulator, coarse):
            acc.update({"click": scores[rows]}, labels[rows], weight=batch_weight)
    assert not accumulator.exact and len(accumulator) == n
    exact = auc(_sigmoid(logits), labels, weight)
    result = accumulator.compute()["click"]
    assert 0 < result["auc_error_bound"] <= 1e-4  # the default bins on CTR-like data
    assert abs(result["auc"] - exact) <= result["auc_error_bound"]
    # Few bins: a much looser bound, still honoured.
    rough = coarse.compute()["click"]
    assert result["auc_error_bound"] < rough["auc_error_bound"] < 0.05
    assert abs(rough["auc"] - exact) <= rough["auc_error_bound"]


def test_fold_into_histograms_keeps_every_row():
    # Binned from the first row, or exact for 40k rows and then folded: the same histograms.
    n = 100_000
    rng, logits, labels = _ctr_data(n, seed=11)
    folded = MetricAccumulator(["click"], from_logits=True, exact_max_rows=40_000)
    binned = MetricAccumulator(["click"], from_logits=True, exact_max_rows=0)
    for rows in _uneven_chunks(rng, n):
        was_exact = folded.exact
        for acc in (folded, binned):
            acc.update({"click": logits[rows]}, labels[rows])
        if was_exact and not folded.exact:
            assert len(folded) > 40_000 >= len(folded) - (rows.stop - rows.start)
    a, b = folded.compute()["click"], binned.compute()["click"]
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-14)
    assert a["auc_error_bound"] == pytest.approx(b["auc_error_bound"], abs=1e-15)
    assert folded.buffered_rows == 0  # no groups: nothing kept past the fold


def test_histogram_auc_by_hand():
    # One bin: every pair ties, AUC ½ with bound ½. Logits in distinct bins: exact.
    accumulator = MetricAccumulator(["click"], from_logits=True, exact_max_rows=0, auc_bins=1)
    accumulator.update({"click": torch.tensor([-3.0, 0.0, 2.0])}, torch.tensor([0.0, 1.0, 1.0]))
    result = accumulator.compute()["click"]
    assert result["auc"] == 0.5 and result["auc_error_bound"] == 0.5
    accumulator = MetricAccumulator(["click"], from_logits=True, exact_max_rows=0)
    accumulator.update({"click": torch.tensor([-3.0, 0.0, 2.0, -99.0])},
                       torch.tensor([0.0, 1.0, 0.0, 1.0]))
    result = accumulator.compute()["click"]
    # positives 0, −99 (clamped to −16); negatives −3, 2: only (0, −3) is ordered right
    assert result["auc"] == pytest.approx(0.25) and result["auc_error_bound"] == 0.0
    one_class = MetricAccumulator(["click"], exact_max_rows=0)
    one_class.update({"click": torch.tensor([0.2, 0.3])}, torch.tensor([0.0, 0.0]))
    assert math.isnan(one_class.compute()["click"]["auc"])


@pytest.mark.parametrize("exact_max_rows", [0, 10**9])
def test_streaming_probability_metrics_equal_the_exact_ones(exact_max_rows):
    n = 120_000
    rng = np.random.default_rng(12)
    tasks = ["click", "convert"]
    logits = np.stack([rng.normal(-2.5, 1.5, n), rng.normal(-4.0, 2.0, n)], 1)
    logits[rng.random((n, 2)) < 0.001] *= 40  # some probabilities at (or rounded to) 0 and 1
    labels = (rng.random((n, 2)) < _sigmoid(logits)).astype(float)
    weight = rng.exponential(size=n) * (rng.random(n) < 0.9)  # some zero weights
    accumulator = MetricAccumulator(tasks, from_logits=True, exact_max_rows=exact_max_rows)
    chunks = 0
    for rows in _uneven_chunks(rng, n, largest=3000):
        accumulator.update({task: torch.from_numpy(logits[rows, k]) for k, task in
                            enumerate(tasks)}, labels[rows], weight=weight[rows])
        chunks += 1
    assert chunks > 100 and accumulator.exact == bool(exact_max_rows)
    result = accumulator.compute()
    for k, task in enumerate(tasks):
        p, y = _sigmoid(logits[:, k]), labels[:, k]
        expected = {"logloss": logloss(p, y, weight), "ne": normalized_entropy(p, y, weight),
                    "calibration": calibration(p, y, weight),
                    "ece": calibration_error(p, y, weight),
                    "positive_rate": np.dot(weight, y) / weight.sum()}
        for name, value in expected.items():
            assert result[task][name] == pytest.approx(value, rel=1e-12, abs=0), name
        assert result[task]["count"] == n


def test_accumulator_below_the_bound_is_exactly_evaluate():
    scores, labels, groups = _two_task_data()
    weight = np.random.default_rng(13).random(len(labels))
    accumulator = MetricAccumulator(["click", "convert"])
    for start in range(0, len(labels), 700):
        rows = slice(start, start + 700)
        accumulator.update({t: s[rows] for t, s in scores.items()}, labels[rows], groups[rows],
                           weight[rows])
    assert accumulator.exact and accumulator.buffered_rows == len(labels)
    expected = evaluate(scores, labels, ["click", "convert"], groups=groups, weight=weight)
    result = accumulator.compute()
    for task in expected:
        assert result[task]["auc"] == expected[task]["auc"]
        assert result[task]["gauc"] == expected[task]["gauc"]
        assert result[task]["auc_error_bound"] == 0.0
        assert result[task]["gauc_groups"] == len(
            {g for g in np.unique(groups)
             if 0 < labels[groups == g, ["click", "convert"].index(task)].sum()
             < (groups == g).sum()})


def test_memory_stays_bounded():
    rng = np.random.default_rng(14)
    exact_max_rows, gauc_max_rows = 3_000, 2_000
    accumulator = MetricAccumulator(["click", "convert"], from_logits=True,
                                    exact_max_rows=exact_max_rows,
                                    gauc_max_rows=gauc_max_rows, auc_bins=1024)
    no_groups = MetricAccumulator(["click"], exact_max_rows=exact_max_rows)
    most = 0
    for _ in range(400):
        batch = int(rng.integers(1, 1500))
        logits = torch.randn(batch, 2) - 2
        accumulator.update({"click": logits[:, 0], "convert": logits[:, 1]},
                           torch.rand(batch, 2) < 0.2,
                           groups=torch.from_numpy(rng.integers(0, 50_000, batch)))
        no_groups.update({"click": torch.rand(batch)}, torch.rand(batch) < 0.2)
        most = max(most, accumulator.buffered_rows)
        assert accumulator.buffered_rows <= max(exact_max_rows, 2 * gauc_max_rows)
        assert accumulator.buffered_rows == sum(  # the count it reports is what it holds
            chunk.shape[0] for chunk in accumulator._columns.get("labels", []))
        assert no_groups.exact or no_groups.buffered_rows == 0
    assert len(accumulator) > 100 * gauc_max_rows and most > gauc_max_rows
    assert all(h.shape == (1024, 2) for h in accumulator._histograms.values())
    result = accumulator.compute()["click"]
    # ~6 impressions per group: ~330 groups in the sample, most with both classes
    assert 100 < result["gauc_groups"] <= gauc_max_rows / 2
    accumulator.reset()
    assert accumulator.exact and accumulator.buffered_rows == 0 and len(accumulator) == 0


def _grouped_data(n_groups, seed):
    """Users with 2 to ~60 impressions, a per-user offset, CTR ≈ 0.15: per-group AUCs vary."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 8, n_groups) * rng.integers(1, 9, n_groups)
    groups = np.repeat(rng.choice(10**9, n_groups, replace=False), sizes)  # scattered ids
    n = groups.shape[0]
    user_offset = np.repeat(rng.normal(0, 1, n_groups), sizes)
    logits = rng.normal(-2.0, 1.0, n) + user_offset
    labels = (rng.random(n) < _sigmoid(logits + rng.normal(0, 1.0, n))).astype(float)
    order = rng.permutation(n)  # a user's impressions spread over batches
    return rng, groups[order], logits[order], labels[order]


def test_sampled_gauc_is_exact_on_the_bottom_k_groups_and_close_to_the_full_gauc():
    rng, groups, logits, labels = _grouped_data(n_groups=40_000, seed=15)
    n, gauc_max_rows = groups.shape[0], 80_000  # ~1/10 of the rows
    accumulator = MetricAccumulator(["click"], from_logits=True, exact_max_rows=50_000,
                                    gauc_max_rows=gauc_max_rows)
    for rows in _uneven_chunks(rng, n, largest=20_000):
        accumulator.update({"click": logits[rows]}, labels[rows], groups=groups[rows])
    result = accumulator.compute()["click"]
    p = _sigmoid(logits)

    # The sample: the smallest hashes whose groups hold at most gauc_max_rows rows.
    hashes = metrics_module._group_hash(groups)
    unique_hashes, sizes = np.unique(hashes, return_counts=True)
    kept = unique_hashes[:np.searchsorted(np.cumsum(sizes), gauc_max_rows, side="right")]
    in_sample = np.isin(hashes, kept)
    assert gauc_max_rows - sizes.max() < in_sample.sum() <= gauc_max_rows
    assert result["gauc"] == pytest.approx(gauc(p[in_sample], labels[in_sample],
                                                groups[in_sample]), abs=1e-12)

    # Close to the full gAUC: within 4 standard errors of the ratio estimator under simple
    # random sampling of k of the G valid groups, SE² = (1 − k/G)/k · Var(n_g (a_g − R)) / n̄².
    codes = np.unique(groups, return_inverse=True)[1]
    group_auc, _, _, impressions = metrics_module._grouped_auc(p, labels, np.ones(n), codes)
    valid = ~np.isnan(group_auc)
    a_g, n_g = group_auc[valid], impressions[valid]
    full = gauc(p, labels, groups)
    k, total_groups = result["gauc_groups"], valid.sum()
    assert 0.05 * total_groups < k < 0.2 * total_groups
    se = math.sqrt((1 - k / total_groups) / k * np.var(n_g * (a_g - full))) / n_g.mean()
    assert se < 0.01  # the test means something
    assert abs(result["gauc"] - full) <= 4 * se

    # The sample is fixed by the data: another batching and row order, the same estimate.
    order = rng.permutation(n)
    logits, labels, groups = logits[order], labels[order], groups[order]
    again = MetricAccumulator(["click"], from_logits=True, exact_max_rows=0,
                              gauc_max_rows=gauc_max_rows)
    for rows in _uneven_chunks(rng, n, largest=3_000):
        again.update({"click": logits[rows]}, labels[rows], groups=groups[rows])
    assert again.compute()["click"]["gauc"] == pytest.approx(result["gauc"], abs=1e-12)


def test_gauc_is_exact_under_its_bound():
    rng, groups, logits, labels = _grouped_data(n_groups=3_000, seed=16)
    n = groups.shape[0]
    names = np.array([f"user{g}" for g in groups])  # strings: batches have other widths
    accumulator = MetricAccumulator(["click"], from_logits=True, exact_max_rows=5_000,
                                    gauc_max_rows=n)
    for rows in _uneven_chunks(rng, n, largest=4_000):
        accumulator.update({"click": logits[rows]}, labels[rows], groups=names[rows])
    assert not accumulator.exact
    result = accumulator.compute()["click"]
    assert result["gauc"] == gauc(_sigmoid(logits), labels, names)


def test_group_hash_is_fixed_by_the_id():
    names = np.array(["a", "user12", "user1", "", "ü"])
    hashes = metrics_module._group_hash(names)
    for k, name in enumerate(names):
        assert metrics_module._group_hash(np.array([name]))[0] == hashes[k]
        assert metrics_module._group_hash(np.array([name, "x" * 30]))[0] == hashes[k]
    assert len(set(hashes.tolist())) == len(names)
    assert metrics_module._group_hash(np.array(["ab"], dtype="S"))[0] != hashes[0]
    ints = metrics_module._group_hash(np.arange(5))
    assert np.array_equal(ints, metrics_module._group_hash(torch.arange(5).numpy()))
    assert np.array_equal(ints, metrics_module._group_hash(np.arange(5, dtype=np.int32)))
    # a fixed function, not salted per process
    assert int(metrics_module._group_hash(np.array([0]))[0]) == 0xE220A8397B1DCDAF
    assert np.array_equal(metrics_module._group_hash(np.array([0.0])),
                          metrics_module._group_hash(np.array([-0.0])))


@pytest.mark.parametrize("argument, value", [
    ("exact_max_rows", -1), ("exact_max_rows", 2.5), ("exact_max_rows", True),
    ("auc_bins", 0), ("auc_bins", "65536"), ("gauc_max_rows", 0), ("gauc_max_rows", None),
])
def test_accumulator_bad_bounds(argument, value):
    with pytest.raises(ValueError, match=f"{argument} must be an integer"):
        MetricAccumulator(["click"], **{argument: value})


def test_accumulator_checks_values_at_update():
    accumulator = MetricAccumulator(["click", "convert"], exact_max_rows=0)
    good = {"click": torch.rand(3), "convert": torch.rand(3)}
    accumulator.update(good, torch.zeros(3, 2), groups=torch.arange(3), weight=torch.ones(3))
    before = accumulator.compute()
    with pytest.raises(ValueError, match="task 'convert': scores must be probabilities"):
        accumulator.update(dict(good, convert=torch.rand(3) + 1), torch.zeros(3, 2),
                           groups=torch.arange(3), weight=torch.ones(3))
    with pytest.raises(ValueError, match="task 'click': labels must be 0 or 1"):
        accumulator.update(good, torch.full((3, 2), 0.5), groups=torch.arange(3),
                           weight=torch.ones(3))
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        accumulator.update(good, torch.zeros(3, 2), groups=torch.arange(3),
                           weight=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="groups must not be NaN"):
        accumulator.update(good, torch.zeros(3, 2), groups=torch.tensor([1.0, math.nan, 2.0]),
                           weight=torch.ones(3))
    with pytest.raises(ValueError, match="weight must be given with every batch"):
        accumulator.update(good, torch.zeros(3, 2), groups=torch.arange(3))
    assert len(accumulator) == 3  # a rejected batch changes nothing
    after = accumulator.compute()
    assert after["click"]["count"] == before["click"]["count"] == 3
    assert after["click"]["logloss"] == before["click"]["logloss"]
