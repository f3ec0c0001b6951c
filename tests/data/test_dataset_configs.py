"""configs/datasets/*.yaml: every public-format config loads, preprocesses a small synthetic file
written in its own format, and (when the real samples are present) the real sample files."""

import os
from pathlib import Path

import numpy as np
import pytest

from hmoe.data import check_columns, load_schema
from hmoe.data.preprocess import _Plan, load_dataset_config, preprocess

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "datasets").glob("*.yaml"))
REQUIRED = {"criteo", "avazu", "movielens_100k", "taobao_userbehavior", "aliexpress", "ali_ccp",
            "adult", "census_income_kdd", "kuairand"}


def _data_dir() -> Path | None:
    """HMOE_DATA_DIR, else ../shared/data beside the project (as tests/conftest.py)."""
    candidate = Path(os.environ.get("HMOE_DATA_DIR", ROOT.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


def _real(*parts: str) -> Path:
    root = _data_dir()
    path = root.joinpath(*parts) if root is not None else None
    if path is None or not path.exists():
        pytest.skip(f"real sample {'/'.join(parts)} not available (set HMOE_DATA_DIR)")
    return path


def test_every_public_format_has_a_config():
    assert REQUIRED <= {path.stem for path in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_as_a_schema_and_a_dataset_config(path):
    schema = load_schema(path)
    config = load_dataset_config(path)
    assert config.schema == schema and schema.name == path.stem
    assert schema.labels and schema.features


# --------------------------------------------------------------------------------------------
# A synthetic file in each config's own format.


def _raw_columns(config) -> list[str]:
    """The columns the file holds: the reader's column_names, or what the schema and the
    behaviour log read."""
    if config.source.reader.column_names is not None:
        return list(config.source.reader.column_names)
    log = config.source.behaviour_log
    made = set()
    columns = list(_Plan(config.schema, config.source).columns)
    if log is not None:
        made = set(log.history.values()) | {log.delta_column}
        columns += [log.user, log.time, *log.history, *(log.history_filter or {})]
    return [c for c in dict.fromkeys(columns) if c not in made]


def _write_synthetic(config, path: Path, n: int, seed: int = 0) -> np.ndarray:
    """Writes n rows in the config's format; returns the expected labels (n, T)."""
    rng = np.random.default_rng(seed)
    schema, source, log = config.schema, config.source, config.source.behaviour_log
    columns = _raw_columns(config)
    roles: dict[str, object] = {}
    for f in schema.categorical:
        roles[f.column or f.name] = "category"
    for f in schema.numeric:
        roles[f.column or f.name] = "number"
    for seq in schema.sequence:
        roles[seq.column or seq.name] = ("sequence", seq.separator)
        assert log is not None or seq.temporal_column is None, "not written by this helper"
    label_values = {}
    for label in schema.labels:
        column = label.column or label.name
        rule = source.labels.get(label.name)
        if rule is None:
            label_values.setdefault(column, ["0", "1"])
        elif rule.positive is not None:
            label_values[column] = sorted(set(label_values.get(column, ["neg"]))
                                          | set(rule.positive))
        else:
            label_values[column] = [str(v) for v in range(1, 6)]
        roles[column] = "label"
    if log is not None:
        roles[log.user], roles[log.time] = "user", "time"
        for column in log.history_filter or {}:
            label_values.setdefault(column, ["0", "1"])
            roles[column] = "label"
    missing = "?" if "?" in source.reader.null_values else ""
    cells = {}
    for column in columns:
        role = roles.get(column, "other")
        if role == "category":
            values = rng.integers(0, 6, size=n).astype(str).astype(object)
            values[rng.random(n) < 0.05] = missing
        elif role == "number":
            values = np.array([f"{v:.3f}" for v in rng.lognormal(2, 1, size=n)], dtype=object)
            values[rng.random(n) < 0.1] = ""
        elif role == "label":
            values = rng.choice(label_values[column], size=n).astype(object)
        elif role == "user":
            values = rng.integers(0, 15, size=n).astype(str).astype(object)
        elif role == "time":
            values = rng.permutation(n).astype(str).astype(object)
        elif role == "other":
            values = np.array([f"x{i}" for i in range(n)], dtype=object)
        else:  # a sequence: separator-joined items (times come from behaviour logs only)
            _, separator = role
            lengths = rng.integers(0, 6, size=n)
            values = np.array([separator.join(rng.integers(0, 6, size=k).astype(str))
                               for k in lengths], dtype=object)
        cells[column] = values
    delimiter = source.reader.delimiter
    joiner = delimiter + (" " if source.reader.strip_whitespace else "")
    with open(path, "w", encoding="utf-8") as f:
        if source.reader.header:
            f.write(delimiter.join(columns) + "\n")
        for i in range(n):
            f.write(joiner.join(str(cells[c][i]) for c in columns) + "\n")
    expected = np.zeros((n, len(schema.labels)), dtype=np.float32)
    for t, label in enumerate(schema.labels):
        raw = cells[label.column or label.name]
        rule = source.labels.get(label.name)
        if rule is None:
            expected[:, t] = raw.astype(float)
        elif rule.positive is not None:
            expected[:, t] = np.isin(raw, rule.positive)
        else:
            expected[:, t] = raw.astype(float) >= rule.threshold
    return expected


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_preprocesses_a_synthetic_file_in_its_format(path, tmp_path):
    config = load_dataset_config(path)
    n = 300
    expected = _write_synthetic(config, tmp_path / "raw.txt", n)
    data = preprocess(config, tmp_path / "raw.txt", tmp_path / "cache")
    total = 0
    labels = []
    for split in data.splits:
        columns = data.columns(split)
        check_columns(columns, data.schema)
        total += len(columns["labels"])
        labels.append(columns["labels"])
    assert total == n
    labels = np.concatenate(labels)
    if config.source.behaviour_log is None:
        np.testing.assert_array_equal(labels, expected)  # rows keep the file's order
    else:
        np.testing.assert_array_equal(labels.sum(0), expected.sum(0))
        assert data.splits == ("train", "valid", "test")
        assert data.num_rows["test"] == 15  # one per user (15 users)
    for feature in data.schema.categorical:
        assert feature.vocab_size >= 1
    for feature in data.schema.numeric:
        assert feature.std > 0


# --------------------------------------------------------------------------------------------
# The real samples (skipped when absent).


def _config(name: str):
    return load_dataset_config(ROOT / "configs" / "datasets" / f"{name}.yaml")


def _check(data):
    for split in data.splits:
        check_columns(data.columns(split), data.schema)


def test_real_avazu(tmp_path):
    train = _real("avazu_10k", "avazu_train_9000.csv")
    test = _real("avazu_10k", "avazu_test_1000.csv")
    config = _config("avazu")
    data = preprocess(config, train, tmp_path / "train")
    _check(data)
    assert data.num_rows == {"train": 8999}
    assert data.columns()["labels"].mean() == pytest.approx(0.174, abs=0.001)
    assert len(data.schema.categorical) == 22
    # The test file has no header: same columns, read by name from the config.
    held_out = preprocess(config.with_reader(header=False), test, tmp_path / "test")
    assert held_out.num_rows == {"train": 1000}
    assert held_out.columns()["labels"].mean() == pytest.approx(0.143, abs=0.001)


def test_real_adult(tmp_path):
    train, test = _real("adult", "adult.data"), _real("adult", "adult.test")
    data = preprocess(_config("adult"), {"train": train, "test": test}, tmp_path / "cache")
    _check(data)
    assert data.num_rows == {"train": 32561, "test": 16281}
    income = data.columns("train")["labels"][:, 0].sum(), data.columns("test")["labels"][:, 0].sum()
    assert income == (7841, 3846)  # ">50K" in train and ">50K." in test
    assert "Private" in data.vocabulary("workclass")
    assert "?" not in data.vocabulary("workclass")  # "?" is missing -> OOV 0


def test_real_movielens_100k(tmp_path):
    path = _real("ml-100k", "u.data")
    data = preprocess(_config("movielens_100k"), path, tmp_path / "cache")
    _check(data)
    assert sum(data.num_rows.values()) == 100_000
    assert data.num_rows["test"] == 943 and data.num_rows["valid"] == 943
    ratings = np.loadtxt(path, dtype=np.int64)  # user, movie, rating, time
    liked = sum(data.columns(s)["labels"].sum() for s in data.splits)
    assert liked == (ratings[:, 2] >= 4).sum()
    # One user's test sample by hand: the last rating, the 50 before it as history.
    user = 1
    events = ratings[ratings[:, 0] == user]
    events = events[np.lexsort((np.arange(len(events)), events[:, 3]))]
    test = data.columns("test")
    users = data.vocabulary("user_id")
    movies = {int(v): i + 1 for i, v in enumerate(data.vocabulary("movie_id"))}
    row = int(np.flatnonzero(test["categorical"][:, 0] == users.index(str(user)) + 1)[0])
    assert test["categorical"][row, 1] == movies.get(int(events[-1, 1]), 0)
    history = [movies.get(int(m), 0) for m in events[-51:-1, 1]]
    assert test["seq/hist_movies/lengths"][row] == 50
    assert test["seq/hist_movies"][row].tolist() == history
    positions = test["seq/hist_movies/positions"][row]
    assert positions.min() >= 1 and positions.max() <= 32
    assert (np.diff(positions) <= 0).all()  # older behaviours are further away


def test_real_criteo_sample(tmp_path):
    path = _real("tiny_mtl_and_seq", "deepctr_examples", "criteo_sample.txt")
    config = _config("criteo").with_reader(delimiter=",", header=True)
    data = preprocess(config, path, tmp_path / "cache")
    _check(data)
    assert data.num_rows == {"train": 200}
    numeric = data.columns()["numeric"]
    assert np.isnan(numeric).any()  # empty cells are missing
    assert all(f.max_code is not None for f in data.schema.numeric)


def test_real_census_income_kdd_sample(tmp_path):
    path = _real("tiny_mtl_and_seq", "deepctr_examples", "census-income.sample")
    config = _config("census_income_kdd")
    config = config.with_reader(column_names=("id",) + config.source.reader.column_names)
    data = preprocess(config, path, tmp_path / "cache")
    _check(data)
    assert data.num_rows == {"train": 200}
    assert data.columns()["labels"][:, 0].sum() == 12  # "50000+." in 12 rows


@pytest.mark.parametrize("folder, files, rows", [
    ("fuxictr_tiny_mtl", ("train.csv", "test.csv"), (100, 100)),
    ("torch_rechub_aliexpress", ("aliexpress_train_sample.csv", "aliexpress_test_sample.csv"),
     (100, 20)),
])
def test_real_aliexpress_samples(tmp_path, folder, files, rows):
    train, test = (_real("tiny_mtl_and_seq", folder, f) for f in files)
    data = preprocess(_config("aliexpress"), {"train": train, "test": test}, tmp_path / "cache")
    _check(data)
    assert (data.num_rows["train"], data.num_rows["test"]) == rows
    assert len(data.schema.numeric) == 63


def test_real_ali_ccp_sample(tmp_path):
    folder = ("tiny_mtl_and_seq", "torch_rechub_ali_ccp")
    inputs = {"train": _real(*folder, "ali_ccp_train_sample.csv"),
              "valid": _real(*folder, "ali_ccp_val_sample.csv"),
              "test": _real(*folder, "ali_ccp_test_sample.csv")}
    data = preprocess(_config("ali_ccp"), inputs, tmp_path / "cache")
    _check(data)
    assert data.num_rows == {"train": 100, "valid": 50, "test": 50}
    assert data.columns("train")["labels"][:, 0].mean() == pytest.approx(0.07, abs=0.005)


def test_real_taobao_ad_sample(tmp_path):
    path = _real("tiny_mtl_and_seq", "fuxictr_tiny_csv", "train_sample.csv")
    data = preprocess(_config("taobao_ad"), path, tmp_path / "cache")
    _check(data)
    lengths = data.columns()["seq/click_sequence/lengths"]
    assert data.num_rows == {"train": 100} and lengths.max() > 1 and (lengths == 0).any()
