"""hmoe.data.preprocess: vocabularies, statistics, encoding, bad rows, the cache and its reuse,
behaviour-log construction, bounded memory."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import hmoe.data.preprocess as preprocess_module
from hmoe.data import SyntheticConfig, check_columns, generate
from hmoe.data.preprocess import (
    DatasetConfig,
    dataset_config_to_dict,
    load_dataset_config,
    load_preprocessed,
    preprocess,
)
from hmoe.data.readers import ChunkBudget, DataFileError
from hmoe.nn import time_buckets

CONFIG = """
name: toy
features:
  - {name: user, type: categorical, min_count: 2}
  - {name: ad, type: categorical}
  - {name: price, type: numeric, quantizer: quantile, num_bins: 4}
  - {name: count, type: numeric, quantizer: log, log_transform: criteo}
  - {name: hist, type: sequence, item: ad, max_len: 3}
labels:
  - {name: click}
  - {name: buy, column: outcome}
group_id: user
source:
  labels:
    buy: {positive: [buy]}
"""

# user "u1" 3x, "u2" 2x, "u3" once (below min_count 2). ads: a 3x + 2 in histories, b 2x + 3,
# c 1x + 1, d only in a history.
TRAIN = """user,ad,price,count,hist,click,outcome
u1,a,1.5,3,b|a|c|b,1,buy
u2,b,2.5,,b,0,view
u1,a,,10,,0,view
u3,c,4.0,0,d|a,1,buy
u1,b,3.5,100,b,0,view
u2,a,0.5,7,,1,view
"""


def _toy(tmp_path, train=TRAIN, test=None, config=CONFIG, **kwargs):
    (tmp_path / "train.csv").write_text(train)
    inputs = {"train": tmp_path / "train.csv"}
    if test is not None:
        (tmp_path / "test.csv").write_text(test)
        inputs["test"] = tmp_path / "test.csv"
    return preprocess(config, inputs, tmp_path / "cache", **kwargs)


def test_vocabularies_by_descending_count_ties_by_value_and_min_count(tmp_path):
    data = _toy(tmp_path)
    # users: u1 3, u2 2, u3 1 (< min_count 2 -> OOV).
    assert data.vocabulary("user") == ["u1", "u2"]
    assert data.schema.categorical[0].vocab_size == 3
    # ads, as targets + in the kept (last max_len = 3) history steps: a 3 + 2 = 5, b 2 + 3 = 5
    # (the truncated oldest "b" of "b|a|c|b" does not count), c 1 + 1, d 0 + 1; a and b tie.
    ads = data.vocabulary("ad")
    assert ads == ["a", "b", "c", "d"]
    assert data.schema.categorical[1].vocab_size == 5
    columns = data.columns()
    check_columns(columns, data.schema)
    ids = {value: i + 1 for i, value in enumerate(ads)}
    assert columns["categorical"][:, 0].tolist() == [1, 2, 1, 0, 1, 2]  # u3 -> OOV 0
    assert columns["categorical"][:, 1].tolist() == [ids[v] for v in "abacba"]


def test_sequences_keep_the_most_recent_with_rank_positions(tmp_path):
    columns = _toy(tmp_path).columns()
    ids = {value: i + 1 for i, value in enumerate(load_preprocessed(tmp_path / "cache")
                                                  .vocabulary("ad"))}
    hist = columns["seq/hist"]
    assert hist.shape == (6, 3)
    # "b|a|c|b" keeps the last three, oldest first; positions are ranks, 1 = most recent.
    assert hist[0].tolist() == [ids["a"], ids["c"], ids["b"]]
    assert columns["seq/hist/positions"][0].tolist() == [3, 2, 1]
    assert columns["seq/hist/lengths"].tolist() == [3, 1, 0, 2, 1, 0]
    assert hist[2].tolist() == [0, 0, 0] and columns["seq/hist/positions"][2].tolist() == [0, 0, 0]
    assert hist[3].tolist() == [ids["d"], ids["a"], 0]
    assert columns["seq/hist/positions"][3].tolist() == [2, 1, 0]


def test_numeric_statistics_fill_the_schema(tmp_path):
    data = _toy(tmp_path)
    price, count = data.schema.numeric
    values = np.array([1.5, 2.5, 4.0, 3.5, 0.5])
    assert price.mean == pytest.approx(values.mean()) and price.std == pytest.approx(values.std())
    assert price.boundaries == pytest.approx(tuple(np.quantile(values, [0.25, 0.5, 0.75])))
    assert count.max_code == int(np.floor(np.log(100.0) ** 2))  # the criteo code of the maximum
    numeric = data.columns()["numeric"]
    assert numeric.dtype == np.float32
    assert np.isnan(numeric[2, 0]) and np.isnan(numeric[1, 1])  # missing -> NaN
    assert numeric[0].tolist() == [1.5, 3.0]


def test_labels_direct_and_by_rule(tmp_path):
    labels = _toy(tmp_path).columns()["labels"]
    assert labels.dtype == np.float32
    assert labels[:, 0].tolist() == [1, 0, 0, 1, 0, 1]
    assert labels[:, 1].tolist() == [1, 0, 0, 1, 0, 0]  # outcome == "buy"


def test_test_split_uses_the_train_vocabulary_and_stable_group_ids(tmp_path):
    test = "user,ad,price,count,hist,click,outcome\nu2,zz,1,1,zz|a,0,view\nu9,a,2,2,,1,buy\n"
    data = _toy(tmp_path, test=test)
    train, held_out = data.columns("train"), data.columns("test")
    check_columns(held_out, data.schema)
    ads = data.vocabulary("ad")
    assert held_out["categorical"][:, 1].tolist() == [0, ads.index("a") + 1]  # zz unseen -> 0
    assert held_out["seq/hist"][0].tolist() == [0, ads.index("a") + 1, 0]
    # group ids hash the user's text: the same user has the same id in every split, and u9
    # (not in the vocabulary) still has a group of its own.
    assert held_out["group_id"][0] == train["group_id"][1]
    assert held_out["group_id"][1] not in set(train["group_id"].tolist()) | {0}
    assert len(set(train["group_id"].tolist())) == 3


@pytest.mark.parametrize("line, location, column, problem", [
    ("u1,a,abc,1,,0,view", "line 3", "price", "cannot parse 'abc' as a number"),
    ("u1,a,1,1,,2,view", "line 3", "click", "labels must be 0 or 1, got '2'"),
    ("u1,a,1,1,,,view", "line 3", "click", "missing label"),
    ("u1,a,1,1,,1,", "line 3", "outcome", "missing label"),
    ("u1,a,1,1", "line 3", None, "expected 7 fields, got 4"),
])
def test_bad_rows_raise_naming_file_line_and_column(tmp_path, line, location, column, problem):
    train = TRAIN.splitlines(keepends=True)
    text = "".join(train[:2]) + line + "\n" + "".join(train[2:])
    with pytest.raises(DataFileError) as info:
        _toy(tmp_path, train=text)
    error = info.value
    assert error.path.endswith("train.csv") and error.location == location
    assert error.column == column and problem in error.problem
    assert not (tmp_path / "cache" / "feature_map.yaml").exists()


def test_skip_mode_drops_and_counts_bad_rows_in_both_passes(tmp_path):
    lines = TRAIN.splitlines(keepends=True)
    bad = ["only_here,a,abc,1,,0,view\n", "u1,a,1,1,,7,view\n", "u1,a\n"]
    text = lines[0] + bad[0] + "".join(lines[1:4]) + bad[1] + "".join(lines[4:]) + bad[2]
    with pytest.warns(UserWarning, match=r"skipped 3 malformed row"):
        data = _toy(tmp_path, train=text, on_error="skip")
    assert data.num_rows == {"train": 6}
    report = data.report["splits"]["train"]
    assert report["skipped_rows"] == 3
    assert any("line 2" in e and "'abc'" in e for e in report["skipped_examples"])
    assert any("line 6" in e for e in report["skipped_examples"])
    assert any("line 10" in e and "expected 7 fields" in e for e in report["skipped_examples"])
    assert "only_here" not in data.vocabulary("user")  # pass 1 skipped it too
    assert data.columns()["labels"][:, 0].tolist() == [1, 0, 0, 1, 0, 1]


def test_sequence_times_become_time_buckets_and_must_match(tmp_path):
    config = """
name: t
features:
  - {name: ad, type: categorical}
  - {name: hist, type: sequence, item: ad, max_len: 4, temporal_column: dt, max_position: 6}
labels: [{name: click}]
"""
    train = "ad,hist,dt,click\na,a|b|c,100|10|0.5,1\nb,,,0\nc,b|a,3|1,0\n"
    data = _toy(tmp_path, train=train, config=config)
    columns = data.columns()
    check_columns(columns, data.schema)
    expected = time_buckets(torch.tensor([100.0, 10.0, 0.5]), 6).tolist()
    assert columns["seq/hist/positions"][0].tolist() == expected + [0]
    assert columns["seq/hist/positions"][2].tolist() == time_buckets(
        torch.tensor([3.0, 1.0]), 6).tolist() + [0, 0]
    with pytest.raises(DataFileError, match=r"line 3: column 'dt': has 1 times but column "
                                            r"'hist' has 2 items"):
        _toy(tmp_path, train="ad,hist,dt,click\na,a,1,1\nb,a|b,1,0\n", config=config)
    with pytest.raises(DataFileError, match=r"line 2: column 'dt': times must be numbers >= 0"):
        _toy(tmp_path, train="ad,hist,dt,click\na,a|b,1|-1,1\n", config=config)


def test_pretrained_vectors_and_exposure_counts(tmp_path):
    config = """
name: t
features:
  - {name: ad, type: categorical}
  - {name: sim, type: pretrained, user_column: u, item_column: i, dim: 2}
labels: [{name: click}]
exposure_count: shown
"""
    train = "ad,u,i,click,shown\na,0.5|1,1|0,1,1\nb,2|3,0|1,0,3\n"
    data = _toy(tmp_path, train=train, config=config)
    columns = data.columns()
    check_columns(columns, data.schema)
    assert columns["pretrained/sim/user"].tolist() == [[0.5, 1.0], [2.0, 3.0]]
    assert columns["exposure_count"].tolist() == [1.0, 3.0]
    with pytest.raises(DataFileError, match=r"line 3: column 'u': expected a vector of 2"):
        _toy(tmp_path, train="ad,u,i,click,shown\na,1|1,1|0,1,1\nb,2,0|1,0,3\n", config=config)
    with pytest.raises(DataFileError, match=r"line 2: column 'shown': exposure count must be"):
        _toy(tmp_path, train="ad,u,i,click,shown\na,1|1,1|0,1,0\n", config=config)


def _first_of_group(ids: np.ndarray) -> np.ndarray:
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    return first[inverse]


def test_pre_indexed_world_parquet_round_trips_exactly(tmp_path):
    world = generate(SyntheticConfig(num_rows=3000, num_users=200, num_ads=400,
                                     num_advertisers=40, seed=5))
    world.save(tmp_path / "world")
    data = preprocess(world.schema, {"train": tmp_path / "world" / "train.parquet",
                                     "test": tmp_path / "world" / "test.parquet"},
                      tmp_path / "cache", budget=ChunkBudget(max_rows=500))
    for split in ("train", "test"):
        columns, expected = data.columns(split), world.splits[split]
        check_columns(columns, data.schema)
        for key, values in columns.items():
            if key != "group_id":
                np.testing.assert_array_equal(values, expected[key], err_msg=key)
        # group ids are hashes of the user id: the same partition of the rows (each row labelled
        # by the first row of its group).
        np.testing.assert_array_equal(_first_of_group(columns["group_id"]),
                                      _first_of_group(expected["group_id"]))
    assert [f.vocab_size for f in data.schema.categorical] == \
        [f.vocab_size for f in world.schema.categorical]
    with pytest.raises(DataFileError, match=r"row 1: column 'ad_id': must be an integer id in "
                                            r"\[0, 3\)"):
        small = world.schema.with_vocab_sizes({"ad_id": 3})
        preprocess(small, tmp_path / "world" / "train.parquet", tmp_path / "cache2")


def test_second_run_reuses_the_cache_and_changes_rebuild_it(tmp_path):
    first = _toy(tmp_path)
    assert not first.reused
    train_file = tmp_path / "cache" / "train.parquet"
    stamp = train_file.stat().st_mtime_ns
    second = preprocess(CONFIG, {"train": tmp_path / "train.csv"}, tmp_path / "cache")
    assert second.reused and second.fingerprint == first.fingerprint
    assert train_file.stat().st_mtime_ns == stamp  # nothing rewritten
    # A changed input invalidates the cache.
    (tmp_path / "train.csv").write_text(TRAIN + "u2,c,1.0,1,,1,buy\n")
    third = preprocess(CONFIG, {"train": tmp_path / "train.csv"}, tmp_path / "cache")
    assert not third.reused and third.num_rows == {"train": 7}
    # So does a changed config.
    fourth = preprocess(CONFIG.replace("min_count: 2", "min_count: 1"),
                        {"train": tmp_path / "train.csv"}, tmp_path / "cache")
    assert not fourth.reused and fourth.schema.categorical[0].vocab_size == 4
    assert preprocess(CONFIG.replace("min_count: 2", "min_count: 1"),
                      {"train": tmp_path / "train.csv"}, tmp_path / "cache", force=True).reused \
        is False
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_content_fingerprint_sees_a_same_size_change(tmp_path):
    _toy(tmp_path, fingerprint="content")
    path = tmp_path / "train.csv"
    info = path.stat()
    path.write_text(TRAIN.replace("u3,c,4.0", "u3,c,5.0"))  # same size
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # and the same mtime
    data = preprocess(CONFIG, {"train": path}, tmp_path / "cache", fingerprint="content")
    assert not data.reused and 5.0 in data.columns()["numeric"][:, 0].tolist()


def test_a_failed_run_leaves_no_valid_cache(tmp_path):
    _toy(tmp_path)
    bad_test = "user,ad,price,count,hist,click,outcome\nu1,a,x,1,,1,buy\n"
    with pytest.raises(DataFileError, match="test.csv: line 2"):
        _toy(tmp_path, test=bad_test)
    assert not (tmp_path / "cache" / "feature_map.yaml").exists()
    with pytest.raises(FileNotFoundError, match="feature_map.yaml"):
        load_preprocessed(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []
    data = _toy(tmp_path)  # the next run rebuilds
    assert not data.reused and data.num_rows == {"train": 6}


def _write_random_log(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write("user,ad,price,hist,click\n")
        for _ in range(n):
            length = rng.integers(0, 12)
            hist = "|".join(str(v) for v in rng.integers(0, 300, size=length))
            price = "" if rng.random() < 0.1 else f"{rng.lognormal(3, 1):.4f}"
            f.write(f"u{rng.integers(0, 500)},{rng.integers(0, 300)},{price},{hist},"
                    f"{int(rng.random() < 0.2)}\n")


BIG_CONFIG = """
name: big
features:
  - {name: user, type: categorical}
  - {name: ad, type: categorical, min_count: 2}
  - {name: price, type: numeric, quantizer: quantile, num_bins: 16}
  - {name: hist, type: sequence, item: ad, max_len: 8}
labels: [{name: click}]
group_id: user
"""


def test_memory_bound_chunks_never_exceed_the_budget(tmp_path, monkeypatch):
    """A file 12x the row budget (and far above the byte budget) streams through both passes in
    chunks within the budget; the cache's row groups and the streaming iterator too."""
    n, budget = 24_000, ChunkBudget(max_rows=2000, max_bytes=48 * 1024)
    path = tmp_path / "log.csv"
    _write_random_log(path, n)
    assert path.stat().st_size > 10 * budget.max_bytes
    observed = []
    real_read_chunks = preprocess_module.read_chunks

    def recording(*args, **kwargs):
        for chunk in real_read_chunks(*args, **kwargs):
            observed.append((chunk.num_rows, chunk.batch.nbytes))
            yield chunk

    monkeypatch.setattr(preprocess_module, "read_chunks", recording)
    data = preprocess(BIG_CONFIG, path, tmp_path / "cache", budget=budget,
                      quantile_sample=5000)
    assert sum(rows for rows, _ in observed) == 2 * n  # both passes read every row
    assert len(observed) >= 2 * 12
    assert max(rows for rows, _ in observed) <= budget.max_rows
    assert max(size for _, size in observed) <= budget.max_bytes
    for name in ("pass1", "pass2"):
        sizes = data.report["passes"][name]
        assert sizes["max_chunk_rows"] <= budget.max_rows
        assert sizes["max_chunk_bytes"] <= budget.max_bytes
    metadata = pq.ParquetFile(tmp_path / "cache" / "train.parquet").metadata
    assert max(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)) \
        <= budget.max_rows
    streamed = list(data.iter_chunks("train", max_rows=1500))
    assert max(len(c["labels"]) for c in streamed) <= 1500
    whole = data.columns("train")
    check_columns(whole, data.schema)
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([c[key] for c in streamed]), whole[key])
    # The sampled quantile boundaries (5000 of ~21,600 values) are close to the exact ones.
    prices = whole["numeric"][:, 0]
    exact = np.quantile(prices[np.isfinite(prices)], np.arange(1, 16) / 16)
    np.testing.assert_allclose(data.schema.numeric[0].boundaries, exact, rtol=0.15)


LOG_CONFIG = """
name: log
features:
  - {name: user, type: categorical}
  - {name: item, type: categorical}
  - {name: hist, type: sequence, item: item, max_len: 2, temporal_column: dt, max_position: 8}
labels:
  - {name: like, column: rating}
group_id: user
source:
  labels: {like: {threshold: 4}}
  behaviour_log:
    user: user
    time: t
    history: {item: hist}
    delta_column: dt
    max_len: 2
"""


def test_behaviour_log_builds_histories_by_time_and_splits_per_user(tmp_path):
    # Out of time order on purpose; user a has 5 events, user b 3.
    log = ("user,item,rating,t\n"
           "a,i3,5,30\n" "b,i1,2,5\n" "a,i1,4,10\n" "a,i2,1,20\n" "b,i2,5,7\n"
           "a,i4,3,40\n" "a,i1,5,50\n" "b,i3,4,9\n")
    (tmp_path / "log.csv").write_text(log)
    data = preprocess(LOG_CONFIG, tmp_path / "log.csv", tmp_path / "cache")
    assert data.num_rows == {"train": 4, "valid": 2, "test": 2}
    items = {v: i + 1 for i, v in enumerate(data.vocabulary("item"))}
    users = {v: i + 1 for i, v in enumerate(data.vocabulary("user"))}
    test = data.columns("test")
    check_columns(test, data.schema)
    by_user = {int(u): row for row, u in enumerate(test["categorical"][:, 0])}
    a, b = by_user[users["a"]], by_user[users["b"]]
    # a's last event (i1 at t=50) with its two most recent earlier items, oldest first: i3 and
    # i4 — but i4 occurs only in a's valid and test samples, so it is OOV (the vocabularies
    # come from the train samples).
    assert test["categorical"][a, 1] == items["i1"]
    assert "i4" not in items
    assert test["seq/hist"][a].tolist() == [items["i3"], 0]
    expected = time_buckets(torch.tensor([20.0, 10.0]), 8).tolist()  # 50-30, 50-40
    assert test["seq/hist/positions"][a].tolist() == expected
    assert test["labels"][a, 0] == 1.0  # rating 5 >= 4
    assert test["seq/hist"][b].tolist() == [items["i1"], items["i2"]]
    valid = data.columns("valid")
    assert sorted(valid["labels"][:, 0].tolist()) == [0.0, 1.0]  # a: i4 (3), b: i2 (5)
    train = data.columns("train")
    assert sorted(train["seq/hist/lengths"].tolist()) == [0, 0, 1, 2]  # first events: empty
    # An error in the log names the log's own line.
    (tmp_path / "bad.csv").write_text(log.replace("a,i4,3,40", "a,i4,3,soon"))
    with pytest.raises(DataFileError, match=r"bad\.csv: line 7: column 't': time must be a "
                                            r"number, got 'soon'"):
        preprocess(LOG_CONFIG, tmp_path / "bad.csv", tmp_path / "cache2")
    (tmp_path / "bad2.csv").write_text(log.replace("a,i4,3,40", "a,i4,x,40"))
    with pytest.raises(DataFileError, match=r"bad2\.csv: line 7: column 'rating'"):
        preprocess(LOG_CONFIG, tmp_path / "bad2.csv", tmp_path / "cache3",
                   budget=ChunkBudget(max_rows=2))  # located through the sample chunks


def test_behaviour_log_history_filter(tmp_path):
    config = LOG_CONFIG + "    valid_last: 0\n    history_filter: {clicked: [1]}\n"
    log = "user,item,rating,t,clicked\na,i1,5,1,1\na,i2,5,2,0\na,i3,5,3,1\na,i4,5,4,0\n"
    (tmp_path / "log.csv").write_text(log)
    data = preprocess(config, tmp_path / "log.csv", tmp_path / "cache")
    assert data.splits == ("train", "test")
    items = {v: i + 1 for i, v in enumerate(data.vocabulary("item"))}
    test = data.columns("test")
    assert test["seq/hist"][0].tolist() == [items["i1"], items["i3"]]  # clicked ones only


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.replace("source:\n", "source:\n  delimeter: ';'\n"),
     r"source\.delimeter: unknown key"),
    (lambda c: c.replace("labels:\n    buy:", "labels:\n    sell:"),
     r"source\.labels\.sell: no label named 'sell'"),
    (lambda c: c.replace("{positive: [buy]}", "{positive: [buy], threshold: 1}"),
     r"source\.labels\.buy: give exactly one of positive"),
    (lambda c: c.replace("source:\n", "source:\n  delimiter: ', '\n"),
     r"source\.delimiter: must be a single character"),
])
def test_bad_source_sections_name_the_key(mutate, message):
    with pytest.raises(ValueError, match=message):
        load_dataset_config(mutate(CONFIG))


def test_dataset_config_round_trip_and_with_reader():
    config = load_dataset_config(CONFIG)
    assert load_dataset_config(dataset_config_to_dict(config)) == config
    log = load_dataset_config(LOG_CONFIG)
    assert load_dataset_config(dataset_config_to_dict(log)) == log
    tsv = config.with_reader(delimiter="\t")
    assert isinstance(tsv, DatasetConfig) and tsv.source.reader.delimiter == "\t"
    assert tsv.source.labels == config.source.labels


def test_bad_inputs(tmp_path):
    (tmp_path / "train.csv").write_text(TRAIN)
    with pytest.raises(ValueError, match="need a 'train' split"):
        preprocess(CONFIG, {"test": tmp_path / "train.csv"}, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        preprocess(CONFIG, tmp_path / "nope.csv", tmp_path / "cache")
    with pytest.raises(ValueError, match="behaviour_log give the event log"):
        preprocess(LOG_CONFIG, {"train": tmp_path / "train.csv"}, tmp_path / "cache")
    (tmp_path / "short.csv").write_text("user,ad\nu1,a\n")
    with pytest.raises(DataFileError, match=r"short\.csv: missing column\(s\) \['price', 'count', "
                                            r"'hist', 'click', 'outcome'\]"):
        preprocess(CONFIG, tmp_path / "short.csv", tmp_path / "cache")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataFileError, match=r"empty\.csv: the file is empty"):
        preprocess(CONFIG, tmp_path / "empty.csv", tmp_path / "cache")
    with pytest.raises(ValueError, match="on_error must be"):
        preprocess(CONFIG, tmp_path / "train.csv", tmp_path / "cache", on_error="ignore")


def test_a_bad_test_file_fails_before_any_pass(tmp_path):
    (tmp_path / "train.csv").write_text(TRAIN)
    (tmp_path / "test.csv").write_text("user,ad\nu1,a\n")
    with pytest.raises(DataFileError, match=r"test\.csv: missing column\(s\)"):
        preprocess(CONFIG, {"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"},
                   tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing was written


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text(CONFIG.replace("positive: [buy]", "positive: []"))
    with pytest.raises(ValueError, match=r"data\.yaml: source\.labels\.buy\.positive: must be a "
                                         r"non-empty list"):
        load_dataset_config(path)
    path.write_text(CONFIG.replace("min_count: 2", "min_count: 0"))
    with pytest.raises(ValueError, match=r"data\.yaml: features\[0\]\.min_count"):
        load_dataset_config(path)


def test_quantile_feature_without_values_is_an_error(tmp_path):
    train = "user,ad,price,count,hist,click,outcome\nu1,a,,1,,1,buy\nu1,a,,1,,0,view\n"
    with pytest.raises(ValueError, match=r"column 'price': numeric feature 'price' has no finite "
                                         r"values"):
        _toy(tmp_path, train=train)


def test_parquet_inputs_with_list_and_string_columns(tmp_path):
    table = pa.table({
        "user": pa.array([1, 2, 1, None], pa.int64()),
        "ad": pa.array([7, 8, 7, 8]),
        "price": pa.array([1.0, None, 3.0, 4.0]),
        "count": pa.array([1, 2, 3, 4]),
        "hist": pa.array([[7, 8], [], None, [8]], pa.list_(pa.int64())),
        "click": pa.array([1, 0, 1, 0], pa.int8()),
        "outcome": pa.array(["buy", "view", "view", "buy"]),
    })
    pq.write_table(table, tmp_path / "train.parquet")
    data = preprocess(CONFIG, tmp_path / "train.parquet", tmp_path / "cache")
    columns = data.columns()
    check_columns(columns, data.schema)
    assert data.vocabulary("user") == ["1"]  # 1 twice, 2 once (min_count 2); None -> OOV
    assert columns["categorical"][:, 0].tolist() == [1, 0, 1, 0]
    assert columns["seq/hist/lengths"].tolist() == [2, 0, 0, 1]
    # integer items share the vocabulary of the integer ad column (both compared as text)
    ads = {v: i + 1 for i, v in enumerate(data.vocabulary("ad"))}
    assert set(ads) == {"7", "8"}
    assert columns["seq/hist"][0].tolist() == [ads["7"], ads["8"], 0]
    assert columns["categorical"][:, 1].tolist() == [ads["7"], ads["8"], ads["7"], ads["8"]]
    assert columns["labels"].tolist() == [[1, 1], [0, 0], [1, 0], [0, 1]]


def test_the_filled_schema_builds_the_models_quantizers(tmp_path):
    """Boundaries, max codes, means and stds are what hmoe.models' quantizers need."""
    from hmoe.models.hmoe import make_quantizer

    data = _toy(tmp_path)
    numeric = torch.from_numpy(data.columns()["numeric"])  # (N, F_n)
    for f, feature in enumerate(data.schema.numeric):
        quantizer = make_quantizer(feature)
        codes = quantizer(numeric[:, f:f + 1])  # (N, 1)
        finite = ~torch.isnan(numeric[:, f])
        assert torch.isnan(codes[~finite]).all()
        assert (codes[finite] >= 0).all()
        assert (codes[finite] <= quantizer.max_values[0]).all()
    price = make_quantizer(data.schema.numeric[0])
    assert price(torch.tensor([[0.0], [100.0]])).flatten().tolist() == [0.0, 3.0]


NEXT_DAY = """user,ad,price,count,hist,click,outcome
u2,e,2.0,1,e|a,1,buy
u9,b,9.5,4,b,0,view
u1,a,1.0,2,,1,view
"""


def test_new_inputs_are_encoded_with_a_previous_fit(tmp_path):
    """fit_from: the next day's file is encoded with yesterday's vocabularies and statistics
    (what a warm start needs): known values keep their ids, new ones are OOV, the schema is the
    same; the caches stay apart."""
    first = _toy(tmp_path)
    (tmp_path / "next.csv").write_text(NEXT_DAY)
    data = preprocess(CONFIG, {"train": tmp_path / "next.csv"}, tmp_path / "next-cache",
                      fit_from=tmp_path / "cache")
    assert data.schema == first.schema
    assert data.vocabulary("ad") == first.vocabulary("ad")
    ads = {value: i + 1 for i, value in enumerate(first.vocabulary("ad"))}
    users = {value: i + 1 for i, value in enumerate(first.vocabulary("user"))}
    columns = data.columns()
    assert columns["categorical"][:, 1].tolist() == [0, ads["b"], ads["a"]]  # "e" is new
    assert columns["categorical"][:, 0].tolist() == [users["u2"], 0, users["u1"]]
    assert columns["seq/hist"][0, :2].tolist() == [0, ads["a"]]
    # the fit is part of the fingerprint: the same inputs fitted afresh make another cache
    again = preprocess(CONFIG, {"train": tmp_path / "next.csv"}, tmp_path / "next-cache")
    assert not again.reused and again.vocabulary("ad") != first.vocabulary("ad")
    with pytest.raises(ValueError, match="fit_from: .* is the cache being written"):
        preprocess(CONFIG, {"train": tmp_path / "next.csv"}, tmp_path / "cache",
                   fit_from=tmp_path / "cache")
    other = CONFIG.replace("{name: ad, type: categorical}", "{name: ad, type: categorical, "
                                                            "min_count: 3}")
    with pytest.raises(ValueError, match="fit_from: .* another dataset config"):
        preprocess(other, {"train": tmp_path / "next.csv"}, tmp_path / "third",
                   fit_from=tmp_path / "cache")


def test_a_time_column_is_kept_for_online_training(tmp_path):
    """source.time_column: each row's time, in seconds, is kept as the int64 column
    "timestamp" of the cache (exact beyond float32's 2^24), which online training reads; a
    time that is not a number >= 0 is a bad row naming the column."""
    config = CONFIG.replace("source:\n", "source:\n  time_column: ts\n")
    times = [1_700_000_003, 1_700_000_007, 1_700_003_600, 1_700_090_000, 1_700_090_001,
             1_700_200_000]
    lines = TRAIN.strip().split("\n")
    train = "\n".join([lines[0] + ",ts"] + [f"{line},{t}" for line, t in zip(lines[1:], times)])
    data = _toy(tmp_path, train=train + "\n", config=config)
    table = pq.read_table(tmp_path / "cache" / "train.parquet")
    assert table.schema.field("timestamp").type == pa.int64()
    assert table.column("timestamp").to_pylist() == times
    columns = data.columns()
    assert columns["timestamp"].dtype == np.int64 and columns["timestamp"].tolist() == times
    assert load_dataset_config(config).source.time_column == "ts"
    assert dataset_config_to_dict(load_dataset_config(config))["source"]["time_column"] == "ts"
    bad = train.replace("1700003600", "-5")
    (tmp_path / "bad").mkdir()
    with pytest.raises(DataFileError, match="ts.*time must be a number of seconds"):
        _toy(tmp_path / "bad", train=bad + "\n", config=config)
