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
    extra columns            float32, one value per row (the synthetic world's "true/<task>")

Rows are written in row groups of ``row_group_rows`` (default :data:`ROW_GROUP_ROWS`) whatever
the size of the chunks handed to the writer: a row group is the unit the stream
(:mod:`hmoe.data.stream`) reads, shuffles and hands to workers, so its size bounds both the memory
of one read and the granularity of the shuffle. Files are written under a temporary name and
renamed when complete, so a crash never leaves a truncated file under the real name.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hmoe.data.schema import Schema, batch_keys

__all__ = ["ROW_GROUP_ROWS", "ParquetStore", "StoreWriter", "arrow_schema", "from_table",
           "to_table"]

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
    integer = key in ("categorical", "group_id") or (key.startswith("seq/") and key in
                                                     batch_keys(schema))
    value = pa.int64() if integer else pa.float32()
    if _sequence_lengths_key(schema, key) is not None:
        return pa.list_(value)  # the valid steps only
    width = _width(schema, key)
    return value if width is None else pa.list_(value, width)


def padded(lists: pa.Array, width: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int64> array -> ((N, width) int64, each row's values first then zeros; (N,)
    lengths), by one scatter of the flat values (a boolean-mask assignment is several times
    slower). ValueError naming ``name`` if a row holds more than ``width`` values."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    n = len(lists)
    offsets = lists.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)  # (N,)
    if n and lengths.max() > width:
        raise ValueError(f"{name}: a row holds {int(lengths.max())} values, more than "
                         f"{width}")
    flat = lists.flatten().to_numpy()  # the values of rows [0, N), in order
    row_start = np.repeat(offsets[:-1] - offsets[0] - np.arange(n) * width, lengths)
    values = np.zeros(n * width, np.int64)
    values[np.arange(len(flat)) - row_start] = flat
    return values.reshape(n, width), lengths


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
    n = table.num_rows
    out = {}
    for key in (*batch_keys(schema), *extra):
        column = table.column(key)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        kind = _arrow_type(schema, key)
        if _sequence_lengths_key(schema, key) is not None:
            values, _ = padded(column, _width(schema, key), key)
        elif pa.types.is_fixed_size_list(kind):
            values = column.flatten().to_numpy(zero_copy_only=False).reshape(n, kind.list_size)
        else:
            values = column.to_numpy(zero_copy_only=False)
        # Arrow's zero-copy views are read-only; callers get ordinary (writable) arrays.
        out[key] = values if values.flags.writeable else values.copy()
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
    layout (a table -> batch-layout columns; e.g. a saved synthetic world's per-feature
    columns): every column is read and handed to it.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], schema: Schema,
                 *, extra: Sequence[str] | None = None,
                 decode: Callable[[pa.Table], dict[str, np.ndarray]] | None = None):
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
        """The rows of ``units`` (indices into unit_rows), in that order, as read (Arrow)."""
        keys = None if self._decode else [*batch_keys(self.schema), *self.extra]
        tables = [self._file(f).read_row_group(g, columns=keys)
                  for f, g in (self._units[int(u)] for u in units)]
        if not tables:
            tables = [self._file(0).schema_arrow.empty_table() if self._decode
                      else arrow_schema(self.schema, self.extra).empty_table()]
        return pa.concat_tables(tables).combine_chunks()

    def decode(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Rows as read -> numpy columns in the batch layout (plus the extra keys)."""
        if self._decode is not None:
            return self._decode(table)
        return from_table(table, self.schema, self.extra)

    def read(self, units: Sequence[int]) -> dict[str, np.ndarray]:
        """The rows of ``units`` (indices into unit_rows), in that order, as numpy columns."""
        return self.decode(self.read_table(units))

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
