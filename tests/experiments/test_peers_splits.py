"""experiments/peers.py rebuilds PEERS.md's splits exactly (row counts, hour of day, the
movie histories); skipped where the real files are absent (../shared/data, HMOE_DATA_DIR)."""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import pytest

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(EXPERIMENTS_DIR))
    try:
        yield importlib.import_module("peers")
    finally:
        sys.path.remove(str(EXPERIMENTS_DIR))


def _files(peers, name, tmp_path):
    from real import data_dir

    root = data_dir()
    prepare, _ = peers.PREPARE[name]
    needed = {"avazu_10k": "avazu_10k", "adult": "adult", "movielens": "ml-100k"}[name]
    if root is None or not (root / needed).is_dir():
        pytest.skip(f"{needed} not found")
    return prepare(root, tmp_path / name)


def _rows(path):
    with open(path, newline="") as file:
        return list(csv.reader(file))


def test_the_random_split_is_peers_md(peers):
    train, valid = peers._valid_rows(8999)
    assert len(train) == 8100 and len(valid) == 899
    assert sorted(set(train) | set(valid)) == list(range(8999))
    assert (train == sorted(train)).all() and (valid == sorted(valid)).all()


def test_avazu(peers, tmp_path):
    files = _files(peers, "avazu_10k", tmp_path)
    counts = {split: len(_rows(path)) - 1 for split, path in files.items()}
    assert counts == {"train": 8100, "valid": 899, "test": 1000}
    header, *rows = _rows(files["test"])
    assert {len(row[header.index("hour")]) for row in rows} == {2}  # hour of day


def test_adult(peers, tmp_path):
    files = _files(peers, "adult", tmp_path)
    counts = {split: len(path.read_text().splitlines()) for split, path in files.items()}
    assert counts == {"train": 29305, "valid": 3256, "test": 16280}


def test_movielens(peers, tmp_path):
    files = _files(peers, "movielens", tmp_path)
    rows = {split: _rows(path) for split, path in files.items()}
    assert {split: len(r) - 1 for split, r in rows.items()} == \
        {"train": 70771, "valid": 9596, "test": 19633}
    header = rows["test"][0]
    column = {name: i for i, name in enumerate(header)}
    for row in rows["test"][1:200]:
        items, cates = row[column["hist_item"]].split("|"), row[column["hist_cate"]].split("|")
        deltas = [int(d) for d in row[column["hist_dt"]].split("|")]
        assert len(items) == len(cates) == len(deltas) <= 50
        assert all(d >= 0 for d in deltas)
