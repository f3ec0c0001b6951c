r"""The Parquet store: columns in the batch layout on disk, read back one row group at a time.

Every on-disk dataset of hmoe — a preprocessed cache split, a saved synthetic world — is a
Parquet file with one column per batch-layout key of :mod:`hmoe.data.schema`:

    "categorical"            fixed-size list of F_c int64
    "numeric"                fixed-size list of F_n float32 (NaN where missing)
    "seq/<name>", ".../positions"   list of int64: the valid steps only (".../lengths" int64
                             of them), padded to max_len when read, so a window of short
                             sequences holds what they contain, not max_len values a row
    "pretrained/<name>/user|item"   fixed-size list of dim float32
    "labels"                 fixed-size list of T float32
    "group_id" int64, "exposure_count" float32
    "timestamp"              int64 seconds, one per row (a world of several days, a dataset
                             config's source.time_column), read by online training
    extra columns            float32, one value per row (the synthetic world's "true/<task>")

Rows are written in row groups of ``row_group_rows`` (default :data:`ROW_GROUP_ROWS`) whatever
the size of the chunks handed to the writer: a row group is the unit the stream
(:mod:`hmoe.data.stream`) reads, shuffles and hands to workers, so its size bounds both the memory
of one read and the granularity of the shuffle. Files are written under a temporary name and
renamed when complete, so a crash never leaves a truncated file under the real name.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hmoe.data.schema import Schema, batch_keys

__all__ = ["ROW_GROUP_ROWS", "ParquetStore", "Picked", "Rows", "StoreWriter", "arrow_schema",
           "decode_store", "from_table", "to_table"]

ROW_GROUP_ROWS = 32_768


def _width(schema: Schema, key: str) -> int | None:
    """The list size of a fixed-size-list key, None for a scalar key."""
    if key in ("categorical", "numeric", "labels"):
        return {"categorical": len(schema.categorical), "numeric": len(schema.numeric),
                "labels": len(schema.labels)}[key]
    for seq in schema.sequence:
        if key in (f"seq/{seq.name}", f"seq/{seq.name}/positions"):
            return seq.max_len
    for pre in schema.pretrained:
        if key in (f"pretrained/{pre.name}/user", f"pretrained/{pre.name}/item"):
            return pre.dim
    return None


def _sequence_lengths_key(schema: Schema, key: str) -> str | None:
    """For a sequence's ids or positions key, the key of its lengths; else None."""
    for seq in schema.sequence:
        if key in (f"seq/{seq.name}", f"seq/{seq.name}/positions"):
            return f"seq/{seq.name}/lengths"
    return None


def _arrow_type(schema: Schema, key: str) -> pa.DataType:
    """The Parquet column type of a batch-layout key (an extra key: float32)."""
    integer = key in ("categorical", "group_id", "timestamp") or (
        key.startswith("seq/") and key in batch_keys(schema))
    value = pa.int64() if integer else pa.float32()
    if _sequence_lengths_key(schema, key) is not None:
        return pa.list_(value)  # the valid steps only
    width = _width(schema, key)
    return value if width is None else pa.list_(value, width)


def _pad(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray | None, width: int,
         name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a list column (row r's values at ``values[offsets[r]:offsets[r + 1]]``) as
    ((n, width) int64, each row's values first then zeros; (n,) int64 lengths), ``rows`` an
    index (None: every row). One (n, width) gather: a row's values are contiguous, so a random
    row costs about one cache miss. ValueError naming ``name`` if a row holds more than
    ``width`` values."""
    starts = offsets[:-1] if rows is None else offsets[rows]
    lengths = (offsets[1:] if rows is None else offsets[rows + 1]) - starts
    n = len(lengths)
    if n and int(lengths.max()) > width:
        raise ValueError(f"{name}: a row holds {int(lengths.max())} values, more than {width}")
    if not len(values):
        return np.zeros((n, width), np.int64), lengths
    steps = np.arange(width)
    index = starts[:, None] + steps  # (n, width)
    np.minimum(index, len(values) - 1, out=index)  # steps past a row's end: masked below
    out = values[index].astype(np.int64, copy=False)
    out *= steps < lengths[:, None]
    return out, lengths


class Picked:
    """Some rows of :class:`Rows`, column by column, as writable numpy arrays: what a decoder
    (the batch layout's, or a saved world's) reads."""

    def __init__(self, rows: Rows, index: np.ndarray | None):
        self._rows, self._index = rows, index
        self.num_rows = rows.num_rows if index is None else len(index)
        self._gathered = None if index is None else rows.matrix[index]  # (n, row words)

    @property
    def names(self) -> list[str]:
        return list(self._rows.kinds)

    def column(self, name: str) -> np.ndarray:
        """A column of one value a row (n,) or of a fixed-size list (n, k)."""
        kind, dtype, width, start = self._rows.kind(name)
        if kind == "list":
            raise ValueError(f"{name}: a list column; read it with lists()")
        if self._gathered is None:
            values = self._rows.dense(name)
        else:
            word = self._rows.word.itemsize
            span = self._gathered[:, start // word:(start + dtype.itemsize * width) // word]
            values = np.ascontiguousarray(span).view(dtype)  # (n, width)
        return values.reshape(-1) if kind == "scalar" else values.reshape(self.num_rows, width)

    def stack(self, names: Sequence[str], dtype) -> np.ndarray:
        """Columns of one value a row side by side, (n, len(names)) of ``dtype``: one copy
        when they lie next to each other in the packed rows with one dtype (a world's
        categorical ids, its labels)."""
        kinds = [self._rows.kind(name) for name in names]
        first = kinds[0] if kinds else None
        if self._gathered is not None and first is not None and all(
                k[0] == "scalar" and k[1] == first[1] and k[3] == first[3] + i * first[1].itemsize
                for i, k in enumerate(kinds)):
            word = self._rows.word.itemsize
            span = self._gathered[:, first[3] // word:
                                  (first[3] + first[1].itemsize * len(kinds)) // word]
            return np.ascontiguousarray(span).view(first[1]).astype(dtype, copy=False)
        return np.column_stack([self.column(name) for name in names]).astype(dtype, copy=False)

    def lists(self, name: str, width: int) -> tuple[np.ndarray, np.ndarray]:
        """A list column as ((n, width) int64 padded with zeros, (n,) int64 lengths)."""
        kind = self._rows.kind(name)
        if kind[0] != "list":
            raise ValueError(f"{name}: not a list column")
        return _pad(kind[1], kind[2], self._index, width, name)


class Rows:
    """Row groups as read (an Arrow table, its columns in chunks or not), ready for many picks
    of random rows.

    Taking rows column by column costs a cache miss per row per column (Arrow's
    ``Table.take``: some 1.5 ms of a worker's 5.6 ms per batch of 1024 rows, with another
    1.5 ms of per-batch overhead in decoding its result). So with ``pack`` the columns of one
    value or a fixed-size list per row are packed row-major into one byte matrix (one
    sequential pass, chunk by chunk), and a pick gathers each row once and splits the columns
    in cache. List columns are kept as their offsets and values (one copy when they come in
    several chunks) and padded as they are picked. Without ``pack`` only ``pick(None)`` (every
    row, in order) is possible."""

    def __init__(self, table: pa.Table, *, pack: bool = True):
        self.num_rows = table.num_rows
        self.kinds: dict[str, tuple] = {}  # name -> (kind, dtype, width, byte offset in a row)
        self._chunks: dict[str, list[np.ndarray]] = {}  # dense columns, as read
        width = 0
        for name, column in zip(table.column_names, table.columns):
            chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
            kind = column.type
            if pa.types.is_list(kind) or pa.types.is_large_list(kind):
                if not pa.types.is_integer(kind.value_type):
                    raise ValueError(f"{name}: a list column of {kind.value_type}; store lists "
                                     f"hold integers (sequence ids and positions)")
                array = pa.concat_arrays(chunks) if len(chunks) != 1 else chunks[0]
                if array.null_count or array.values.null_count:
                    raise ValueError(f"{name}: a list column with nulls")
                offsets = array.offsets.to_numpy().astype(np.int64)
                self.kinds[name] = ("list", offsets, array.values.to_numpy(), None)
                continue
            parts = [self._dense(name, chunk) for chunk in chunks]
            fixed = pa.types.is_fixed_size_list(kind)
            dtype = np.dtype((kind.value_type if fixed else kind).to_pandas_dtype())
            size = kind.list_size if fixed else 1
            self.kinds[name] = ("fixed" if fixed else "scalar", dtype, size, width)
            self._chunks[name] = parts
            width += dtype.itemsize * size
        self.matrix = self._pack(width) if pack else None

    @staticmethod
    def _dense(name: str, array: pa.Array) -> np.ndarray:
        kind = array.type
        if pa.types.is_fixed_size_list(kind):
            if not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
                raise ValueError(f"{name}: a fixed-size list of {kind.value_type}, not a store "
                                 f"column")
            if array.null_count or array.values.null_count:
                raise ValueError(f"{name}: a fixed-size list column with nulls")
            return array.flatten().to_numpy().reshape(len(array), kind.list_size)
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            if array.null_count and pa.types.is_floating(kind):
                array = array.fill_null(float("nan"))
            elif array.null_count:
                raise ValueError(f"{name}: an integer column with nulls")
            return array.to_numpy()
        raise ValueError(f"{name}: a column of type {kind}, not a store column")

    def _pack(self, width: int) -> np.ndarray:
        """(n, width / w) words of w bytes, w the largest of 8, 4, 2, 1 that divides every
        column's item size: columns are copied a word at a time, not a byte at a time."""
        word = math.gcd(8, *(self.kinds[name][1].itemsize for name in self._chunks))
        self.word = np.dtype(f"u{word}")
        packed = np.empty((self.num_rows, width // word), self.word)
        for name, parts in self._chunks.items():
            start, row = self.kinds[name][3] // word, 0
            for part in parts:
                raw = np.ascontiguousarray(part).reshape(len(part), -1).view(self.word)
                packed[row:row + len(part), start:start + raw.shape[1]] = raw
                row += len(part)
        return packed

    def kind(self, name: str) -> tuple:
        if name not in self.kinds:
            raise KeyError(f"no column {name!r}; columns: {list(self.kinds)}")
        return self.kinds[name]

    def dense(self, name: str) -> np.ndarray:
        """Every row of a dense column, writable."""
        parts = self._chunks[name]
        if len(parts) == 1:
            return parts[0] if parts[0].flags.writeable else parts[0].copy()
        return np.concatenate(parts)

    def pick(self, index: np.ndarray | None = None) -> Picked:
        """Rows ``index`` ((n,) int64, any order, repeats allowed; None: all, in order)."""
        if index is not None and self.matrix is None:
            raise ValueError("pick(index) needs Rows(table, pack=True)")
        return Picked(self, None if index is None else np.asarray(index, dtype=np.int64))


def arrow_schema(schema: Schema, extra: Sequence[str] = ()) -> pa.Schema:
    """The Arrow schema of the store of ``schema``, with ``extra`` float32 columns."""
    return pa.schema([(key, _arrow_type(schema, key)) for key in (*batch_keys(schema), *extra)])


def to_table(schema: Schema, columns: Mapping[str, np.ndarray],
             extra: Sequence[str] = ()) -> pa.Table:
    """Columns in the batch layout (plus ``extra`` keys) -> an Arrow table of the store."""
    arrays = []
    for key in (*batch_keys(schema), *extra):
        kind = _arrow_type(schema, key)
        values = np.ascontiguousarray(columns[key])
        lengths_key = _sequence_lengths_key(schema, key)
        if lengths_key is not None:  # valid steps come first: keep each row's prefix
            lengths = np.asarray(columns[lengths_key], dtype=np.int64)
            valid = np.arange(values.shape[1])[None, :] < lengths[:, None]  # (N, L)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            if offsets[-1] >= 2**31:
                raise ValueError(f"{key}: {offsets[-1]} values in one table; write fewer rows "
                                 f"at a time")
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                   pa.array(values[valid], pa.int64())))
        elif pa.types.is_fixed_size_list(kind):
            flat = pa.array(values.reshape(-1), kind.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, kind.list_size))
        else:
            arrays.append(pa.array(values, kind))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(schema, extra))


def from_table(table: pa.Table | pa.RecordBatch, schema: Schema,
               extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A store table -> writable numpy columns in the batch layout (plus ``extra`` keys)."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    return decode_store(Rows(table, pack=False).pick(), schema, extra)


def decode_store(rows: Picked, schema: Schema, extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Picked rows of a store -> writable numpy columns in the batch layout (plus ``extra``)."""
    out = {}
    for key in (*batch_keys(schema), *extra):
        if _sequence_lengths_key(schema, key) is not None:
            out[key], _ = rows.lists(key, _width(schema, key))
        else:
            out[key] = rows.column(key)
    return out


class StoreWriter:
    """Appends column chunks to a store file in row groups of ``row_group_rows``.

    ``with StoreWriter(path, schema) as writer: writer.write(columns)``; the file appears under
    ``path`` only when the block exits without an exception. ``rows`` counts the rows written.
    """

    def __init__(self, path: str | os.PathLike, schema: Schema, *, extra: Sequence[str] = (),
                 row_group_rows: int = ROW_GROUP_ROWS):
        if isinstance(row_group_rows, bool) or not isinstance(row_group_rows, int) \
                or row_group_rows < 1:
            raise ValueError(f"row_group_rows must be an int >= 1, got {row_group_rows!r}")
        self.path, self.schema, self.extra = Path(path), schema, tuple(extra)
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> StoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self._temporary, arrow_schema(self.schema, self.extra))
        return self

    def write(self, columns: Mapping[str, np.ndarray]) -> None:
        """Appends the rows of ``columns`` (the batch layout plus the writer's extra keys)."""
        if self._writer is None:
            raise RuntimeError("StoreWriter.write outside its with block")
        table = to_table(self.schema, columns, self.extra)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        self._writer.write_table(pending.slice(0, rows), row_group_size=rows)
        rest = pending.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self.rows += rows

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is None and self._pending_rows:
                self._flush(self._pending_rows)
        finally:
            self._writer.close()
            self._writer = None
        if error is None:
            os.replace(self._temporary, self.path)
        else:
            self._temporary.unlink(missing_ok=True)


class ParquetStore:
    """One split on disk: store files read back by row group (the stream's units).

    ``unit_rows`` (U,) rows of each row group, over the files in order; :meth:`read` returns the
    rows of the listed units, concatenated in that order; :meth:`columns` reads everything.
    Only the footers are read when the store is opened. ``decode`` reads files of another
    layout (rows picked from the file's :class:`Rows` -> batch-layout columns; e.g. a saved synthetic world's per-feature
    columns): every column is read and handed to it.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], schema: Schema,
                 *, extra: Sequence[str] | None = None,
                 decode: Callable[[Picked], dict[str, np.ndarray]] | None = None):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("paths: a store needs at least one file")
        self.schema, self._decode = schema, decode
        units, unit_rows, present = [], [], None
        for f, path in enumerate(self.paths):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such store file")
            metadata = pq.ParquetFile(path).metadata
            found = metadata.schema.to_arrow_schema()
            names = set(found.names)
            wrong = [key for key in batch_keys(schema) if key not in names
                     or not found.field(key).type.equals(_arrow_type(schema, key))]
            if wrong and decode is None:
                raise ValueError(f"{path}: not a store of schema {schema.name!r}: column(s) "
                                 f"{wrong} are missing or of another type or width")
            present = names if present is None else present & names
            for group in range(metadata.num_row_groups):
                units.append((f, group))
                unit_rows.append(metadata.row_group(group).num_rows)
        layout = set(batch_keys(schema))
        self.extra = () if decode is not None else \
            tuple(sorted(present - layout)) if extra is None else tuple(extra)
        self._units = units
        self.unit_rows = np.asarray(unit_rows, dtype=np.int64)  # (U,)
        self.num_rows = int(self.unit_rows.sum())
        self._local = threading.local()  # open files per thread: a ParquetFile is not shared

    def __getstate__(self):  # worker processes reopen the files themselves
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _file(self, index: int) -> pq.ParquetFile:
        files = self._local.__dict__.setdefault("files", {})
        if index not in files:
            files[index] = pq.ParquetFile(self.paths[index])
        return files[index]

    def read_table(self, units: Sequence[int]) -> pa.Table:
        """The rows of ``units`` (indices into unit_rows), in that order, as read (Arrow, a
        chunk per row group). One thread: a read runs beside training, not ahead of it."""
        keys = None if self._decode else [*batch_keys(self.schema), *self.extra]
        tables = [self._file(f).read_row_group(g, columns=keys, use_threads=False)
                  for f, g in (self._units[int(u)] for u in units)]
        if not tables:
            tables = [self._file(0).schema_arrow.empty_table() if self._decode
                      else arrow_schema(self.schema, self.extra).empty_table()]
        return pa.concat_tables(tables)  # a chunk per row group: Rows packs them, no copy here

    def decode(self, rows: Picked) -> dict[str, np.ndarray]:
        """Rows as read (picked from :class:`Rows` of :meth:`read_table`) -> numpy columns in
        the batch layout (plus the extra keys)."""
        if self._decode is not None:
            return self._decode(rows)
        return decode_store(rows, self.schema, self.extra)

    def read(self, units: Sequence[int]) -> dict[str, np.ndarray]:
        """The rows of ``units`` (indices into unit_rows), in that order, as numpy columns."""
        return self.decode(Rows(self.read_table(units), pack=False).pick())

    def describe(self, units: Sequence[int]) -> str:
        """Where ``units`` live, for error messages: "<file> row groups [...]"."""
        places: dict[Path, list[int]] = {}
        for u in units:
            f, group = self._units[int(u)]
            places.setdefault(self.paths[f], []).append(group)
        return "; ".join(f"{path} row group(s) {groups}" for path, groups in places.items())

    def columns(self) -> dict[str, np.ndarray]:
        """Every row, in file order (for data that fits in memory)."""
        return self.read(range(len(self.unit_rows)))
