"""Parsing: one raw chunk -> its values, checked, before any vocabulary lookup.

A :class:`_Plan` (from a schema and its source config) names the raw columns to read and turns a
chunk of them (:class:`hmoe.data.readers.Chunk`) into a :class:`_Parsed`: categorical values as
text (or ids, for a pre-indexed feature), numbers float64 (NaN where missing), each sequence's
most recent ``max_len`` items (and time deltas), pre-trained vectors, labels in {0, 1} (through
the source's label rules), group hashes and exposure counts. A sequence column holds
``separator``-joined items, most recent last (or a list column); its ``temporal_column`` the
time from each behaviour to the target, same separator. Both passes parse the same way:
pass 1 (:mod:`hmoe.data.fit`) counts and summarises the values, pass 2
(:mod:`hmoe.data.encode`) looks them up.

Values are compared as text (an integer column's 17 is "17"), so a sequence's items — which
share the vocabulary of their categorical ``item`` feature — match the item column. A feature
whose ``vocab_size`` is set in the config is *pre-indexed*: its values are used as ids
(integers in [0, vocab_size), missing -> 0). ``group_id`` is a stable 63-bit hash of the group
column's text (0 where missing), so users of valid/test keep distinct groups.

Bad values (a number that does not parse, a label that is not 0/1 or is missing, a sequence whose
times do not match its items, a vector of the wrong size, an exposure count < 1) raise
:class:`~hmoe.data.readers.DataFileError` naming the file, the line (CSV) or row (Parquet), the
column and the problem (``on_error="raise"``), or are skipped and counted in a :class:`_Counter`
(``on_error="skip"``): :func:`_parse_checked`.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmoe.data.dataset_config import LabelRule, SourceConfig
from hmoe.data.readers import Chunk
from hmoe.data.schema import CategoricalFeature, Schema, SequenceFeature

_MAX_EXAMPLES = 10  # skip messages kept per split for the report


# --------------------------------------------------------------------------------------------
# Column conversions. Each returns its values and the rows that are bad, with a message.

_Problem = tuple[np.ndarray, str, Callable[[int], str]]  # (bad rows (n,), column, describe)


def _is_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind))


def _as_strings(array: pa.Array) -> pa.Array:
    """Any scalar column as text (nulls kept)."""
    if pa.types.is_dictionary(array.type):
        array = array.cast(array.type.value_type)
    if pa.types.is_string(array.type):
        return array
    if pa.types.is_large_string(array.type):
        return array.cast(pa.string())
    return pc.cast(array, pa.string())


RAW_ID_SEED = 7  # the string hash of raw ids (dynamic and hash vocabularies): fixed for good


def _raw_ids(array: pa.Array) -> np.ndarray:
    """A column of a dynamic or hash vocabulary as raw ids: (n,) int64, a stable 63-bit hash of
    each value's text, >= 1; a missing (null or empty) value is 0, which the model maps to the
    shared row 0."""
    from hmoe.data.fit import _string_hash

    strings = _as_strings(array)
    missing = np.asarray(pc.fill_null(pc.equal(pc.utf8_length(strings), 0), True)
                         .to_numpy(zero_copy_only=False), dtype=bool)
    ids = (_string_hash(pc.fill_null(strings, ""), RAW_ID_SEED) >> np.uint64(1)) \
        .astype(np.int64)
    ids[ids == 0] = 1
    ids[missing] = 0
    return ids


def _strict_floats(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values float64 (n,), bad (n,)) for a string column with some unparsable value."""
    encoded = pc.dictionary_encode(strings)
    uniques = encoded.dictionary.to_pylist()
    values = np.full(len(uniques) + 1, np.nan)
    bad = np.zeros(len(uniques) + 1, dtype=bool)
    for j, text in enumerate(uniques):
        try:
            values[j] = pc.cast(pa.array([text], pa.string()), pa.float64())[0].as_py()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad[j] = True
    index = pc.fill_null(encoded.indices, -1).to_numpy()
    return values[index], bad[index]


def _floats(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values float64 (n,), unparsable (n,)); missing values are NaN (not bad)."""
    if pa.types.is_dictionary(array.type) or pa.types.is_large_string(array.type):
        array = _as_strings(array)
    if pa.types.is_string(array.type):
        try:
            array = pc.cast(array, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return _strict_floats(array)
    elif pa.types.is_null(array.type):
        return np.full(len(array), np.nan), np.zeros(len(array), dtype=bool)
    else:
        try:
            array = pc.cast(array, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise TypeError(f"cannot read a column of type {array.type} as numbers") from None
    values = pc.fill_null(array, np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    return values, np.zeros(len(values), dtype=bool)


def _value_at(array: pa.Array, i: int):
    return array[i].as_py()


def _lists(array: pa.Array, separator: str, strip: bool) -> tuple[pa.Array, np.ndarray]:
    """(flat values, lengths (n,) int64) of a list column or a ``separator``-joined text column;
    a missing cell is an empty list."""
    if pa.types.is_dictionary(array.type) or pa.types.is_large_string(array.type):
        array = _as_strings(array)
    if pa.types.is_string(array.type):
        array = pc.split_pattern(array, pattern=separator)
    elif pa.types.is_null(array.type):
        return pa.array([], pa.string()), np.zeros(len(array), dtype=np.int64)
    elif not _is_list(array.type):
        raise TypeError(f"expected a text or list column, got type {array.type}")
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(array)
    if strip and (pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type)):
        flat = pc.utf8_trim_whitespace(flat)
    return flat, lengths


def _row_of_each(lengths: np.ndarray) -> np.ndarray:
    """(sum(lengths),) the row each flat element belongs to."""
    return np.repeat(np.arange(len(lengths)), lengths)


def _recent_window(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept lengths (n,), flat indices of the kept elements): the last max_len of each row."""
    kept = np.minimum(lengths, max_len)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) + lengths - kept  # (n,)
    kept_starts = np.concatenate([[0], np.cumsum(kept)[:-1]])
    index = np.arange(int(kept.sum())) + np.repeat(starts - kept_starts, kept)
    return kept, index.astype(np.int64)


def _group_hash(strings: pa.Array) -> np.ndarray:
    """(n,) int64: a stable 63-bit hash of each value's text, 0 where missing."""
    encoded = pc.dictionary_encode(strings)
    uniques = encoded.dictionary.to_pylist()
    hashes = np.zeros(len(uniques) + 1, dtype=np.int64)
    for j, text in enumerate(uniques):
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        hashes[j] = int.from_bytes(digest, "little") & ((1 << 63) - 1)
    return hashes[pc.fill_null(encoded.indices, -1).to_numpy()]


# --------------------------------------------------------------------------------------------
# Parsing one chunk.


@dataclass
class _Sequence:
    lengths: np.ndarray  # (n,) kept lengths, <= max_len
    items: pa.Array | np.ndarray  # flat kept items, oldest first per row: text, or ids
    deltas: np.ndarray | None  # flat kept time deltas (float64), aligned with items


@dataclass
class _Parsed:
    """One chunk's values, checked, before vocabulary lookup."""

    n: int
    categorical: list  # per feature: text (pa.Array) or ids (np.ndarray, pre-indexed)
    numeric: np.ndarray  # (n, F_n) float64
    sequences: list[_Sequence]
    pretrained: list[tuple[np.ndarray, np.ndarray]]  # (n, P) float32 user, item
    labels: np.ndarray  # (n, T) float32
    group: np.ndarray | None  # (n,) int64
    exposure: np.ndarray | None  # (n,) float32
    times: np.ndarray | None = None  # (n,) int64 seconds (source.time_column)


class _Plan:
    """What to read and how to check it, from a schema and its source config."""

    def __init__(self, schema: Schema, source: SourceConfig, *, features_only: bool = False,
                 hash_raw_ids: bool = True):
        self.schema, self.source = schema, source
        self.features_only = features_only  # serving: no labels, groups, exposures or times
        # Raw ids of dynamic and hash vocabularies: a hash of the text (files), or the values
        # as integers >= 0 (serving a model trained on a generated world, whose ids are raw).
        self.hash_raw_ids = hash_raw_ids
        self.strip = source.reader.strip_whitespace
        self.categorical_columns = [f.column or f.name for f in schema.categorical]
        self.numeric_columns = [f.column or f.name for f in schema.numeric]
        self.label_columns = [] if features_only else \
            [label.column or label.name for label in schema.labels]
        self.vocab_features = [f for f in schema.categorical if f.vocab_size is None]
        self.indexed = {f.name: f.vocab_size for f in schema.categorical
                        if f.vocab_size is not None}
        self.raw = {f.name for f in schema.categorical if f.raw_ids}
        columns = list(self.categorical_columns) + self.numeric_columns
        for seq in schema.sequence:
            columns.append(seq.column or seq.name)
            if seq.temporal_column:
                columns.append(seq.temporal_column)
        for pre in schema.pretrained:
            columns += [pre.user_column, pre.item_column]
        self.feature_columns = list(dict.fromkeys(columns))
        if not features_only:
            columns += self.label_columns
            columns += [c for c in (schema.group_id, schema.exposure_count) if c is not None]
            if source.time_column is not None:
                columns.append(source.time_column)
        self.columns = list(dict.fromkeys(columns))  # distinct, in order

    def parse(self, chunk: Chunk) -> tuple[_Parsed, list[_Problem]]:
        batch, problems = chunk.batch, []

        def column(name: str) -> pa.Array:
            return batch.column(batch.schema.get_field_index(name))

        categorical = []
        for f, name in zip(self.schema.categorical, self.categorical_columns):
            categorical.append(self._categorical(f, column(name), name, problems))
        numeric = np.zeros((batch.num_rows, len(self.schema.numeric)))
        for j, name in enumerate(self.numeric_columns):
            numeric[:, j] = self._numbers(column(name), name, problems)
        sequences = [self._sequence(seq, column(seq.column or seq.name),
                                    column(seq.temporal_column) if seq.temporal_column else None,
                                    problems) for seq in self.schema.sequence]
        pretrained = [(self._vector(column(p.user_column), p.user_column, p.dim, p.separator,
                                    problems),
                       self._vector(column(p.item_column), p.item_column, p.dim, p.separator,
                                    problems)) for p in self.schema.pretrained]
        labels = np.zeros((batch.num_rows, len(self.schema.labels)), dtype=np.float32)
        if self.features_only:
            return _Parsed(batch.num_rows, categorical, numeric, sequences, pretrained, labels,
                           None, None), problems
        for t, (label, name) in enumerate(zip(self.schema.labels, self.label_columns)):
            labels[:, t] = self._label(self.source.labels.get(label.name), column(name), name,
                                       problems)
        group = exposure = None
        if self.schema.group_id is not None:
            group = _group_hash(_as_strings(column(self.schema.group_id)))
        if self.schema.exposure_count is not None:
            name = self.schema.exposure_count
            raw = column(name)
            counts = self._numbers(raw, name, problems)
            low = ~(counts >= 1)  # NaN too
            problems.append((low, name, lambda i, raw=raw: f"exposure count must be a number "
                                                           f">= 1, got {_value_at(raw, i)!r}"))
            exposure = counts.astype(np.float32)
        times = None
        if self.source.time_column is not None:
            name = self.source.time_column
            raw = column(name)
            seconds = self._numbers(raw, name, problems)
            negative = ~(seconds >= 0)  # NaN too
            problems.append((negative, name, lambda i, raw=raw: f"time must be a number of "
                                                                f"seconds >= 0, got "
                                                                f"{_value_at(raw, i)!r}"))
            times = np.floor(np.where(negative, 0, seconds)).astype(np.int64)
        parsed = _Parsed(batch.num_rows, categorical, numeric, sequences, pretrained, labels,
                         group, exposure, times)
        return parsed, problems

    def _numbers(self, raw: pa.Array, name: str, problems: list) -> np.ndarray:
        values, bad = _floats(raw)
        problems.append((bad, name, lambda i: f"cannot parse {_value_at(raw, i)!r} as a number"))
        return values

    def _categorical(self, f: CategoricalFeature, raw: pa.Array, name: str, problems: list):
        if f.raw_ids:
            if self.hash_raw_ids:
                return _raw_ids(raw)
            values, unparsable = _floats(raw)
            ids, bad = _as_ids(values, 1 << 62)
            problems.append((unparsable | bad, name,
                             lambda i: f"must be a raw id, an integer >= 0 (the model was "
                                       f"trained on integer raw ids), got {_value_at(raw, i)!r}"))
            return ids
        if f.vocab_size is None:
            return _as_strings(raw)
        values, unparsable = _floats(raw)
        ids, bad = _as_ids(values, f.vocab_size)
        problems.append((unparsable | bad, name,
                         lambda i: f"must be an integer id in [0, {f.vocab_size}) (vocab_size is "
                                   f"set: the column is pre-indexed), got {_value_at(raw, i)!r}"))
        return ids

    def _sequence(self, seq: SequenceFeature, raw: pa.Array, raw_times: pa.Array | None,
                  problems: list) -> _Sequence:
        name = seq.column or seq.name
        n = len(raw)
        flat, lengths = _lists(raw, seq.separator, self.strip)
        kept, index = _recent_window(lengths, seq.max_len)
        items = flat.take(pa.array(index)) if len(index) else flat.slice(0, 0)
        vocab_size = self.indexed.get(seq.item)
        if seq.item in self.raw and self.hash_raw_ids:
            items = _raw_ids(items) if len(items) else np.zeros(0, dtype=np.int64)
        elif seq.item in self.raw:
            values, unparsable = (_floats(items) if len(items)
                                  else (np.zeros(0), np.zeros(0, dtype=bool)))
            items, bad = _as_ids(values, 1 << 62)
            problems.append((_any_per_row(unparsable | bad, _row_of_each(kept), n), name,
                             lambda i: f"items must be raw ids, integers >= 0 (the model was "
                                       f"trained on integer raw ids), got "
                                       f"{_value_at(raw, i)!r}"))
        elif vocab_size is None:
            items = _as_strings(items)  # compared as text with the item column's values
        else:  # the item feature is pre-indexed: the items are ids
            values, unparsable = (_floats(items) if len(items)
                                  else (np.zeros(0), np.zeros(0, dtype=bool)))
            items, bad = _as_ids(values, vocab_size)
            problems.append((_any_per_row(unparsable | bad, _row_of_each(kept), n), name,
                             lambda i: f"items must be integer ids in [0, {vocab_size}) (the "
                                       f"item feature {seq.item!r} is pre-indexed), got "
                                       f"{_value_at(raw, i)!r}"))
        deltas = None
        if raw_times is not None:
            time_name = seq.temporal_column
            flat_times, time_lengths = _lists(raw_times, seq.separator, self.strip)
            mismatch = time_lengths != lengths
            problems.append((mismatch, time_name,
                             lambda i: f"has {time_lengths[i]} times but column {name!r} has "
                                       f"{lengths[i]} items"))
            kept_times, index = _recent_window(time_lengths, seq.max_len)
            times, bad = (_floats(flat_times.take(pa.array(index))) if len(index)
                          else (np.zeros(0), np.zeros(0, dtype=bool)))
            invalid = bad | ~(times >= 0)  # NaN too
            problems.append((_any_per_row(invalid, _row_of_each(kept_times), n), time_name,
                             lambda i: f"times must be numbers >= 0 (time from the behaviour to "
                                       f"the target), got {_value_at(raw_times, i)!r}"))
            # Where the counts agree the kept items and times align one to one.
            deltas = np.zeros(int(kept.sum()))
            deltas[np.repeat(~mismatch, kept)] = np.where(invalid, 0.0, times)[
                np.repeat(~mismatch, kept_times)]
        return _Sequence(kept, items, deltas)

    def _vector(self, raw: pa.Array, name: str, dim: int, separator: str,
                problems: list) -> np.ndarray:
        n = len(raw)
        flat, lengths = _lists(raw, separator, self.strip)
        missing = np.asarray(pc.is_null(raw).to_numpy(zero_copy_only=False), dtype=bool)
        wrong = (lengths != dim) | missing
        problems.append((wrong, name, lambda i: f"expected a vector of {dim} numbers, got "
                                                f"{_value_at(raw, i)!r}"))
        values, bad = _floats(flat) if len(flat) else (np.zeros(0), np.zeros(0, bool))
        problems.append((_any_per_row(bad, _row_of_each(lengths), n), name,
                         lambda i: f"cannot parse the vector {_value_at(raw, i)!r} as numbers"))
        out = np.zeros((n, dim), dtype=np.float32)
        right = ~wrong
        if right.any():
            keep = np.repeat(right, lengths)
            out[right] = values[keep].reshape(-1, dim)
        return out

    def _label(self, rule: LabelRule | None, raw: pa.Array, name: str,
               problems: list) -> np.ndarray:
        if rule is not None and rule.positive is not None:
            strings = _as_strings(raw)
            missing = np.asarray(pc.is_null(strings).to_numpy(zero_copy_only=False), dtype=bool)
            problems.append((missing, name, lambda i: "missing label"))
            positive = pa.array(list(rule.positive), pa.string())
            hit = pc.fill_null(pc.is_in(strings, value_set=positive), False)
            return hit.to_numpy(zero_copy_only=False).astype(np.float32)
        values, bad = _floats(raw)
        problems.append((bad, name, lambda i: f"cannot parse the label {_value_at(raw, i)!r} "
                                              f"as a number"))
        missing = np.isnan(values) & ~bad
        problems.append((missing, name, lambda i: "missing label (NaN or empty)"))
        if rule is not None:
            return (values >= rule.threshold).astype(np.float32)
        binary = (values == 0) | (values == 1)
        problems.append((~binary & ~bad & ~missing, name,
                         lambda i: f"labels must be 0 or 1, got {_value_at(raw, i)!r} (give a "
                                   f"source.labels rule to derive one)"))
        return np.where(binary, values, 0).astype(np.float32)


def _as_ids(values: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, bad): pre-indexed ids from numbers (NaN = missing -> id 0); bad where a
    value is not an integer in [0, vocab_size)."""
    missing = np.isnan(values)
    ok = missing | ((values == np.floor(values)) & (values >= 0) & (values < vocab_size))
    return np.where(ok & ~missing, values, 0).astype(np.int64), ~ok


def _any_per_row(flat_bad: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """(n,) bool: the rows having a bad flat element (``rows`` maps each element to its row)."""
    out = np.zeros(n, dtype=bool)
    if len(rows):
        out[rows[flat_bad]] = True
    return out


class _Counter:
    """Rows read, rows skipped (per file) and the first few skip messages."""

    def __init__(self):
        self.skipped: dict[str, int] = collections.Counter()
        self.examples: list[str] = []
        self.rows = 0

    def skip(self, path: str, message: str) -> None:
        self.skipped[path] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(message)


def _parse_checked(plan: _Plan, chunk: Chunk, on_error: str, counter: _Counter) -> _Parsed | None:
    """The chunk parsed; bad rows raise (the first in file order) or are skipped (None when
    none is left)."""
    parsed, problems = plan.parse(chunk)
    bad_any = np.zeros(chunk.num_rows, dtype=bool)
    for bad, _, _ in problems:
        bad_any |= bad
    if not bad_any.any():
        counter.rows += parsed.n
        return parsed
    first_problem: dict[int, tuple[str, Callable]] = {}
    for bad, column, describe in problems:
        for i in np.flatnonzero(bad):
            if i not in first_problem:
                first_problem[int(i)] = (column, describe)
    if on_error == "raise":
        i = min(first_problem)
        column, describe = first_problem[i]
        raise chunk.error(i, column, describe(i))
    for i in sorted(first_problem):
        column, describe = first_problem[i]
        counter.skip(chunk.path, str(chunk.error(i, column, describe(i))))
    if bad_any.all():
        return None
    kept = chunk.take(~bad_any)
    parsed, problems = plan.parse(kept)
    if any(bad.any() for bad, _, _ in problems):  # cannot happen: each check is per row
        raise RuntimeError("internal error: rows still bad after skipping the bad ones")
    counter.rows += parsed.n
    return parsed
