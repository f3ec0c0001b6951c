r"""Preprocessing: raw files + a dataset config -> a cache of Parquet files in the batch layout.

A *dataset config* is a schema YAML (:mod:`hmoe.data.schema`) with one more top-level section,
``source``, saying how to read the raw files and how to turn raw columns into labels (see
``configs/datasets/*.yaml``)::

    source:
      format: csv              # hmoe.data.readers.ReaderOptions keys: format, delimiter, header,
      delimiter: "\t"          # column_names, quote_char, encoding, skip_lines, null_values,
      header: false            # strip_whitespace
      column_names: [user_id, movie_id, rating, timestamp]
      labels:                  # optional, per label name: how its column becomes 0 / 1
        like: {threshold: 4}   #   value >= threshold -> 1 (a number), or
        # income: {positive: [">50K", ">50K."]}   the value is one of these strings -> 1
      behaviour_log: {...}     # optional: build samples with histories from an event log

Without a rule a label column must hold 0 or 1. :func:`load_dataset_config` reads it
(``load_schema`` reads the same file and ignores ``source``).

Two passes, each streaming the raw files chunk by chunk (:func:`hmoe.data.readers.read_chunks`,
so memory is bounded by the :class:`~hmoe.data.readers.ChunkBudget`, not the data):

1. Over the *training* files: vocabularies and numeric statistics.
   * Categorical feature f: every non-missing value seen at least ``min_count`` times gets an id
     1, 2, ... by descending count, ties by the value's text; everything else (rarer values,
     values first seen in valid/test, missing ones) maps to 0, the OOV/padding id.
     ``vocab_size`` = 1 + the number of kept values. Values are compared as text (an integer
     column's 17 is "17"), so a sequence's items — which share the vocabulary of their
     categorical ``item`` feature — match the item column, and their occurrences count towards
     that vocabulary too. A feature whose ``vocab_size`` is already set in the config is
     *pre-indexed*: its values are used as ids (integers in [0, vocab_size), missing -> 0).
   * Numeric feature: ``mean`` and ``std`` of the finite values (std 1 when constant); for
     ``quantizer: quantile`` without ``boundaries``, the boundaries at quantiles 1/n ... (n-1)/n
     (n = num_bins) of the values — exact up to ``quantile_sample`` values, else of a uniform
     random sample of that many (deterministic); for ``quantizer: log`` without ``max_code``,
     the code of the largest value (so MNSE needs no more digits than the data has). These are
     what :func:`hmoe.models.hmoe.make_quantizer` and the "scaled" encoder read.
2. Over every split: encode to the batch layout of :mod:`hmoe.data.schema` and write
   ``<split>.parquet`` (one row group per chunk).

Per row: categorical ids (N, F_c); numerics float32 (N, F_n), NaN where missing; a sequence
column holds ``separator``-joined items, most recent last (or a list column); the most recent
``max_len`` are kept, stored oldest first at steps 0..length-1 with positions = recency rank
(1 = most recent) or, with a ``temporal_column`` (the time from each behaviour to the target,
same separator), ``hmoe.nn.time_buckets(delta, max_position)`` (base 2, unit 1 of the column's
unit); pre-trained vectors ``dim`` floats; labels float32 in {0, 1}; ``group_id`` a stable 63-bit
hash of the group column's text (0 where missing), so users of valid/test keep distinct groups;
``exposure_count`` float32 >= 1.

Bad values (a number that does not parse, a label that is not 0/1 or is missing, a sequence whose
times do not match its items, a vector of the wrong size, an exposure count < 1) and malformed
CSV rows raise :class:`~hmoe.data.readers.DataFileError` naming the file, the line (CSV) or row
(Parquet), the column and the problem (``on_error="raise"``), or are skipped and counted in the
report (``on_error="skip"``; a warning says how many).

The cache directory::

    feature_map.yaml        the filled-in schema (vocab sizes, boundaries, ...), the source config,
                            the inputs, rows per split, the report and the fingerprint
    vocabularies.parquet    feature, id, value, count: every kept value of every vocabulary
                            (Parquet, not YAML, as vocabularies reach millions of values)
    <split>.parquet         one column per batch-layout key ("categorical" a fixed-size list of
                            F_c int64, "numeric" of F_n float32, "seq/<name>" of max_len, ...)

The fingerprint is a SHA-256 of the dataset config, the options that change the output and every
input file (path, size and modification time; or its content with ``fingerprint="content"``): a
second :func:`preprocess` with the same inputs reuses the cache, a changed input or config
rebuilds it. Every file is written under a temporary name and moved into place with
``os.replace``; ``feature_map.yaml`` is removed first and written last, so a crash never leaves a
cache that looks valid.

Behaviour logs (``source.behaviour_log``: MovieLens ratings, Taobao UserBehavior, KuaiRand):
an event log becomes samples — one per event (the *target*), whose history is the user's
previous events (those passing ``history_filter``), oldest first, at most ``max_len``; the
history columns hold the listed source columns of those events, ``delta_column`` the time from
each to the target. Events are ordered by (user, time, file order). The last ``test_last`` events
of each user form the test split, the ``valid_last`` before them the valid split, the rest train.
The log is read in chunks but the construction holds it in memory (a log of E events with H
history columns costs about E · max_len · H values).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hmoe.data.readers import (
    Chunk,
    ChunkBudget,
    DataFileError,
    ReaderOptions,
    ReadStats,
    _bounded,
    file_columns,
    read_chunks,
)
from hmoe.data.schema import (
    CategoricalFeature,
    NumericFeature,
    Schema,
    SequenceFeature,
    batch_keys,
    load_schema,
    schema_to_dict,
)

__all__ = [
    "BehaviourLog",
    "DatasetConfig",
    "LabelRule",
    "PreprocessedData",
    "SourceConfig",
    "dataset_config_to_dict",
    "load_dataset_config",
    "load_preprocessed",
    "preprocess",
]

FORMAT_VERSION = 1
FEATURE_MAP = "feature_map.yaml"
VOCABULARIES = "vocabularies.parquet"
FINGERPRINTS = ("stat", "content")
_MAX_EXAMPLES = 10


# --------------------------------------------------------------------------------------------
# The dataset config: a schema plus its source section.


@dataclass(frozen=True)
class LabelRule:
    """How a raw label column becomes 0/1: ``positive`` (1 where the text is one of these
    strings, 0 otherwise) or ``threshold`` (1 where the number is >= it). A missing value is a
    bad row either way."""

    positive: tuple[str, ...] | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class BehaviourLog:
    """Samples from an event log (see the module docstring).

    user, time: the columns of the user and of the event time (a number; histories are ordered
    by it and ``delta_column`` holds target time - behaviour time in its unit). history: source
    column -> history column (a list column of the previous events' values, oldest first).
    delta_column: the history column of time deltas (or None). max_len: the longest history.
    history_filter: {column: values} — only events whose column's text is one of the values
    enter histories (every event is still a target). valid_last, test_last: the last events of
    each user that form the valid and test splits.
    """

    user: str
    time: str
    history: Mapping[str, str]
    delta_column: str | None = None
    max_len: int = 50
    history_filter: Mapping[str, tuple[str, ...]] | None = None
    valid_last: int = 1
    test_last: int = 1


@dataclass(frozen=True)
class SourceConfig:
    """The ``source`` section: reader options, label rules, an optional behaviour log."""

    reader: ReaderOptions = field(default_factory=ReaderOptions)
    labels: Mapping[str, LabelRule] = field(default_factory=dict)
    behaviour_log: BehaviourLog | None = None


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset: its schema (what the model sees) and its source (how raw files become it)."""

    schema: Schema
    source: SourceConfig = field(default_factory=SourceConfig)

    def with_reader(self, **changes) -> DatasetConfig:
        """A copy whose reader options have ``changes`` (e.g. ``header=False`` for a headerless
        test file of the same format)."""
        reader = dataclasses.replace(self.source.reader, **changes)
        return dataclasses.replace(self, source=dataclasses.replace(self.source, reader=reader))


_SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(ReaderOptions)) + ("labels",
                                                                         "behaviour_log")


def _unknown_keys(entry: Mapping, path: str, allowed: Sequence[str]) -> None:
    for key in entry:
        if key not in allowed:
            raise ValueError(f"{path}.{key}: unknown key; allowed keys: {', '.join(allowed)}")


def _mapping(value, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: must be a mapping, got {type(value).__name__}")
    return value


def _string(value, path: str, *, optional: bool = False) -> str | None:
    if optional and value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}: must be a non-empty string{' or null' if optional else ''}, "
                         f"got {value!r}")
    return value


def _int(value, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{path}: must be an int >= {minimum}, got {value!r}")
    return value


def _texts(value, path: str) -> tuple[str, ...]:
    """A list of scalars as their text (YAML reads 1 as an int; the column's text is "1")."""
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, (list, dict)) or v is None for v in value):
        raise ValueError(f"{path}: must be a non-empty list of values, got {value!r}")
    return tuple(_text(v) for v in value)


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return str(value)


def _label_rule(entry, path: str) -> LabelRule:
    entry = _mapping(entry, path)
    _unknown_keys(entry, path, ("positive", "threshold"))
    if ("positive" in entry) == ("threshold" in entry):
        raise ValueError(f"{path}: give exactly one of positive (a list of values) or threshold "
                         f"(a number)")
    if "positive" in entry:
        return LabelRule(positive=_texts(entry["positive"], f"{path}.positive"))
    threshold = entry["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold):
        raise ValueError(f"{path}.threshold: must be a finite number, got {threshold!r}")
    return LabelRule(threshold=float(threshold))


def _behaviour_log(entry, path: str) -> BehaviourLog:
    entry = _mapping(entry, path)
    allowed = tuple(f.name for f in dataclasses.fields(BehaviourLog))
    _unknown_keys(entry, path, allowed)
    for key in ("user", "time", "history"):
        if key not in entry:
            raise ValueError(f"{path}.{key}: required key missing")
    history = _mapping(entry["history"], f"{path}.history")
    if not history:
        raise ValueError(f"{path}.history: needs at least one source column -> history column")
    history = {_string(k, f"{path}.history"): _string(v, f"{path}.history.{k}")
               for k, v in history.items()}
    filter_entry = entry.get("history_filter")
    history_filter = None
    if filter_entry is not None:
        filter_entry = _mapping(filter_entry, f"{path}.history_filter")
        if len(filter_entry) != 1:
            raise ValueError(f"{path}.history_filter: must map one column to its values, got "
                             f"{dict(filter_entry)!r}")
        (column, values), = filter_entry.items()
        history_filter = {_string(column, f"{path}.history_filter"):
                          _texts(values, f"{path}.history_filter.{column}")}
    log = BehaviourLog(
        user=_string(entry["user"], f"{path}.user"), time=_string(entry["time"], f"{path}.time"),
        history=history, delta_column=_string(entry.get("delta_column"), f"{path}.delta_column",
                                              optional=True),
        max_len=_int(entry.get("max_len", 50), f"{path}.max_len", 1),
        history_filter=history_filter,
        valid_last=_int(entry.get("valid_last", 1), f"{path}.valid_last", 0),
        test_last=_int(entry.get("test_last", 1), f"{path}.test_last", 0))
    made = list(log.history.values()) + ([log.delta_column] if log.delta_column else [])
    if len(set(made)) != len(made):
        raise ValueError(f"{path}: the history and delta columns must have distinct names, got "
                         f"{made}")
    return log


def _source_config(entry, schema: Schema) -> SourceConfig:
    entry = _mapping(entry, "source")
    _unknown_keys(entry, "source", _SOURCE_KEYS)
    reader_keys = {k: v for k, v in entry.items() if k not in ("labels", "behaviour_log")}
    for key in ("column_names", "null_values"):
        if isinstance(reader_keys.get(key), list):
            reader_keys[key] = tuple(_text(v) for v in reader_keys[key])
    try:
        reader = ReaderOptions(**reader_keys)
    except ValueError as error:
        raise ValueError(str(error).replace("ReaderOptions.", "source.", 1)) from None
    labels = {}
    rules = _mapping(entry.get("labels") or {}, "source.labels")
    for name, rule in rules.items():
        if name not in schema.tasks:
            raise ValueError(f"source.labels.{name}: no label named {name!r}; the labels are "
                             f"{list(schema.tasks)}")
        labels[name] = _label_rule(rule, f"source.labels.{name}")
    log = entry.get("behaviour_log")
    log = None if log is None else _behaviour_log(log, "source.behaviour_log")
    return SourceConfig(reader=reader, labels=labels, behaviour_log=log)


def load_dataset_config(source: str | os.PathLike | Mapping[str, Any] | DatasetConfig | Schema
                        ) -> DatasetConfig:
    """Parses a dataset config: a shipped config's name (``"criteo"``; see hmoe.configs), a
    path, a YAML string or a mapping (a schema plus ``source``); a DatasetConfig is returned as
    is, a Schema gets the default source (CSV with a header, or Parquet). Raises ValueError
    ``<file>: <key path>: <problem>``."""
    if isinstance(source, DatasetConfig):
        return source
    if isinstance(source, Schema):
        return DatasetConfig(source.validate())
    from hmoe.configs import resolve

    source = resolve(source, "dataset")
    from hmoe.data.schema import _read_source  # the schema's reader: path | YAML | mapping

    data, origin = _read_source(source)
    try:
        schema = load_schema(data)
        source_config = _source_config(data.get("source") or {}, schema)
        _check_source_against_schema(schema, source_config)
    except ValueError as error:
        if origin is None or origin == "<string>":
            raise
        raise ValueError(f"{origin}: {error}") from None
    return DatasetConfig(schema, source_config)


def _check_source_against_schema(schema: Schema, source: SourceConfig) -> None:
    log = source.behaviour_log
    if log is None:
        return
    made = set(log.history.values()) | ({log.delta_column} if log.delta_column else set())
    for i, seq in enumerate(schema.sequence):
        if (seq.temporal_column in made) and (seq.column or seq.name) not in made:
            raise ValueError(f"sequence[{i}].temporal_column: {seq.temporal_column!r} is built "
                             f"by source.behaviour_log but the items column is not")


def dataset_config_to_dict(config: DatasetConfig) -> dict[str, Any]:
    """The YAML-shaped dict of a dataset config (the schema's keys plus ``source``)."""
    reader = dataclasses.asdict(config.source.reader)
    defaults = dataclasses.asdict(ReaderOptions())
    source: dict[str, Any] = {key: list(value) if isinstance(value, tuple) else value
                              for key, value in reader.items() if value != defaults[key]}
    if config.source.labels:
        source["labels"] = {
            name: ({"positive": list(rule.positive)} if rule.positive is not None
                   else {"threshold": rule.threshold})
            for name, rule in config.source.labels.items()}
    log = config.source.behaviour_log
    if log is not None:
        entry = dataclasses.asdict(log)
        entry["history"] = dict(log.history)
        if log.history_filter is not None:
            entry["history_filter"] = {k: list(v) for k, v in log.history_filter.items()}
        source["behaviour_log"] = entry
    return {**schema_to_dict(config.schema), "source": source}


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


def _value_counts(strings: pa.Array) -> dict[str, int]:
    """Counts of the non-missing, non-empty values."""
    strings = strings.drop_null()
    if len(strings) == 0:
        return {}
    counts = pc.value_counts(strings)
    out = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
    out.pop("", None)
    return out


def _lookup(strings: pa.Array, index: Mapping[str, int]) -> np.ndarray:
    """(n,) int64 ids of ``strings`` in a vocabulary index (value -> id), 0 where absent."""
    if len(strings) == 0:
        return np.zeros(0, dtype=np.int64)
    encoded = pc.dictionary_encode(strings)
    ids = np.array([index.get(v, 0) for v in encoded.dictionary.to_pylist()] + [0], np.int64)
    return ids[pc.fill_null(encoded.indices, -1).to_numpy()]


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


class _Plan:
    """What to read and how to check it, from a schema and its source config."""

    def __init__(self, schema: Schema, source: SourceConfig):
        self.schema, self.source = schema, source
        self.strip = source.reader.strip_whitespace
        self.categorical_columns = [f.column or f.name for f in schema.categorical]
        self.numeric_columns = [f.column or f.name for f in schema.numeric]
        self.label_columns = [label.column or label.name for label in schema.labels]
        self.vocab_features = [f for f in schema.categorical if f.vocab_size is None]
        self.indexed = {f.name: f.vocab_size for f in schema.categorical
                        if f.vocab_size is not None}
        columns = list(self.categorical_columns) + self.numeric_columns
        for seq in schema.sequence:
            columns.append(seq.column or seq.name)
            if seq.temporal_column:
                columns.append(seq.temporal_column)
        for pre in schema.pretrained:
            columns += [pre.user_column, pre.item_column]
        columns += self.label_columns
        columns += [c for c in (schema.group_id, schema.exposure_count) if c is not None]
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
        parsed = _Parsed(batch.num_rows, categorical, numeric, sequences, pretrained, labels,
                         group, exposure)
        return parsed, problems

    def _numbers(self, raw: pa.Array, name: str, problems: list) -> np.ndarray:
        values, bad = _floats(raw)
        problems.append((bad, name, lambda i: f"cannot parse {_value_at(raw, i)!r} as a number"))
        return values

    def _categorical(self, f: CategoricalFeature, raw: pa.Array, name: str, problems: list):
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
        if vocab_size is None:
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


# --------------------------------------------------------------------------------------------
# Pass 1: vocabularies and statistics.


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


def _log_code(feature: NumericFeature, value: float) -> int:
    """The LogQuantizer code of ``value`` (hmoe.nn.quantize)."""
    x = max(value, 0.0)
    if feature.log_transform == "criteo":
        return int(math.floor(math.log(x) ** 2)) if x > 2 else int(math.floor(x))
    return int(math.floor(math.log1p(x) * feature.log_scale))


@dataclass
class _Vocabulary:
    values: list[str]
    counts: list[int]
    distinct: int  # distinct values seen

    @property
    def index(self) -> dict[str, int]:
        return {value: i + 1 for i, value in enumerate(self.values)}


def _make_vocabulary(counts: Mapping[str, int], min_count: int) -> _Vocabulary:
    kept = sorted(((v, c) for v, c in counts.items() if c >= min_count),
                  key=lambda item: (-item[1], item[0]))
    return _Vocabulary([v for v, _ in kept], [c for _, c in kept], len(counts))


def _fit(plan: _Plan, chunks: Iterable[Chunk], on_error: str, quantile_sample: int,
         train_paths: str) -> tuple[Schema, dict[str, _Vocabulary]]:
    """Pass 1: the filled-in schema and the vocabularies, from the training chunks."""
    schema = plan.schema
    counts = {f.name: collections.Counter() for f in plan.vocab_features}
    stats = [_NumericStats(quantile_sample, f.quantizer == "quantile" and f.boundaries is None,
                           seed=j) for j, f in enumerate(schema.numeric)]
    counter = _Counter()
    for chunk in chunks:
        parsed = _parse_checked(plan, chunk, on_error, counter)
        if parsed is None:
            continue
        for f, values in zip(schema.categorical, parsed.categorical):
            if f.name in counts:
                counts[f.name].update(_value_counts(values))
        for seq, values in zip(schema.sequence, parsed.sequences):
            if seq.item in counts:
                counts[seq.item].update(_value_counts(values.items))
        for j, stat in enumerate(stats):
            stat.update(parsed.numeric[:, j])
    if counter.rows == 0:
        raise ValueError(f"{train_paths}: no valid training rows"
                         + (f" ({sum(counter.skipped.values())} were skipped)"
                            if counter.skipped else ""))
    vocabularies = {f.name: _make_vocabulary(counts[f.name], f.min_count)
                    for f in plan.vocab_features}
    categorical = tuple(dataclasses.replace(f, vocab_size=len(vocabularies[f.name].values) + 1)
                        if f.name in vocabularies else f for f in schema.categorical)
    numeric = tuple(_fill_numeric(f, stat, train_paths) for f, stat in zip(schema.numeric, stats))
    filled = dataclasses.replace(schema, categorical=categorical, numeric=numeric).validate()
    return filled, vocabularies


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


# --------------------------------------------------------------------------------------------
# Pass 2: encoding to the batch layout.


def _encode(schema: Schema, parsed: _Parsed, indexes: Mapping[str, Mapping[str, int]]
            ) -> dict[str, np.ndarray]:
    """One parsed chunk -> columns in the batch layout."""
    n = parsed.n
    out: dict[str, np.ndarray] = {}
    if schema.categorical:
        ids = np.zeros((n, len(schema.categorical)), dtype=np.int64)  # (n, F_c)
        for f, (feature, values) in enumerate(zip(schema.categorical, parsed.categorical)):
            ids[:, f] = (_lookup(values, indexes[feature.name]) if feature.name in indexes
                         else values)
        out["categorical"] = ids
    if schema.numeric:
        out["numeric"] = parsed.numeric.astype(np.float32)  # (n, F_n), NaN = missing
    for seq, values in zip(schema.sequence, parsed.sequences):
        out.update(_encode_sequence(seq, values, indexes.get(seq.item), n))
    for pre, (user, item) in zip(schema.pretrained, parsed.pretrained):
        out[f"pretrained/{pre.name}/user"] = user
        out[f"pretrained/{pre.name}/item"] = item
    out["labels"] = parsed.labels
    if schema.group_id is not None:
        out["group_id"] = parsed.group
    if schema.exposure_count is not None:
        out["exposure_count"] = parsed.exposure
    return out


def _encode_sequence(seq: SequenceFeature, values: _Sequence, index: Mapping[str, int] | None,
                     n: int) -> dict[str, np.ndarray]:
    from hmoe.nn import time_buckets  # torch; only needed with a temporal column

    L, lengths = seq.max_len, values.lengths
    flat_ids = (_lookup(values.items, index) if index is not None
                else np.asarray(values.items, dtype=np.int64))
    steps = np.arange(L)
    valid = steps[None, :] < lengths[:, None]  # (n, L)
    ids = np.zeros((n, L), dtype=np.int64)
    ids[valid] = flat_ids  # row-major order = each row's items oldest first
    if values.deltas is None:
        positions = np.where(valid, lengths[:, None] - steps[None, :], 0)  # rank 1 = newest
    else:
        import torch

        buckets = time_buckets(torch.from_numpy(values.deltas), seq.num_positions).numpy()
        positions = np.zeros((n, L), dtype=np.int64)
        positions[valid] = buckets
    key = f"seq/{seq.name}"
    return {key: ids, f"{key}/lengths": lengths.astype(np.int64),
            f"{key}/positions": positions.astype(np.int64)}


def _arrow_type(schema: Schema, key: str) -> pa.DataType:
    """The Parquet column type of a batch-layout key."""
    width = {"categorical": len(schema.categorical), "numeric": len(schema.numeric),
             "labels": len(schema.labels)}
    for seq in schema.sequence:
        width[f"seq/{seq.name}"] = width[f"seq/{seq.name}/positions"] = seq.max_len
    for pre in schema.pretrained:
        width[f"pretrained/{pre.name}/user"] = width[f"pretrained/{pre.name}/item"] = pre.dim
    value = pa.int64() if key in ("categorical", "group_id") or key.startswith("seq/") \
        else pa.float32()
    return pa.list_(value, width[key]) if key in width else value


def _to_table(schema: Schema, columns: Mapping[str, np.ndarray]) -> pa.Table:
    arrays = []
    for key in batch_keys(schema):
        values = np.ascontiguousarray(columns[key])
        kind = _arrow_type(schema, key)
        if pa.types.is_fixed_size_list(kind):
            flat = pa.array(values.reshape(-1), kind.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, kind.list_size))
        else:
            arrays.append(pa.array(values, kind))
    return pa.Table.from_arrays(arrays, schema=_arrow_schema(schema))


def _arrow_schema(schema: Schema) -> pa.Schema:
    return pa.schema([(key, _arrow_type(schema, key)) for key in batch_keys(schema)])


def _from_table(table: pa.Table | pa.RecordBatch, schema: Schema) -> dict[str, np.ndarray]:
    """Cached rows -> columns in the batch layout (numpy, their layout dtypes)."""
    n = table.num_rows
    out = {}
    for key in batch_keys(schema):
        column = table.column(key)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        kind = _arrow_type(schema, key)
        if pa.types.is_fixed_size_list(kind):
            values = column.flatten().to_numpy(zero_copy_only=False).reshape(n, kind.list_size)
        else:
            values = column.to_numpy(zero_copy_only=False)
        # Arrow's zero-copy views are read-only; callers get ordinary (writable) arrays.
        out[key] = values if values.flags.writeable else values.copy()
    return out


# --------------------------------------------------------------------------------------------
# Behaviour logs -> samples.


@dataclass
class _Samples:
    """Constructed samples of one split, in memory, with the log location of each target."""

    table: pa.Table
    numbers: np.ndarray  # (n,) line/row of the target event in its log file
    unit: str
    path: str


def _build_samples(log: BehaviourLog, paths: Sequence[str], reader: ReaderOptions,
                   raw_columns: Sequence[str], budget: ChunkBudget, on_error: str,
                   read_stats: dict[str, ReadStats], counter: _Counter) -> dict[str, _Samples]:
    """The train / valid / test samples of an event log (see the module docstring)."""
    made = set(log.history.values()) | ({log.delta_column} if log.delta_column else set())
    needed = _log_columns(log, raw_columns)
    for path in paths:
        clash = sorted(made & set(file_columns(path, reader)))
        if clash:
            raise DataFileError(path, f"the behaviour_log would build column(s) {clash}, which "
                                      f"the file already has")
    batches, numbers, units = [], [], set()
    for chunk in read_chunks(paths, reader, columns=needed, budget=budget, on_error=on_error,
                             stats=read_stats):
        raw_times = chunk.batch.column(chunk.batch.schema.get_field_index(log.time))
        users = chunk.batch.column(chunk.batch.schema.get_field_index(log.user))
        times, bad = _floats(raw_times)
        no_user = np.asarray(pc.is_null(users).to_numpy(zero_copy_only=False), dtype=bool)
        invalid = bad | np.isnan(times) | no_user
        if invalid.any():
            def problem(i: int) -> tuple[str, str]:
                if no_user[i]:
                    return log.user, "missing user"
                return log.time, f"time must be a number, got {_value_at(raw_times, i)!r}"

            rows = [int(i) for i in np.flatnonzero(invalid)]
            if on_error == "raise":
                raise chunk.error(rows[0], *problem(rows[0]))
            for i in rows:
                counter.skip(chunk.path, str(chunk.error(i, *problem(i))))
            chunk = chunk.take(~invalid)
        batches.append(chunk.batch)
        numbers.append(chunk.numbers if chunk.numbers is not None
                       else chunk.first_row + 1 + np.arange(chunk.num_rows))
        units.add(chunk.unit)
    events = pa.Table.from_batches(batches).combine_chunks()
    counter.rows = events.num_rows
    numbers_all = np.concatenate(numbers) if numbers else np.zeros(0, np.int64)
    time = _floats(events.column(log.time).combine_chunks())[0]
    user_codes = pc.fill_null(pc.dictionary_encode(
        _as_strings(events.column(log.user).combine_chunks())).indices, -1).to_numpy()
    order = np.lexsort((np.arange(len(time)), time, user_codes))  # by user, time, file order
    events, time, user_codes = events.take(pa.array(order)), time[order], user_codes[order]
    numbers_all = numbers_all[order]

    n = len(time)
    first = np.ones(n, dtype=bool)
    first[1:] = user_codes[1:] != user_codes[:-1]
    user_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))  # (n,)
    last = np.ones(n, dtype=bool)
    last[:-1] = first[1:]
    user_end = np.minimum.accumulate(np.where(last, np.arange(n), n)[::-1])[::-1]
    from_end = user_end - np.arange(n)  # 0 = the user's last event

    qualifies = np.ones(n, dtype=bool)
    if log.history_filter:
        (column, values), = log.history_filter.items()
        texts = _as_strings(events.column(column).combine_chunks())
        qualifies = pc.fill_null(pc.is_in(texts, value_set=pa.array(list(values), pa.string())),
                                 False).to_numpy(zero_copy_only=False).astype(bool)
    before = np.cumsum(qualifies) - qualifies  # qualifying events before each, overall
    available = before - before[user_start]  # ... of the same user
    lengths = np.minimum(available, log.max_len)
    qualifying = np.flatnonzero(qualifies)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    window = np.arange(int(offsets[-1])) + np.repeat(before - lengths - offsets[:-1], lengths)
    history_rows = qualifying[window] if len(window) else np.zeros(0, np.int64)

    columns = {name: events.column(name) for name in events.column_names}
    list_type = pa.ListArray if offsets[-1] < 2**31 else pa.LargeListArray  # int32 offsets
    list_offsets = pa.array(offsets, pa.int32() if list_type is pa.ListArray else pa.int64())
    for source_column, history_column in log.history.items():
        values = _as_strings(events.column(source_column).combine_chunks())
        columns[history_column] = list_type.from_arrays(list_offsets,
                                                        values.take(pa.array(history_rows)))
    if log.delta_column:
        deltas = np.repeat(time, lengths) - time[history_rows]  # target time - behaviour time
        columns[log.delta_column] = list_type.from_arrays(list_offsets,
                                                          pa.array(deltas, pa.float64()))
    samples = pa.table(columns)
    split_of = np.where(from_end < log.test_last, 2,
                        np.where(from_end < log.test_last + log.valid_last, 1, 0))
    path = paths[0] if len(paths) == 1 else f"the log files {list(paths)}"
    unit = units.pop() if len(units) == 1 else "row"
    out = {}
    for code, split in enumerate(("train", "valid", "test")):
        if split != "train" and (log.valid_last if split == "valid" else log.test_last) == 0:
            continue
        rows = np.flatnonzero(split_of == code)
        out[split] = _Samples(samples.take(pa.array(rows)), numbers_all[rows], unit, path)
    return out


def _sample_chunks(samples: _Samples, budget: ChunkBudget) -> Iterator[Chunk]:
    """The constructed samples in chunks within the budget, located at their log events."""
    offset = 0
    for batch in samples.table.to_batches():
        for start, piece in _bounded(batch, budget):
            rows = slice(offset + start, offset + start + piece.num_rows)
            yield Chunk(piece, samples.path, rows.start, samples.numbers[rows], samples.unit)
        offset += batch.num_rows


# --------------------------------------------------------------------------------------------
# The cache.


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary path) then os.replace onto ``path``; the temporary is removed on error."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _file_identity(path: str, mode: str) -> dict[str, Any]:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    info = resolved.stat()
    identity: dict[str, Any] = {"path": str(resolved), "size": info.st_size}
    if mode == "stat":
        identity["mtime_ns"] = info.st_mtime_ns
    else:
        digest = hashlib.sha256()
        with open(resolved, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        identity["sha256"] = digest.hexdigest()
    return identity


def _fingerprint(config: DatasetConfig, inputs: Mapping[str, list[str]], mode: str,
                 options: Mapping[str, Any]) -> str:
    document = {
        "format_version": FORMAT_VERSION,
        "config": dataset_config_to_dict(config),
        "inputs": {split: [_file_identity(p, mode) for p in paths]
                   for split, paths in inputs.items()},
        "options": dict(options),
    }
    text = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PreprocessedData:
    """A preprocessed cache directory: the filled-in schema and the encoded splits.

    ``schema``: the schema with vocab sizes, boundaries, means and stds filled in.
    ``num_rows``: rows per split. ``report``: rows read / skipped per split and file, and the
    chunk sizes each pass saw. ``fingerprint``; ``reused``: whether :func:`preprocess` found
    this cache valid instead of building it.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, reused: bool = False):
        import yaml

        self.cache_dir = Path(cache_dir)
        path = self.cache_dir / FEATURE_MAP
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no feature map (not a preprocessed cache)")
        self.feature_map = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(self.feature_map, dict) or \
                self.feature_map.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a feature map of format version {FORMAT_VERSION}")
        self.schema = load_schema(self.feature_map["schema"])
        self.num_rows: dict[str, int] = {split: int(entry["rows"]) for split, entry
                                         in self.feature_map["splits"].items()}
        self.report: dict[str, Any] = self.feature_map.get("report", {})
        self.fingerprint: str = self.feature_map["fingerprint"]
        self.reused = reused

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.num_rows)

    def _split_path(self, split: str) -> Path:
        if split not in self.num_rows:
            raise KeyError(f"no split {split!r} in {self.cache_dir}; have {list(self.num_rows)}")
        return self.cache_dir / self.feature_map["splits"][split]["file"]

    def columns(self, split: str = "train") -> dict[str, np.ndarray]:
        """Every row of ``split`` as numpy columns in the batch layout (they pass
        ``hmoe.data.check_columns(columns, self.schema)``)."""
        return _from_table(pq.read_table(self._split_path(split)), self.schema)

    def iter_chunks(self, split: str = "train", *, max_rows: int | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
        """The rows of ``split`` as a stream of column dicts (one Parquet row group at a time,
        at most ``max_rows`` rows each), for data larger than memory."""
        parquet = pq.ParquetFile(self._split_path(split))
        for group in range(parquet.metadata.num_row_groups):
            table = parquet.read_row_group(group)
            step = max_rows or max(table.num_rows, 1)
            for start in range(0, table.num_rows, step):
                yield _from_table(table.slice(start, step), self.schema)

    def vocabulary(self, feature: str) -> list[str]:
        """The values of a categorical feature in id order (id i is entry i - 1; id 0 is OOV)."""
        table = pq.read_table(self.cache_dir / VOCABULARIES,
                              filters=[("feature", "=", feature)])
        if table.num_rows == 0 and feature not in self.feature_map["vocabularies"]:
            raise KeyError(f"no vocabulary for {feature!r}; have "
                           f"{list(self.feature_map['vocabularies'])}")
        order = np.argsort(table.column("id").to_numpy())
        return [table.column("value")[int(i)].as_py() for i in order]


def load_preprocessed(cache_dir: str | os.PathLike) -> PreprocessedData:
    """Opens a cache directory written by :func:`preprocess`."""
    return PreprocessedData(cache_dir)


def _normalise_inputs(inputs, behaviour_log: bool) -> dict[str, list[str]]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, Mapping):
        if behaviour_log:
            raise ValueError("inputs: with source.behaviour_log give the event log file(s); the "
                             "splits come from the construction (valid_last / test_last)")
        out = {str(split): [str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike))
                                             else paths)] for split, paths in inputs.items()}
        if "train" not in out:
            raise ValueError(f"inputs: need a 'train' split (vocabularies and statistics are "
                             f"fitted on it), got {list(out)}")
        out = {"train": out.pop("train"), **out}
    else:
        out = {"log" if behaviour_log else "train": [str(p) for p in inputs]}
    for split, paths in out.items():
        if not paths:
            raise ValueError(f"inputs[{split!r}]: needs at least one file")
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such data file (inputs[{split!r}])")
    return out


def _log_columns(log: BehaviourLog, columns: Sequence[str]) -> list[str]:
    """The columns an event log must have: the schema's raw columns (less those the
    construction builds), the user, the time, the history sources and the filter column."""
    made = set(log.history.values()) | ({log.delta_column} if log.delta_column else set())
    needed = [c for c in columns if c not in made] + [log.user, log.time, *log.history]
    needed += list(log.history_filter or {})
    return list(dict.fromkeys(needed))


def _check_inputs(files: Mapping[str, list[str]], reader: ReaderOptions, columns: Sequence[str],
                  log: BehaviourLog | None) -> None:
    """Every input file exists, is not empty and has the needed columns: checked (from the
    headers) before the first pass, so a bad valid/test file fails before any work."""
    needed = _log_columns(log, columns) if log is not None else list(columns)
    for paths in files.values():
        for path in paths:
            available = file_columns(path, reader)
            missing = [c for c in needed if c not in available]
            if missing:
                raise DataFileError(path, f"missing column(s) {missing}; the file has "
                                          f"{available}")


def _cache_is_valid(cache_dir: Path, fingerprint: str) -> bool:
    import yaml

    path = cache_dir / FEATURE_MAP
    if not path.is_file():
        return False
    try:
        feature_map = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(feature_map, dict) or feature_map.get("fingerprint") != fingerprint:
        return False
    files = [entry.get("file") for entry in feature_map.get("splits", {}).values()]
    return all(isinstance(f, str) and (cache_dir / f).is_file() for f in files + [VOCABULARIES])


def preprocess(config: DatasetConfig | Schema | str | os.PathLike | Mapping[str, Any],
               inputs: str | os.PathLike | Sequence[str | os.PathLike]
               | Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
               cache_dir: str | os.PathLike, *, budget: ChunkBudget | None = None,
               on_error: str = "raise", fingerprint: str = "stat",
               quantile_sample: int = 1_000_000, force: bool = False,
               progress: bool = False) -> PreprocessedData:
    """Preprocesses raw files into ``cache_dir`` (or reuses a valid cache there).

    Args:
        config: a dataset config (path, YAML text, mapping, DatasetConfig) or a bare Schema.
        inputs: {split: file(s)} with a "train" split (vocabularies and statistics come from
            it); or one file / a list of files: the train split — or, with
            ``source.behaviour_log``, the event log, split by the construction.
        cache_dir: where the cache goes (created if needed).
        budget: the most rows / bytes per chunk read (default ChunkBudget()).
        on_error: "raise" on a bad row (DataFileError naming file, line, column), or "skip"
            (counted in ``report``, with a warning).
        fingerprint: "stat" (path, size, mtime of each input) or "content" (their SHA-256).
        quantile_sample: at most this many values per quantile feature fit its boundaries.
        force: rebuild even if the cache is valid.
        progress: show tqdm progress bars.
    Returns the :class:`PreprocessedData` of the cache.
    """
    config = load_dataset_config(config)
    budget = budget or ChunkBudget()
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if fingerprint not in FINGERPRINTS:
        raise ValueError(f"fingerprint must be one of {', '.join(FINGERPRINTS)}, got "
                         f"{fingerprint!r}")
    _int(quantile_sample, "quantile_sample", 2)
    log = config.source.behaviour_log
    files = _normalise_inputs(inputs, log is not None)
    cache_dir = Path(cache_dir)
    options = {"on_error": on_error, "quantile_sample": quantile_sample}
    digest = _fingerprint(config, files, fingerprint, options)
    if not force and _cache_is_valid(cache_dir, digest):
        return PreprocessedData(cache_dir, reused=True)

    plan = _Plan(config.schema, config.source)
    reader = config.source.reader
    _check_inputs(files, reader, plan.columns, log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / FEATURE_MAP).unlink(missing_ok=True)  # invalid until written last
    read_stats: dict[str, dict[str, ReadStats]] = {}
    counters: dict[str, _Counter] = {}

    if log is not None:
        log_stats: dict[str, ReadStats] = {}
        read_stats["log"] = log_stats
        counters["log"] = _Counter()
        samples = _build_samples(log, files["log"], reader, plan.columns, budget, on_error,
                                 log_stats, counters["log"])
        split_names = list(samples)

        def chunks(split: str, stats: dict[str, ReadStats]) -> Iterator[Chunk]:
            return _sample_chunks(samples[split], budget)

        train_where = f"{files['log']} (constructed train samples)"
    else:
        split_names = list(files)

        def chunks(split: str, stats: dict[str, ReadStats]) -> Iterator[Chunk]:
            return read_chunks(files[split], reader, columns=plan.columns, budget=budget,
                               on_error=on_error, stats=stats)

        train_where = ", ".join(files["train"])

    pass_stats = {"pass1": _ChunkSizes(), "pass2": _ChunkSizes()}
    fit_chunks = _progress(pass_stats["pass1"].observe(chunks("train", {})), progress,
                           "pass 1 (vocabularies)")
    schema, vocabularies = _fit(plan, fit_chunks, on_error, quantile_sample, train_where)
    indexes = {name: vocab.index for name, vocab in vocabularies.items()}

    num_rows, split_files = {}, {}
    for split in split_names:
        stats: dict[str, ReadStats] = {}
        read_stats[split] = stats
        counter = counters[split] = _Counter()
        name = f"{split}.parquet"
        source = _progress(pass_stats["pass2"].observe(chunks(split, stats)), progress,
                           f"pass 2 ({split})")
        num_rows[split] = _write_split(cache_dir / name, schema, plan, source, on_error,
                                       counter, indexes)
        if num_rows[split] == 0:
            raise ValueError(f"inputs[{split!r}]: no valid rows"
                             + (f" ({sum(counter.skipped.values())} were skipped)"
                                if counter.skipped else ""))
        split_files[split] = name

    _atomic_write(cache_dir / VOCABULARIES, lambda path: pq.write_table(
        _vocabulary_table(vocabularies), path))
    report = _report(read_stats, counters, pass_stats, budget)
    skipped = sum(entry["skipped_rows"] for entry in report["splits"].values())
    if skipped:
        warnings.warn(f"preprocess: skipped {skipped} malformed row(s); see "
                      f"{cache_dir / FEATURE_MAP} (report) for where", stacklevel=2)
    feature_map = {
        "format_version": FORMAT_VERSION,
        "fingerprint": digest,
        "schema": schema_to_dict(schema),
        "source": dataset_config_to_dict(config)["source"],
        "inputs": files,
        "splits": {split: {"file": split_files[split], "rows": num_rows[split]}
                   for split in split_names},
        "vocabularies": {name: {"file": VOCABULARIES, "vocab_size": len(v.values) + 1,
                                "distinct_values": v.distinct,
                                "min_count": config.schema.categorical[
                                    config.schema.categorical_index(name)].min_count}
                         for name, v in vocabularies.items()},
        "report": report,
    }
    _write_yaml(cache_dir / FEATURE_MAP, feature_map)
    return PreprocessedData(cache_dir)


def _write_yaml(path: Path, document: Mapping) -> None:
    import yaml

    text = yaml.safe_dump(_plain(document), sort_keys=False, width=100)
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _plain(value):
    """Numpy scalars and tuples -> plain YAML-able values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _vocabulary_table(vocabularies: Mapping[str, _Vocabulary]) -> pa.Table:
    features, ids, values, counts = [], [], [], []
    for name, vocab in vocabularies.items():
        features += [name] * len(vocab.values)
        ids += range(1, len(vocab.values) + 1)
        values += vocab.values
        counts += vocab.counts
    return pa.table({"feature": pa.array(features, pa.string()), "id": pa.array(ids, pa.int64()),
                     "value": pa.array(values, pa.string()),
                     "count": pa.array(counts, pa.int64())})


def _write_split(path: Path, schema: Schema, plan: _Plan, chunks: Iterable[Chunk],
                 on_error: str, counter: _Counter, indexes) -> int:
    """Pass 2 of one split into ``path`` (atomically); returns the rows written."""
    rows = 0

    def write(temporary: Path) -> None:
        nonlocal rows
        with pq.ParquetWriter(temporary, _arrow_schema(schema)) as writer:
            for chunk in chunks:
                parsed = _parse_checked(plan, chunk, on_error, counter)
                if parsed is None:
                    continue
                table = _to_table(schema, _encode(schema, parsed, indexes))
                writer.write_table(table, row_group_size=max(table.num_rows, 1))
                rows += table.num_rows

    _atomic_write(path, write)
    return rows


class _ChunkSizes:
    """The number and largest size of the chunks a pass saw."""

    def __init__(self):
        self.chunks, self.max_rows, self.max_bytes = 0, 0, 0

    def observe(self, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            self.chunks += 1
            self.max_rows = max(self.max_rows, chunk.num_rows)
            self.max_bytes = max(self.max_bytes, chunk.batch.nbytes)
            yield chunk

    def as_dict(self) -> dict[str, int]:
        return {"chunks": self.chunks, "max_chunk_rows": self.max_rows,
                "max_chunk_bytes": self.max_bytes}


def _progress(chunks: Iterable[Chunk], enabled: bool, description: str) -> Iterable[Chunk]:
    if not enabled:
        return chunks
    from tqdm import tqdm

    return tqdm(chunks, desc=description, unit="chunk")


def _report(read_stats: Mapping[str, Mapping[str, ReadStats]],
            counters: Mapping[str, _Counter], pass_stats: Mapping[str, _ChunkSizes],
            budget: ChunkBudget) -> dict[str, Any]:
    splits = {}
    for split, counter in counters.items():
        files = read_stats.get(split, {})
        malformed = {path: s.skipped_rows for path, s in files.items()}
        skipped_by_file = collections.Counter(malformed)
        skipped_by_file.update(counter.skipped)
        examples = [e for s in files.values() for e in s.skipped_examples] + counter.examples
        splits[split] = {
            "rows": counter.rows,
            "skipped_rows": sum(skipped_by_file.values()),
            "skipped_by_file": {path: n for path, n in skipped_by_file.items() if n},
            "skipped_examples": examples[:_MAX_EXAMPLES],
        }
    return {"budget": {"max_rows": budget.max_rows, "max_bytes": budget.max_bytes},
            "passes": {name: sizes.as_dict() for name, sizes in pass_stats.items()},
            "splits": splits}
