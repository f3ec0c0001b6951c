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
