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

Streaming (MetricAccumulator), memory bounded independent of the rows seen:

* logloss, NE, calibration, positive_rate, count and ECE are exact at any size: each is a ratio
  of running float64 sums (W, Σ w y, Σ w·loss_i, Σ w p, and per ECE bin W_b, Σ_b w p, Σ_b w y),
  added chunk by chunk with Neumaier compensation, so they equal the functions above up to
  float64 rounding (~1e-12 relative or better; ECE, a sum of differences, loses the most)
  however many batches there are.
* AUC is exact while at most exact_max_rows (default 2,000,000) rows have been seen; the rows are
  kept and the formula above is applied at the end. Past that, every kept row is folded into
  per-task histograms (so no row is lost) and the rows are dropped. The histogram has B bins
  (default 65,536) uniform over the logit clamped to [−16, 16] (the raw logits with from_logits,
  else logit(p)), where click-model scores spread out instead of crowding near 0. With W_P,b and
  W_N,b the positive and negative weight of bin b, pairs in different bins are ordered by bin and
  pairs in one bin count ½:

      AUC_B = Σ_b W_P,b (W_N below b + ½·W_N,b) / (W_P · W_N)

  Each same-bin pair truly scores 0, ½ or 1, so |AUC_B − AUC| ≤ ½ Σ_b W_P,b W_N,b / (W_P W_N),
  which is computed exactly from the histograms and reported as "auc_error_bound" (0.0 while the
  AUC is exact). On 1M rows of logits ~ N(−2.5, 1.5²) with labels ~ Bernoulli(σ(logit)) (CTR
  ≈ 0.14) the bound is 3.4e-5 at the default bins (6.7e-5 at 32,768; it halves as B doubles).
  (With from_logits the bound is against the AUC of the logits; the exact path ranks float64
  σ(logit), which ties distinct logits only where σ rounds them to one probability.)
* gAUC samples groups: each group id gets a fixed 64-bit hash (splitmix64 of the integer or
  float bits, or of the characters of a string; no per-process salt), and the sample is the
  bottom-k of the hashes: the groups with the smallest hashes whose rows total at most
  gauc_max_rows (default 2,000,000); larger-hash groups are dropped one at a time while the rows
  exceed it. The hash makes the sample a uniform random sample of groups, fixed by the data
  (not the batching), and keeps every row of a sampled group, so each sampled AUC_g is exact.
  gAUC is then the formula above over the sampled groups: a ratio of two sample sums, a
  consistent estimate of the full gAUC (standard error about sd_g(n_g·(AUC_g − gAUC)) /
  (mean n_g · √k) over k sampled groups). With at most gauc_max_rows rows every group is in the
  sample and gAUC is exact. "gauc_groups" reports the groups with both classes that it used.
  Between updates the accumulator keeps at most max(exact_max_rows, 2·gauc_max_rows) rows (the
  factor 2 lets the sample be cut back rarely: O(log(rows / gauc_max_rows)) times), plus
  O(B · tasks) for the histograms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from hmoe.data.hashing import mix64

__all__ = ["METRIC_NAMES", "MetricAccumulator", "auc", "calibration", "calibration_error",
           "evaluate", "gauc", "logloss", "normalized_entropy"]

PROBABILITY_CLIP = 1e-15
DEFAULT_BINS = 10
DEFAULT_EXACT_MAX_ROWS = 2_000_000
DEFAULT_AUC_BINS = 65_536
DEFAULT_GAUC_MAX_ROWS = 2_000_000
LOGIT_RANGE = 16.0  # AUC histogram bins span logits [−16, 16]; σ(±16) is 1e-7 from 0 or 1
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


def _gauc_and_groups(scores, labels, group_codes) -> tuple[float, int]:
    """gAUC and the number of groups with both classes that it averages."""
    if scores.shape[0] == 0:
        return float("nan"), 0
    # Every impression counts once: per-group AUC is unweighted, groups weigh by impressions.
    group_auc, _, _, impressions = _grouped_auc(scores, labels, np.ones_like(scores), group_codes)
    valid = ~np.isnan(group_auc)
    if not valid.any():
        return float("nan"), 0
    return (float(np.dot(impressions[valid], group_auc[valid]) / impressions[valid].sum()),
            int(valid.sum()))


def _gauc(scores, labels, group_codes) -> float:
    return _gauc_and_groups(scores, labels, group_codes)[0]


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


# --------------------------------------------------------------------------------------------
# Streaming pieces: compensated sums, histogram AUC, group hashes and the bottom-k sample.


class _RunningSum:
    """float64 running totals with Neumaier compensation: over 1e5+ chunk additions the rounding
    error stays at about one ulp of the total instead of growing with the number of chunks."""

    def __init__(self, shape):
        self._total = np.zeros(shape)
        self._error = np.zeros(shape)

    def add(self, values: np.ndarray) -> None:
        total = self._total + values
        # What the addition rounded away, computed exactly with the larger operand first.
        self._error += np.where(np.abs(self._total) >= np.abs(values),
                                (self._total - total) + values, (values - total) + self._total)
        self._total = total

    @property
    def value(self) -> np.ndarray:
        return self._total + self._error


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _logit_bins(logits: np.ndarray, n_bins: int) -> np.ndarray:
    """(N,) bin of each logit: n_bins uniform bins over [−16, 16], values outside clamped in."""
    clamped = np.clip(logits, -LOGIT_RANGE, LOGIT_RANGE)
    scaled = (clamped + LOGIT_RANGE) * (n_bins / (2 * LOGIT_RANGE))
    return np.minimum(scaled.astype(np.int64), n_bins - 1)  # logit 16 -> the last bin


def _histogram_auc(histogram: np.ndarray) -> tuple[float, float]:
    """(AUC_B, its error bound) from a (B, 2) histogram of negative and positive weight."""
    negative, positive = histogram[:, 0], histogram[:, 1]
    pairs = positive.sum() * negative.sum()
    if pairs <= 0:
        return float("nan"), float("nan")
    negative_below = np.cumsum(negative) - negative
    same_bin = np.dot(positive, negative)
    estimate = (np.dot(positive, negative_below) + 0.5 * same_bin) / pairs
    return float(estimate), float(0.5 * same_bin / pairs)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64: a fixed bijection of uint64 in which every output bit depends on every input
    bit, so consecutive ids get unrelated hashes (uniform enough for sampling)."""
    with np.errstate(over="ignore"):
        return mix64(x + _GOLDEN)


def _group_hash(groups: np.ndarray) -> np.ndarray:
    """(N,) uint64 hash of each group id; the same id gets the same hash in any batch or run."""
    kind = groups.dtype.kind
    if kind in "biu":
        return _mix64(groups.astype(np.int64).view(np.uint64))
    if kind == "f":
        if np.isnan(groups).any():
            raise ValueError("groups must not be NaN")
        return _mix64((groups.astype(np.float64) + 0.0).view(np.uint64))  # + 0.0: −0.0 -> 0.0
    if kind not in "US":
        groups = groups.astype(str)  # any other ids by their text
    groups = np.ascontiguousarray(groups)
    char_type = np.uint32 if groups.dtype.kind == "U" else np.uint8
    width = groups.dtype.itemsize // np.dtype(char_type).itemsize
    chars = groups.view(char_type).reshape(groups.shape[0], width)
    # numpy pads short strings with NULs to the array's width: hash only the first len(s)
    # characters so the hash does not depend on the width of the batch's array.
    lengths = np.char.str_len(groups)
    hashes = _mix64(lengths.astype(np.uint64))
    for column in range(width):
        hashes = np.where(column < lengths, _mix64(hashes ^ chars[:, column].astype(np.uint64)),
                          hashes)
    return hashes


def _bottom_k_limit(hashes: np.ndarray, max_rows: int):
    """The hash limit h* such that the groups with hash < h* are the smallest-hash groups whose
    rows total at most max_rows (larger-hash groups dropped one at a time); None when every
    group fits."""
    if hashes.shape[0] <= max_rows:
        return None
    unique, rows = np.unique(hashes, return_counts=True)  # ascending hash
    kept_groups = np.searchsorted(np.cumsum(rows), max_rows, side="right")
    return unique[kept_groups]  # the first dropped hash (kept_groups < len(unique) here)


# --------------------------------------------------------------------------------------------
# The streaming accumulator.


_GAUC_SLACK = 2  # the gAUC sample is cut back to gauc_max_rows rows when it passes twice that
# Late in a long run a batch adds only a few sampled rows: merge every _MERGE_CHUNKS trailing
# chunks so the number of small arrays (and their per-array overhead) stays small.
_MERGE_CHUNKS = 64
# Running sums per task: W, Σ w·y, Σ w·loss, Σ w·p.
_WEIGHT, _POSITIVE, _LOSS, _PREDICTED = range(4)


class MetricAccumulator:
    """Streams per-batch scores, labels and groups into every metric of :func:`evaluate`, in
    memory bounded independent of the number of rows (module docstring: "Streaming").

    Args:
        tasks: task names in label-column order.
        from_logits: scores passed to :meth:`update` are logits; they are turned into
            probabilities in float64 (more precise than a float32 sigmoid near 0 and 1).
        exact_max_rows: AUC is exact up to this many rows, then histogram-based.
        auc_bins: histogram bins over the logit for AUC past exact_max_rows.
        gauc_max_rows: gAUC is exact up to this many rows, then over a hash sample of groups
            with at most this many rows.

    update(scores_by_task, labels (B, T), groups=None, weight=None) after each batch (it checks
    the values at once: rows are not kept to be checked later); compute() -> {task: metrics}
    with the keys of :func:`evaluate` plus "auc_error_bound" (and "gauc_groups" with groups);
    reset() empties it. Either every batch brings groups (weights) or none does.
    """

    def __init__(self, tasks: Sequence[str], from_logits: bool = False, *,
                 exact_max_rows: int = DEFAULT_EXACT_MAX_ROWS,
                 auc_bins: int = DEFAULT_AUC_BINS,
                 gauc_max_rows: int = DEFAULT_GAUC_MAX_ROWS):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        self.from_logits = bool(from_logits)
        self.exact_max_rows = _check_count(exact_max_rows, "exact_max_rows", 0)
        self.auc_bins = _check_count(auc_bins, "auc_bins", 1)
        self.gauc_max_rows = _check_count(gauc_max_rows, "gauc_max_rows", 1)
        self.reset()

    def reset(self) -> None:
        self._count = 0
        self._sums = {task: _RunningSum(4) for task in self.tasks}
        self._ece = {task: _RunningSum((3, DEFAULT_BINS)) for task in self.tasks}  # W, wp, wy
        self._histograms: dict[str, np.ndarray] | None = None  # set when AUC turns binned
        # Kept rows, as chunks per column: ("scores", task) the scores as given, "labels" int8
        # (B, T), "weight" (exact phase only), "groups" the ids as given, "hash" their hashes.
        self._columns: dict[object, list[np.ndarray]] = {}
        self._buffered = 0  # rows in each column
        self._hash_limit = None  # keep only groups with hash < this (None: all)
        self._has_groups: bool | None = None
        self._has_weights: bool | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def exact(self) -> bool:
        """Whether AUC is still exact (at most exact_max_rows rows seen)."""
        return self._histograms is None

    @property
    def buffered_rows(self) -> int:
        """Rows held in memory now: at most max(exact_max_rows, 2·gauc_max_rows) between
        updates."""
        return self._buffered

    def _column(self, name) -> np.ndarray:
        chunks = self._columns[name]
        if len(chunks) > 1:
            chunks[:] = [np.concatenate(chunks)]  # once, so later calls don't copy again
        return chunks[0]

    def _append(self, columns: dict, keep) -> None:
        """Keep a batch's rows (those where keep is True; all when keep is None)."""
        for name, values in columns.items():
            chunks = self._columns.setdefault(name, [])
            # A copy of its own: a view would keep the caller's whole batch alive (a streamed
            # batch's columns are views of one buffer).
            chunks.append(np.array(values) if keep is None else values[keep])
            if len(chunks) >= 2 * _MERGE_CHUNKS:
                chunks[-_MERGE_CHUNKS:] = [np.concatenate(chunks[-_MERGE_CHUNKS:])]
        self._buffered += (columns["labels"].shape[0] if keep is None
                           else int(np.count_nonzero(keep)))

    def _keep_rows(self, mask: np.ndarray) -> None:
        for name in self._columns:
            self._columns[name] = [self._column(name)[mask]]
        self._buffered = int(np.count_nonzero(mask))

    def _probabilities(self, scores: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.tanh(0.5 * scores)) if self.from_logits else scores  # σ, no overflow

    def _histogram(self, scores, labels, weight) -> np.ndarray:
        """(auc_bins, 2) negative and positive weight per logit bin."""
        if self.from_logits:
            logits = scores
        else:
            with np.errstate(divide="ignore"):  # p = 0 or 1: ∓inf, clamped into the end bins
                logits = np.log(scores) - np.log1p(-scores)
        index = 2 * _logit_bins(logits, self.auc_bins) + labels.astype(np.int64)
        return np.bincount(index, weights=weight, minlength=2 * self.auc_bins).reshape(-1, 2)

    def _consistent(self, flag_name: str, present: bool, argument: str) -> None:
        previous = getattr(self, flag_name)
        if previous is not None and previous != present:
            raise ValueError(f"{argument} must be given with every batch or with none "
                             f"(earlier batches {'had' if previous else 'lacked'} it)")

    def _check_batch(self, scores_by_task, labels, groups, weight):
        """Everything update needs, every value checked before any state changes."""
        label_matrix = _as_array(labels, "labels")
        if label_matrix.ndim == 1 and len(self.tasks) == 1:
            label_matrix = label_matrix[:, None]
        if label_matrix.ndim != 2 or label_matrix.shape[1] != len(self.tasks):
            raise ValueError(f"labels must be (B, T={len(self.tasks)}), got shape "
                             f"{label_matrix.shape}")
        batch = label_matrix.shape[0]
        raw_scores = {}
        for task in self.tasks:
            if task not in scores_by_task:
                raise ValueError(f"scores_by_task has no entry for task {task!r}")
            scores = _as_array(scores_by_task[task], f"scores_by_task[{task!r}]").reshape(-1)
            if scores.shape[0] != batch:
                raise ValueError(f"scores_by_task[{task!r}] has {scores.shape[0]} scores for "
                                 f"{batch} label rows")
            raw_scores[task] = scores
        self._consistent("_has_groups", groups is not None, "groups")
        self._consistent("_has_weights", weight is not None, "weight")
        group_array = hashes = weight_array = None
        if groups is not None:
            group_array = _as_array(groups, "groups", dtype=None).reshape(-1)
            if group_array.shape[0] != batch:
                raise ValueError(f"groups has {group_array.shape[0]} entries for {batch} rows")
            hashes = _group_hash(group_array)
        if weight is not None:
            weight_array = _as_array(weight, "weight").reshape(-1)
            if weight_array.shape[0] != batch:
                raise ValueError(f"weight has {weight_array.shape[0]} entries for {batch} rows")
        prepared = {}
        for column, task in enumerate(self.tasks):
            try:
                prepared[task] = _prepare(self._probabilities(raw_scores[task]),
                                          label_matrix[:, column], weight_array,
                                          probabilities=True)
            except ValueError as error:
                raise ValueError(f"task {task!r}: {error}") from None
        return label_matrix, raw_scores, prepared, group_array, hashes, weight_array

    def update(self, scores_by_task: Mapping[str, object], labels, groups=None,
               weight=None) -> None:
        label_matrix, raw_scores, prepared, group_array, hashes, weight_array = \
            self._check_batch(scores_by_task, labels, groups, weight)
        self._has_groups, self._has_weights = groups is not None, weight is not None
        self._count += label_matrix.shape[0]
        for task, (probabilities, task_labels, task_weight) in prepared.items():
            self._add_sums(task, probabilities, task_labels, task_weight)
            if not self.exact:
                self._histograms[task] += self._histogram(raw_scores[task], task_labels,
                                                          task_weight)
        # Keep the rows exact AUC needs (all of them) or the gAUC sample needs (its groups').
        keep = None
        if not self.exact:
            if group_array is None:
                return
            if self._hash_limit is not None:
                keep = hashes < self._hash_limit
        columns = {("scores", task): scores for task, scores in raw_scores.items()}
        columns["labels"] = label_matrix.astype(np.int8)  # 0/1, checked
        if group_array is not None:
            columns["groups"], columns["hash"] = group_array, hashes
        if weight_array is not None and self.exact:
            columns["weight"] = weight_array
        self._append(columns, keep)
        if self.exact and self._count > self.exact_max_rows:
            self._fold()
        elif not self.exact and self.buffered_rows > _GAUC_SLACK * self.gauc_max_rows:
            self._shrink_sample()

    def _add_sums(self, task, probabilities, labels, weight) -> None:
        p = np.clip(probabilities, PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
        loss = -(labels * np.log(p) + (1.0 - labels) * np.log1p(-p))  # as in _logloss
        self._sums[task].add(np.array([weight.sum(), np.dot(weight, labels),
                                       np.dot(weight, loss), np.dot(weight, probabilities)]))
        bins = np.minimum((probabilities * DEFAULT_BINS).astype(np.int64), DEFAULT_BINS - 1)
        self._ece[task].add(np.stack([
            np.bincount(bins, weights=values, minlength=DEFAULT_BINS)
            for values in (weight, weight * probabilities, weight * labels)]))

    def _fold(self) -> None:
        """Exact -> binned AUC: every kept row goes into the histograms (no row seen is lost),
        then only the gAUC sample's rows stay."""
        labels = self._column("labels")
        weight = self._column("weight") if self._has_weights else None
        self._histograms = {}
        for column, task in enumerate(self.tasks):
            task_weight = np.ones(labels.shape[0]) if weight is None else weight
            self._histograms[task] = self._histogram(self._column(("scores", task)),
                                                     labels[:, column], task_weight)
        self._columns.pop("weight", None)
        if not self._has_groups:
            self._columns.clear()
            self._buffered = 0
        elif self.buffered_rows > _GAUC_SLACK * self.gauc_max_rows:
            self._shrink_sample()

    def _shrink_sample(self) -> None:
        """Cut the gAUC sample back to the bottom-k groups with at most gauc_max_rows rows. The
        limit only falls as rows come, and a group's rows are all kept or all dropped, so
        rows dropped now would be out of the final sample anyway."""
        limit = _bottom_k_limit(self._column("hash"), self.gauc_max_rows)
        if limit is not None:
            self._hash_limit = limit
            self._keep_rows(self._column("hash") < limit)

    def compute(self) -> dict[str, dict[str, float]]:
        results = {task: self._stream_metrics(task) for task in self.tasks}
        if self.exact and self._count > 0:  # every row is kept: the exact AUC of evaluate
            labels = self._column("labels")
            weight = self._column("weight") if self._has_weights else np.ones(labels.shape[0])
            for column, task in enumerate(self.tasks):
                scores = self._probabilities(self._column(("scores", task)))
                results[task]["auc"] = _auc(scores, labels[:, column].astype(np.float64), weight)
        if self._has_groups:
            self._add_gauc(results)
        return results

    def _stream_metrics(self, task) -> dict[str, float]:
        sums = self._sums[task].value
        total, positive = sums[_WEIGHT], sums[_POSITIVE]
        if self.exact:
            auc_value, bound = float("nan"), 0.0  # set by compute from the kept rows
        else:
            auc_value, bound = _histogram_auc(self._histograms[task])
        metrics = {"auc": auc_value, "auc_error_bound": bound, "logloss": float("nan"),
                   "ne": float("nan"), "ece": float("nan"), "positive_rate": float("nan"),
                   "calibration": float(sums[_PREDICTED] / positive) if positive > 0
                   else float("nan"),
                   "count": self._count}
        if total > 0:  # the same ratios as _logloss, _normalized_entropy, _calibration_error
            metrics["logloss"] = float(sums[_LOSS] / total)
            metrics["positive_rate"] = float(positive / total)
            base_entropy = _entropy(metrics["positive_rate"])
            metrics["ne"] = metrics["logloss"] / base_entropy if base_entropy > 0 else float("nan")
            bin_weight, bin_predicted, bin_actual = self._ece[task].value
            metrics["ece"] = float(np.abs(bin_predicted - bin_actual).sum() / bin_weight.sum())
        return metrics

    def _add_gauc(self, results) -> None:
        """gAUC over the bottom-k sample of groups (all groups while it fits)."""
        if self._count == 0:
            for task in self.tasks:
                results[task].update(gauc=float("nan"), gauc_groups=0)
            return
        hashes = self._column("hash")
        limit = _bottom_k_limit(hashes, self.gauc_max_rows)
        rows = slice(None) if limit is None else hashes < limit
        groups = self._column("groups")[rows]
        codes = _group_codes(groups, groups.shape[0])
        labels = self._column("labels")[rows]
        for column, task in enumerate(self.tasks):
            scores = self._probabilities(self._column(("scores", task))[rows])
            value, used = _gauc_and_groups(scores, labels[:, column].astype(np.float64), codes)
            results[task].update(gauc=value, gauc_groups=used)
