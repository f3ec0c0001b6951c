"""iterate_batches: layout dtypes, order, shuffling by seed, drop_last; check_columns."""

import numpy as np
import pytest
import torch

from hmoe.data.batches import check_columns, iterate_batches, num_rows, to_tensors
from hmoe.data.schema import CategoricalFeature, Label, Schema, SequenceFeature

N, L = 103, 6

SCHEMA = Schema(
    "t",
    categorical=(CategoricalFeature("user", vocab_size=20), CategoricalFeature("ad", vocab_size=9)),
    sequence=(SequenceFeature("hist", item="ad", max_len=L),),
    labels=(Label("click"), Label("like")),
    group_id="user", exposure_count="shown").validate()


def make_columns(seed=0, n=N):
    """Valid columns of SCHEMA in deliberately loose dtypes (int32, float64, bool)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, L + 1, size=n)
    steps = np.arange(L)
    valid = steps[None, :] < lengths[:, None]
    return {
        "categorical": np.column_stack([rng.integers(1, 20, size=n),
                                        rng.integers(0, 9, size=n)]).astype(np.int32),
        "numeric": rng.normal(size=(n, 2)),  # float64
        "seq/hist": np.where(valid, rng.integers(1, 9, size=(n, L)), 0),
        "seq/hist/lengths": lengths,
        "seq/hist/positions": np.where(valid, lengths[:, None] - steps[None, :], 0),
        "labels": rng.random((n, 2)) < 0.3,  # bool
        "group_id": np.arange(n),
        "exposure_count": rng.integers(1, 4, size=n),
        "row": np.arange(n, dtype=np.int32),  # outside the layout: keeps its dtype
    }


def test_num_rows():
    assert num_rows(make_columns()) == N
    with pytest.raises(ValueError, match="disagree.*labels: 5"):
        num_rows({"categorical": np.zeros((4, 1)), "labels": np.zeros((5, 1))})
    with pytest.raises(ValueError, match="empty"):
        num_rows({})
    with pytest.raises(ValueError, match="scalar"):
        num_rows({"labels": np.float32(1.0)})


def test_layout_dtypes_contiguity_and_order():
    columns = make_columns()
    batches = iterate_batches(columns, 10)
    assert len(batches) == 11
    batches = list(batches)
    assert [len(b["labels"]) for b in batches] == [10] * 10 + [3]
    dtypes = {"categorical": torch.int64, "numeric": torch.float32, "seq/hist": torch.int64,
              "seq/hist/lengths": torch.int64, "seq/hist/positions": torch.int64,
              "labels": torch.float32, "group_id": torch.int64, "exposure_count": torch.float32,
              "row": torch.int32}
    for batch in batches:
        assert {k: v.dtype for k, v in batch.items()} == dtypes
        assert all(v.is_contiguous() for v in batch.values())
    joined = {k: torch.cat([b[k] for b in batches]) for k in dtypes}
    for key, values in columns.items():
        np.testing.assert_allclose(joined[key].numpy(), np.asarray(values, dtype=np.float64)
                                   .astype(joined[key].numpy().dtype))
    assert torch.equal(joined["row"], torch.arange(N, dtype=torch.int32))


def test_drop_last():
    batches = list(iterate_batches(make_columns(), 10, drop_last=True))
    assert len(batches) == 10 and all(len(b["row"]) == 10 for b in batches)
    assert len(iterate_batches(make_columns(n=30), 10, drop_last=True)) == 3
    assert list(iterate_batches(make_columns(n=5), 10, drop_last=True)) == []
    assert len(list(iterate_batches(make_columns(n=5), 10))) == 1


def test_shuffle_is_a_seeded_permutation_keeping_rows_aligned():
    columns = make_columns()
    rows = [torch.cat([b["row"] for b in iterate_batches(columns, 16, shuffle=True, seed=s)])
            for s in (0, 0, 1)]
    assert torch.equal(rows[0], rows[1])
    assert not torch.equal(rows[0], rows[2])
    assert not torch.equal(rows[0], torch.arange(N, dtype=torch.int32))
    assert torch.equal(rows[0].sort().values, torch.arange(N, dtype=torch.int32))
    # Every column follows the same permutation.
    for batch in iterate_batches(columns, 16, shuffle=True, seed=3):
        index = batch["row"].long().numpy()
        np.testing.assert_array_equal(batch["seq/hist"].numpy(), columns["seq/hist"][index])
        np.testing.assert_array_equal(batch["group_id"].numpy(), index)
        assert batch["categorical"].is_contiguous()


def test_shuffle_with_drop_last_drops_a_random_tail():
    batches = list(iterate_batches(make_columns(), 50, shuffle=True, seed=5, drop_last=True))
    seen = torch.cat([b["row"] for b in batches])
    assert len(seen) == 100 and len(set(seen.tolist())) == 100


def test_torch_input_and_shared_memory():
    columns = to_tensors(make_columns())
    assert columns["labels"].dtype == torch.float32
    batch = next(iterate_batches(columns, 7))
    assert batch["seq/hist"].data_ptr() == columns["seq/hist"].data_ptr()  # a view, no copy
    readonly = np.arange(12, dtype=np.int64).reshape(6, 2)
    readonly.flags.writeable = False
    assert next(iterate_batches({"categorical": readonly}, 4))["categorical"].shape == (4, 2)


def test_bad_arguments_fail_before_the_first_batch():
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            iterate_batches(make_columns(), bad)
    with pytest.raises(TypeError, match=r"columns\['categorical'\] must hold integer ids"):
        iterate_batches({"categorical": np.zeros((3, 2), np.float32)}, 2)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        iterate_batches({"labels": [[0.0], [1.0]]}, 2)


def test_empty_columns_give_no_batches():
    assert list(iterate_batches(make_columns(n=0), 4)) == []


def test_check_columns_accepts_valid_columns():
    check_columns(to_tensors(make_columns()), SCHEMA)
    check_columns(to_tensors(make_columns(n=0)), SCHEMA)


def _broken(key, change):
    def make():
        columns = to_tensors(make_columns())
        columns[key] = change(columns[key].clone())
        return columns
    return make


def _set_at(index, value):
    def change(t):
        t[index] = value
        return t
    return change


@pytest.mark.parametrize("make, match", [
    (_broken("categorical", _set_at((4, 1), 9)), r"categorical.*field 'ad' has id 9 >= its "
                                                 r"vocab_size 9"),
    (_broken("categorical", _set_at((4, 0), -1)), "field 'user' has negative id -1"),
    (_broken("categorical", lambda t: t[:, :1].contiguous()), r"expected shape \(103, 2\)"),
    (_broken("categorical", lambda t: t.int()), "expected dtype torch.int64, got torch.int32"),
    (_broken("seq/hist", _set_at((0, 0), 12)), "sequence 'hist' has id 12"),
    (_broken("seq/hist/lengths", _set_at(3, L + 1)), r"lengths must lie in \[0, 6\]"),
    (_broken("seq/hist/lengths", _set_at(3, -1)), r"lengths must lie in \[0, 6\]"),
    (lambda: {**_broken("seq/hist/lengths", _set_at(3, L))(),
              "seq/hist/positions": _set_at((3, L - 1), 0)(
                  to_tensors(make_columns())["seq/hist/positions"].clone())},
     r"positions at valid steps must lie in \[1, 6\]"),
    (_broken("labels", _set_at((0, 0), 2.0)), "labels must be 0 or 1"),
    (_broken("exposure_count", _set_at(0, 0.0)), "exposure counts must be >= 1"),
    (_broken("group_id", lambda t: t[:, None].contiguous()), r"group_id.*expected shape \(103,\)"),
])
def test_check_columns_rejects(make, match):
    with pytest.raises(ValueError, match=match):
        check_columns(make(), SCHEMA)


def test_check_columns_missing_key_and_too_many_steps():
    columns = to_tensors(make_columns())
    del columns["exposure_count"]
    with pytest.raises(ValueError, match=r"columns lack \['exposure_count'\]"):
        check_columns(columns, SCHEMA)
    columns = to_tensors(make_columns())
    for key in ("seq/hist", "seq/hist/positions"):
        columns[key] = torch.cat([columns[key], torch.zeros(N, 1, dtype=torch.int64)], 1)
    with pytest.raises(ValueError, match="more than max_len 6"):
        check_columns(columns, SCHEMA)
