"""What the examples share: where the real data lies, AUC and gAUC (hmoe.train will hold the
library's own metrics), and the results table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


def default_data_dir(name: str) -> Path:
    """$HMOE_DATA_DIR/<name>, else ../shared/data/<name> beside the repository."""
    env = os.environ.get("HMOE_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return root / name


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns, a rule under the header."""
    lines = [list(header)] + [list(row) for row in rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for i, row in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


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
