r"""Online training: one pass over a time-ordered log, window by window, test then train.

With ``train.mode: online`` the trainer reads the train split once, in row order, which must be
time order (``data.time_column`` non-decreasing; a row that goes back in time is an error
naming it), and cuts it into windows of ``train.window``:

    "1d", "6h", "30m", "90s", "1w"   a window per period of the time column (in seconds):
                                     window w holds the rows with floor(t / period) = w, so
                                     "1d" windows are calendar days [d·86400, (d + 1)·86400)
    N (an int)                       a window per N rows

For each window, in order:

1. **Test**: the model as it is after the previous window scores every row of the window
   (progressive validation); the window's metrics (AUC, gAUC, logloss, NE, calibration, ...)
   go to metrics.jsonl as ``{"kind": "window", "window", "start", "rows", "metrics"}``.
2. **Train**: the model steps on the window's rows, in order, in batches of
   ``train.batch_size`` that start at the window's first row (the last batch of a window is
   smaller), so a window's steps depend on nothing before it but the model.
3. **Checkpoint** at the boundary: the stream position of the next window's first row is in
   the loop state, so a killed run resumes exactly there.

The log is read twice per window, once to test and once to train, through two streams of the
same source (reading is cheap beside the model; nothing holds a window in memory).
``data.time_range: [t0, t1]`` restricts the pass to rows with t0 <= t < t1 (a warm start,
``hmoe train --init-from RUN``, continues a trained model on the next days this way).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hmoe.data.stream import Source, stream_batches

__all__ = ["Window", "parse_window", "window_batches"]

_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Window:
    """How the log is cut: every ``size`` seconds of ``column`` (kind "time") or every ``size``
    rows (kind "rows")."""

    kind: str
    size: int


def parse_window(value) -> Window:
    """``train.window``: "1d" / "6h" / "30m" / "90s" / "1w", or a number of rows."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"train.window: a number of rows must be >= 1, got {value}")
        return Window("rows", value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value)
        if match and int(match.group(1)) > 0:
            return Window("time", int(match.group(1)) * _PERIODS[match.group(2)])
        if value.strip().isdigit() and int(value) > 0:
            return Window("rows", int(value))
    raise ValueError(f"train.window: expected a period like '1d', '6h', '30m', '90s', '1w' or "
                     f"a number of rows, got {value!r}")


def _take(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in batch.items()}


def _join(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _pieces(source: Source, batch_size: int, time_column: str | None, start: int,
            num_workers: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """The stream's batches from row ``start`` on, in row order (one stream: batch k holds rows
    [k·B, (k + 1)·B)), with the row index of each one's first row; checks that time does not
    go backwards."""
    first_batch, skip = divmod(start, batch_size)
    stream = stream_batches(source, batch_size, num_workers=min(num_workers, 1),
                            start=first_batch)
    index, last = first_batch * batch_size, None
    for batch in stream:
        rows = len(batch["labels"])
        if skip:
            batch, index, rows, skip = _take(batch, slice(skip, None)), index + skip, \
                rows - skip, 0
        if time_column is not None:
            if time_column not in batch:
                raise ValueError(f"data.time_column: the data has no column {time_column!r}; "
                                 f"its columns: {sorted(batch)}")
            times = batch[time_column]
            before = times[:-1] if last is None else torch.cat([last.view(1), times[:-1]])
            after = times[1:] if last is None else times
            back = (after < before).nonzero()
            if len(back):
                row = int(back[0]) + (1 if last is None else 0)
                raise ValueError(f"data.time_column: row {index + row} of the train split has "
                                 f"{time_column} {int(times[row])}, before the row ahead of it "
                                 f"({int(before[back[0]])}): online training needs the log in "
                                 f"time order (sort it first)")
            if len(times):
                last = times[-1]
        yield batch, index
        index += rows


def window_batches(source: Source, batch_size: int, window: Window, *,
                   time_column: str | None, start: int = 0,
                   time_range: tuple[int, int] | None = None, num_workers: int = 0
                   ) -> Iterator[tuple[int, dict[str, torch.Tensor] | None, int | None]]:
    """(window, batch, None) in order: each window's rows in batches of ``batch_size`` from its
    first row; after each window's last batch, (window, None, row) marks the boundary, with the
    row index of the next window's first row (None after the last window). From row ``start``
    (a boundary's row given before), whatever the batch size."""
    if window.kind == "time" and time_column is None:
        raise ValueError("train.window: a period needs data.time_column (windows of rows do "
                         "not)")
    if time_range is not None and time_column is None:
        raise ValueError("data.time_range needs data.time_column")
    current, parts, held = None, [], 0
    for batch, first in _pieces(source, batch_size, time_column, start, num_workers):
        rows = len(batch["labels"])
        index = torch.arange(first, first + rows)
        keep = torch.ones(rows, dtype=torch.bool)
        if time_range is not None:
            times = batch[time_column]
            if rows and int(times[0]) >= time_range[1]:
                break
            keep = (times >= time_range[0]) & (times < time_range[1])
        ids = batch[time_column] // window.size if window.kind == "time" else \
            index // window.size
        offset = 0
        while offset < rows:
            # the run of rows [offset, end) in one window
            same = (ids[offset:] != ids[offset]).nonzero()
            end = offset + (int(same[0]) if len(same) else rows - offset)
            chosen = keep[offset:end].nonzero().squeeze(1) + offset
            w = int(ids[offset])
            if len(chosen) and w != current:  # (a window none of whose rows is kept: none)
                if current is not None:
                    if parts:
                        yield current, _join(parts), None
                        parts, held = [], 0
                    yield current, None, first + offset
                current = w
            while len(chosen):
                piece, chosen = chosen[:batch_size - held], chosen[batch_size - held:]
                # (index_select: indexing with a tensor, value[piece], is many times slower
                # on CPU for 1-D columns)
                parts.append({key: value.index_select(0, piece) for key, value in batch.items()})
                held += len(piece)
                if held == batch_size:
                    yield current, _join(parts), None
                    parts, held = [], 0
            offset = end
        if time_range is not None and rows and int(batch[time_column][-1]) >= time_range[1]:
            break
    if current is not None:
        if parts:
            yield current, _join(parts), None
        yield current, None, None
