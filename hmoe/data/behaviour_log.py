"""Behaviour logs: an event log -> train / valid / test samples with histories.

``source.behaviour_log`` (MovieLens ratings, Taobao UserBehavior, KuaiRand; the config is
:class:`hmoe.data.dataset_config.BehaviourLog`): an event log becomes samples — one per event
(the *target*), whose history is the user's previous events (those passing ``history_filter``),
oldest first, at most ``max_len``; the history columns hold the listed source columns of those
events, ``delta_column`` the time from each to the target. Events are ordered by (user, time,
file order). The last ``test_last`` events of each user form the test split, the ``valid_last``
before them the valid split, the rest train. The log is read in chunks but the construction
holds it in memory (a log of E events with H history columns costs about E · max_len · H
values); :func:`_sample_chunks` hands the samples on in chunks, like a raw file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmoe.data.dataset_config import BehaviourLog
from hmoe.data.parse import _as_strings, _Counter, _floats, _value_at
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


def _log_columns(log: BehaviourLog, columns: Sequence[str]) -> list[str]:
    """The columns an event log must have: the schema's raw columns (less those the
    construction builds), the user, the time, the history sources and the filter column."""
    made = set(log.history.values()) | ({log.delta_column} if log.delta_column else set())
    needed = [c for c in columns if c not in made] + [log.user, log.time, *log.history]
    needed += list(log.history_filter or {})
    return list(dict.fromkeys(needed))


def _sample_chunks(samples: _Samples, budget: ChunkBudget) -> Iterator[Chunk]:
    """The constructed samples in chunks within the budget, located at their log events."""
    offset = 0
    for batch in samples.table.to_batches():
        for start, piece in _bounded(batch, budget):
            rows = slice(offset + start, offset + start + piece.num_rows)
            yield Chunk(piece, samples.path, rows.start, samples.numbers[rows], samples.unit)
        offset += batch.num_rows
