r"""The dataset schema: which columns are features of which type, which are labels.

A schema is the contract between the data layer and the models. Readers and the synthetic world
produce batches that follow it; :mod:`hmoe.models` builds embedding tables from it. It is written
in YAML (keys follow FuxiCTR where meanings agree) and parsed into the frozen dataclasses below;
unknown keys and bad values are errors naming the key.

Batch layout (a dict of tensors, B rows; fields in schema order within each kind):

    "categorical"            (B, F_c) int64   ids in [0, vocab_size_f); 0 is the out-of-vocabulary
                                              (and missing-value) bucket of every field
    "numeric"                (B, F_n) float32 raw values; NaN = missing
    "seq/<name>"             (B, L)   int64   item ids in the shared vocabulary (0 at padding)
    "seq/<name>/lengths"     (B,)     int64   valid steps, in [0, L]; steps >= length are padding
    "seq/<name>/positions"   (B, L)   int64   in [1, max_position] at valid steps (rank 1 = most
                                              recent, or a time bucket of the temporal column)
    "pretrained/<name>/user" (B, P)   float32 the user-side pre-trained vectors (P = dim)
    "pretrained/<name>/item" (B, P)   float32 the item-side vectors (see PretrainedFeature)
    "labels"                 (B, T)   float32 in {0, 1}, tasks in schema order
    "group_id"               (B,)     int64   (when the schema names one) for gAUC
    "exposure_count"         (B,)     float32 (when the schema names one) for IPW, >= 1

:func:`batch_keys` lists the keys a schema's batches hold and :func:`batch_dtype` the dtype of a
key; both are the single source of that layout for the rest of the library.

The YAML form (one list of features, each with a ``type``; the parsed :class:`Schema` groups them
by kind, keeping their order within a kind)::

    name: synthetic
    features:
      - {name: user_id, type: categorical, min_count: 2}
      - {name: price, type: numeric, quantizer: log, bases: [2, 3, 10]}
      - {name: hist_items, type: sequence, item: ad_id, max_len: 50, temporal_column: hist_dt}
      - {name: text_sim, type: pretrained, user_column: u_vec, item_column: i_vec, dim: 32}
    labels:
      - {name: click}
      - {name: like, auxiliary: true}
    group_id: user_id
    exposure_count: exposures

Every key of a feature or label entry is a field of its dataclass (``type`` picks the class).
:func:`load_schema` reads a path, a YAML string or a dict and validates it; errors are
``ValueError`` whose message starts with the key path, e.g.
``features[3].max_len: must be an int >= 1, got 0``. :func:`schema_to_dict` is its inverse
(``load_schema(schema_to_dict(s)) == s``) and :func:`dump_schema` writes the YAML text.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FEATURE_TYPES",
    "QUANTIZERS",
    "CategoricalFeature",
    "Label",
    "NumericFeature",
    "PretrainedFeature",
    "Schema",
    "SequenceFeature",
    "batch_dtype",
    "batch_keys",
    "dump_schema",
    "load_schema",
    "schema_to_dict",
]

QUANTIZERS = ("log", "uniform", "quantile")
LOG_TRANSFORMS = ("criteo", "log1p")  # as hmoe.nn.LogQuantizer


@dataclass(frozen=True)
class CategoricalFeature:
    """A single-valued categorical column.

    ``vocab_size`` counts rows including the out-of-vocabulary id 0; it is set by preprocessing
    (values seen at least ``min_count`` times get ids 1..V-1) or given for pre-indexed data.

    ``vocab`` says how values become rows:

        static    (default) a vocabulary fixed before training (preprocessing, or pre-indexed
                  ids): the column holds rows
        dynamic   ids that come and go (online learning): the column holds raw int64 ids (0:
                  none), and the model maps them to its ``capacity`` rows as it trains
                  (hmoe.nn.DynamicVocab): an id gets its own row once seen ``min_count`` times,
                  row 0 until then, and when every row is taken the least recently seen id's
                  row is reclaimed (``eviction``: lru); ``pending_capacity`` bounds the ids
                  still being counted (default: capacity)
        hash      the hashing trick: raw ids to 1 + hash(id) mod ``capacity`` (the buckets)

    For dynamic and hash, ``vocab_size`` is capacity + 1. In YAML either flat keys or
    ``vocab: {kind: dynamic, capacity: N, min_count: c, eviction: lru}`` (``buckets: N`` for
    hash).
    """

    name: str
    column: str | None = None  # source column; default: name
    min_count: int = 1
    vocab_size: int | None = None
    vocab: str = "static"
    capacity: int | None = None
    pending_capacity: int | None = None
    eviction: str = "lru"

    def __post_init__(self):
        if self.vocab in ("dynamic", "hash") and self.vocab_size is None \
                and _is_int(self.capacity) and self.capacity >= 1:
            object.__setattr__(self, "vocab_size", int(self.capacity) + 1)

    @property
    def raw_ids(self) -> bool:
        """Whether the column holds raw ids that the model maps to rows (dynamic, hash)."""
        return self.vocab != "static"


@dataclass(frozen=True)
class NumericFeature:
    """A numeric column, quantised to integer codes that MNSE encodes digit by digit.

    quantizer: "log" (hmoe.nn.LogQuantizer, transform ``log_transform``), "uniform"
    (hmoe.nn.AffineQuantizer with ``lo``, ``step``, ``max_code``) or "quantile"
    (hmoe.nn.QuantileQuantizer with ``num_bins``; ``boundaries`` set by preprocessing).
    ``mean`` and ``std`` (set by preprocessing) standardise the raw value for the "scaled"
    baseline encoding.
    """

    name: str
    column: str | None = None
    quantizer: str = "quantile"
    bases: tuple[int, ...] = (2, 3, 10)
    num_bins: int = 64  # quantile
    log_transform: str = "log1p"  # log
    log_scale: float = 4.0  # log, transform log1p
    lo: float = 0.0  # uniform
    step: float = 1.0  # uniform
    max_code: int | None = None  # uniform (required), log (optional clamp)
    boundaries: tuple[float, ...] | None = None  # quantile, num_bins - 1 ascending values
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class SequenceFeature:
    """A behaviour sequence: item ids sharing the vocabulary of categorical feature ``item``.

    The column holds ids separated by ``separator``, most recent last. ``temporal_column``
    (optional) holds the time since each behaviour, same separator, bucketed by
    hmoe.nn.time_buckets into ``max_position`` buckets; without it positions are ranks.
    """

    name: str
    item: str  # the CategoricalFeature whose vocabulary (and embedding rows) the items share
    max_len: int = 50
    column: str | None = None
    separator: str = "|"
    temporal_column: str | None = None
    max_position: int | None = None  # default: max_len (ranks)

    @property
    def num_positions(self) -> int:
        """The largest position a valid step can have (the size of TIM's position table less
        the target's slot 0)."""
        return self.max_position if self.max_position is not None else self.max_len


@dataclass(frozen=True)
class PretrainedFeature:
    """A pre-trained vector pair for similarity encoding: the user-side vector column and the
    item-side vector column (each ``dim`` floats, ``separator``-joined). The model encodes the
    pair by hmoe.nn.SimilarityEncoder: their cosine similarity, quantised and MNSE-encoded."""

    name: str
    user_column: str
    item_column: str
    dim: int
    separator: str = "|"
    resolution: int = 1024


@dataclass(frozen=True)
class Label:
    """A task's binary label column. ``auxiliary`` tasks train their own tower (STEM-AL) but are
    not the product's metric."""

    name: str
    column: str | None = None
    auxiliary: bool = False
    weight: float = 1.0


FEATURE_TYPES: dict[str, type] = {
    "categorical": CategoricalFeature,
    "numeric": NumericFeature,
    "sequence": SequenceFeature,
    "pretrained": PretrainedFeature,
}


@dataclass(frozen=True)
class Schema:
    """A dataset's features (grouped by kind, in order), labels and bookkeeping columns.

    ``group_id`` names the column whose value groups rows for gAUC (typically the user id);
    ``exposure_count`` the column counting how often a (user, ad) pair was shown (for IPW).
    Build one by :func:`load_schema` (validated) or by hand and call :meth:`validate`.
    """

    name: str
    categorical: tuple[CategoricalFeature, ...] = ()
    numeric: tuple[NumericFeature, ...] = ()
    sequence: tuple[SequenceFeature, ...] = ()
    pretrained: tuple[PretrainedFeature, ...] = ()
    labels: tuple[Label, ...] = field(default=())
    group_id: str | None = None
    exposure_count: str | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    @property
    def features(self) -> tuple:
        """Every feature, kinds in the order categorical, numeric, sequence, pretrained."""
        return self.categorical + self.numeric + self.sequence + self.pretrained

    def categorical_index(self, name: str) -> int:
        for i, feature in enumerate(self.categorical):
            if feature.name == name:
                return i
        raise KeyError(f"no categorical feature named {name!r}; have "
                       f"{[f.name for f in self.categorical]}")

    def numeric_index(self, name: str) -> int:
        for i, feature in enumerate(self.numeric):
            if feature.name == name:
                return i
        raise KeyError(f"no numeric feature named {name!r}; have "
                       f"{[f.name for f in self.numeric]}")

    def task_index(self, name: str) -> int:
        if name not in self.tasks:
            raise KeyError(f"no label named {name!r}; have {list(self.tasks)}")
        return self.tasks.index(name)

    def with_vocab_sizes(self, vocab_sizes: Mapping[str, int]) -> Schema:
        """A copy whose categorical features named in ``vocab_sizes`` have those vocab sizes
        (counting the out-of-vocabulary id 0); the result is validated."""
        unknown = set(vocab_sizes) - {f.name for f in self.categorical}
        if unknown:
            raise KeyError(f"no categorical features named {sorted(unknown)}; have "
                           f"{[f.name for f in self.categorical]}")
        categorical = tuple(
            dataclasses.replace(f, vocab_size=vocab_sizes[f.name]) if f.name in vocab_sizes else f
            for f in self.categorical)
        return dataclasses.replace(self, categorical=categorical).validate()

    def validate(self) -> Schema:
        """Checks every value and the cross-references; returns self, raises ValueError naming
        the offending field as ``<kind>[<index>].<key>`` (``features[<i>].<key>`` when parsed
        from YAML)."""
        _validate(self, _own_paths(self))
        return self


# --------------------------------------------------------------------------------------------
# The batch layout.

_INT_KEYS = ("categorical", "group_id")
_FLOAT_KEYS = ("numeric", "labels", "exposure_count")


def batch_dtype(key: str) -> torch.dtype | None:
    """The dtype of batch key ``key`` in the layout above, or None for a key outside it (extra
    columns such as the synthetic world's ``"true/click"`` keep their own dtype)."""
    if key in _INT_KEYS or key.startswith("seq/"):
        return torch.int64
    if key in _FLOAT_KEYS or key.startswith("pretrained/"):
        return torch.float32
    return None


def batch_keys(schema: Schema) -> tuple[str, ...]:
    """The keys a batch of ``schema`` holds, in layout order (kinds without features omitted)."""
    keys = []
    if schema.categorical:
        keys.append("categorical")
    if schema.numeric:
        keys.append("numeric")
    for seq in schema.sequence:
        keys += [f"seq/{seq.name}", f"seq/{seq.name}/lengths", f"seq/{seq.name}/positions"]
    for pre in schema.pretrained:
        keys += [f"pretrained/{pre.name}/user", f"pretrained/{pre.name}/item"]
    keys.append("labels")
    if schema.group_id is not None:
        keys.append("group_id")
    if schema.exposure_count is not None:
        keys.append("exposure_count")
    return tuple(keys)


# --------------------------------------------------------------------------------------------
# YAML and dicts -> Schema.

# "source" (how raw files become rows) belongs to the dataset configs of hmoe.data.dataset_config;
# the schema accepts it and leaves its checking to load_dataset_config. "description"
# is a one-line text for people (``hmoe configs`` lists it); the schema does not keep it.
_TOP_KEYS = ("name", "description", "features", "labels", "group_id", "exposure_count", "source")


def load_schema(source: str | os.PathLike | Mapping[str, Any]) -> Schema:
    """Parses and validates a schema.

    Args:
        source: a path (``os.PathLike``, or a one-line string naming an existing file or ending
            in .yaml/.yml), a YAML document as a string, or an already-parsed mapping.
    Raises FileNotFoundError for a missing file, ValueError (message: ``<file>: <key path>:
    <what is wrong>``) for bad YAML, unknown or missing keys and bad values.
    """
    data, origin = _read_source(source)
    try:
        schema, feature_paths = _schema_from_dict(data)
        _validate(schema, feature_paths)
    except ValueError as error:
        if origin is None or origin == "<string>":
            raise
        raise ValueError(f"{origin}: {error}") from None
    return schema


def _read_source(source) -> tuple[Any, str | None]:
    """(the parsed document, the file name for messages or None)."""
    if isinstance(source, Mapping):
        return source, None
    is_path = isinstance(source, os.PathLike)
    if isinstance(source, str) and "\n" not in source:
        is_path = source.endswith((".yaml", ".yml")) or Path(source).is_file()
    if is_path:
        path = Path(source)
        text, origin = path.read_text(encoding="utf-8"), str(path)
    elif isinstance(source, str):
        text, origin = source, "<string>"
    else:
        raise TypeError(f"source must be a path, a YAML string or a mapping, got "
                        f"{type(source).__name__}")
    import yaml  # here: only parsing needs it

    try:
        return yaml.load(text, Loader=_strict_loader()), origin
    except yaml.YAMLError as error:
        raise ValueError(f"{origin}: invalid YAML: {error}") from None


def _strict_loader():
    """yaml.SafeLoader that rejects a key repeated within one mapping (SafeLoader keeps the
    last silently, which would hide a typo'd duplicate)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        mapping = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in mapping:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}",
                    key_node.start_mark)
            mapping[key] = loader.construct_object(value_node, deep=deep)
        return mapping

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 construct_mapping)
    return StrictLoader


def _type_name(value) -> str:
    return "nothing (an empty document)" if value is None else type(value).__name__


def _check_keys(entry: Mapping, path: str, allowed, required, what: str) -> None:
    prefix = f"{path}." if path else ""
    for key in entry:
        if key not in allowed:
            raise ValueError(f"{prefix}{key}: unknown key for {what}; allowed keys: "
                             f"{', '.join(allowed)}")
    for key in required:
        if key not in entry:
            raise ValueError(f"{prefix}{key}: required key missing ({what})")


def _dataclass_keys(cls) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all field names, the names without a default) of a dataclass."""
    fields = dataclasses.fields(cls)
    required = tuple(f.name for f in fields
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return tuple(f.name for f in fields), required


def _flat_vocab(vocab: Mapping, path: str) -> dict[str, Any]:
    """``vocab: {kind, capacity | buckets, min_count, pending_capacity, eviction}`` as the flat
    keys of CategoricalFeature."""
    unknown = sorted(str(k) for k in vocab if k not in ("kind", "capacity", "buckets",
                                                         "min_count", "pending_capacity",
                                                         "eviction"))
    if unknown or "kind" not in vocab:
        raise ValueError(f"{path}: expected {{kind: static | dynamic | hash, capacity (or "
                         f"buckets), min_count, pending_capacity, eviction}}, got "
                         f"{dict(vocab)!r}")
    if "buckets" in vocab and "capacity" in vocab:
        raise ValueError(f"{path}: give capacity or buckets, not both")
    flat = {"vocab": vocab["kind"]}
    for key in ("capacity", "min_count", "pending_capacity", "eviction"):
        if key in vocab:
            flat[key] = vocab[key]
    if "buckets" in vocab:
        flat["capacity"] = vocab["buckets"]
    return flat


def _entry_to_dataclass(cls, entry: Mapping, path: str, what: str):
    allowed, required = _dataclass_keys(cls)
    _check_keys(entry, path, allowed, required, what)
    values = dict(entry)
    # YAML lists become the dataclasses' tuples (hashable, comparable); ints given for float
    # fields become floats so that a parsed schema equals its round trip.
    for key in ("bases", "boundaries"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if isinstance(values.get("boundaries"), tuple):
        values["boundaries"] = tuple(float(v) if _is_int(v) else v for v in values["boundaries"])
    for f in dataclasses.fields(cls):
        if f.type == "float" and _is_int(values.get(f.name)):
            values[f.name] = float(values[f.name])
    return cls(**values)


def _schema_from_dict(data) -> tuple[Schema, dict[tuple[str, int], str]]:
    """The Schema (not yet value-checked) and, for each (kind, index), its YAML path."""
    if not isinstance(data, Mapping):
        raise ValueError(f"schema: the document must be a mapping, got {_type_name(data)}")
    _check_keys(data, "", _TOP_KEYS, ("name", "features", "labels"), "a schema")
    if data.get("source") is not None and not isinstance(data["source"], Mapping):
        raise ValueError(f"source: must be a mapping, got {_type_name(data['source'])}")
    if data.get("description") is not None and not isinstance(data["description"], str):
        raise ValueError(f"description: must be a string, got {_type_name(data['description'])}")
    features = data["features"]
    if not isinstance(features, list):
        raise ValueError(f"features: must be a list of feature mappings, got "
                         f"{_type_name(features)}")
    by_kind: dict[str, list] = {kind: [] for kind in FEATURE_TYPES}
    paths: dict[tuple[str, int], str] = {}
    for i, entry in enumerate(features):
        path = f"features[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path}: must be a mapping, got {_type_name(entry)}")
        if "type" not in entry:
            raise ValueError(f"{path}.type: required key missing (one of "
                             f"{', '.join(FEATURE_TYPES)})")
        kind = entry["type"]
        if not isinstance(kind, str) or kind not in FEATURE_TYPES:
            raise ValueError(f"{path}.type: unknown type {kind!r}; expected one of "
                             f"{', '.join(FEATURE_TYPES)}")
        values = {k: v for k, v in entry.items() if k != "type"}
        if kind == "categorical" and isinstance(values.get("vocab"), Mapping):
            values = {**values, **_flat_vocab(values.pop("vocab"), f"{path}.vocab")}
        feature = _entry_to_dataclass(FEATURE_TYPES[kind], values, path, f"a {kind} feature")
        paths[(kind, len(by_kind[kind]))] = path
        by_kind[kind].append(feature)
    labels = data["labels"]
    if not isinstance(labels, list):
        raise ValueError(f"labels: must be a list of label mappings, got {_type_name(labels)}")
    parsed_labels = []
    for i, entry in enumerate(labels):
        if not isinstance(entry, Mapping):
            raise ValueError(f"labels[{i}]: must be a mapping, got {_type_name(entry)}")
        parsed_labels.append(_entry_to_dataclass(Label, entry, f"labels[{i}]", "a label"))
    schema = Schema(
        name=data["name"],
        categorical=tuple(by_kind["categorical"]),
        numeric=tuple(by_kind["numeric"]),
        sequence=tuple(by_kind["sequence"]),
        pretrained=tuple(by_kind["pretrained"]),
        labels=tuple(parsed_labels),
        group_id=data.get("group_id"),
        exposure_count=data.get("exposure_count"),
    )
    return schema, paths


# --------------------------------------------------------------------------------------------
# Value checks, shared by load_schema and Schema.validate.


def _own_paths(schema: Schema) -> dict[tuple[str, int], str]:
    return {(kind, i): f"{kind}[{i}]" for kind in FEATURE_TYPES
            for i in range(len(getattr(schema, kind)))}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class _Checker:
    """Value checks of one entry; every message starts with the entry's key path."""

    def __init__(self, entry, path: str):
        self.entry, self.path = entry, path

    def fail(self, key: str, message: str):
        raise ValueError(f"{self.path}.{key}: {message}")

    def _value(self, key: str):
        return getattr(self.entry, key)

    def string(self, key: str, *, optional: bool = False) -> None:
        value = self._value(key)
        if optional and value is None:
            return
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string{' or null' if optional else ''}, got "
                           f"{value!r}")

    def integer(self, key: str, minimum: int, *, optional: bool = False) -> None:
        value = self._value(key)
        if optional and value is None:
            return
        if not _is_int(value) or value < minimum:
            self.fail(key, f"must be an int >= {minimum}{' or null' if optional else ''}, got "
                           f"{value!r}")

    def number(self, key: str, *, positive: bool = False, nonnegative: bool = False) -> None:
        value = self._value(key)
        bound = " > 0" if positive else " >= 0" if nonnegative else ""
        if (not _is_number(value) or not math.isfinite(value) or (positive and value <= 0)
                or (nonnegative and value < 0)):
            self.fail(key, f"must be a finite number{bound}, got {value!r}")

    def boolean(self, key: str) -> None:
        if not isinstance(self._value(key), bool):
            self.fail(key, f"must be true or false, got {self._value(key)!r}")

    def choice(self, key: str, choices, what: str) -> None:
        value = self._value(key)
        if value not in choices:
            self.fail(key, f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


def _check_numeric(c: _Checker, feature: NumericFeature) -> None:
    c.choice("quantizer", QUANTIZERS, "quantizer")
    bases = feature.bases
    if (not isinstance(bases, (tuple, list)) or not bases
            or not all(_is_int(b) and b >= 2 for b in bases)):
        c.fail("bases", f"must be a non-empty list of ints >= 2, got {bases!r}")
    c.integer("num_bins", 2)
    c.choice("log_transform", LOG_TRANSFORMS, "log_transform")
    c.number("log_scale", positive=True)
    c.number("lo")
    c.number("step", positive=True)
    c.integer("max_code", 0, optional=True)
    if feature.quantizer == "uniform" and feature.max_code is None:
        c.fail("max_code", "required for quantizer 'uniform' (the largest code)")
    c.number("mean")
    c.number("std", positive=True)
    boundaries = feature.boundaries
    if boundaries is None:
        return
    if feature.quantizer != "quantile":
        c.fail("boundaries", f"only quantizer 'quantile' takes boundaries, got quantizer "
                             f"{feature.quantizer!r}")
    if (not isinstance(boundaries, (tuple, list))
            or not all(_is_number(b) and math.isfinite(b) for b in boundaries)):
        c.fail("boundaries", f"must be a list of finite numbers, got {boundaries!r}")
    if len(boundaries) != feature.num_bins - 1:
        c.fail("boundaries", f"must have num_bins - 1 = {feature.num_bins - 1} values, got "
                             f"{len(boundaries)}")
    for i in range(1, len(boundaries)):
        if boundaries[i] < boundaries[i - 1]:
            c.fail("boundaries", f"must be ascending (non-decreasing), but value {i} "
                                 f"({boundaries[i]!r}) < value {i - 1} ({boundaries[i - 1]!r})")


def _check_feature(kind: str, feature, path: str) -> None:
    if not isinstance(feature, FEATURE_TYPES[kind]):
        raise ValueError(f"{path}: must be a {FEATURE_TYPES[kind].__name__}, got "
                         f"{type(feature).__name__}")
    c = _Checker(feature, path)
    c.string("name")
    if kind == "categorical":
        c.string("column", optional=True)
        c.integer("min_count", 1)
        c.integer("vocab_size", 1, optional=True)
        if feature.vocab not in ("static", "dynamic", "hash"):
            c.fail("vocab", f"must be static, dynamic or hash, got {feature.vocab!r}")
        if feature.vocab == "static":
            for key in ("capacity", "pending_capacity"):
                if getattr(feature, key) is not None:
                    c.fail(key, "applies to vocab dynamic or hash")
        else:
            c.integer("capacity", 1)
            c.integer("pending_capacity", 1, optional=True)
            if feature.vocab_size != feature.capacity + 1:
                c.fail("vocab_size", f"of a {feature.vocab} vocabulary is capacity + 1 = "
                                     f"{feature.capacity + 1}, got {feature.vocab_size}")
        if feature.eviction != "lru":
            c.fail("eviction", f"must be lru (the only policy), got {feature.eviction!r}")
    elif kind == "numeric":
        c.string("column", optional=True)
        _check_numeric(c, feature)
    elif kind == "sequence":
        c.string("item")
        c.integer("max_len", 1)
        c.string("column", optional=True)
        c.string("separator")
        c.string("temporal_column", optional=True)
        c.integer("max_position", 1, optional=True)
    else:
        c.string("user_column")
        c.string("item_column")
        c.integer("dim", 1)
        c.string("separator")
        c.integer("resolution", 2)


def _validate(schema: Schema, paths: dict[tuple[str, int], str]) -> None:
    if not isinstance(schema.name, str) or not schema.name:
        raise ValueError(f"name: must be a non-empty string, got {schema.name!r}")
    seen: dict[str, str] = {}  # feature name -> path of its first occurrence
    kinds: dict[str, str] = {}
    for (kind, i), path in paths.items():  # in the order the user wrote them
        feature = getattr(schema, kind)[i]
        _check_feature(kind, feature, path)
        if feature.name in seen:
            raise ValueError(f"{path}.name: duplicate feature name {feature.name!r} (first "
                             f"at {seen[feature.name]})")
        seen[feature.name], kinds[feature.name] = path, kind
    if not seen:
        raise ValueError("features: at least one feature is required")
    for i, seq in enumerate(schema.sequence):
        if kinds.get(seq.item) != "categorical":
            found = (f"{seq.item!r} is a {kinds[seq.item]} feature" if seq.item in kinds
                     else f"there is no feature named {seq.item!r}")
            raise ValueError(f"{paths[('sequence', i)]}.item: must name a categorical feature "
                             f"(whose vocabulary the items share); {found}")
    if not schema.labels:
        raise ValueError("labels: at least one label is required")
    label_paths: dict[str, str] = {}
    for i, label in enumerate(schema.labels):
        path = f"labels[{i}]"
        if not isinstance(label, Label):
            raise ValueError(f"{path}: must be a Label, got {type(label).__name__}")
        c = _Checker(label, path)
        c.string("name")
        c.string("column", optional=True)
        c.boolean("auxiliary")
        c.number("weight", nonnegative=True)
        if label.name in label_paths:
            raise ValueError(f"{path}.name: duplicate label name {label.name!r} (first at "
                             f"{label_paths[label.name]})")
        label_paths[label.name] = path
    for key in ("group_id", "exposure_count"):
        value = getattr(schema, key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{key}: must be a non-empty string (a column name) or null, got "
                             f"{value!r}")


# --------------------------------------------------------------------------------------------
# Schema -> dict and YAML.


def _entry_to_dict(entry) -> dict[str, Any]:
    """The fields of a feature or label that differ from their defaults (required ones always),
    tuples as lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(entry):
        value = getattr(entry, f.name)
        has_default = f.default is not dataclasses.MISSING
        if has_default and value == f.default:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def schema_to_dict(schema: Schema) -> dict[str, Any]:
    """The YAML-shaped dict of ``schema`` (features grouped by kind; only non-default keys), so
    that ``load_schema(schema_to_dict(schema)) == schema``."""
    features = []
    for kind in FEATURE_TYPES:
        for feature in getattr(schema, kind):
            entry = _entry_to_dict(feature)
            features.append({"name": entry.pop("name"), "type": kind, **entry})
    out: dict[str, Any] = {
        "name": schema.name,
        "features": features,
        "labels": [_entry_to_dict(label) for label in schema.labels],
    }
    for key in ("group_id", "exposure_count"):
        if getattr(schema, key) is not None:
            out[key] = getattr(schema, key)
    return out


def dump_schema(schema: Schema) -> str:
    """The YAML text of ``schema`` (one flow-style line per feature and label)."""
    import yaml

    data = schema_to_dict(schema)
    head = yaml.safe_dump({"name": data["name"]}, sort_keys=False)
    lines = [head.rstrip("\n"), "features:"]
    lines += [f"  - {_flow(entry)}" for entry in data["features"]]
    lines.append("labels:")
    lines += [f"  - {_flow(entry)}" for entry in data["labels"]]
    rest = {k: v for k, v in data.items() if k not in ("name", "features", "labels")}
    if rest:
        lines.append(yaml.safe_dump(rest, sort_keys=False).rstrip("\n"))
    return "\n".join(lines) + "\n"


def _flow(entry: dict) -> str:
    import yaml

    return yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=10**9).strip()
