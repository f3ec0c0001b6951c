r"""Evaluation metrics for click models: AUC, gAUC, logloss, NE, calibration, ECE.

Design section 3.7. Everything is vectorised numpy with float64 accumulation; torch tensors are
accepted anywhere (detached and copied to the host). ``scores`` are predicted probabilities in
[0, 1] for the probability metrics; AUC and gAUC only use their order, so any real scores do.
Labels are in {0, 1}; optional sample weights w >= 0 (all ones when absent). P and N are the
positives and negatives, W_P and W_N their total weights.

AUC (Mann–Whitney, ties counted one half):

    AUC = Σ_{i∈P} Σ_{j∈N} w_i w_j · (1[s_i > s_j] + ½·1[s_i = s_j]) / (W_P · W_N)

computed exactly in O(n log n): sort the scores once, and for each run r of equal scores
(weights W_P,r and W_N,r) add W_P,r · (W_N below r + ½·W_N,r). This is the average-rank form
(Σ ranks of positives − |P|(|P|+1)/2) / (|P|·|N|) when w = 1. NaN when a class is missing.

gAUC (design 3.7): the impression-weighted mean of per-group AUC over the groups (users) that
have both classes; a group's weight is its number of impressions n_g = |P_g| + |N_g|:

    gAUC = Σ_{g valid} n_g · AUC_g / Σ_{g valid} n_g

Groups with only one class are left out of both sums. One lexicographic sort by (group, score)
gives every group's runs at once; there is no Python loop over groups. NaN when no group is valid.

Logloss:  −Σ_i w_i [y_i log p_i + (1−y_i) log(1−p_i)] / Σ_i w_i, p clipped to [1e-15, 1 − 1e-15]
(so a confident wrong 0 or 1 costs about 34.5 instead of infinity).
NE (normalised entropy, He et al. 2014):  logloss / H(ȳ), H(q) = −q log q − (1−q) log(1−q), with
ȳ = Σ w y / Σ w the evaluation set's own base rate, so the constant predictor p = ȳ scores exactly
1 and lower is better. NaN when the set has one class (H = 0).
Calibration:  Σ_i w_i p_i / Σ_i w_i y_i (1 is calibrated on average; NaN with no positive).
ECE (expected calibration error): n_bins equal-width bins of p on [0, 1] (p = 1 in the last),
ECE = Σ_b (W_b / W) · |mean_b p − mean_b y| with weighted means.

Empty input gives NaN for every metric. Bad input (shape mismatch, labels outside {0, 1} or
NaN, NaN scores, probabilities outside [0, 1], negative or non-finite weights) raises ValueError
naming the argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["METRIC_NAMES", "MetricAccumulator", "auc", "calibration", "calibration_error",
           "evaluate", "gauc", "logloss", "normalized_entropy"]

PROBABILITY_CLIP = 1e-15
DEFAULT_BINS = 10
METRIC_NAMES = ("auc", "gauc", "logloss", "ne", "calibration", "ece", "positive_rate", "count")


# --------------------------------------------------------------------------------------------
# Input conversion and checks.


def _as_array(values, name: str, dtype=np.float64) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.is_floating_point() and values.dtype not in (torch.float32, torch.float64):
            values = values.float()  # numpy has no bfloat16
        values = values.cpu().numpy()
    array = np.asarray(values)
    if dtype is not None:
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
        array = array.astype(dtype, copy=False)
    return array


def _check_1d(array: np.ndarray, name: str, length: int | None = None) -> None:
    if array.ndim != 1:
        raise ValueError(f"{name} must be (N,), got shape {array.shape}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} must have N={length} entries like scores, got {array.shape[0]}")


def _prepare(scores, labels, weight, *, probabilities: bool):
    """float64 (N,) scores, labels, weights (ones when absent), validated."""
    scores = _as_array(scores, "scores")
    _check_1d(scores, "scores")
    labels = _as_array(labels, "labels")
    _check_1d(labels, "labels", scores.shape[0])
    if np.isnan(scores).any():
        raise ValueError(f"scores must not be NaN, found NaN at index "
                         f"{np.flatnonzero(np.isnan(scores))[0]}")
    if probabilities and ((scores < 0) | (scores > 1)).any():
        bad = np.flatnonzero((scores < 0) | (scores > 1))[0]
        raise ValueError(f"scores must be probabilities in [0, 1], found {scores[bad]} at "
                         f"index {bad}")
    bad_labels = (labels != 0) & (labels != 1)  # NaN is neither
    if bad_labels.any():
        bad = np.flatnonzero(bad_labels)[0]
        raise ValueError(f"labels must be 0 or 1, found {labels[bad]} at index {bad}")
    if weight is None:
        weight = np.ones_like(scores)
    else:
        weight = _as_array(weight, "weight")
        _check_1d(weight, "weight", scores.shape[0])
        bad_weight = ~np.isfinite(weight) | (weight < 0)
        if bad_weight.any():
            bad = np.flatnonzero(bad_weight)[0]
            raise ValueError(f"weight must be finite and >= 0, found {weight[bad]} at index {bad}")
    return scores, labels, weight


def _group_codes(groups, length: int) -> np.ndarray:
    """Group ids of any sortable kind -> int64 codes (N,)."""
    groups = _as_array(groups, "groups", dtype=None)
    _check_1d(groups, "groups", length)
    if groups.dtype.kind in "iub":
        return groups.astype(np.int64, copy=False)
    if groups.dtype.kind == "f" and np.isnan(groups).any():
        raise ValueError("groups must not be NaN")
    return np.unique(groups, return_inverse=True)[1].reshape(-1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# AUC per group: the one implementation behind auc and gauc.


def _grouped_auc(scores, labels, weight, group_codes):
    """Per-group (AUC, W_P, W_N, impressions), AUC NaN where a class is missing.

    Sort by (group, score); runs of equal (group, score) are the ties. In each group the run r
    contributes W_P,r · (W_N of the group's earlier runs + ½·W_N,r).
    """
    order = np.lexsort((scores, group_codes))  # by group, then by score
    sorted_scores, sorted_groups = scores[order], group_codes[order]
    positive_weight = (weight * labels)[order]
    negative_weight = (weight * (1.0 - labels))[order]

    new_run = np.empty(scores.shape[0], dtype=bool)
    new_run[:1] = True
    new_run[1:] = ((sorted_scores[1:] != sorted_scores[:-1])
                   | (sorted_groups[1:] != sorted_groups[:-1]))
    run_start = np.flatnonzero(new_run)  # (R,)
    run_positive = np.add.reduceat(positive_weight, run_start)  # (R,)
    run_negative = np.add.reduceat(negative_weight, run_start)  # (R,)
    run_group = sorted_groups[run_start]  # (R,)

    new_group = np.empty(run_start.shape[0], dtype=bool)
    new_group[:1] = True
    new_group[1:] = run_group[1:] != run_group[:-1]
    group_start = np.flatnonzero(new_group)  # (G,) first run of each group
    # Negative weight strictly below each run, within its group: a global exclusive cumsum
    # minus its value at the group's first run.
    negative_before = np.cumsum(run_negative) - run_negative  # (R,)
    runs_per_group = np.diff(np.append(group_start, run_start.shape[0]))
    negative_before -= np.repeat(negative_before[group_start], runs_per_group)

    numerator = np.add.reduceat(run_positive * (negative_before + 0.5 * run_negative), group_start)
    group_positive = np.add.reduceat(run_positive, group_start)  # (G,)
    group_negative = np.add.reduceat(run_negative, group_start)  # (G,)
    group_impressions = np.diff(np.append(run_start[group_start], scores.shape[0]))  # (G,)
    denominator = group_positive * group_negative
    with np.errstate(invalid="ignore", divide="ignore"):
        group_auc = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1),
                             np.nan)
    return group_auc, group_positive, group_negative, group_impressions


def _auc(scores, labels, weight) -> float:
    if scores.shape[0] == 0:
        return float("nan")
    single_group = np.zeros(scores.shape[0], dtype=np.int64)
    return float(_grouped_auc(scores, labels, weight, single_group)[0][0])


def _gauc(scores, labels, group_codes) -> float:
    if scores.shape[0] == 0:
        return float("nan")
    # Every impression counts once: per-group AUC is unweighted, groups weigh by impressions.
    group_auc, _, _, impressions = _grouped_auc(scores, labels, np.ones_like(scores), group_codes)
    valid = ~np.isnan(group_auc)
    if not valid.any():
        return float("nan")
    return float(np.dot(impressions[valid], group_auc[valid]) / impressions[valid].sum())


def auc(scores, labels, weight=None) -> float:
    """Exact (weighted) ROC AUC with ties counted one half; NaN when a class is missing.

    scores: (N,) any real numbers (only the order counts).  labels: (N,) in {0, 1}.
    weight: optional (N,) sample weights >= 0 (pair weight w_i·w_j).
    """
    return _auc(*_prepare(scores, labels, weight, probabilities=False))


def gauc(scores, labels, groups) -> float:
    """Impression-weighted mean of per-group AUC over groups having both classes.

    groups: (N,) group ids (e.g. user ids) of any sortable type. A group's weight is its number
    of impressions; groups with one class are skipped; NaN when none has both classes.
    """
    scores, labels, _ = _prepare(scores, labels, None, probabilities=False)
    return _gauc(scores, labels, _group_codes(groups, scores.shape[0]))


# --------------------------------------------------------------------------------------------
# Probability metrics.


def _entropy(rate: float) -> float:
    if not 0.0 < rate < 1.0:
        return 0.0
    return float(-rate * np.log(rate) - (1.0 - rate) * np.log1p(-rate))


def _logloss(scores, labels, weight) -> float:
    total_weight = weight.sum()
    if total_weight <= 0:
        return float("nan")
    p = np.clip(scores, PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    per_sample = -(labels * np.log(p) + (1.0 - labels) * np.log1p(-p))
    return float(np.dot(weight, per_sample) / total_weight)


def logloss(scores, labels, weight=None) -> float:
    """Weighted mean binary cross-entropy of probabilities (clipped to [1e-15, 1 − 1e-15])."""
    return _logloss(*_prepare(scores, labels, weight, probabilities=True))


def _normalized_entropy(scores, labels, weight) -> float:
    total_weight = weight.sum()
    if total_weight <= 0:
        return float("nan")
    base_entropy = _entropy(float(np.dot(weight, labels) / total_weight))
    return _logloss(scores, labels, weight) / base_entropy if base_entropy > 0 else float("nan")


def normalized_entropy(scores, labels, weight=None) -> float:
    """NE = logloss / H(base rate of these labels); 1 for the base-rate predictor, NaN with
    one class."""
    return _normalized_entropy(*_prepare(scores, labels, weight, probabilities=True))


def _calibration(scores, labels, weight) -> float:
    actual = np.dot(weight, labels)
    return float(np.dot(weight, scores) / actual) if actual > 0 else float("nan")


def calibration(scores, labels, weight=None) -> float:
    """Σ w·p / Σ w·y: predicted over actual positives (1 = calibrated); NaN with no positive."""
    return _calibration(*_prepare(scores, labels, weight, probabilities=True))


def _calibration_error(scores, labels, weight, n_bins: int) -> float:
    total_weight = weight.sum()
    if total_weight <= 0:
        return float("nan")
    bins = np.minimum((scores * n_bins).astype(np.int64), n_bins - 1)  # p = 1 -> last bin
    bin_weight = np.bincount(bins, weights=weight, minlength=n_bins)
    bin_predicted = np.bincount(bins, weights=weight * scores, minlength=n_bins)
    bin_actual = np.bincount(bins, weights=weight * labels, minlength=n_bins)
    # Σ_b (W_b/W)|Σ_b wp/W_b − Σ_b wy/W_b| = Σ_b |Σ_b wp − Σ_b wy| / W; empty bins add 0.
    return float(np.abs(bin_predicted - bin_actual).sum() / bin_weight.sum())


def calibration_error(scores, labels, weight=None, n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error over n_bins equal-width probability bins."""
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins}")
    return _calibration_error(*_prepare(scores, labels, weight, probabilities=True), int(n_bins))


# --------------------------------------------------------------------------------------------
# All metrics of several tasks.


def _task_metrics(scores, labels, weight, codes) -> dict[str, float]:
    total_weight = weight.sum()
    metrics = {
        "auc": _auc(scores, labels, weight),
        "logloss": _logloss(scores, labels, weight),
        "ne": _normalized_entropy(scores, labels, weight),
        "calibration": _calibration(scores, labels, weight),
        "ece": _calibration_error(scores, labels, weight, DEFAULT_BINS),
        "positive_rate": float(np.dot(weight, labels) / total_weight) if total_weight > 0
        else float("nan"),
        "count": scores.shape[0],
    }
    if codes is not None:
        metrics["gauc"] = _gauc(scores, labels, codes)
    return metrics


def evaluate(scores_by_task: Mapping[str, object], labels, tasks: Sequence[str],
             groups=None, weight=None) -> dict[str, dict[str, float]]:
    """Every metric of every task.

    Args:
        scores_by_task: task -> (N,) predicted probabilities.
        labels: (N, T) in {0, 1}, column k for tasks[k] (or (N,) when T = 1).
        tasks: the task names, in label-column order.
        groups: optional (N,) group ids; adds "gauc" (unweighted impressions).
        weight: optional (N,) sample weights for every metric but gAUC.

    Returns {task: {"auc", "logloss", "ne", "calibration", "ece", "positive_rate", "count"
    [, "gauc"]}}.
    """
    tasks = list(tasks)
    label_matrix = _as_array(labels, "labels")
    if label_matrix.ndim == 1 and len(tasks) == 1:
        label_matrix = label_matrix[:, None]
    if label_matrix.ndim != 2 or label_matrix.shape[1] != len(tasks):
        raise ValueError(f"labels must be (N, T={len(tasks)}) for tasks {tasks}, got shape "
                         f"{label_matrix.shape}")
    for task in tasks:
        if task not in scores_by_task:
            raise ValueError(f"scores_by_task has no entry for task {task!r}")
    codes = None if groups is None else _group_codes(groups, label_matrix.shape[0])
    results = {}
    for column, task in enumerate(tasks):
        try:
            prepared = _prepare(scores_by_task[task], label_matrix[:, column], weight,
                                probabilities=True)
        except ValueError as error:
            raise ValueError(f"task {task!r}: {error}") from None
        results[task] = _task_metrics(*prepared, codes)
    return results


class MetricAccumulator:
    """Collects per-batch scores, labels and groups (tensors -> float64 numpy), then evaluates.

    Args:
        tasks: task names in label-column order.
        from_logits: scores passed to :meth:`update` are logits; they are turned into
            probabilities in float64 (more precise than a float32 sigmoid near 0 and 1).

    update(scores_by_task, labels (B, T), groups=None, weight=None) after each batch;
    compute() -> :func:`evaluate` over everything so far; reset() empties it. Either every
    batch brings groups (weights) or none does.
    """

    def __init__(self, tasks: Sequence[str], from_logits: bool = False):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        self.from_logits = bool(from_logits)
        self.reset()

    def reset(self) -> None:
        self._scores: dict[str, list[np.ndarray]] = {task: [] for task in self.tasks}
        self._labels: list[np.ndarray] = []
        self._groups: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._has_groups: bool | None = None
        self._has_weights: bool | None = None

    def __len__(self) -> int:
        return sum(batch.shape[0] for batch in self._labels)

    def _consistent(self, flag_name: str, present: bool, argument: str) -> None:
        previous = getattr(self, flag_name)
        if previous is not None and previous != present:
            raise ValueError(f"{argument} must be given with every batch or with none "
                             f"(earlier batches {'had' if previous else 'lacked'} it)")
        setattr(self, flag_name, present)

    def update(self, scores_by_task: Mapping[str, object], labels, groups=None,
               weight=None) -> None:
        label_matrix = _as_array(labels, "labels")
        if label_matrix.ndim == 1 and len(self.tasks) == 1:
            label_matrix = label_matrix[:, None]
        if label_matrix.ndim != 2 or label_matrix.shape[1] != len(self.tasks):
            raise ValueError(f"labels must be (B, T={len(self.tasks)}), got shape "
                             f"{label_matrix.shape}")
        batch = label_matrix.shape[0]
        batch_scores = {}
        for task in self.tasks:
            if task not in scores_by_task:
                raise ValueError(f"scores_by_task has no entry for task {task!r}")
            scores = _as_array(scores_by_task[task], f"scores_by_task[{task!r}]").reshape(-1)
            if scores.shape[0] != batch:
                raise ValueError(f"scores_by_task[{task!r}] has {scores.shape[0]} scores for "
                                 f"{batch} label rows")
            if self.from_logits:
                scores = 0.5 * (1.0 + np.tanh(0.5 * scores))  # σ, overflow-free
            batch_scores[task] = scores
        self._consistent("_has_groups", groups is not None, "groups")
        self._consistent("_has_weights", weight is not None, "weight")
        if groups is not None:
            group_array = _as_array(groups, "groups", dtype=None).reshape(-1)
            if group_array.shape[0] != batch:
                raise ValueError(f"groups has {group_array.shape[0]} entries for {batch} rows")
            self._groups.append(group_array)
        if weight is not None:
            weight_array = _as_array(weight, "weight").reshape(-1)
            if weight_array.shape[0] != batch:
                raise ValueError(f"weight has {weight_array.shape[0]} entries for {batch} rows")
            self._weights.append(weight_array)
        for task, scores in batch_scores.items():
            self._scores[task].append(scores)
        self._labels.append(label_matrix)

    def compute(self) -> dict[str, dict[str, float]]:
        width = len(self.tasks)
        labels = (np.concatenate(self._labels) if self._labels
                  else np.zeros((0, width), dtype=np.float64))
        scores = {task: np.concatenate(parts) if parts else np.zeros(0)
                  for task, parts in self._scores.items()}
        groups = np.concatenate(self._groups) if self._has_groups else None
        weight = np.concatenate(self._weights) if self._has_weights else None
        return evaluate(scores, labels, self.tasks, groups=groups, weight=weight)
