r"""The real datasets of the experiments: read where they lie, preprocessed once into a cache.

Looked up in $HMOE_DATA_DIR, else ../shared/data beside the repository; an absent dataset is
skipped (``load`` returns None), so the experiments run anywhere. Their licences forbid copying
them into the repository: only the cache under .cache/experiments/ (git-ignored) is written.

    avazu      avazu_10k/avazu_train_9000.csv (Avazu CTR, 8,999 rows, 22 categorical fields,
               label click); rows split 80/10/10 at random (seed 0)
    adult      adult/adult.data + adult.test (UCI census income, 32,561 + 16,281 rows);
               labels income_50k and never_married (the MMoE paper's census tasks); the
               train file split 90/10 into train / valid at random (seed 0)
    movielens  ml-100k/u.data (100,000 ratings): configs/datasets/movielens_100k.yaml's
               construction, target = the rated movie, label like = rating >= 4, history =
               the 50 previous movies with time-bucket positions; leave-last-out split

Training: experiments/common.py's BASE (to early stopping) plus ``TRAIN[name]`` (Avazu
B = 256, Adult and MovieLens B = 512).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common import ROOT
from hmoe.data.preprocess import preprocess
from hmoe.train import Dataset

CACHE = ROOT / ".cache" / "experiments"
FILES = {
    "avazu": ("avazu_10k/avazu_train_9000.csv",),
    "adult": ("adult/adult.data", "adult/adult.test"),
    "movielens": ("ml-100k/u.data",),
}
CONFIGS = {"avazu": "avazu", "adult": "adult", "movielens": "movielens_100k"}
# Training settings on top of experiments/common.py's BASE.
TRAIN = {"avazu": ["train.batch_size=256"], "adult": ["train.batch_size=512"],
         "movielens": ["train.batch_size=512"]}


def data_dir() -> Path | None:
    env = os.environ.get("HMOE_DATA_DIR")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def _random_split(columns: dict, fractions: dict[str, float], seed: int = 0) -> dict:
    n = len(columns["labels"])
    order = np.random.default_rng(seed).permutation(n)
    splits, start = {}, 0
    for i, (name, fraction) in enumerate(fractions.items()):
        stop = n if i == len(fractions) - 1 else start + int(round(fraction * n))
        rows = np.sort(order[start:stop])
        splits[name] = {k: v[rows] for k, v in columns.items()}
        start = stop
    return splits


_LOADED: dict[str, Dataset | None] = {}


def load(name: str) -> Dataset | None:
    """The dataset ``name`` (module docstring), or None when its files are absent."""
    if name in _LOADED:
        return _LOADED[name]
    root = data_dir()
    paths = [root / f for f in FILES[name]] if root is not None else []
    if not paths or not all(p.is_file() for p in paths):
        _LOADED[name] = None
        return None
    config = ROOT / "configs" / "datasets" / f"{CONFIGS[name]}.yaml"
    cache = CACHE / name
    if name == "adult":
        data = preprocess(config, {"train": paths[0], "test": paths[1]}, cache)
        held = _random_split(data.columns("train"), {"train": 0.9, "valid": 0.1})
        splits = {**held, "test": data.columns("test")}
    elif name == "avazu":
        data = preprocess(config, paths[0], cache)
        splits = _random_split(data.columns("train"), {"train": 0.8, "valid": 0.1, "test": 0.1})
    else:
        data = preprocess(config, paths[0], cache)
        splits = {s: data.columns(s) for s in ("train", "valid", "test")}
    dataset = Dataset(data.schema, splits, None)
    dataset.overrides = TRAIN[name]
    _LOADED[name] = dataset
    return dataset
