"""examples/mnse_adult.py on synthetic files in UCI Adult's format (the real data may not be
committed): it reads both splits, trains every variant and learns a planted numeric signal."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))  # mnse_adult, _common

import mnse_adult  # noqa: E402


def write_split(path: Path, rows: int, seed: int, test_suffix: bool) -> None:
    """Adult-format rows whose label is planted on age and capital_gain (both numeric)."""
    rng = random.Random(seed)
    lines = ["|1x3 Cross validator"] if test_suffix else []
    for _ in range(rows):
        age, gain = rng.randint(17, 90), rng.choice([0, 0, 0, rng.randint(1, 99_999)])
        rich = (age > 45) != (rng.random() < 0.1) or gain > 20_000
        label = (">50K" if rich else "<=50K") + ("." if test_suffix else "")
        fields = [age, rng.choice(["Private", "State-gov", "?"]), rng.randint(10_000, 900_000),
                  rng.choice(["Bachelors", "HS-grad"]), rng.randint(1, 16),
                  rng.choice(["Never-married", "Divorced"]), rng.choice(["Sales", "Tech-support"]),
                  rng.choice(["Husband", "Wife"]), rng.choice(["White", "Black"]),
                  rng.choice(["Male", "Female"]), gain, rng.choice([0, 1_902]),
                  rng.randint(1, 99), rng.choice(["United-States", "Mexico"]), label]
        lines.append(", ".join(map(str, fields)))
    path.write_text("\n".join(lines) + "\n\n")


def test_every_variant_learns_the_planted_signal(tmp_path, capsys):
    write_split(tmp_path / "adult.data", 1500, seed=0, test_suffix=False)
    write_split(tmp_path / "adult.test", 600, seed=1, test_suffix=True)
    results = mnse_adult.main(["--data", str(tmp_path), "--seeds", "0,1", "--epochs", "6",
                               "--batch-size", "128", "--lr", "0.01"])
    assert set(results) == set(mnse_adult.VARIANTS)
    for variant, aucs in results.items():
        assert len(aucs) == 2
        assert min(aucs) > 0.8, (variant, aucs)  # chance is 0.5; the planted rule gives ~0.9
    assert "test AUC" in capsys.readouterr().out


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="adult.data"):
        mnse_adult.main(["--data", str(tmp_path)])


def test_auc_is_the_rank_statistic_with_ties_halved():
    import torch

    from _common import auc, gauc

    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>both) (0.4>0.1) (0.4=0.4 counts 1/2) -> 4.5 / 6
    assert auc(scores, labels) == pytest.approx(4.5 / 6)
    assert auc(scores, torch.ones(5)) != auc(scores, torch.ones(5))  # NaN: one class only
    groups = torch.tensor([0, 0, 1, 1, 2])  # group 2 has one class: left out
    # group 0: (neg 0.1, neg 0.4) no positive -> left out; group 1: two positives -> left out
    assert gauc(scores, labels, groups) != gauc(scores, labels, groups)
    groups = torch.tensor([0, 0, 0, 1, 1])
    labels2 = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    # g0: pos 0.35 beats 0.1, loses to 0.4 -> 1/2 (3 impressions); g1: pos 0.8 > 0.4 -> 1 (2)
    assert gauc(scores, labels2, groups) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)
