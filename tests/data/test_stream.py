"""The stream of batches (hmoe.data.stream): every row once per epoch, the same batches for the
same seed, workers that reproduce the in-process order, exact resume from any batch, a shuffle
buffer that behaves like random sampling, hash subsets, and bad rows stopped with their file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe.data import SyntheticConfig, generate
from hmoe.data.store import ParquetStore, StoreWriter
from hmoe.data.stream import (
    BatchStream,
    ColumnSource,
    StoreSource,
    StreamPlan,
    Subset,
    stream_batches,
)

WORLD = generate(SyntheticConfig(num_rows=2600, num_users=100, num_ads=200, num_advertisers=20,
                                 max_len=6, seed=4))
SCHEMA = WORLD.schema


def _columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A toy split of ``n`` rows whose "row" column names each row."""
    rng = np.random.default_rng(seed)
    return {"row": np.arange(n, dtype=np.int64), "labels": rng.integers(0, 2, (n, 1)).astype(
        np.float32)}


def _rows(batches) -> list[np.ndarray]:
    return [b["row"].numpy().copy() for b in batches]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """The world's train split in a store of irregular row groups (97 rows)."""
    path = tmp_path_factory.mktemp("store") / "train.parquet"
    with StoreWriter(path, SCHEMA, extra=("true/click",), row_group_rows=97) as writer:
        columns = WORLD.splits["train"]
        for start in range(0, len(columns["labels"]), 311):  # chunks unaligned with groups
            writer.write({k: v[start:start + 311] for k, v in columns.items()})
    return path


def test_store_round_trips_and_reads_any_units(store_path):
    store = ParquetStore(store_path, SCHEMA)
    train = WORLD.splits["train"]
    assert store.num_rows == len(train["labels"]) and set(store.unit_rows[:-1]) == {97}
    assert store.extra == ("true/click",)
    whole = store.columns()
    assert set(whole) == {k for k in train if k != "true/conversion" and k != "true/like"}
    for key in whole:
        np.testing.assert_array_equal(whole[key], train[key], err_msg=key)
    picked = store.read([3, 0])
    np.testing.assert_array_equal(picked["labels"],
                                  np.concatenate([train["labels"][291:388], train["labels"][:97]]))


@pytest.mark.parametrize("n, unit, buffer, batch, streams", [
    (1000, 64, 200, 37, 1), (1000, 64, 200, 37, 3), (999, 1000, 10_000, 50, 1),
    (257, 10, 1, 16, 2), (40, 7, 13, 64, 2)])
def test_every_row_once_per_epoch_and_a_pure_function_of_seed_and_epoch(n, unit, buffer, batch,
                                                                         streams):
    source = ColumnSource(_columns(n), unit_rows=unit)

    def epoch_rows(seed, epoch):
        plan = StreamPlan(tuple(source.unit_rows), batch, True, buffer, seed, epoch, streams)
        return _rows(BatchStream(source, plan, 0, 0, False))

    rows = epoch_rows(1, 0)
    assert sorted(np.concatenate(rows).tolist()) == list(range(n))
    assert sum(len(r) < batch for r in rows) <= streams  # only a stream's last batch is short
    assert all(np.array_equal(a, b) for a, b in zip(rows, epoch_rows(1, 0)))
    assert not np.array_equal(np.concatenate(rows), np.concatenate(epoch_rows(1, 1)))
    assert not np.array_equal(np.concatenate(rows), np.concatenate(epoch_rows(2, 0)))


def test_without_shuffle_one_stream_is_file_order():
    rows = _rows(stream_batches(_columns(1000), 64))
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(1000))


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_in_process_order(store_path, workers):
    """DataLoader's workers return the same batches, in the same order, as the plan's round
    robin run in this process (so num_workers changes speed, not results)."""
    source = StoreSource(ParquetStore(store_path, SCHEMA))
    kwargs = dict(shuffle=True, seed=3, epoch=1, shuffle_buffer=250)
    loaded = list(stream_batches(source, 64, num_workers=workers, **kwargs))
    plan = stream_batches(source, 64, num_workers=workers, **kwargs).plan
    in_process = list(BatchStream(source, plan, 0, 0, False))
    assert len(loaded) == len(in_process) == len(plan)
    for a, b in zip(loaded, in_process):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)


def test_one_worker_equals_none(store_path):
    source = StoreSource(ParquetStore(store_path, SCHEMA))
    a = [b["labels"] for b in stream_batches(source, 50, shuffle=True, seed=9, num_workers=1,
                                             shuffle_buffer=300)]
    b = [b["labels"] for b in stream_batches(source, 50, shuffle=True, seed=9, num_workers=0,
                                             shuffle_buffer=300)]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_any_batch_gives_the_rest_of_the_epoch(workers):
    source = ColumnSource(_columns(1300), unit_rows=70)
    kwargs = dict(shuffle=True, seed=5, epoch=2, shuffle_buffer=180, num_workers=workers)
    full = _rows(stream_batches(source, 33, **kwargs))
    for start in (0, 1, 5, 6, 17, len(full) - 1, len(full)):
        rest = _rows(stream_batches(source, 33, start=start, **kwargs))
        assert len(rest) == len(full) - start
        assert all(np.array_equal(a, b) for a, b in zip(rest, full[start:])), start


@pytest.mark.parametrize("ranks,workers", [(2, 0), (3, 2)])
def test_ranks_read_disjoint_rows_in_the_same_number_of_steps(ranks, workers):
    source = ColumnSource(_columns(1300), unit_rows=70)  # 19 units: uneven between ranks
    kwargs = dict(shuffle=True, seed=3, epoch=1, shuffle_buffer=150, num_workers=workers,
                  num_ranks=ranks)
    per_rank = [_rows(stream_batches(source, 20, rank=r, **kwargs)) for r in range(ranks)]
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1 and steps.pop() > 0  # lockstep: every rank takes as many steps
    seen = [np.concatenate(batches) for batches in per_rank]
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)  # no row on two ranks or twice
    assert len(everything) > 0.8 * 1300  # only the surplus of the fuller ranks is left out
    again = _rows(stream_batches(source, 20, rank=1, **kwargs))
    assert all(np.array_equal(a, b) for a, b in zip(again, per_rank[1]))  # a pure function
    rest = _rows(stream_batches(source, 20, rank=1, start=3, **kwargs))
    assert all(np.array_equal(a, b) for a, b in zip(rest, per_rank[1][3:]))
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        stream_batches(source, 20, rank=2, num_ranks=2)


def test_round_robin_counts_match_a_replay():
    plan = StreamPlan((50, 10, 30, 5, 70), 8, True, 20, 0, 0, 3)
    order = []
    source = ColumnSource({"row": np.arange(165), "labels": np.zeros((165, 1), np.float32)},
                          unit_rows=1)  # unit sizes differ from the plan's: only counts matter
    counts = [plan.stream_batches(s) for s in range(3)]
    taken = [0, 0, 0]
    live = [s for s in range(3) if counts[s]]
    while live:  # the reference round robin
        for s in list(live):
            order.append(s)
            taken[s] += 1
            if taken[s] == counts[s]:
                live.remove(s)
    for k in range(len(order) + 1):
        expected = [order[:k].count(s) for s in range(3)]
        assert plan.consumed(k) == expected, k
    with pytest.raises(ValueError, match="start must lie in"):
        plan.consumed(len(order) + 1)
    del source


def test_shuffle_buffer_on_a_label_sorted_file_samples_like_random():
    """On a file sorted by label the batch label means of a buffered shuffle spread about like
    those of random batches (binomial variance), not like the sorted file's 0-or-1 batches."""
    n, batch, p = 60_000, 128, 0.3
    labels = np.sort((np.random.default_rng(0).random(n) < p).astype(np.float32))[::-1]
    columns = {"labels": labels[:, None].copy(), "row": np.arange(n)}
    source = ColumnSource(columns, unit_rows=64)  # 938 units
    means = np.array([b["labels"].mean().item() for b in stream_batches(
        source, batch, shuffle=True, seed=0, shuffle_buffer=64 * 256, drop_last=True)])
    binomial = p * (1 - p) / batch
    assert 0.6 * binomial < means.var() < 1.8 * binomial
    assert abs(means.mean() - labels.mean()) < 0.01
    sorted_means = np.array([b["labels"].mean().item() for b in stream_batches(
        source, batch, drop_last=True)])
    assert sorted_means.var() > 20 * binomial  # what no shuffle gives


def test_subsets_partition_a_source_stably():
    source = ColumnSource(_columns(5000), unit_rows=300)
    fractions = {"valid": 0.1, "test": 0.15, "train": 0.75}
    parts = {name: np.concatenate(_rows(stream_batches(Subset(source, name, fractions, 7), 999)))
             for name in fractions}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(5000))
    for name, fraction in fractions.items():
        assert abs(len(parts[name]) / 5000 - fraction) < 0.02
    again = np.concatenate(_rows(stream_batches(Subset(source, "valid", fractions, 7), 999)))
    np.testing.assert_array_equal(again, parts["valid"])
    other = np.concatenate(_rows(stream_batches(Subset(source, "valid", fractions, 8), 999)))
    assert not np.array_equal(other, parts["valid"])
    with pytest.raises(ValueError, match="part: must be one of"):
        Subset(source, "nope", fractions, 7)
    with pytest.raises(ValueError, match="fractions: must be >= 0 and sum to 1"):
        Subset(source, "valid", {"valid": 0.5, "train": 0.6}, 7)


def test_bad_rows_stop_the_stream_naming_file_and_row_group(tmp_path):
    columns = {k: v.copy() for k, v in WORLD.splits["test"].items()}
    columns["categorical"][150, 1] = 10_000  # beyond ad_id's vocabulary
    path = tmp_path / "bad.parquet"
    with StoreWriter(path, SCHEMA, row_group_rows=100) as writer:
        writer.write({k: v for k, v in columns.items() if not k.startswith("true/")})
    source = StoreSource(ParquetStore(path, SCHEMA))
    with pytest.raises(ValueError, match=r"bad\.parquet row group\(s\) \[1\].*ad_id"):
        list(stream_batches(source, 64))
    with pytest.raises(ValueError, match=r"bad\.parquet row group\(s\) \[1\].*ad_id"):
        list(stream_batches(source, 64, num_workers=1))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"batch_size": 8, "shuffle_buffer": 0}, "shuffle_buffer must be an int >= 1"),
    ({"batch_size": 8, "num_workers": -1}, "num_workers must be an int >= 0"),
    ({"batch_size": 8, "start": 1000}, r"start must be an int in \[0, 13\]"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stream_batches(_columns(100), **kwargs)


def test_a_store_of_another_schema_is_refused(store_path):
    other = generate(SyntheticConfig(num_rows=300, num_users=50, num_ads=60, num_advertisers=5,
                                     num_low_card_fields=2, seed=1)).schema  # 6 fields, not 7
    with pytest.raises(ValueError, match="not a store of schema"):
        ParquetStore(store_path, other)
    with pytest.raises(FileNotFoundError, match="no such store file"):
        ParquetStore(store_path.with_name("missing.parquet"), SCHEMA)


def test_the_writer_leaves_no_file_after_an_error(tmp_path):
    path = tmp_path / "x.parquet"
    with pytest.raises(KeyError):
        with StoreWriter(path, SCHEMA) as writer:
            writer.write({"labels": np.zeros((3, 3), np.float32)})
    assert not list(tmp_path.iterdir())
