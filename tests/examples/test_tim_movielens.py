"""examples/tim_movielens.py on a synthetic u.data in MovieLens 100K's format (the real data may
not be committed): it builds the samples as documented and learns a planted sequence signal."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import tim_movielens  # noqa: E402


def write_ratings(path: Path, users: int, per_user: int, seed: int) -> None:
    """Each user likes one genre (movies id % 4); a rating is >= 4 iff the movie is of the genre
    the user's previous ratings were mostly high on: a signal only the history carries."""
    rng = random.Random(seed)
    lines = []
    for user in range(1, users + 1):
        genre, stamp = rng.randrange(4), 880_000_000 + rng.randrange(10**6)
        for _ in range(per_user):
            item = rng.randrange(1, 41)
            liked = item % 4 == genre
            rating = rng.choice([4, 5]) if liked != (rng.random() < 0.1) else rng.choice([1, 2, 3])
            stamp += rng.randrange(60, 10**5)
            lines.append(f"{user}\t{item}\t{rating}\t{stamp}")
    path.write_text("\n".join(lines) + "\n")


def test_samples_follow_the_documented_construction(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n1\t11\t2\t300\n1\t12\t4\t200\n2\t10\t3\t50\n"
                                     "2\t13\t4\t60\n")
    train, test, num_users, num_items = tim_movielens.load(tmp_path, max_len=5, test_per_user=1,
                                                           positions="rank", time_buckets_count=8)
    # user 1 in time order: 10 (t=100), 12 (t=200), 11 (t=300); user 2: 10, 13
    assert (num_users, num_items) == (3, 14)
    assert train.target.tolist() == [12] and test.target.tolist() == [11, 13]
    assert test.label.tolist() == [0.0, 1.0]
    assert test.history[0, :2].tolist() == [12, 10]  # most recent first
    assert test.ratings[0, :2].tolist() == [4, 5] and test.lengths.tolist() == [2, 1]
    assert test.positions[0, :2].tolist() == [1, 2]
    _, test, _, _ = tim_movielens.load(tmp_path, max_len=5, test_per_user=1, positions="time",
                                       time_buckets_count=8)
    hours = torch.tensor([100 / 3600, 200 / 3600])  # target t=300: 12 is 100 s back, 10 is 200 s
    assert test.positions[0, :2].tolist() == [1, 1] and hours.max() < 1


def test_sequence_variants_learn_the_planted_signal(tmp_path, capsys):
    write_ratings(tmp_path / "u.data", users=80, per_user=60, seed=0)
    results = tim_movielens.main(["--data", str(tmp_path), "--seeds", "0", "--epochs", "8",
                                  "--max-len", "12", "--dim", "8", "--hidden", "16",
                                  "--lr", "0.01", "--batch-size", "64",
                                  "--variants", "tim,tim_no_temporal,din,mean"])
    assert set(results) == {"tim", "tim_no_temporal", "din", "mean"}
    for variant, [(test_auc, test_gauc)] in results.items():
        assert test_auc > 0.7, (variant, test_auc)  # chance is 0.5
        assert 0 <= test_gauc <= 1
    assert "test gAUC" in capsys.readouterr().out


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="u.data"):
        tim_movielens.main(["--data", str(tmp_path)])
