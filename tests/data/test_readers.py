"""hmoe.data.readers: CSV and Parquet streams of bounded chunks, located errors, skipping."""

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmoe.data.readers import (
    ChunkBudget,
    DataFileError,
    ReaderOptions,
    file_columns,
    file_format,
    read_chunks,
)


def _rows(chunks):
    """All chunks' rows as {column: list}, plus every row's location."""
    out, where = {}, []
    for chunk in chunks:
        for name, values in chunk.batch.to_pydict().items():
            out.setdefault(name, []).extend(values)
        where += [chunk.where(i) for i in range(chunk.num_rows)]
    return out, where


def test_csv_columns_are_strings_with_nulls_and_line_numbers(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a,b,c\n1,x,3\n\n4,,6\r\n7,y,9")  # an empty line, CRLF, no final newline
    rows, where = _rows(read_chunks(path))
    assert rows == {"a": ["1", "4", "7"], "b": ["x", None, "y"], "c": ["3", "6", "9"]}
    assert where == ["line 2", "line 4", "line 5"]
    assert file_columns(path) == ["a", "b", "c"]


def test_selected_columns_tab_delimiter_and_column_names(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("1\tu\t0.5\n2\tv\t1.5\n")
    options = ReaderOptions(delimiter="\t", header=False, column_names=("id", "user", "price"))
    rows, where = _rows(read_chunks(path, options, columns=["price", "user"]))
    assert rows == {"user": ["u", "v"], "price": ["0.5", "1.5"]}
    assert where == ["line 1", "line 2"]


def test_header_replaced_by_column_names_and_skip_lines(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("# a comment\nA,B\n1,2\n")
    options = ReaderOptions(column_names=("x", "y"), skip_lines=1)
    rows, where = _rows(read_chunks(path, options))
    assert rows == {"x": ["1"], "y": ["2"]} and where == ["line 3"]
    with pytest.raises(DataFileError, match=r"a\.csv: line 2: the header has 2 columns but "
                                            r"column_names lists 3"):
        list(read_chunks(path, ReaderOptions(column_names=("x", "y", "z"), skip_lines=1)))


def test_strip_whitespace_and_null_values(tmp_path):
    path = tmp_path / "adult.data"
    path.write_text("39, State-gov, ?\n50, ?, <=50K\n")
    options = ReaderOptions(header=False, column_names=("age", "work", "income"),
                            strip_whitespace=True, null_values=("", "?"))
    rows, _ = _rows(read_chunks(path, options))
    assert rows == {"age": ["39", "50"], "work": ["State-gov", None], "income": [None, "<=50K"]}


def test_malformed_row_raises_with_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n\n3\n4,5\n")
    with pytest.raises(DataFileError, match=r"bad\.csv: line 4: expected 2 fields, got 1") as info:
        list(read_chunks(path))
    assert info.value.location == "line 4" and info.value.path == str(path)


def test_malformed_rows_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n3\n4,5,6\n7,8\n")
    stats = {}
    rows, where = _rows(read_chunks(path, on_error="skip", stats=stats))
    assert rows == {"a": ["1", "7"], "b": ["2", "8"]}
    assert where == ["line 2", "line 5"]
    file_stats = stats[str(path)]
    assert file_stats.skipped_rows == 2 and file_stats.rows == 2
    assert "line 3" in file_stats.skipped_examples[0] and "line 4" in file_stats.skipped_examples[1]


def test_empty_file_header_only_and_all_rows_skipped(tmp_path):
    empty, header = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_text("")
    header.write_text("a,b\n")
    with pytest.raises(DataFileError, match=r"empty\.csv: the file is empty"):
        list(read_chunks(empty))
    with pytest.raises(DataFileError, match=r"header\.csv: the file has no data rows"):
        list(read_chunks(header))
    broken = tmp_path / "broken.csv"
    broken.write_text("a,b\n1\n2\n")
    with pytest.raises(DataFileError, match=r"no data rows \(2 malformed rows were skipped\)"):
        list(read_chunks(broken, on_error="skip"))
    parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), parquet)
    with pytest.raises(DataFileError, match=r"empty\.parquet: the file has no data rows"):
        list(read_chunks(parquet))


def test_missing_columns_are_named_before_any_row(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataFileError, match=r"a\.csv: missing column\(s\) \['z'\]; the file has "
                                            r"\['a', 'b'\]"):
        next(read_chunks(path, columns=["a", "z"]))
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"a": [1]}), parquet)
    with pytest.raises(DataFileError, match=r"missing column\(s\) \['b'\]"):
        next(read_chunks(parquet, columns=["b"]))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        next(read_chunks(tmp_path / "nope.csv"))


def _write_big_csv(path, n):
    with open(path, "w") as f:
        f.write("i,text\n")
        for i in range(n):
            f.write(f"{i},{'v' * (i % 17)}{i}\n")


@pytest.mark.parametrize("budget", [ChunkBudget(max_rows=700), ChunkBudget(max_bytes=8192),
                                    ChunkBudget(max_rows=333, max_bytes=4096)])
def test_csv_chunks_stay_within_the_budget(tmp_path, budget):
    path = tmp_path / "big.csv"
    n = 12_000
    _write_big_csv(path, n)
    stats, seen = {}, []
    for chunk in read_chunks(path, budget=budget, stats=stats):
        assert chunk.num_rows <= budget.max_rows
        assert chunk.batch.nbytes <= budget.max_bytes
        first = int(chunk.batch.column(0)[0].as_py())
        assert chunk.where(0) == f"line {first + 2}"  # the header is line 1
        seen += [int(v) for v in chunk.batch.column(0).to_pylist()]
    assert seen == list(range(n))
    assert stats[str(path)].chunks >= 10
    assert stats[str(path)].max_chunk_rows <= budget.max_rows


def test_parquet_chunks_by_row_group_within_the_budget(tmp_path):
    n = 10_000
    path = tmp_path / "big.parquet"
    table = pa.table({"i": np.arange(n), "text": [f"value-{i}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=3000)
    budget = ChunkBudget(max_rows=1000, max_bytes=6000)
    seen = []
    for chunk in read_chunks(path, budget=budget, columns=["i"]):
        assert chunk.num_rows <= 1000 and chunk.batch.nbytes <= 6000
        assert chunk.batch.schema.names == ["i"]
        assert chunk.where(0) == f"row {chunk.batch.column(0)[0].as_py() + 1}"
        seen += chunk.batch.column(0).to_pylist()
    assert seen == list(range(n))
    assert file_format(path, ReaderOptions()) == "parquet"
    assert file_columns(path) == ["i", "text"]


def test_a_line_longer_than_a_block_and_compressed_files(tmp_path):
    long_value = "x" * 5000
    text = f"a,b\n1,{long_value}\n2,short\n"
    path = tmp_path / "long.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    rows, where = _rows(read_chunks(path, budget=ChunkBudget(max_bytes=1024)))
    assert rows["b"] == [long_value, "short"] and where == ["line 2", "line 3"]


def test_several_files_in_order_with_stats_per_file(tmp_path):
    first, second = tmp_path / "1.csv", tmp_path / "2.csv"
    first.write_text("a\n1\n2\n")
    second.write_text("a\n3\n")
    stats = {}
    rows, where = _rows(read_chunks([first, second], stats=stats))
    assert rows == {"a": ["1", "2", "3"]} and where == ["line 2", "line 3", "line 2"]
    assert stats[str(first)].rows == 2 and stats[str(second)].rows == 1


@pytest.mark.parametrize("changes, key", [
    ({"delimiter": ", "}, "delimiter"),
    ({"header": False}, "column_names"),
    ({"column_names": ("a", "a")}, "column_names"),
    ({"format": "json"}, "format"),
    ({"skip_lines": -1}, "skip_lines"),
    ({"quote_char": "''"}, "quote_char"),
])
def test_bad_reader_options_name_the_key(changes, key):
    with pytest.raises(ValueError, match=rf"ReaderOptions\.{key}: must be"):
        ReaderOptions(**changes)


@pytest.mark.parametrize("changes, key", [({"max_rows": 0}, "max_rows"),
                                          ({"max_bytes": 10}, "max_bytes")])
def test_bad_budget_names_the_key(changes, key):
    with pytest.raises(ValueError, match=rf"ChunkBudget\.{key}: must be an int"):
        ChunkBudget(**changes)


def test_bad_on_error():
    with pytest.raises(ValueError, match="on_error must be one of raise, skip"):
        next(read_chunks("x.csv", on_error="ignore"))


def test_a_quoted_newline_falls_back_to_data_row_numbers(tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_text('a,b\n1,"x\ny"\n2,z\n')
    rows, where = _rows(read_chunks(path))
    assert rows == {"a": ["1", "2"], "b": ["x\ny", "z"]}
    assert where == ["data row 1", "data row 2"]  # physical lines cannot be matched to rows
