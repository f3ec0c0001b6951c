"""hmoe.data.store.Rows / Picked: picking random rows of Arrow row groups, against Arrow's take."""

import itertools

import numpy as np
import pyarrow as pa
import pytest

from hmoe.data.store import Rows

WIDTH = 7


def _table(rng, n: int) -> pa.Table:
    lengths = rng.integers(0, WIDTH + 1, n)
    lengths[rng.random(n) < 0.2] = 0  # empty lists too
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(-9, 10**6,
                                                                              offsets[-1])))
    floats = rng.normal(size=n).astype(np.float32)
    floats[rng.random(n) < 0.1] = np.nan
    return pa.table({
        "a": pa.array(rng.integers(-10**12, 10**12, n)),
        "b": pa.array(floats),
        "c": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 3).astype(np.float32)), 3),
        "d": pa.array(rng.integers(0, 100, n)),
        "e": pa.array(rng.normal(size=n)),  # float64
        "f": pa.array(rng.integers(0, 5, n)),
        "seq": lists,
    })


def _chunked(table: pa.Table, cuts) -> pa.Table:
    """The same rows in several chunks (as a window of several row groups is read)."""
    bounds = [0, *cuts, table.num_rows]
    return pa.concat_tables([table.slice(a, b - a) for a, b in itertools.pairwise(bounds)])


def _reference(table: pa.Table, index: np.ndarray, name: str):
    return table.column(name).take(pa.array(index)).to_pylist()


@pytest.mark.parametrize("n,cuts", [(1, []), (97, []), (500, [1, 250, 251, 499]), (300, [100, 200])])
def test_picks_equal_arrows_take(n, cuts):
    rng = np.random.default_rng(n)
    table = _table(rng, n)
    rows = Rows(_chunked(table, cuts))
    index = rng.integers(0, n, 2 * n + 3)  # any order, repeats
    picked = rows.pick(index)
    assert picked.num_rows == len(index)
    for name in ("a", "b", "d", "e", "f"):
        got = picked.column(name)
        assert got.shape == (len(index),) and got.flags.writeable
        np.testing.assert_array_equal(got, np.array(_reference(table, index, name),
                                                    dtype=got.dtype))
    np.testing.assert_array_equal(picked.column("c"),
                                  np.array(_reference(table, index, "c"), np.float32))
    ids, lengths = picked.lists("seq", WIDTH)
    expected = _reference(table, index, "seq")
    assert ids.dtype == np.int64 and ids.shape == (len(index), WIDTH)
    np.testing.assert_array_equal(lengths, [len(v) for v in expected])
    np.testing.assert_array_equal(ids, [v + [0] * (WIDTH - len(v)) for v in expected])
    stacked = picked.stack(["a", "d", "f"], np.int64)  # neighbours of one dtype: one span
    np.testing.assert_array_equal(stacked, np.column_stack(
        [picked.column(k) for k in ("a", "d", "f")]))
    mixed = picked.stack(["d", "b"], np.float64)  # not neighbours: column by column
    np.testing.assert_array_equal(mixed, np.column_stack(
        [picked.column("d"), picked.column("b")]).astype(np.float64))


def test_pick_all_reads_every_row_in_order_without_packing():
    rng = np.random.default_rng(3)
    table = _table(rng, 200)
    rows = Rows(_chunked(table, [50, 51]), pack=False)
    everything = rows.pick()
    np.testing.assert_array_equal(everything.column("a"), table.column("a").to_numpy())
    ids, lengths = everything.lists("seq", WIDTH)
    expected = table.column("seq").to_pylist()
    np.testing.assert_array_equal(lengths, [len(v) for v in expected])
    np.testing.assert_array_equal(ids, [v + [0] * (WIDTH - len(v)) for v in expected])
    with pytest.raises(ValueError, match="pack=True"):
        rows.pick(np.arange(3))


def test_bad_columns_are_refused_by_name():
    with pytest.raises(ValueError, match="'?n'?: an integer column with nulls"):
        Rows(pa.table({"n": pa.array([1, None, 3])}))
    with pytest.raises(ValueError, match="s: a column of type string"):
        Rows(pa.table({"s": pa.array(["x", "y"])}))
    with pytest.raises(ValueError, match="l: a list column of double"):
        Rows(pa.table({"l": pa.array([[1.0], [2.0]])}))
    with pytest.raises(ValueError, match="l: a list column with nulls"):
        Rows(pa.table({"l": pa.array([[1], None])}))
    nan = Rows(pa.table({"x": pa.array([1.0, None], pa.float32())})).pick(np.array([1, 0]))
    np.testing.assert_array_equal(nan.column("x"), [np.nan, 1.0])  # a missing float is NaN
    rows = Rows(pa.table({"l": pa.array([[1, 2, 3], [4]])}))
    with pytest.raises(ValueError, match="l: a row holds 3 values, more than 2"):
        rows.pick(np.array([1, 0])).lists("l", 2)
    with pytest.raises(KeyError, match="no column 'zz'"):
        rows.pick(np.array([0])).column("zz")
    with pytest.raises(ValueError, match="not a list column"):
        Rows(pa.table({"a": pa.array([1])})).pick(np.array([0])).lists("a", 2)

