r"""The dataset config: a schema YAML plus its ``source`` section, parsed into typed dataclasses.

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
(``load_schema`` reads the same file and ignores ``source``); unknown keys are errors, reported
as ``<file>: <key path>: <problem>``. What a behaviour log builds is in
:mod:`hmoe.data.behaviour_log`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hmoe.data.readers import ReaderOptions
from hmoe.data.schema import Schema, load_schema, schema_to_dict

__all__ = ["BehaviourLog", "DatasetConfig", "LabelRule", "SourceConfig",
           "dataset_config_to_dict", "load_dataset_config"]


@dataclass(frozen=True)
class LabelRule:
    """How a raw label column becomes 0/1: ``positive`` (1 where the text is one of these
    strings, 0 otherwise) or ``threshold`` (1 where the number is >= it). A missing value is a
    bad row either way."""

    positive: tuple[str, ...] | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class BehaviourLog:
    """Samples from an event log (built by :mod:`hmoe.data.behaviour_log`).

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
    """The ``source`` section: reader options, label rules, an optional behaviour log, and
    ``time_column``: a raw column of each row's time in seconds (numbers >= 0), kept in the
    cache as the int64 column "timestamp" for online training (``data.time_column:
    timestamp``)."""

    reader: ReaderOptions = field(default_factory=ReaderOptions)
    labels: Mapping[str, LabelRule] = field(default_factory=dict)
    behaviour_log: BehaviourLog | None = None
    time_column: str | None = None


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
                                                                         "behaviour_log",
                                                                         "time_column")


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
    reader_keys = {k: v for k, v in entry.items()
                   if k not in ("labels", "behaviour_log", "time_column")}
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
    time_column = entry.get("time_column")
    if time_column is not None:
        if not isinstance(time_column, str) or not time_column:
            raise ValueError(f"source.time_column: must be a column name, got "
                             f"{time_column!r}")
        if log is not None:
            raise ValueError("source.time_column: not with a behaviour_log (its samples are "
                             "made from the log's own time column)")
    return SourceConfig(reader=reader, labels=labels, behaviour_log=log,
                        time_column=time_column)


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
    if config.source.time_column is not None:
        source["time_column"] = config.source.time_column
    return {**schema_to_dict(config.schema), "source": source}

