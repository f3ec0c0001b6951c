r"""File readers: CSV and Parquet files -> a stream of pyarrow RecordBatches of bounded size.

Raw click logs are often larger than memory, so nothing here reads a whole file. A file is read
as a stream of :class:`Chunk` objects, each a ``pyarrow.RecordBatch`` of at most
``budget.max_rows`` rows and ``budget.max_bytes`` bytes (``RecordBatch.nbytes``; only a single
row larger than the byte budget is let through alone), tagged with the file and the line (CSV)
or row (Parquet) of every row, so that later stages can name the offending line of a bad value.

CSV (``pyarrow.csv``): the file (optionally compressed; ``pyarrow.input_stream`` detects .gz,
.bz2, ...) is read in raw blocks of about ``budget.max_bytes / 2`` bytes, each cut after its last
newline and parsed single-threaded, every column as a string (typing is the preprocessor's job:
it knows the schema and can report a bad value with its line). Peak memory is a small multiple
of the budget: one raw block, its parsed table and one chunk. Physical line numbers are exact as
long as no quoted value contains a newline (values with newlines are not supported; where the
count cannot be reconciled, rows are located by their data-row number instead).

Parquet (``pyarrow.parquet``): row group by row group through ``ParquetFile.iter_batches``, with
a batch size derived from the row group's uncompressed bytes per row, so memory is bounded by
one row group's column chunks plus the budget. Parquet rows are located by row number.

Malformed CSV rows (a wrong number of fields) raise :class:`DataFileError` naming the file, the
line and the field counts (``on_error="raise"``, the default), or are skipped and counted in
:attr:`ReadStats.skipped_rows` (``on_error="skip"``). An empty file, a file without data rows, a
missing column, or a header that does not match ``column_names`` is always an error, raised
before the first chunk of that file.

Strings are post-processed the same way for both formats: with ``strip_whitespace`` leading and
trailing whitespace is removed (UCI Adult separates fields by ", "), then every value listed in
``null_values`` (default: the empty string) becomes null.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

__all__ = [
    "FORMATS",
    "Chunk",
    "ChunkBudget",
    "ChunkReader",
    "DataFileError",
    "ReadStats",
    "ReaderOptions",
    "file_columns",
    "file_format",
    "read_chunks",
]

FORMATS = ("auto", "csv", "parquet")
ON_ERROR = ("raise", "skip")
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_MAX_EXAMPLES = 10  # skipped-row messages kept for the report


class DataFileError(ValueError):
    """A problem in a data file, located: ``<path>: <line N | row N>: column '<c>': <problem>``.

    Attributes: ``path``, ``location`` (e.g. "line 12", or None for a whole-file problem),
    ``column`` (or None) and ``problem`` (the message without the location).
    """

    def __init__(self, path: str, problem: str, *, location: str | None = None,
                 column: str | None = None):
        self.path, self.location, self.column, self.problem = str(path), location, column, problem
        parts = [self.path] + ([location] if location else []) + (
            [f"column {column!r}"] if column is not None else []) + [problem]
        super().__init__(": ".join(parts))


@dataclass(frozen=True)
class ChunkBudget:
    """The most a chunk may hold: ``max_rows`` rows and ``max_bytes`` bytes (Arrow memory,
    ``RecordBatch.nbytes``). The defaults keep a chunk of a wide CTR log around 64 MiB."""

    max_rows: int = 65_536
    max_bytes: int = 64 << 20

    def __post_init__(self):
        for key, minimum in (("max_rows", 1), ("max_bytes", 1024)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"ChunkBudget.{key}: must be an int >= {minimum}, got {value!r}")

    @property
    def block_bytes(self) -> int:
        """The raw CSV block read at once: half the byte budget (its parsed form is larger)."""
        return max(512, self.max_bytes // 2)


def _is_str_tuple(value) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)


@dataclass(frozen=True)
class ReaderOptions:
    """How to read a dataset's files (the reader keys of a dataset config's ``source`` section).

    format: "csv", "parquet" or "auto" (by suffix: .parquet/.pq/.parq are Parquet, anything else
        CSV). delimiter: one character ("\t" for TSV). header: whether the first line (after
        ``skip_lines``) names the columns. column_names: the names to use; required without a
        header; with a header they replace the file's names (the counts must agree).
    quote_char: the quoting character, or "" for none. encoding: the text encoding of CSV files
        (one whose newline is the byte 0x0A: utf8, latin-1, ...). skip_lines: lines to skip
        before the header or the first data row. null_values: strings that mean "missing"
        (after stripping). strip_whitespace: strip leading/trailing whitespace of every string.
    """

    format: str = "auto"
    delimiter: str = ","
    header: bool = True
    column_names: tuple[str, ...] | None = None
    quote_char: str = '"'
    encoding: str = "utf8"
    skip_lines: int = 0
    null_values: tuple[str, ...] = ("",)
    strip_whitespace: bool = False

    def __post_init__(self):
        if isinstance(self.column_names, list):
            object.__setattr__(self, "column_names", tuple(self.column_names))
        if isinstance(self.null_values, list):
            object.__setattr__(self, "null_values", tuple(self.null_values))
        self.validate("ReaderOptions")

    def validate(self, prefix: str) -> None:
        """Raises ValueError naming ``<prefix>.<key>`` for a bad value."""

        def fail(key: str, what: str):
            raise ValueError(f"{prefix}.{key}: must be {what}, got {getattr(self, key)!r}")

        if self.format not in FORMATS:
            fail("format", f"one of {', '.join(FORMATS)}")
        delimiter = self.delimiter
        if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n":
            fail("delimiter", "a single character other than a newline (strip_whitespace handles "
                              "separators such as ', ')")
        if not isinstance(self.header, bool):
            fail("header", "true or false")
        names = self.column_names
        if names is not None and (not _is_str_tuple(names) or not names or not all(names)):
            fail("column_names", "a non-empty list of non-empty strings or null")
        if names is not None and len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            fail("column_names", f"a list of distinct names (repeated: {duplicates})")
        if names is None and not self.header and self.format != "parquet":
            fail("column_names", "given when header is false (the file does not name its "
                                 "columns)")
        if not isinstance(self.quote_char, str) or len(self.quote_char) > 1:
            fail("quote_char", "one character, or \"\" for no quoting")
        if not isinstance(self.encoding, str) or not self.encoding:
            fail("encoding", "a non-empty string")
        if isinstance(self.skip_lines, bool) or not isinstance(self.skip_lines, int) \
                or self.skip_lines < 0:
            fail("skip_lines", "an int >= 0")
        if not _is_str_tuple(self.null_values):
            fail("null_values", "a list of strings")
        if not isinstance(self.strip_whitespace, bool):
            fail("strip_whitespace", "true or false")


def file_format(path: str | os.PathLike, options: ReaderOptions) -> str:
    """"csv" or "parquet": ``options.format``, or by the file's suffix for "auto"."""
    if options.format != "auto":
        return options.format
    suffixes = [s.lower() for s in Path(path).suffixes]
    return "parquet" if any(s in _PARQUET_SUFFIXES for s in suffixes) else "csv"


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows of one file.

    ``batch``: the rows (n of them). ``path``: the file. ``first_row``: the 0-based data-row
    index of row 0 in the file (counting the rows yielded, not skipped ones). ``numbers`` (n,)
    int64: each row's line (``unit`` "line", 1-based physical line of a CSV file) or row
    (``unit`` "row", 1-based); None means rows ``first_row + 1, ...``.
    """

    batch: pa.RecordBatch
    path: str
    first_row: int
    numbers: np.ndarray | None = None
    unit: str = "row"

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows

    def where(self, i: int) -> str:
        """The location of row ``i`` of this chunk, e.g. "line 12"."""
        number = int(self.numbers[i]) if self.numbers is not None else self.first_row + i + 1
        return f"{self.unit} {number}"

    def error(self, i: int, column: str | None, problem: str) -> DataFileError:
        """A DataFileError locating row ``i``."""
        return DataFileError(self.path, problem, location=self.where(i), column=column)

    def take(self, keep: np.ndarray) -> Chunk:
        """The rows where ``keep`` (n,) bool is true (numbers kept, so locations stay right)."""
        numbers = self.numbers if self.numbers is not None else (
            self.first_row + 1 + np.arange(self.num_rows, dtype=np.int64))
        return dataclasses.replace(self, batch=self.batch.filter(pa.array(keep)),
                                   numbers=numbers[keep])


@dataclass
class ReadStats:
    """What a reader saw: rows yielded, malformed rows skipped (with the first few messages),
    chunks and the largest chunk (rows and bytes)."""

    rows: int = 0
    skipped_rows: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    chunks: int = 0
    max_chunk_rows: int = 0
    max_chunk_bytes: int = 0

    def record_chunk(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        self.chunks += 1
        self.max_chunk_rows = max(self.max_chunk_rows, batch.num_rows)
        self.max_chunk_bytes = max(self.max_chunk_bytes, batch.nbytes)

    def record_skip(self, message: str) -> None:
        self.skipped_rows += 1
        if len(self.skipped_examples) < _MAX_EXAMPLES:
            self.skipped_examples.append(message)

    def merge(self, other: ReadStats) -> None:
        self.rows += other.rows
        self.skipped_rows += other.skipped_rows
        room = _MAX_EXAMPLES - len(self.skipped_examples)
        self.skipped_examples += other.skipped_examples[:max(room, 0)]
        self.chunks += other.chunks
        self.max_chunk_rows = max(self.max_chunk_rows, other.max_chunk_rows)
        self.max_chunk_bytes = max(self.max_chunk_bytes, other.max_chunk_bytes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Bounding chunks.


def _bounded(batch: pa.RecordBatch, budget: ChunkBudget) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(offset, slice) pieces of ``batch`` within the budget (zero-copy slices). A piece is cut
    to the row budget and to the bytes-per-row estimate, then halved while still too large."""
    n = batch.num_rows
    if n == 0:
        return
    per_row = max(batch.nbytes / n, 1e-9)
    step = max(1, min(budget.max_rows, int(budget.max_bytes // per_row)))
    start = 0
    while start < n:
        size = min(step, n - start)
        piece = batch.slice(start, size)
        while size > 1 and piece.nbytes > budget.max_bytes:
            size //= 2
            piece = batch.slice(start, size)
        yield start, piece
        start += size


def _clean_strings(batch: pa.RecordBatch, options: ReaderOptions) -> pa.RecordBatch:
    """Strip (if asked) and null the ``null_values`` of every string column."""
    null_set = pa.array(list(options.null_values), pa.string()) if options.null_values else None
    columns = []
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            if options.strip_whitespace:
                column = pc.utf8_trim_whitespace(column)
            if null_set is not None:
                column = pc.if_else(pc.is_in(column, value_set=null_set),
                                    pa.scalar(None, column.type), column)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


# --------------------------------------------------------------------------------------------
# Columns.


def _missing_columns_error(path, missing: Sequence[str], available: Sequence[str]):
    return DataFileError(str(path), f"missing column(s) {list(missing)}; the file has "
                                    f"{list(available)}")


def _open_stream(path):
    try:
        return pa.input_stream(str(path))  # detects compression from the suffix
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    except OSError as error:
        raise DataFileError(str(path), f"cannot open: {error}") from None


def _parse_options(options: ReaderOptions, handler=None) -> pa_csv.ParseOptions:
    return pa_csv.ParseOptions(delimiter=options.delimiter,
                               quote_char=options.quote_char or False,
                               ignore_empty_lines=True, invalid_row_handler=handler)


def _read_line(stream, block: int = 1 << 16) -> tuple[bytes, bytes]:
    """(the first line including its newline, what was read after it)."""
    buffer = b""
    while True:
        data = stream.read(block)
        buffer += data
        cut = buffer.find(b"\n")
        if cut >= 0:
            return buffer[:cut + 1], buffer[cut + 1:]
        if not data:
            return buffer, b""


def _csv_header(path, options: ReaderOptions, stream) -> tuple[list[str], bytes, int]:
    """(column names, bytes read past the header, lines consumed) of an opened CSV stream."""
    consumed, rest = 0, b""
    first = stream.read(1)
    if not first:
        raise DataFileError(str(path), "the file is empty")
    rest = first
    for _ in range(options.skip_lines):
        line, after = _read_line(_Prefixed(rest, stream))
        if not line:
            raise DataFileError(str(path), f"the file has fewer than skip_lines = "
                                           f"{options.skip_lines} lines")
        rest, consumed = after, consumed + 1
    if not options.header:
        return list(options.column_names), rest, consumed
    line, rest = _read_line(_Prefixed(rest, stream))
    if not line.strip():
        found = "the end of the file" if not line else "an empty line"
        raise DataFileError(str(path), f"expected a header line, found {found}",
                            location=f"line {consumed + 1}")
    try:
        table = pa_csv.read_csv(pa.py_buffer(line), read_options=pa_csv.ReadOptions(
            use_threads=False, encoding=options.encoding, autogenerate_column_names=True),
            parse_options=_parse_options(options),
            convert_options=pa_csv.ConvertOptions(strings_can_be_null=False))
    except pa.ArrowInvalid as error:
        raise DataFileError(str(path), f"cannot parse the header: {error}",
                            location=f"line {consumed + 1}") from None
    names = [str(table.column(i)[0].as_py()) for i in range(table.num_columns)]
    if options.strip_whitespace:
        names = [name.strip() for name in names]
    if options.column_names is not None:
        if len(names) != len(options.column_names):
            raise DataFileError(str(path), f"the header has {len(names)} columns but "
                                           f"column_names lists {len(options.column_names)}",
                                location=f"line {consumed + 1}")
        names = list(options.column_names)
    return names, rest, consumed + 1


class _Prefixed:
    """A stream that first returns ``prefix``, then reads from ``stream``."""

    def __init__(self, prefix: bytes, stream):
        self.prefix, self.stream = prefix, stream

    def read(self, size: int) -> bytes:
        if self.prefix:
            out, self.prefix = self.prefix[:size], self.prefix[size:]
            return out
        return self.stream.read(size)


def file_columns(path: str | os.PathLike, options: ReaderOptions | None = None) -> list[str]:
    """The column names of a data file (its header, ``column_names``, or its Parquet schema)."""
    options = options or ReaderOptions()
    if file_format(path, options) == "parquet":
        return list(_parquet_file(path).schema_arrow.names)
    with _open_stream(path) as stream:
        return _csv_header(path, options, stream)[0]


def _parquet_file(path) -> pq.ParquetFile:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        return pq.ParquetFile(str(path))
    except (pa.ArrowInvalid, OSError) as error:
        raise DataFileError(str(path), f"not a readable Parquet file: {error}") from None


# --------------------------------------------------------------------------------------------
# The readers.


class ChunkReader:
    """An iterator of the :class:`Chunk` s of one file; see :func:`read_chunks`. ``stats`` fills
    in while iterating."""

    def __init__(self, path: str | os.PathLike, options: ReaderOptions | None = None, *,
                 columns: Sequence[str] | None = None, budget: ChunkBudget | None = None,
                 on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        self.path = str(path)
        self.options = options or ReaderOptions()
        self.columns = list(columns) if columns is not None else None
        self.budget = budget or ChunkBudget()
        self.on_error = on_error
        self.stats = ReadStats()
        self.format = file_format(path, self.options)
        self._iterator = (self._parquet_chunks() if self.format == "parquet"
                          else self._csv_chunks())

    def __iter__(self) -> ChunkReader:
        return self

    def __next__(self) -> Chunk:
        return next(self._iterator)

    def _emit(self, batch: pa.RecordBatch, first_row: int, numbers: np.ndarray | None,
              unit: str) -> Iterator[Chunk]:
        batch = _clean_strings(batch, self.options)
        for offset, piece in _bounded(batch, self.budget):
            self.stats.record_chunk(piece)
            part = None if numbers is None else numbers[offset:offset + piece.num_rows]
            yield Chunk(piece, self.path, first_row + offset, part, unit)

    def _check_columns(self, available: Sequence[str]) -> list[str]:
        wanted = self.columns if self.columns is not None else list(available)
        missing = [c for c in wanted if c not in available]
        if missing:
            raise _missing_columns_error(self.path, missing, available)
        return wanted

    def _no_rows(self) -> DataFileError:
        skipped = (f" ({self.stats.skipped_rows} malformed rows were skipped)"
                   if self.stats.skipped_rows else "")
        return DataFileError(self.path, f"the file has no data rows{skipped}")

    # Parquet ---------------------------------------------------------------------------------

    def _parquet_chunks(self) -> Iterator[Chunk]:
        parquet = _parquet_file(self.path)
        wanted = self._check_columns(parquet.schema_arrow.names)
        metadata = parquet.metadata
        if metadata.num_rows == 0:
            raise self._no_rows()
        row = 0
        for group in range(metadata.num_row_groups):
            info = metadata.row_group(group)
            if info.num_rows == 0:
                continue
            per_row = max(info.total_byte_size / info.num_rows, 1.0)
            batch_rows = max(1, min(self.budget.max_rows, int(self.budget.max_bytes // per_row)))
            try:
                batches = parquet.iter_batches(batch_size=batch_rows, row_groups=[group],
                                               columns=wanted, use_threads=False)
                for batch in batches:
                    yield from self._emit(batch, row, None, "row")
                    row += batch.num_rows
            except (pa.ArrowInvalid, OSError) as error:
                raise DataFileError(self.path, f"cannot read row group {group}: {error}",
                                    location=f"row {row + 1}") from None

    # CSV -------------------------------------------------------------------------------------

    def _csv_chunks(self) -> Iterator[Chunk]:
        with _open_stream(self.path) as stream:
            names, rest, lines_before = _csv_header(self.path, self.options, stream)
            wanted = self._check_columns(names)
            source = _Prefixed(rest, stream)
            read_options = pa_csv.ReadOptions(use_threads=False, encoding=self.options.encoding,
                                              column_names=names)
            convert = pa_csv.ConvertOptions(include_columns=wanted,
                                            column_types={c: pa.string() for c in wanted},
                                            strings_can_be_null=False, null_values=[],
                                            quoted_strings_can_be_null=False)
            row, carry = 0, b""
            while True:
                data = source.read(self.budget.block_bytes)
                buffer = carry + data
                if data:
                    cut = buffer.rfind(b"\n")
                    if cut < 0:  # one line longer than a block: read on
                        carry = buffer
                        continue
                    block, carry = buffer[:cut + 1], buffer[cut + 1:]
                else:
                    block, carry = buffer, b""
                if block:
                    batch, numbers, unit = self._parse_block(block, lines_before, names,
                                                             read_options, convert)
                    lines_before += block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
                    if batch is not None and batch.num_rows:
                        yield from self._emit(batch, row, numbers, unit)
                        row += batch.num_rows
                if not data:
                    break
        if row == 0:
            raise self._no_rows()

    def _parse_block(self, block: bytes, lines_before: int, names: list[str], read_options,
                     convert) -> tuple[pa.RecordBatch | None, np.ndarray | None, str]:
        """Parses one block of whole lines; returns (rows, their line numbers, unit)."""
        invalid: list = []

        def handler(row) -> str:
            invalid.append(row)
            return "skip"

        nonempty = _nonempty_lines(block) + lines_before  # (lines,) 1-based physical lines
        try:
            table = pa_csv.read_csv(pa.py_buffer(block), read_options=read_options,
                                    parse_options=_parse_options(self.options, handler),
                                    convert_options=convert)
        except pa.ArrowInvalid as error:
            first = int(nonempty[0]) if len(nonempty) else lines_before + 1
            last = int(nonempty[-1]) if len(nonempty) else first
            raise DataFileError(self.path, f"cannot parse CSV: {error}",
                                location=f"lines {first}-{last}") from None
        numbers, unit = None, "line"
        valid_count = table.num_rows
        if valid_count + len(invalid) == len(nonempty):
            bad = np.zeros(len(nonempty), dtype=bool)
            for row in invalid:
                if row.number is not None and 1 <= row.number <= len(nonempty):
                    bad[row.number - 1] = True
            if int(bad.sum()) == len(invalid):
                numbers = nonempty[~bad]
        for row in invalid:
            number = (int(nonempty[row.number - 1]) if numbers is not None and row.number
                      else None)
            where = f"line {number}" if number is not None else "a line"
            problem = (f"expected {row.expected_columns} fields, got {row.actual_columns}: "
                       f"{row.text[:120]!r}")
            if self.on_error == "raise":
                raise DataFileError(self.path, problem, location=where)
            self.stats.record_skip(f"{self.path}: {where}: {problem}")
        if numbers is None:
            # Lines could not be matched to rows (a newline inside a quoted value): locate rows
            # by their data-row number instead.
            unit = "data row"
        batch = table.combine_chunks().to_batches()
        if not batch:
            return None, None, unit
        return batch[0], numbers, unit


def _nonempty_lines(block: bytes) -> np.ndarray:
    """The 0-based indices of the non-empty lines of ``block`` (int64); a line holding only
    "\\r" counts as empty, as it does for pyarrow's ignore_empty_lines."""
    data = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(data)]])
    if len(starts) and starts[-1] == len(data):  # nothing after the final newline
        starts, ends = starts[:-1], ends[:-1]
    lengths = ends - starts
    carriage = np.zeros(len(starts), dtype=bool)
    ones = lengths == 1
    carriage[ones] = data[starts[ones]] == 13
    empty = (lengths == 0) | carriage
    return np.flatnonzero(~empty).astype(np.int64) + 1


def read_chunks(paths: str | os.PathLike | Iterable[str | os.PathLike],
                options: ReaderOptions | None = None, *, columns: Sequence[str] | None = None,
                budget: ChunkBudget | None = None, on_error: str = "raise",
                stats: dict[str, ReadStats] | None = None) -> Iterator[Chunk]:
    """The chunks of one file or several (in order), each within ``budget``.

    Args:
        paths: a file or a list of files (CSV or Parquet, per ``options.format``).
        options: how to read them (default: ReaderOptions(), CSV with a header or Parquet).
        columns: the columns to read (default: all); a missing one raises DataFileError naming
            the file before any of its rows are read.
        budget: the most rows and bytes per chunk (default ChunkBudget()).
        on_error: "raise" on a malformed CSV row, or "skip" (counted in the stats).
        stats: if given, filled with one ReadStats per file path.
    Yields :class:`Chunk` s whose batches hold only ``columns``, CSV columns as strings.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("paths: need at least one data file")
    for path in paths:
        reader = ChunkReader(path, options, columns=columns, budget=budget, on_error=on_error)
        if stats is not None:
            stats[str(path)] = reader.stats
        yield from reader
