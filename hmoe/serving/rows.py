r"""Raw request rows -> the model's batch, with the preprocessing of training.

A prediction request holds rows as JSON objects whose keys are the raw columns of the dataset
config and whose values are what the training files hold: a categorical value as text or an
integer, a number, a sequence as ``separator``-joined text or a JSON list (most recent last), a
pre-trained vector the same way. :class:`RowEncoder` checks them and encodes them exactly as
preprocessing encoded the training files (:mod:`hmoe.data.parse` and :mod:`hmoe.data.encode`
run on them), so a served row scores as ``hmoe predict`` scores the same row of a file.

Columns (``RowEncoder.columns``, also in the service's ``/metadata``):

- every feature column is required in every row; ``null`` means missing, as an empty cell does
  in a file (categorical -> the out-of-vocabulary id 0, numeric -> the feature's missing
  embedding, sequence -> empty); strings listed in the source's ``null_values`` are missing
  too;
- the label, group, exposure and time columns of the training files may be present and are
  ignored (rows taken straight from a training file can be posted);
- any other key is an error.

What is an error (:class:`RowError`, naming each bad row and field; nothing of the request is
scored): a row that is not an object; a missing or unknown column; a value of the wrong type
(an object, a boolean, a list where a scalar belongs, a fractional number as a categorical
value); a number that does not parse; a non-finite number (NaN is allowed only in numeric
features, where it means missing); a sequence longer than its ``max_len`` (training keeps the
most recent ``max_len`` items of a longer history; a service is told, not silently trimmed); a
sequence whose times do not match its items; a vector of the wrong length; a pre-indexed id out
of its range.

Behaviour logs: a dataset built from an event log (``source.behaviour_log``) is served in its
sample layout: the request gives each row's history columns (and time-delta column) as the
samples held them; the service keeps no per-user state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from hmoe.data.dataset_config import SourceConfig
from hmoe.data.encode import VocabularyIndex, _encode
from hmoe.data.parse import _Plan
from hmoe.data.readers import Chunk, ReaderOptions
from hmoe.data.schema import Schema, batch_keys

__all__ = ["RowEncoder", "RowError", "model_inputs"]

_MAX_ERRORS = 20  # problems named in one error


class RowError(ValueError):
    """Rows that cannot be scored. ``errors``: [(row index or None, field or None, message)];
    ``str()`` names each as ``rows[i].field: message``."""

    def __init__(self, errors: Sequence[tuple[int | None, str | None, str]], total: int = 0):
        self.errors = list(errors)[:_MAX_ERRORS]
        self.total = max(total, len(self.errors))
        parts = [_where(row, field) + message for row, field, message in self.errors]
        more = self.total - len(self.errors)
        super().__init__("; ".join(parts) + (f"; and {more} more" if more > 0 else ""))

    def as_json(self) -> list[dict]:
        return [{"row": row, "field": field, "message": message}
                for row, field, message in self.errors]


def _where(row: int | None, field: str | None) -> str:
    if row is None:
        return f"{field}: " if field else ""
    return f"rows[{row}].{field}: " if field else f"rows[{row}]: "


def model_inputs(schema: Schema) -> list[str]:
    """The batch keys the model reads, in a fixed order (the exported program's inputs): the
    layout's feature keys, without labels and bookkeeping columns."""
    return [key for key in batch_keys(schema)
            if key in ("categorical", "numeric") or key.startswith(("seq/", "pretrained/"))]


class RowEncoder:
    """Encodes raw rows (a list of dicts) into the batch layout of ``schema``.

    Args:
        schema: the fitted schema the model was trained on.
        reader: the source's reader options (``null_values``, ``strip_whitespace``).
        vocabularies: feature -> its values in id order (id i is entry i - 1), for every
            categorical feature that preprocessing indexed (neither pre-indexed nor raw ids).
        hash_raw_ids: the raw ids of dynamic and hash vocabularies are a hash of the value's
            text, as preprocessing of raw files makes them (True), or the values themselves,
            integers >= 0, as a generated world holds them (False).
    """

    def __init__(self, schema: Schema, reader: ReaderOptions | None = None,
                 vocabularies: Mapping[str, pa.Array] | None = None, *,
                 hash_raw_ids: bool = True, aligned_sequences: bool = False):
        self.schema = schema
        self.hash_raw_ids = hash_raw_ids
        # a model that attends its sequences jointly (ModelConfig.joint_sequences) needs each
        # row's sequences equally long: a row whose are not is a RowError
        self.aligned_sequences = aligned_sequences and len(schema.sequence) > 1
        self.reader = reader or ReaderOptions()
        vocabularies = dict(vocabularies or {})
        names = [f.name for f in schema.categorical]
        unknown = sorted(set(vocabularies) - set(names))
        if unknown:
            raise ValueError(f"vocabularies: {unknown} are not categorical features; they are "
                             f"{names}")
        self._indexes = {name: VocabularyIndex(pa.array(values, pa.string()))
                         for name, values in vocabularies.items()}
        self._values = {name: list(values) for name, values in vocabularies.items()}
        # The plan reads the values of indexed features as text (in the fitted schema every
        # feature has its vocab_size; only the pre-indexed ones are read as ids).
        unfitted = dataclasses.replace(schema, categorical=tuple(
            dataclasses.replace(f, vocab_size=None) if f.name in self._indexes else f
            for f in schema.categorical))
        self._plan = _Plan(unfitted, SourceConfig(reader=self.reader), features_only=True,
                           hash_raw_ids=hash_raw_ids)
        self._nulls = frozenset(self.reader.null_values)
        self.columns = self._describe(hash_raw_ids)
        ignored = [label.column or label.name for label in schema.labels]
        ignored += [c for c in (schema.group_id, schema.exposure_count) if c is not None]
        self.ignored = [c for c in dict.fromkeys(ignored) if c not in self.columns]
        self.inputs = model_inputs(schema)

    # ---- what a row holds

    def _describe(self, hash_raw_ids: bool) -> dict[str, dict]:
        """raw column -> {"kind", "feature", ...}: what a request must give."""
        out: dict[str, dict] = {}
        items = {s.item for s in self.schema.sequence}
        for f in self.schema.categorical:
            entry = {"kind": "categorical", "feature": f.name}
            if f.raw_ids:
                entry["ids"] = (f"raw values, hashed ({f.vocab} vocabulary)" if hash_raw_ids
                                else f"raw ids: integers >= 0 ({f.vocab} vocabulary)")
            elif f.name in self._indexes:
                entry["ids"] = f"vocabulary of {len(self._indexes[f.name])} values"
            else:
                entry["ids"] = f"pre-indexed: integers in [0, {f.vocab_size})"
            if f.name in items:
                entry["sequence_item"] = True
            out[f.column or f.name] = entry
        for f in self.schema.numeric:
            out[f.column or f.name] = {"kind": "numeric", "feature": f.name}
        for s in self.schema.sequence:
            out[s.column or s.name] = {"kind": "sequence", "feature": s.name, "item": s.item,
                                       "max_len": s.max_len, "separator": s.separator}
            if s.temporal_column:
                out[s.temporal_column] = {"kind": "sequence_times", "feature": s.name,
                                          "max_len": s.max_len, "separator": s.separator}
        for p in self.schema.pretrained:
            for side, column in (("user", p.user_column), ("item", p.item_column)):
                out[column] = {"kind": "vector", "feature": p.name, "side": side, "dim": p.dim,
                               "separator": p.separator}
        return out

    # ---- encoding

    def encode(self, rows) -> dict[str, torch.Tensor]:
        """The batch (model inputs only) of ``rows``; raises :class:`RowError` naming every bad
        row and field (up to 20) when any row cannot be read."""
        batch, (error,) = self.encode_many([rows])
        if error is not None:
            raise error
        return batch

    def encode_many(self, requests: Sequence) -> tuple[dict[str, torch.Tensor] | None,
                                                       list[RowError | None]]:
        """(the batch of every readable request's rows, in order, or None when there is none;
        per request its RowError or None). The requests are parsed together: the parser's
        cost is per call more than per row, so a server encodes the requests it batches in one
        call; a bad request fails alone, its rows named by their index in it."""
        errors: list[list] = []
        values: dict[str, list] = {column: [] for column in self.columns}
        spans = []  # (request, first row in the joint batch, rows)
        for rows in requests:
            problems: list = []
            errors.append(problems)
            if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
                problems.append((None, "rows", f"must be a list of objects, got "
                                               f"{type(rows).__name__}"))
            elif not rows:
                problems.append((None, "rows", "must hold at least one row"))
            else:
                start = len(values[next(iter(values))]) if values else 0
                self._check(rows, values, problems)
                spans.append((len(errors) - 1, start, len(rows)))
        keep = None
        if spans:
            # Every value that passed the checks above goes through the parser (the checks of
            # training), so that one answer names every problem; a field is named once.
            batch = pa.RecordBatch.from_pydict(
                {column: pa.array(column_values, _arrow_type(self.columns[column]))
                 for column, column_values in values.items()})
            parsed, problems = self._plan.parse(Chunk(batch, "request", 0))
            owner = np.repeat(np.arange(len(spans)), [n for _, _, n in spans])
            for bad, column, describe in problems:
                for i in np.flatnonzero(bad):
                    request, start, _ = spans[owner[i]]
                    row = int(i) - start
                    named = {(r, c) for r, c, _ in errors[request]}
                    if (row, column) not in named and (row, None) not in named:
                        errors[request].append((row, column, describe(int(i))))
            good = [not errors[request] for request, _, _ in spans]
            if not all(good):
                mask = np.repeat(good, [n for _, _, n in spans])
                batch = batch.filter(pa.array(mask))
                parsed, problems = self._plan.parse(Chunk(batch, "request", 0)) \
                    if batch.num_rows else (None, [])
                if any(bad.any() for bad, _, _ in problems):  # each check is per row
                    raise RuntimeError("internal error: rows still bad after leaving out "
                                       "the bad requests")
            if parsed is not None and batch.num_rows:
                columns = _encode(self.schema, parsed, self._indexes)
                keep = {key: torch.from_numpy(np.ascontiguousarray(columns[key]))
                        for key in self.inputs}
                if self.aligned_sequences:
                    keep = self._drop_misaligned(
                        keep, [span for span, ok in zip(spans, good) if ok], errors)
        results = []
        for problems in errors:
            problems.sort(key=lambda e: (-1 if e[0] is None else e[0], e[1] or ""))
            results.append(RowError(problems, len(problems)) if problems else None)
        return keep, results

    def _drop_misaligned(self, batch: dict[str, torch.Tensor], spans: list, errors: list):
        """``batch`` (the rows of ``spans``' requests, in order) without the requests that
        have a row whose sequences differ in length or positions from the first sequence's;
        each such row is named in its request's errors. None when no request is left."""
        first, *others = self.schema.sequence
        lengths, positions = batch[f"seq/{first.name}/lengths"], \
            batch[f"seq/{first.name}/positions"]
        starts = np.cumsum([0] + [n for _, _, n in spans])
        keep = torch.ones(int(starts[-1]), dtype=torch.bool)
        for s in others:
            differ = (batch[f"seq/{s.name}/lengths"] != lengths) | \
                (batch[f"seq/{s.name}/positions"] != positions).any(1)
            for i in np.flatnonzero(differ.numpy()):
                j = int(np.searchsorted(starts, i, side="right")) - 1
                request = spans[j][0]
                errors[request].append((int(i - starts[j]), s.column or s.name, (
                    f"must hold as many behaviours as {first.column or first.name}, at the "
                    "same times (the model attends the sequences jointly)")))
                keep[starts[j]:starts[j + 1]] = False
        if bool(keep.all()):
            return batch
        return {key: value[keep] for key, value in batch.items()} if keep.any() else None

    def _check(self, rows: Sequence, values: dict[str, list], errors: list) -> None:
        """Checks each row's keys and value types (appending (row, field, message) to
        ``errors``) and appends its values, as the Arrow columns take them, to ``values``
        (None where a value is bad: the row stays aligned)."""
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                errors.append((i, None, f"must be an object of column: value, got "
                                        f"{_json_type(row)}"))
                for column in self.columns:
                    values[column].append(None)
                continue
            for key in row:
                if key not in self.columns and key not in self.ignored:
                    errors.append((i, _printable(key), f"unknown column; the columns are "
                                                       f"{sorted(self.columns)}"))
            for column, entry in self.columns.items():
                if column not in row:
                    errors.append((i, column, "missing column (give null for a missing "
                                              "value)"))
                    values[column].append(None)
                    continue
                value, problem = self._convert(entry, row[column])
                if problem is not None:
                    errors.append((i, column, problem))
                    value = None
                values[column].append(value)

    def rows(self, columns: Mapping[str, np.ndarray], start: int = 0,
             stop: int | None = None) -> list[dict]:
        """Raw rows that encode to rows ``start:stop`` of ``columns`` (the batch layout, e.g. a
        split of a generated world or a cache): the inverse of :meth:`encode`, for requests
        made from data already encoded. Ids become their vocabulary's values (id 0: null),
        pre-indexed ids (and integer raw ids) stay integers, sequences become lists (oldest
        first). Raises ValueError for what cannot be inverted: hashed raw ids of dynamic and
        hash vocabularies, and time-bucketed sequence positions (the times are gone)."""
        inverse = {name: np.asarray([None] + index_values, dtype=object)
                   for name, index_values in self._values.items()}
        for f in self.schema.categorical:
            if f.raw_ids and self.hash_raw_ids:
                raise ValueError(f"rows: {f.name!r} holds hashed raw ids ({f.vocab} "
                                 f"vocabulary), which cannot be turned back into values")
        for s in self.schema.sequence:
            if s.temporal_column:
                raise ValueError(f"rows: the positions of {s.name!r} are buckets of its times "
                                 f"({s.temporal_column}), which cannot be recovered")
        n = len(next(iter(columns.values())))
        stop = n if stop is None else min(stop, n)
        out: list[dict] = [{} for _ in range(start, stop)]

        def values(name: str, ids: np.ndarray) -> list:
            if name in inverse:
                return inverse[name][ids].tolist()
            return [int(i) for i in ids]

        for f, feature in enumerate(self.schema.categorical):
            column = values(feature.name, columns["categorical"][start:stop, f])
            for row, value in zip(out, column):
                row[feature.column or feature.name] = value
        for j, feature in enumerate(self.schema.numeric):
            for row, value in zip(out, columns["numeric"][start:stop, j].tolist()):
                row[feature.column or feature.name] = None if math.isnan(value) else value
        for s in self.schema.sequence:
            ids = columns[f"seq/{s.name}"][start:stop]
            lengths = columns[f"seq/{s.name}/lengths"][start:stop]
            for row, items, length in zip(out, ids, lengths):
                row[s.column or s.name] = values(s.item, items[:int(length)])
        for p in self.schema.pretrained:
            for side, column in (("user", p.user_column), ("item", p.item_column)):
                vectors = columns[f"pretrained/{p.name}/{side}"][start:stop].tolist()
                for row, vector in zip(out, vectors):
                    row[column] = vector
        return out

    def _convert(self, entry: dict, value) -> tuple[object, str | None]:
        """(the value as the Arrow column takes it, or a problem)."""
        kind = entry["kind"]
        if kind in ("sequence", "sequence_times", "vector"):
            return self._convert_list(entry, value)
        if value is None:
            return None, None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return None, f"must be {_expected(kind)}, got {_json_type(value)}"
        if isinstance(value, str):
            text, problem = self._text(value)
            if problem is None and text is not None and kind == "numeric":
                problem = _non_finite(text)
            return text, problem
        if kind == "categorical":
            if isinstance(value, float):
                if not value.is_integer():
                    return None, f"must be {_expected(kind)}, got the number {value!r}"
                value = int(value)
            return str(value), None
        problem = _non_finite(value)
        if problem is not None:
            return None, problem
        return (None if isinstance(value, float) and math.isnan(value) else repr(value)), None

    def _convert_list(self, entry: dict, value) -> tuple[object, str | None]:
        kind = entry["kind"]
        if value is None:
            return None, None
        if isinstance(value, str):
            text, problem = self._text(value)
            if problem is not None or text is None:
                return None, problem
            items = text.split(entry["separator"])
        elif isinstance(value, list):
            items = value
        else:
            return None, f"must be {_expected(kind)}, got {_json_type(value)}"
        limit = entry.get("max_len", entry.get("dim"))
        if len(items) > limit:
            what = "max_len" if kind != "vector" else "dim"
            return None, (f"holds {len(items)} items, more than {what} {limit}"
                          + (f" (send the most recent {limit})" if kind != "vector" else ""))
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                return None, f"items must be {_expected_item(kind)}, got {_json_type(item)}"
            if isinstance(item, str):
                if _bad_text(item):
                    return None, "items must be valid Unicode text (a lone surrogate?)"
                if kind != "sequence":
                    try:
                        number = float(item)
                    except (ValueError, OverflowError):
                        return None, f"items must be numbers, got {_printable(item)!r}"
                    if _non_finite(number) or math.isnan(number):
                        return None, f"items must be finite numbers, got {_printable(item)!r}"
                out.append(item)
                continue
            if kind == "sequence":
                if isinstance(item, float):
                    if not (math.isfinite(item) and item.is_integer()):
                        return None, f"items must be {_expected_item(kind)}, got {item!r}"
                    item = int(item)
                out.append(str(item))
                continue
            if _non_finite(item) or math.isnan(item):
                return None, f"items must be finite numbers, got {_printable(item)}"
            out.append(repr(item))
        if kind == "vector" and len(out) != entry["dim"]:
            return None, f"must hold {entry['dim']} numbers, got {len(out)}"
        return out, None

    def _text(self, value: str) -> tuple[str | None, str | None]:
        """(the text as the column holds it: stripped if the reader strips, None if it is a
        null value; or a problem)."""
        if _bad_text(value):
            return None, "must be valid Unicode text (a lone surrogate?)"
        if self.reader.strip_whitespace:
            value = value.strip()
        return (None if value in self._nulls else value), None


def _bad_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _non_finite(value) -> str | None:
    """A problem when a number (or numeric text) is infinite or too large for a float; None
    otherwise (NaN and text that is no number pass: missing, or the parser's to name)."""
    try:
        number = float(value)
    except OverflowError:
        return "must be a finite number, got an integer too large for a float"
    except ValueError:
        return None
    shown = repr(_printable(value)) if isinstance(value, str) else _printable(value)
    if math.isinf(number):
        return f"must be a finite number, got {shown}"
    if abs(number) > 3.4e38:
        return f"must be a number within float32's range, got {shown}"
    return None


def _printable(value, limit: int = 60) -> str:
    """``value`` as text fit for a message: at most ``limit`` characters, no surrogates."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def _arrow_type(entry: dict) -> pa.DataType:
    return pa.list_(pa.string()) if entry["kind"] in ("sequence", "sequence_times", "vector") \
        else pa.string()


def _expected(kind: str) -> str:
    return {"categorical": "a string, an integer or null",
            "numeric": "a number, a numeric string or null",
            "sequence": "a list of items or a separator-joined string (or null)",
            "sequence_times": "a list of numbers or a separator-joined string (or null)",
            "vector": "a list of numbers or a separator-joined string"}[kind]


def _expected_item(kind: str) -> str:
    return "strings or integers" if kind == "sequence" else "numbers"


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__
