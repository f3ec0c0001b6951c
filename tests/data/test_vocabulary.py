"""hmoe.data.fit's bounded vocabulary counting: spilling to disk in hash partitions gives the
vocabularies (values, ids, counts) and the cache that counting in memory gives, never holds more
rows than its bound, and leaves no spill file behind, after an error too; and pass 2's compact
vocabulary index looks values up as a dict would."""

import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmoe.data import fit
from hmoe.data.encode import VocabularyIndex
from hmoe.data.preprocess import preprocess
from hmoe.data.readers import ChunkBudget, DataFileError

# Values whose order by text differs between bytes and naive expectations (upper before lower,
# accents after ASCII), so ties by text are checked beyond ASCII digits.
SPECIAL = ["Z", "z", "é", "ü", "ad_ß", "ad_Ω"]


def _skewed(rng, n: int, pool: int, prefix: str) -> list[str]:
    """n values from a pool of ``pool``, Zipf-distributed (a few very common, a long tail)."""
    ranks = (rng.zipf(1.3, size=n) - 1) % pool
    values = [f"{prefix}{r}" for r in ranks]
    for i in rng.choice(n, size=n // 20, replace=False):
        values[i] = SPECIAL[int(i) % len(SPECIAL)]
    return values


def _reference(values, min_count: int) -> tuple[list[str], list[int], int]:
    """The in-memory method: a Counter, kept by min_count, by descending count, ties by text."""
    counts = collections.Counter(v for v in values if v)
    kept = sorted(((v, c) for v, c in counts.items() if c >= min_count),
                  key=lambda item: (-item[1], item[0]))
    return [v for v, _ in kept], [c for _, c in kept], len(counts)


def _count(values, max_entries: int, directory, *, chunk: int = 300, partitions: int = 4):
    """Counts ``values`` in chunks through one _ValueCounts; returns it, its tally and the
    largest number of rows it held after any add."""
    tally = fit._CountTally()
    counts = fit._ValueCounts(max_entries, directory, tally, partitions)
    most = 0
    for start in range(0, len(values), chunk):
        counts.add(pa.array(values[start:start + chunk], pa.string()))
        most = max(most, counts.held_rows)
    return counts, tally, most


@pytest.mark.parametrize("min_count", [1, 2, 5])
def test_spilled_counts_equal_the_in_memory_counts(tmp_path, min_count, monkeypatch):
    """A bound far below the distinct values forces spills and re-splits of partitions; the
    vocabulary is the reference's, value for value, and no more than the bound is held."""
    rng = np.random.default_rng(min_count)
    values = _skewed(rng, 6000, 2500, "v")
    values[::97] = [None] * len(values[::97])  # missing values and empty text are not counted
    values[::101] = [""] * len(values[::101])
    spill_levels = []
    real_spill = fit._ValueCounts._spill

    def recording_spill(self, table):
        spill_levels.append(self.level)
        real_spill(self, table)

    monkeypatch.setattr(fit._ValueCounts, "_spill", recording_spill)
    bound = 40
    counts, tally, most = _count(values, bound, tmp_path / "spills")
    vocabulary = fit._make_vocabulary(counts.totals(), min_count)

    expected_values, expected_counts, distinct = _reference(values, min_count)
    assert vocabulary.values.to_pylist() == expected_values  # ids: 1 + the position
    assert vocabulary.counts.tolist() == expected_counts
    assert vocabulary.distinct == distinct
    index = VocabularyIndex(vocabulary.values)
    assert index.lookup(pa.array(expected_values, pa.string())).tolist() == \
        list(range(1, len(expected_values) + 1))
    assert max(spill_levels) >= 1  # partitions were themselves too big and split again
    assert tally.spills == len(spill_levels) and tally.spilled_entries > 0
    assert most <= bound and tally.peak <= bound  # the tally saw every change of held rows
    assert tally.held == 0
    assert not (tmp_path / "spills").exists()


def test_without_spilling_the_counts_are_the_same(tmp_path):
    rng = np.random.default_rng(7)
    values = _skewed(rng, 5000, 1000, "v")
    counts, tally, _ = _count(values, 10**9, tmp_path / "spills")
    vocabulary = fit._make_vocabulary(counts.totals(), 2)
    assert tally.spills == 0
    assert (vocabulary.values.to_pylist(), vocabulary.counts.tolist(), vocabulary.distinct) \
        == _reference(values, 2)


def test_many_small_chunks_are_summed_before_they_pile_up(tmp_path):
    """A feature of few values never reaches its bound in rows, but its per-chunk tables are
    summed into one past _MAX_HELD_TABLES."""
    values = ["a", "b", "c"] * 2000
    counts, _, _ = _count(values, 10**9, tmp_path / "spills", chunk=3)
    assert len(counts.held) <= fit._MAX_HELD_TABLES
    vocabulary = fit._make_vocabulary(counts.totals(), 1)
    assert vocabulary.values.to_pylist() == ["a", "b", "c"]
    assert vocabulary.counts.tolist() == [2000, 2000, 2000]


def test_the_partition_of_a_value_does_not_depend_on_its_neighbours():
    """A value hashes alike wherever it sits (sliced arrays, other chunks), and a level's
    partition spreads over the next level's partitions."""
    values = pa.array([f"user_{i}" for i in range(5000)] + SPECIAL)
    whole = fit._partition_of(values, 16, 0)
    assert (fit._partition_of(values.slice(1234), 16, 0) == whole[1234:]).all()
    assert (fit._partition_of(pa.array(values.to_pylist()[77:99]), 16, 0)
            == whole[77:99]).all()
    edge = fit._string_hash(pa.array(["", "a", "a\x00", "\x00a", "\x00"]), 0)
    assert len(set(edge.tolist())) == 5  # zero bytes and the empty string count
    assert np.bincount(whole, minlength=16).min() > 5000 / 16 / 2  # roughly uniform
    one_partition = values.filter(pa.array(whole == 3))
    assert len(set(fit._partition_of(one_partition, 16, 1).tolist())) == 16


# --------------------------------------------------------------------------------------------
# Through preprocess(): the cache does not depend on the bound.

CONFIG = """
name: vocab_toy
features:
  - {{name: user, type: categorical, min_count: {min_count}}}
  - {{name: ad, type: categorical, min_count: {min_count}}}
  - {{name: price, type: numeric}}
  - {{name: hist, type: sequence, item: ad, max_len: 4}}
labels: [{{name: click}}]
"""


def _write_log(path, n: int, seed: int, bad_row: int | None = None) -> dict[str, list[str]]:
    """A CSV of skewed users, ads and histories of ads; returns what each vocabulary counts
    (users; ads as targets and in the kept, most recent 4, history steps)."""
    rng = np.random.default_rng(seed)
    users, ads = _skewed(rng, n, 3000, "u"), _skewed(rng, n, 400, "ad")
    histories = [_skewed(rng, int(k), 400, "ad") for k in rng.integers(0, 8, size=n)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("user,ad,price,hist,click\n")
        for i in range(n):
            price = "abc" if i == bad_row else f"{rng.random():.3f}"
            f.write(f"{users[i]},{ads[i]},{price},{'|'.join(histories[i])},{i % 2}\n")
    return {"user": users, "ad": ads + [item for h in histories for item in h[-4:]]}


@pytest.mark.parametrize("min_count", [1, 2, 5])
def test_the_cache_with_a_tiny_bound_equals_the_unbounded_one(tmp_path, min_count):
    path = tmp_path / "log.csv"
    counted = _write_log(path, 3000, seed=min_count)
    config = CONFIG.format(min_count=min_count)
    budget = ChunkBudget(max_rows=250)
    tiny = preprocess(config, path, tmp_path / "tiny", budget=budget, count_memory_entries=48)
    free = preprocess(config, path, tmp_path / "free", budget=budget)

    counting = tiny.report["vocabulary_counts"]
    assert counting["memory_entries"] == 48 and counting["entries_per_feature"] == 24
    assert counting["spills"] > 0 and 0 < counting["peak_entries"] <= 48
    assert free.report["vocabulary_counts"]["spills"] == 0
    for name in ("user", "ad"):
        expected = _reference(counted[name], min_count)
        assert tiny.vocabulary(name) == free.vocabulary(name) == expected[0]
        assert tiny.feature_map["vocabularies"][name]["distinct_values"] == expected[2]
    assert pq.read_table(tmp_path / "tiny" / "vocabularies.parquet").equals(
        pq.read_table(tmp_path / "free" / "vocabularies.parquet"))
    assert tiny.feature_map["schema"] == free.feature_map["schema"]
    assert tiny.feature_map["vocabularies"] == free.feature_map["vocabularies"]
    tiny_columns, free_columns = tiny.columns(), free.columns()
    assert tiny_columns.keys() == free_columns.keys()
    for key in tiny_columns:
        np.testing.assert_array_equal(tiny_columns[key], free_columns[key])
    for cache in ("tiny", "free"):  # the spill directories are gone
        assert sorted(p.name for p in (tmp_path / cache).iterdir()) == [
            "feature_map.yaml", "train.parquet", "vocabularies.parquet"]


def _leftovers(cache_dir) -> list[str]:
    return [p.name for p in cache_dir.iterdir() if p.name.startswith(".vocabulary-counts")]


def test_spill_files_are_removed_after_a_bad_row_in_the_middle(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    _write_log(path, 2000, seed=3, bad_row=1500)
    spills = []
    real_spill = fit._ValueCounts._spill

    def recording_spill(self, table):
        real_spill(self, table)
        spills.append(sorted(p.name for p in self.directory.iterdir()))

    monkeypatch.setattr(fit._ValueCounts, "_spill", recording_spill)
    with pytest.raises(DataFileError, match="abc"):
        preprocess(CONFIG.format(min_count=1), path, tmp_path / "cache",
                   budget=ChunkBudget(max_rows=200), count_memory_entries=40)
    assert spills  # files were on disk when the bad row came
    assert _leftovers(tmp_path / "cache") == []


def test_spill_files_are_removed_after_an_error_while_summing(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    _write_log(path, 2000, seed=4)
    real_read = fit._read_partition
    reads = []

    def failing_read(spill, part):
        reads.append(part)
        if len(reads) == 5:
            raise OSError("disk gone")
        return real_read(spill, part)

    monkeypatch.setattr(fit, "_read_partition", failing_read)
    with pytest.raises(OSError, match="disk gone"):
        preprocess(CONFIG.format(min_count=1), path, tmp_path / "cache",
                   budget=ChunkBudget(max_rows=200), count_memory_entries=40)
    assert _leftovers(tmp_path / "cache") == []


def test_the_bound_must_leave_two_rows_per_feature(tmp_path):
    path = tmp_path / "log.csv"
    _write_log(path, 50, seed=5)
    with pytest.raises(ValueError, match="count_memory_entries: must be at least 2 per counted"):
        preprocess(CONFIG.format(min_count=1), path, tmp_path / "cache",
                   count_memory_entries=3)  # 2 counted features
    with pytest.raises(ValueError, match="count_memory_entries"):
        preprocess(CONFIG.format(min_count=1), path, tmp_path / "cache",
                   count_memory_entries=1)
    assert _leftovers(tmp_path / "cache") == []


def test_vocabulary_index_looks_up_like_a_dict():
    """Pass 2's compact index (sorted UTF-8 bytes + binary search) gives the ids a value -> id
    dict gives: unicode, empty strings, values longer than any in the vocabulary, nulls."""
    rng = np.random.default_rng(3)
    alphabet = list("ab日é0 ")
    words = sorted({"".join(rng.choice(alphabet, size=rng.integers(0, 7))) for _ in range(3000)})
    kept = [words[i] for i in rng.permutation(len(words))[:len(words) // 2]]  # id order
    index = VocabularyIndex(pa.array(kept, pa.string()))
    reference = {value: i + 1 for i, value in enumerate(kept)}
    queries = [words[i] for i in rng.integers(0, len(words), 5000)] + ["ab" * 20, None]
    ids = index.lookup(pa.array(queries, pa.string()))
    assert ids.tolist() == [reference.get(q, 0) if q is not None else 0 for q in queries]
    assert VocabularyIndex(pa.array([], pa.string())).lookup(pa.array(["a"])).tolist() == [0]
