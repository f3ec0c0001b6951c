"""AUC and gAUC for the examples (hmoe.train will hold the library's own metrics)."""

from __future__ import annotations

import torch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the rank-sum (Mann-Whitney) statistic, tied scores given their
    average rank; NaN when a class is missing."""
    order = scores.argsort()
    _, group, counts = torch.unique_consecutive(scores[order], return_inverse=True,
                                                return_counts=True)
    group_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # mean 1-based rank
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = group_rank[group]
    positive = labels.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Group AUC: the mean of per-group AUCs weighted by the group's impressions, over the
    groups (users) that have both classes; the others are left out."""
    total, weight = 0.0, 0
    for g in groups.unique():
        member = groups == g
        value = auc(scores[member], labels[member])
        if value == value:  # both classes present
            n = int(member.sum())
            total, weight = total + n * value, weight + n
    return total / weight if weight else float("nan")
