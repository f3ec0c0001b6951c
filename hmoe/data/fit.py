"""Pass 1 over the training chunks: vocabularies and numeric statistics -> the filled-in schema.

* Categorical feature f: every non-missing value seen at least ``min_count`` times gets an id
  1, 2, ... by descending count, ties by the value's text; everything else (rarer values,
  values first seen in valid/test, missing ones) maps to 0, the OOV/padding id.
  ``vocab_size`` = 1 + the number of kept values. A sequence's items share the vocabulary of
  their categorical ``item`` feature, and their occurrences count towards it too. A
  pre-indexed feature (``vocab_size`` set) gets no vocabulary.
* Numeric feature: ``mean`` and ``std`` of the finite values (std 1 when constant); for
  ``quantizer: quantile`` without ``boundaries``, the boundaries at quantiles 1/n ... (n-1)/n
  (n = num_bins) of the values — exact up to ``quantile_sample`` values, else of a uniform
  random sample of that many (deterministic); for ``quantizer: log`` without ``max_code``, the
  code of the largest value (so MNSE needs no more digits than the data has). These are what
  :func:`hmoe.models.hmoe.make_quantizer` and the "scaled" encoder read.

Counting values in bounded memory. A vocabulary needs the exact count of every distinct value,
and an ads log's user or device ids run to 10^7+ distinct values: a dict of them grows without
bound. So each feature counts through a :class:`_ValueCounts` that holds at most its share of
``count_memory_entries`` (value, count) rows in memory (Arrow tables, summed per value when
full). When still full it *spills* them to disk: split by a hash of the value into P = 16
partitions, one Arrow IPC file per spill with one record batch per partition, in a temporary
directory under the cache directory that is removed afterwards (on an error too). Every
occurrence of a value lands in the same partition, so at the end each partition is summed on
its own, through a fresh counter whose hash is salted differently: a partition that is itself
too big spills and splits again (Grace hash aggregation). Memory stays within the bound plus
the piece of a spill file being read; only the features that exceed their share pay disk I/O.

Why exact spilling rather than a count-min sketch: a sketch only over-counts, so values seen
fewer than ``min_count`` times would get ids (embedding rows that never train) and the order of
ids would depend on hash collisions; and with ``min_count: 1`` — keep every value — the output
is every distinct value anyway, which no sketch can shrink. Spilling gives the vocabulary the
in-memory count gives, value for value, id for id.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmoe.data.hashing import mix64
from hmoe.data.parse import _Counter, _parse_checked, _Parsed, _Plan
from hmoe.data.readers import Chunk
from hmoe.data.schema import NumericFeature, Schema

COUNT_MEMORY_ENTRIES = 2_000_000  # default bound on the (value, count) rows held, all features
_SPILL_PARTITIONS = 16  # hash partitions of a spill; the end sums one at a time
# Re-splits of a partition before it is summed in memory regardless: never reached in practice,
# as each level divides a partition's distinct values by about P.
_MAX_LEVEL = 16
_MAX_HELD_TABLES = 256  # held tables summed into one past this (each has a fixed overhead)
_HASH_ROWS = 1 << 16  # strings hashed at a time: bounds the per-byte temporaries
_COUNTS = pa.schema([("value", pa.string()), ("count", pa.int64())])


def _fit(plan: _Plan, chunks: Iterable[Chunk], on_error: str, quantile_sample: int,
         train_paths: str, *, count_memory_entries: int, scratch_dir: Path
         ) -> tuple[Schema, dict[str, _Vocabulary], dict[str, int]]:
    """Pass 1: the filled-in schema, the vocabularies and what counting them took (for the
    report), from the training chunks. Spill files go to a temporary directory in
    ``scratch_dir``."""
    schema = plan.schema
    share = _entries_per_feature(count_memory_entries, len(plan.vocab_features))
    tally = _CountTally()
    stats = [_NumericStats(quantile_sample, f.quantizer == "quantile" and f.boundaries is None,
                           seed=j) for j, f in enumerate(schema.numeric)]
    counter = _Counter()
    with tempfile.TemporaryDirectory(prefix=".vocabulary-counts-", dir=scratch_dir) as spills:
        counts = {f.name: _ValueCounts(share, Path(spills) / str(i), tally, _SPILL_PARTITIONS)
                  for i, f in enumerate(plan.vocab_features)}
        for chunk in chunks:
            parsed = _parse_checked(plan, chunk, on_error, counter)
            if parsed is not None:
                _observe(schema, parsed, counts, stats)
        if counter.rows == 0:
            raise ValueError(f"{train_paths}: no valid training rows"
                             + (f" ({sum(counter.skipped.values())} were skipped)"
                                if counter.skipped else ""))
        vocabularies = {f.name: _make_vocabulary(counts[f.name].totals(), f.min_count)
                        for f in plan.vocab_features}
    categorical = tuple(dataclasses.replace(f, vocab_size=len(vocabularies[f.name].values) + 1)
                        if f.name in vocabularies else f for f in schema.categorical)
    numeric = tuple(_fill_numeric(f, stat, train_paths) for f, stat in zip(schema.numeric, stats))
    filled = dataclasses.replace(schema, categorical=categorical, numeric=numeric).validate()
    counting = {"memory_entries": count_memory_entries, "entries_per_feature": share,
                "partitions": _SPILL_PARTITIONS, **tally.as_dict()}
    return filled, vocabularies, counting


def _observe(schema: Schema, parsed: _Parsed, counts: Mapping[str, _ValueCounts],
             stats: Sequence[_NumericStats]) -> None:
    """Counts a chunk's categorical values and sequence items, and updates the statistics."""
    for f, values in zip(schema.categorical, parsed.categorical):
        if f.name in counts:
            counts[f.name].add(values)
    for seq, values in zip(schema.sequence, parsed.sequences):
        if seq.item in counts:
            counts[seq.item].add(values.items)
    for j, stat in enumerate(stats):
        stat.update(parsed.numeric[:, j])


def _entries_per_feature(total: int, features: int) -> int:
    """Each counted feature's share of the bound. A counter needs room for two rows: merging a
    held value with an incoming one must fit without spilling, or a partition holding a single
    value would spill and re-split forever."""
    share = total // max(features, 1)
    if share < 2:
        raise ValueError(f"count_memory_entries: must be at least 2 per counted categorical "
                         f"feature ({features} features), got {total}")
    return share


# --------------------------------------------------------------------------------------------
# Numeric statistics.


class _NumericStats:
    """Streaming mean / variance (Chan's merge), maximum and a bounded uniform sample."""

    def __init__(self, sample_size: int, keep_sample: bool, seed: int):
        self.count, self.mean, self.m2, self.max = 0, 0.0, 0.0, -math.inf
        self.sample_size, self.keep_sample = sample_size, keep_sample
        self.rng = np.random.default_rng(seed)
        self.sample = np.zeros(0)
        self.keys = np.zeros(0)

    def update(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return
        n, mean = finite.size, float(finite.mean())
        m2 = float(((finite - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.max = max(self.max, float(finite.max()))
        if self.keep_sample:  # keep the values with the smallest random keys: a uniform sample
            keys = self.rng.random(n)
            self.sample = np.concatenate([self.sample, finite])
            self.keys = np.concatenate([self.keys, keys])
            if self.sample.size > self.sample_size:
                keep = np.argpartition(self.keys, self.sample_size - 1)[:self.sample_size]
                self.sample, self.keys = self.sample[keep], self.keys[keep]

    @property
    def std(self) -> float:
        std = math.sqrt(self.m2 / self.count) if self.count else 0.0
        return std if std > 0 and math.isfinite(std) else 1.0


def _fill_numeric(f: NumericFeature, stat: _NumericStats, where: str) -> NumericFeature:
    changes: dict[str, Any] = {"mean": stat.mean if stat.count else 0.0, "std": stat.std}
    if f.quantizer == "quantile" and f.boundaries is None:
        if stat.count == 0:
            raise ValueError(f"{where}: column {(f.column or f.name)!r}: numeric feature "
                             f"{f.name!r} has no finite values to fit its quantile boundaries "
                             f"on")
        q = np.arange(1, f.num_bins) / f.num_bins
        changes["boundaries"] = tuple(float(b) for b in np.quantile(stat.sample, q))
    if f.quantizer == "log" and f.max_code is None and stat.count:
        changes["max_code"] = max(_log_code(f, stat.max), 0)
    return dataclasses.replace(f, **changes)


def _log_code(feature: NumericFeature, value: float) -> int:
    """The LogQuantizer code of ``value`` (hmoe.nn.quantize)."""
    x = max(value, 0.0)
    if feature.log_transform == "criteo":
        return int(math.floor(math.log(x) ** 2)) if x > 2 else int(math.floor(x))
    return int(math.floor(math.log1p(x) * feature.log_scale))


# --------------------------------------------------------------------------------------------
# Vocabularies: exact value counts in bounded memory.


@dataclass
class _Vocabulary:
    values: pa.Array  # (V,) string, in id order: id i is values[i - 1]
    counts: np.ndarray  # (V,) int64
    distinct: int  # distinct values seen


def _make_vocabulary(totals: Iterable[pa.Table], min_count: int) -> _Vocabulary:
    """The values counted at least ``min_count`` times, by descending count, ties by text
    (Arrow orders strings by their UTF-8 bytes, which is Python's order of their code points).
    ``totals``: (value, count) tables, each value in exactly one."""
    kept, distinct = [], 0
    for table in totals:
        distinct += table.num_rows
        kept.append(table.filter(pc.greater_equal(table.column("count"), min_count)))
    table = pa.concat_tables(kept) if kept else _COUNTS.empty_table()
    table = table.sort_by([("count", "descending"), ("value", "ascending")])
    return _Vocabulary(table.column("value").combine_chunks(),
                       table.column("count").to_numpy(), distinct)


def _count_values(strings: pa.Array) -> pa.Table:
    """(value, count) of one chunk's non-missing, non-empty values, one row per value."""
    counts = pc.value_counts(strings.drop_null())
    values, n = counts.field("values"), counts.field("counts")
    keep = pc.not_equal(values, "")
    return pa.table([values.filter(keep), n.filter(keep)], schema=_COUNTS)


@dataclass
class _CountTally:
    """Shared by the counters of one pass: the rows they hold (now and at most) and what they
    spilled, for the report and for checking the bound."""

    held: int = 0
    peak: int = 0
    spills: int = 0
    spilled_entries: int = 0

    def hold(self, change: int) -> None:
        self.held += change
        self.peak = max(self.peak, self.held)

    def as_dict(self) -> dict[str, int]:
        return {"peak_entries": self.peak, "spills": self.spills,
                "spilled_entries": self.spilled_entries}


class _ValueCounts:
    """Exact counts of one feature's values, holding at most ``max_entries`` (value, count)
    rows in memory; the rest spill to ``directory`` in hash partitions (see the module
    docstring). ``level`` salts the partition hash: a partition re-split at the next level
    spreads over all of its partitions. (A compaction or spill briefly holds a copy of the rows
    it works on.)"""

    def __init__(self, max_entries: int, directory: Path, tally: _CountTally, partitions: int,
                 level: int = 0):
        self.max_entries, self.directory, self.tally = max_entries, directory, tally
        self.partitions, self.level = partitions, level
        self.held: list[pa.Table] = []  # (value, count) rows, a value possibly in several
        self.held_rows = 0
        self.spill_files: list[Path] = []

    def add(self, values: pa.Array) -> None:
        """Counts a chunk of values (text; missing and empty ones are not counted)."""
        self.add_counts(_count_values(values))

    def add_counts(self, counts: pa.Table) -> None:
        """Adds (value, count) rows, each value at most once in ``counts``."""
        rows = counts.num_rows
        if rows == 0:
            return
        may_spill = self.level < _MAX_LEVEL  # past it (never, in practice) it only holds
        if may_spill and rows > self.max_entries:  # more values than the bound: to disk
            self._spill(counts)
            return
        if self.held_rows + rows > self.max_entries:
            self._compact()
            # Spilling whenever the summed rows fill over half the room means each compaction
            # is followed by at least max_entries / 2 new rows: O(1) work per row, amortised.
            if may_spill and (self.held_rows > self.max_entries // 2
                              or self.held_rows + rows > self.max_entries):
                self._spill(self._release())
        elif len(self.held) >= _MAX_HELD_TABLES:  # many chunks of few values each
            self._compact()
        self.held.append(counts)
        self._hold(rows)

    def totals(self) -> Iterator[pa.Table]:
        """The exact count of every value: (value, count) tables, each value in exactly one.
        The counter is used up; its spill files are removed as it goes."""
        if not self.spill_files:
            self._compact()
            table = self._release()
            self.tally.hold(table.num_rows)  # held until the caller has taken what it keeps
            yield table
            self.tally.hold(-table.num_rows)
            return
        if self.held_rows:
            self._compact()
            self._spill(self._release())
        for part in range(self.partitions):
            sub = _ValueCounts(self.max_entries, self.directory / f"p{part:02d}", self.tally,
                               self.partitions, self.level + 1)
            for path in self.spill_files:
                sub.add_counts(_read_partition(path, part))
            yield from sub.totals()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.spill_files = []

    def _hold(self, change: int) -> None:
        self.held_rows += change
        self.tally.hold(change)

    def _compact(self) -> None:
        """Sums the held rows per value (one held table is distinct already)."""
        if len(self.held) > 1:
            table = pa.concat_tables(self.held).group_by("value", use_threads=False).aggregate(
                [("count", "sum")])
            table = pa.table([table.column("value"), table.column("count_sum")], schema=_COUNTS)
            self.held = [table]
            self._hold(table.num_rows - self.held_rows)

    def _release(self) -> pa.Table:
        """The held rows, no longer held."""
        table = pa.concat_tables(self.held) if self.held else _COUNTS.empty_table()
        self.held = []
        self._hold(-self.held_rows)
        return table

    def _spill(self, table: pa.Table) -> None:
        """Writes distinct (value, count) rows to a new spill file, one record batch per
        partition (batch p holds the values of partition p, read back alone)."""
        values = table.column("value").combine_chunks()
        counts = table.column("count").combine_chunks()
        part = _partition_of(values, self.partitions, self.level)  # (n,)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.partitions + 1))
        batch = pa.record_batch([values.take(order), counts.take(order)], schema=_COUNTS)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"spill-{len(self.spill_files):05d}.arrow"
        self.spill_files.append(path)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, _COUNTS) as writer:
            for p in range(self.partitions):
                writer.write_batch(batch.slice(bounds[p], bounds[p + 1] - bounds[p]))
        self.tally.spills += 1
        self.tally.spilled_entries += batch.num_rows


def _read_partition(path: Path, part: int) -> pa.Table:
    """Partition ``part`` of a spill file (read into memory: the file is closed after)."""
    with pa.OSFile(str(path), "rb") as source:
        return pa.Table.from_batches([pa.ipc.open_file(source).get_batch(part)])


def _partition_of(values: pa.Array, partitions: int, level: int) -> np.ndarray:
    """(n,) int64 in [0, partitions): the partition of each string, by its hash at ``level``."""
    out = np.empty(len(values), dtype=np.int64)
    for start in range(0, len(values), _HASH_ROWS):
        hashes = _string_hash(values.slice(start, _HASH_ROWS), level)
        out[start:start + len(hashes)] = hashes % np.uint64(partitions)
    return out


def _string_hash(strings: pa.Array, seed: int) -> np.ndarray:
    """(n,) uint64, vectorised over a string array's bytes: sum_i (byte_i + 1) * K^i (mod 2^64),
    K odd and drawn from ``seed``, then splitmix64's finaliser so every bit depends on every
    byte. Stable across runs and machines (unlike Python's salted ``hash``)."""
    n = len(strings)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32, count=n + 1,
                            offset=4 * strings.offset).astype(np.int64)
    lengths = np.diff(offsets)  # (n,)
    total = int(offsets[-1] - offsets[0])
    data = (np.frombuffer(strings.buffers()[2], dtype=np.uint8, count=total,
                          offset=int(offsets[0])) if total else np.zeros(0, np.uint8))
    starts = offsets[:-1] - offsets[0]  # (n,) each string's first byte in data
    position = np.arange(total) - np.repeat(starts, lengths)  # (total,) byte index in its string
    multiplier = mix64(np.array([2 * seed + 1], dtype=np.uint64))[0] | np.uint64(1)
    powers = np.cumprod(np.full(int(lengths.max(initial=0)), multiplier, dtype=np.uint64))
    powers = np.concatenate([np.ones(1, np.uint64), powers[:-1]])  # K^0, K^1, ...
    terms = (data.astype(np.uint64) + np.uint64(1)) * powers[position]  # wraps mod 2^64
    sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
    return mix64(sums[starts + lengths] - sums[starts] + np.uint64(seed))
