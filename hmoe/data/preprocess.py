"""Preprocessing: raw files + a dataset config -> a cache of Parquet files in the batch layout.

The orchestration and the cache directory; the steps live in their own modules:

* the dataset config (a schema plus its ``source`` section): :mod:`hmoe.data.dataset_config`;
* raw chunk -> checked values, bad rows raised or skipped: :mod:`hmoe.data.parse`;
* an event log -> samples with histories (``source.behaviour_log``): :mod:`hmoe.data.behaviour_log`;
* pass 1, over the *training* files: vocabularies and numeric statistics, :mod:`hmoe.data.fit`;
* pass 2, over every split: the batch layout, :mod:`hmoe.data.encode`, written as
  ``<split>.parquet``, a store of :mod:`hmoe.data.store` (row groups of its fixed size, the
  units the stream of batches reads).

Both passes stream the raw files chunk by chunk (:func:`hmoe.data.readers.read_chunks`), so
memory is bounded by the :class:`~hmoe.data.readers.ChunkBudget`, not the data, and pass 1's
value counts by ``count_memory_entries`` (they spill to disk beyond it). Bad values
(:mod:`hmoe.data.parse`) and malformed CSV rows raise :class:`~hmoe.data.readers.DataFileError`
naming the file, the line (CSV) or row (Parquet), the column and the problem
(``on_error="raise"``), or are skipped and counted in the report (``on_error="skip"``; a warning
says how many).

The cache directory::

    feature_map.yaml        the filled-in schema (vocab sizes, boundaries, ...), the source config,
                            the inputs, rows per split, the report and the fingerprint
    vocabularies.parquet    feature, id, value, count: every kept value of every vocabulary
                            (Parquet, not YAML, as vocabularies reach millions of values)
    <split>.parquet         one column per batch-layout key ("categorical" a fixed-size list of
                            F_c int64, "numeric" of F_n float32, "seq/<name>" a list of its
                            valid steps, ...: hmoe.data.store)

The fingerprint is a SHA-256 of the dataset config, the options that change the output and every
input file (path, size and modification time; or its content with ``fingerprint="content"``): a
second :func:`preprocess` with the same inputs reuses the cache, a changed input or config
rebuilds it. Every file is written under a temporary name and moved into place with
``os.replace``; ``feature_map.yaml`` is removed first and written last, so a crash never leaves a
cache that looks valid.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hmoe.data.behaviour_log import _build_samples, _log_columns, _sample_chunks
from hmoe.data.dataset_config import (
    BehaviourLog,
    DatasetConfig,
    LabelRule,
    SourceConfig,
    _int,
    dataset_config_to_dict,
    load_dataset_config,
)
from hmoe.data.encode import VocabularyIndex, _encode
from hmoe.data.fit import COUNT_MEMORY_ENTRIES, _fit, _Vocabulary
from hmoe.data.parse import _MAX_EXAMPLES, _Counter, _parse_checked, _Plan
from hmoe.data.readers import (
    Chunk,
    ChunkBudget,
    DataFileError,
    ReaderOptions,
    ReadStats,
    file_columns,
    read_chunks,
)
from hmoe.data.schema import Schema, load_schema, schema_to_dict
from hmoe.data.store import ROW_GROUP_ROWS, ParquetStore, StoreWriter

__all__ = [
    "BehaviourLog",
    "DatasetConfig",
    "LabelRule",
    "PreprocessedData",
    "SourceConfig",
    "dataset_config_to_dict",
    "default_cache",
    "load_dataset_config",
    "load_preprocessed",
    "preprocess",
]

FORMAT_VERSION = 2  # 2: sequences stored as lists of their valid steps
FEATURE_MAP = "feature_map.yaml"
VOCABULARIES = "vocabularies.parquet"
FINGERPRINTS = ("stat", "content")


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
    ``num_rows``: rows per split. ``report``: rows read / skipped per split and file, the
    chunk sizes each pass saw and how pass 1 counted the vocabularies (``vocabulary_counts``:
    the memory bound, the peak rows held, the spills). ``fingerprint``; ``reused``: whether
    :func:`preprocess` found this cache valid instead of building it.
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

    def store(self, split: str = "train") -> ParquetStore:
        """The split's Parquet store, read a row group at a time (what the stream reads)."""
        return ParquetStore(self._split_path(split), self.schema)

    def columns(self, split: str = "train") -> dict[str, np.ndarray]:
        """Every row of ``split`` as numpy columns in the batch layout (they pass
        ``hmoe.data.check_columns(columns, self.schema)``), for data that fits in memory."""
        return self.store(split).columns()

    def iter_chunks(self, split: str = "train", *, max_rows: int | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
        """The rows of ``split`` as a stream of column dicts (one Parquet row group at a time,
        at most ``max_rows`` rows each), for data larger than memory."""
        store = self.store(split)
        for unit in range(len(store.unit_rows)):
            columns = store.read([unit])
            rows = int(store.unit_rows[unit])
            step = max_rows or max(rows, 1)
            for start in range(0, rows, step):
                yield {key: values[start:start + step] for key, values in columns.items()}

    def vocabulary(self, feature: str) -> list[str]:
        """The values of a categorical feature in id order (id i is entry i - 1; id 0 is OOV)."""
        table = pq.read_table(self.cache_dir / VOCABULARIES,
                              filters=[("feature", "=", feature)])
        if table.num_rows == 0 and feature not in self.feature_map["vocabularies"]:
            raise KeyError(f"no vocabulary for {feature!r}; have "
                           f"{list(self.feature_map['vocabularies'])}")
        order = np.argsort(table.column("id").to_numpy())
        return [table.column("value")[int(i)].as_py() for i in order]


def default_cache(dataset, cache: str | os.PathLike | None = None) -> str:
    """The cache directory a run on raw files uses: ``cache`` (data.cache) when given, else
    ``.cache/hmoe/<dataset name>`` relative to the working directory."""
    if cache:
        return str(cache)
    return str(Path(".cache") / "hmoe" / load_dataset_config(dataset).schema.name)


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
               quantile_sample: int = 1_000_000,
               count_memory_entries: int = COUNT_MEMORY_ENTRIES, force: bool = False,
               progress: bool = False,
               fit_from: str | os.PathLike | None = None) -> PreprocessedData:
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
        count_memory_entries: at most this many (value, count) rows of pass 1's vocabulary
            counts in memory, all features together; beyond it they spill to disk under
            ``cache_dir`` (the vocabularies are the same; see :mod:`hmoe.data.fit`).
        force: rebuild even if the cache is valid.
        progress: show tqdm progress bars.
        fit_from: another cache directory whose schema and vocabularies encode these inputs
            instead of fitting them again (pass 1 is skipped): new data for a model trained on
            that cache keeps its ids (a warm start). The dataset config must be the one that
            cache was made with.
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
    _int(count_memory_entries, "count_memory_entries", 2)
    log = config.source.behaviour_log
    files = _normalise_inputs(inputs, log is not None)
    cache_dir = Path(cache_dir)
    options = {"on_error": on_error, "quantile_sample": quantile_sample}
    fitted = None
    if fit_from is not None:
        fitted = PreprocessedData(fit_from)
        if Path(fit_from).resolve() == Path(cache_dir).resolve():
            raise ValueError(f"fit_from: {fit_from} is the cache being written; give the new "
                             f"inputs a cache of their own")
        if fitted.feature_map["source"] != dataset_config_to_dict(config)["source"] or \
                not _fitted_from(schema_to_dict(config.schema), fitted.feature_map["schema"]):
            raise ValueError(f"fit_from: {fit_from} was made with another dataset config; the "
                             f"same config must encode the new inputs")
        options["fit_from"] = fitted.fingerprint
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
    if fitted is None:
        schema, vocabularies, counting = _fit(plan, fit_chunks, on_error, quantile_sample,
                                              train_where,
                                              count_memory_entries=count_memory_entries,
                                              scratch_dir=cache_dir)
    else:
        schema, vocabularies = fitted.schema, _read_vocabularies(fitted)
        counting = {"fit_from": str(fit_from)}
    indexes = {name: VocabularyIndex(vocab.values) for name, vocab in vocabularies.items()}

    num_rows, split_files = {}, {}
    for split in split_names:
        stats: dict[str, ReadStats] = {}
        read_stats[split] = stats
        counter = counters[split] = _Counter()
        name = f"{split}.parquet"
        source = _progress(pass_stats["pass2"].observe(chunks(split, stats)), progress,
                           f"pass 2 ({split})")
        num_rows[split] = _write_split(cache_dir / name, schema, plan, source, on_error,
                                       counter, indexes, budget)
        if num_rows[split] == 0:
            raise ValueError(f"inputs[{split!r}]: no valid rows"
                             + (f" ({sum(counter.skipped.values())} were skipped)"
                                if counter.skipped else ""))
        split_files[split] = name

    _atomic_write(cache_dir / VOCABULARIES, lambda path: pq.write_table(
        _vocabulary_table(vocabularies), path))
    report = _report(read_stats, counters, pass_stats, budget, counting)
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


def _fitted_from(config: Mapping, fitted: Mapping) -> bool:
    """Whether the schema dict ``fitted`` is ``config``'s once fitted: the same features and
    labels, each feature holding every key the config sets, with its value (fitting only adds
    keys: vocab sizes, boundaries, statistics)."""
    if {k: v for k, v in config.items() if k != "features"} != \
            {k: v for k, v in fitted.items() if k != "features"}:
        return False
    if len(config["features"]) != len(fitted["features"]):
        return False
    return all(all(done.get(key) == value for key, value in given.items())
               for given, done in zip(config["features"], fitted["features"]))


def _read_vocabularies(data: PreprocessedData) -> dict[str, _Vocabulary]:
    """The vocabularies of a cache, as pass 1 made them."""
    table = pq.read_table(data.cache_dir / VOCABULARIES)
    out = {}
    for name, entry in data.feature_map["vocabularies"].items():
        rows = table.filter(pc.equal(table.column("feature"), name))
        order = pa.array(np.argsort(rows.column("id").to_numpy()))
        out[name] = _Vocabulary(values=rows.column("value").take(order).combine_chunks(),
                                counts=rows.column("count").take(order).to_numpy(),
                                distinct=int(entry["distinct_values"]))
    return out


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
    """``vocabularies.parquet``: feature, id, value, count, a row per kept value."""
    schema = pa.schema([("feature", pa.string()), ("id", pa.int64()), ("value", pa.string()),
                        ("count", pa.int64())])
    tables = [pa.table([pa.repeat(pa.scalar(name, pa.string()), len(vocab.values)),
                        pa.array(np.arange(1, len(vocab.values) + 1), pa.int64()),
                        vocab.values, pa.array(vocab.counts, pa.int64())], schema=schema)
              for name, vocab in vocabularies.items()]
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()


def _write_split(path: Path, schema: Schema, plan: _Plan, chunks: Iterable[Chunk],
                 on_error: str, counter: _Counter, indexes, budget: ChunkBudget) -> int:
    """Pass 2 of one split into ``path`` (atomically, in row groups of the store's size, or
    of the budget's rows if smaller: the writer holds one row group); returns the rows
    written."""
    extra = ("timestamp",) if plan.source.time_column is not None else ()
    with StoreWriter(path, schema, extra=extra,
                     row_group_rows=min(ROW_GROUP_ROWS, budget.max_rows)) as writer:
        for chunk in chunks:
            parsed = _parse_checked(plan, chunk, on_error, counter)
            if parsed is not None:
                writer.write(_encode(schema, parsed, indexes))
    return writer.rows


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
            budget: ChunkBudget, counting: Mapping[str, int]) -> dict[str, Any]:
    """Rows read and skipped per split, the chunk sizes of each pass and how pass 1 counted
    the vocabularies (its memory bound, the peak rows held, the spills)."""
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
            "vocabulary_counts": dict(counting),
            "splits": splits}
