r"""The stream of batches: one data path for every source, in bounded memory, with workers.

A *source* holds rows in *units*: the row groups of a Parquet store (:class:`StoreSource`), slices
of in-memory columns (:class:`ColumnSource`: the case of a stream that happens to fit), or the
rows of another source that a hash assigns to one part (:class:`Subset`: valid / test drawn from
a train file without holding it). :func:`stream_batches` turns a source into batches, dicts of
tensors in the batch layout of :mod:`hmoe.data.schema`, by a plan that is a pure function of
(the units' row counts, batch_size, shuffle, shuffle_buffer, seed, epoch, num_streams):

1. Unit order: a permutation of the units drawn from (seed, epoch); file order without shuffle.
2. Streams: stream s of S takes the units order[s::S]. Each DataLoader worker runs one stream
   (S = max(1, num_workers)), so workers read disjoint row groups. With R ranks (multi-process
   training) there are R·S streams and rank r runs streams r·S .. r·S + S - 1; every rank
   yields as many batches as the rank with the fewest, so all take the same number of steps.
3. Windows: a stream's units, in order, grouped into windows of at least ``shuffle_buffer`` rows
   (the last may hold fewer). A window is read whole and its rows are visited in the order of a
   permutation drawn from (seed, epoch, s, w): the bounded shuffle buffer. A window keeps its
   row groups as read (:class:`hmoe.data.store.Rows`: columns of one value a row packed
   row-major, a saved world's sequences as lists of their valid ids) and each batch is picked,
   decoded to the batch layout, and checked, as it is cut. A thread reads the next
   window while the current one is served, so a stream holds at most two windows
   (2 x (``shuffle_buffer`` rows plus one unit), as read) and waits on a read only at its
   start.
4. Batches: a stream's rows in that order, cut every ``batch_size`` rows; a batch may span two
   windows, and only the last batch of a stream may be smaller.
5. Across streams: round robin over the streams that still have batches, which is the order in
   which ``torch.utils.data.DataLoader`` returns the batches of its workers; with
   ``num_workers=0`` the same round robin runs in-process, so the batch sequence depends on
   (seed, epoch, num_streams) only, not on whether workers run it. A worker writes its batches
   into a ring of shared-memory buffers it reuses, and the trainer copies each out as it
   arrives (:class:`_Ring`): no shared-memory segment is made per batch.

So the same seed gives the same batches, and the position in an epoch is one number, the batches
already consumed: :func:`stream_batches` with ``start=k`` replays the round robin on the streams'
batch counts (no data is read) and each stream reopens just the window holding its next row, so a
run killed mid-epoch resumes exactly, reading at most one window per stream again. Without
shuffle every stream reads its units in order; with one stream that is the rows in file order.

How random are the batches? A batch holds rows of the units in one or two windows. Units are
visited in a random order, so with windows of m units the batches are close to uniform samples of
the data when m is large against the batch size's share of structure; on a file sorted by label,
batch label means vary like random sampling once m >= batch_size (tests/data/test_stream.py).
Small row groups (:data:`hmoe.data.store.ROW_GROUP_ROWS`) and a large buffer help; the memory
cost is shuffle_buffer rows per worker.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from hmoe.data.batches import check_columns, num_rows, to_tensors
from hmoe.data.hashing import mix64
from hmoe.data.schema import Schema
from hmoe.data.store import Rows

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "ColumnSource", "StoreSource", "StreamPlan", "Subset",
           "as_source", "split_fraction", "stream_batches"]

DEFAULT_SHUFFLE_BUFFER = 262_144
UNIT_ROWS = 32_768  # the unit of in-memory columns, as the store's row group
MIN_UNITS = 256


# --------------------------------------------------------------------------------------------
# Sources: units of rows, read a window at a time.


class Window:
    """The rows of some units, read: ``rows`` (n,) int64 the indices of those rows, in unit
    order; :meth:`take` gathers rows (any of ``rows``) into batch-layout tensors."""

    rows: np.ndarray

    def take(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class _TensorWindow(Window):
    """Rows of in-memory tensors: a take is an index_select."""

    def __init__(self, tensors: dict[str, torch.Tensor], rows: np.ndarray):
        self.tensors, self.rows = tensors, rows

    def take(self, index):
        picked = torch.from_numpy(index)
        return {key: t.index_select(0, picked) for key, t in self.tensors.items()}


class _TableWindow(Window):
    """Row groups as read (:class:`hmoe.data.store.Rows`): compact (a saved world's sequences
    are lists of their valid ids, not padded (N, L) arrays), picked, decoded and checked a
    batch at a time."""

    def __init__(self, source: StoreSource, units, table):
        self.source, self.units, self.table = source, units, Rows(table)
        self.rows = np.arange(table.num_rows, dtype=np.int64)

    def take(self, index):
        store = self.source.store
        tensors = to_tensors(store.decode(self.table.pick(index)))
        if self.source.check:
            try:
                check_columns(tensors, store.schema)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{store.describe(self.units)}: {error}") from None
        return tensors


class Source:
    """Rows in units. ``unit_rows`` (U,) int64 rows per unit; :meth:`window` reads units into a
    :class:`Window`. A source decides what it loads: a store reads the row groups, in-memory
    columns hand out indices into themselves."""

    schema: Schema | None
    unit_rows: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.unit_rows.sum())

    def window(self, units: Sequence[int]) -> Window:
        raise NotImplementedError

    def columns(self, max_rows: int | None = None) -> dict[str, np.ndarray]:
        """The first ``max_rows`` rows (all by default) as numpy columns, in unit order."""
        units, rows = [], 0
        for u, count in enumerate(self.unit_rows):
            if max_rows is not None and rows >= max_rows:
                break
            units.append(u)
            rows += int(count)
        window = self.window(units)
        index = window.rows if max_rows is None else window.rows[:max_rows]
        return {key: t.numpy() for key, t in window.take(index).items()}


class ColumnSource(Source):
    """In-memory columns (numpy or torch, the batch layout plus any extra keys) as a source of
    units of ``unit_rows`` rows (default: UNIT_ROWS, or fewer so that there are at least
    MIN_UNITS units: small data still splits between workers and ranks, and shuffles finely).
    Converted once to tensors; windows are indices into them."""

    def __init__(self, columns: Mapping, schema: Schema | None = None, *,
                 unit_rows: int | None = None):
        self.schema = schema
        self.tensors = to_tensors(columns)
        n = num_rows(self.tensors)
        if unit_rows is None:
            unit_rows = min(UNIT_ROWS, -(-n // MIN_UNITS))
        self._unit = max(1, int(unit_rows))
        self.unit_rows = np.diff(np.append(np.arange(0, n, self._unit), n)).astype(np.int64)

    def window(self, units):
        index = [np.arange(u * self._unit, u * self._unit + self.unit_rows[u]) for u in units]
        rows = np.concatenate(index) if index else np.zeros(0, np.int64)
        return _TensorWindow(self.tensors, rows.astype(np.int64))


class StoreSource(Source):
    """A Parquet store (:class:`hmoe.data.store.ParquetStore`): units are its row groups.

    A window holds its row groups as read (Arrow); batches are decoded from it as they are
    cut. With ``check`` every batch is checked against the schema
    (:func:`hmoe.data.batches.check_columns`: ids in range, labels in {0, 1}, ...), so bad rows
    stop the stream with a ValueError naming the file and row group, never reach a kernel.
    """

    def __init__(self, store, *, check: bool = True):
        self.store, self.schema, self.check = store, store.schema, check
        self.unit_rows = store.unit_rows

    def window(self, units):
        return _TableWindow(self, list(units), self.store.read_table(units))


def _uniform(rows: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) draw per global row index: splitmix64 of (row + seed's offset)."""
    with np.errstate(over="ignore"):
        x = mix64(rows.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def split_fraction(rows: np.ndarray, seed: int, fractions: Mapping[str, float]) -> np.ndarray:
    """The part (index into ``fractions``' order) of each global row: a pure function of the row
    index and the seed, so a part is the same rows at every read."""
    edges = np.cumsum(list(fractions.values()))
    return np.searchsorted(edges, _uniform(rows, seed), side="right")


class Subset(Source):
    """The rows of ``source`` whose hash falls in ``part`` of ``fractions`` (e.g. {"valid": 0.1,
    "test": 0.1, "train": 0.8}): valid and test drawn from one file, each a stable random subset,
    without holding the file. Each row's part depends only on its index in the source and
    ``seed``; a part has about its fraction of the rows, not exactly."""

    def __init__(self, source: Source, part: str, fractions: Mapping[str, float], seed: int):
        if part not in fractions:
            raise ValueError(f"part: must be one of {list(fractions)}, got {part!r}")
        if not math.isclose(sum(fractions.values()), 1.0) or min(fractions.values()) < 0:
            raise ValueError(f"fractions: must be >= 0 and sum to 1, got {dict(fractions)}")
        self.source, self.schema = source, source.schema
        self._part, self._fractions, self._seed = list(fractions).index(part), dict(fractions), seed
        self._starts = np.concatenate([[0], np.cumsum(source.unit_rows)])
        self.unit_rows = np.array([int((self._parts(u) == self._part).sum())
                                   for u in range(len(source.unit_rows))], dtype=np.int64)

    def _parts(self, unit: int) -> np.ndarray:
        rows = np.arange(self._starts[unit], self._starts[unit + 1])
        return split_fraction(rows, self._seed, self._fractions)

    def window(self, units):
        window = self.source.window(units)
        keep = np.concatenate([self._parts(u) == self._part for u in units]) if len(units) \
            else np.zeros(0, bool)
        window.rows = window.rows[keep]
        return window


def as_source(data, schema: Schema | None = None) -> Source:
    """A Source as is; in-memory columns (a mapping of arrays) as a ColumnSource."""
    if isinstance(data, Source):
        return data
    if isinstance(data, Mapping):
        return ColumnSource(data, schema)
    raise TypeError(f"data must be a Source or a mapping of columns, got {type(data).__name__}")


# --------------------------------------------------------------------------------------------
# The plan: a pure function of the row counts, the options, the seed and the epoch.


def _generator(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclass(frozen=True)
class StreamPlan:
    """Which units each stream reads, in which windows, and how many batches it yields."""

    unit_rows: tuple[int, ...]
    batch_size: int
    shuffle: bool = False
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    seed: int = 0
    epoch: int = 0
    num_streams: int = 1
    drop_last: bool = False
    num_ranks: int = 1
    rank: int = 0
    lockstep: bool = True

    def __post_init__(self):
        for key in ("batch_size", "shuffle_buffer", "num_streams", "num_ranks"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) \
                or not 0 <= self.rank < self.num_ranks:
            raise ValueError(f"rank must be an int in [0, {self.num_ranks}), got {self.rank!r}")

    def _units(self, stream: int, rank: int | None = None) -> np.ndarray:
        """The units of this rank's (or ``rank``'s) stream ``stream``: stream s of rank r is
        stream r·S + s of all R·S, which takes every R·S-th unit of the order."""
        rank = self.rank if rank is None else rank
        return self.unit_order()[rank * self.num_streams + stream::
                                 self.num_streams * self.num_ranks]

    def unit_order(self) -> np.ndarray:
        units = np.arange(len(self.unit_rows))
        if self.shuffle:
            units = _generator(self.seed, self.epoch, 0).permutation(units)
        return units

    def windows(self, stream: int) -> list[np.ndarray]:
        """The units of ``stream``, grouped into windows of >= shuffle_buffer rows."""
        units = self._units(stream)
        rows = np.asarray(self.unit_rows, dtype=np.int64)[units]
        windows, start, count = [], 0, 0
        for i, r in enumerate(rows):
            count += int(r)
            if count >= self.shuffle_buffer or not self.shuffle:  # no shuffle: unit by unit
                windows.append(units[start:i + 1])
                start, count = i + 1, 0
        if start < len(units):
            windows.append(units[start:])
        return windows

    def stream_rows(self, stream: int, rank: int | None = None) -> int:
        return int(np.asarray(self.unit_rows, dtype=np.int64)[self._units(stream, rank)].sum())

    def stream_batches(self, stream: int, rank: int | None = None) -> int:
        rows = self.stream_rows(stream, rank)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def rank_batches(self, rank: int | None = None) -> int:
        """All the batches of this rank's (or ``rank``'s) streams."""
        return sum(self.stream_batches(s, rank) for s in range(self.num_streams))

    def __len__(self) -> int:
        """The batches this rank yields: all of its streams' with one rank or without
        ``lockstep``; in lockstep, as many as the rank with the fewest has, so that every rank
        takes the same number of steps (a sharded model's collectives need all of them at
        every step; the few rows beyond are left out of that epoch)."""
        if not self.lockstep:
            return self.rank_batches()
        return min(self.rank_batches(r) for r in range(self.num_ranks))

    def consumed(self, start: int) -> list[int]:
        """Batches each of this rank's streams has yielded after ``start`` batches of the
        round robin."""
        counts = np.array([self.stream_batches(s) for s in range(self.num_streams)])
        if not 0 <= start <= counts.sum():
            raise ValueError(f"start must lie in [0, {counts.sum()}] batches, got {start}")
        taken = np.zeros_like(counts)
        level, left = 0, start
        for next_level in np.unique(counts):  # between levels the active streams do not change
            active = np.flatnonzero(counts > level)
            full = min(left // len(active), next_level - level) if len(active) else 0
            taken[active] += full
            left -= full * len(active)
            if full < next_level - level:
                taken[active[:left]] += 1
                break
            level = next_level
        return taken.tolist()

    def permutation(self, stream: int, window: int, rows: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        stream = self.rank * self.num_streams + stream  # the permutations of all ranks differ
        return _generator(self.seed, self.epoch, 1, stream, window).permutation(rows)


# --------------------------------------------------------------------------------------------
# Iterating.


def _gather(pieces: list[tuple[Window, np.ndarray]], allocate=None
            ) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    """One batch from (window, row indices) pieces of one or two windows, and its layout.

    Every column of a dtype is a view of one flat buffer (``allocate(dtype, numel)``, default
    a new tensor), so a worker hands a batch over as a few buffers (a :class:`_Ring` slot per
    dtype) and its layout: (key, dtype, offset, shape) of each column in its dtype's buffer."""
    parts = [window.take(index) for window, index in pieces]
    rows = sum(len(index) for _, index in pieces)
    sizes: dict[torch.dtype, int] = {}
    layout = []
    for key, tensor in parts[0].items():
        shape = (rows, *tensor.shape[1:])
        offset = sizes.get(tensor.dtype, 0)
        layout.append((key, tensor.dtype, offset, shape))
        sizes[tensor.dtype] = offset + math.prod(shape)
    allocate = allocate or (lambda dtype, numel: torch.empty(numel, dtype=dtype))
    buffers = {dtype: allocate(dtype, size) for dtype, size in sizes.items()}
    batch = {}
    for key, dtype, offset, shape in layout:
        view = buffers[dtype][offset:offset + math.prod(shape)].view(shape)
        torch.cat([part[key] for part in parts], out=view)
        batch[key] = view
    return batch, layout


def _views(buffers: Mapping[torch.dtype, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    return {key: buffers[dtype][offset:offset + math.prod(shape)].view(shape)
            for key, dtype, offset, shape in layout}


# --------------------------------------------------------------------------------------------
# Handing batches from a worker to the trainer.

RING_SLOTS = 6  # > the DataLoader's prefetch_factor (4) + 1: see _Ring


@dataclass
class _Slotted:
    """A batch a worker wrote into slot ``slot`` of its ring: what crosses the queue. Buffers
    travel once, with the first batch a slot holds (``new``); ``headers`` with the first batch
    of a worker."""

    worker: int
    slot: int
    seq: int
    layout: list
    new: dict | None = None
    headers: torch.Tensor | None = None


class _Ring:
    """A worker's ring of RING_SLOTS batch buffers in shared memory, reused batch after batch.

    Handing each batch over in fresh shared memory costs a segment (create, map, send its file
    descriptor, map again, unmap twice) per dtype per batch: about 4% of the step rate of a
    2-core machine, more than the worker's whole decoding. Batch n goes to slot n % RING_SLOTS;
    the trainer copies it out as it arrives (:func:`_receive`). That is safe because a
    DataLoader asks a worker for batch n + prefetch_factor only after it returned batch n, and
    the slots outnumber prefetch_factor + 1: a slot is rewritten only after its batch was
    copied. ``headers[slot]`` (shared) holds the batch number a slot holds, -1 while written;
    the trainer checks it before and after its copy, so were that ever broken it would raise,
    not hand out a torn batch."""

    def __init__(self, worker: int):
        self.worker, self.seq = worker, 0
        self.slots: list[dict[torch.dtype, torch.Tensor]] = [{} for _ in range(RING_SLOTS)]
        self.headers = torch.full((RING_SLOTS,), -1, dtype=torch.int64).share_memory_()

    def gather(self, pieces) -> _Slotted:
        slot, new = self.seq % RING_SLOTS, {}

        def allocate(dtype, numel):
            buffer = self.slots[slot].get(dtype)
            if buffer is None or buffer.numel() < numel:
                storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
                buffer = self.slots[slot][dtype] = new[dtype] = \
                    torch.empty(0, dtype=dtype).set_(storage)
            return buffer[:numel]

        self.headers[slot] = -1
        _, layout = _gather(pieces, allocate)
        self.headers[slot] = self.seq
        message = _Slotted(self.worker, slot, self.seq, layout, new or None,
                           self.headers if self.seq == 0 else None)
        self.seq += 1
        return message


def _receive(messages: Iterator[_Slotted], pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of workers' rings, each copied out of its slot (into page-locked memory with
    ``pin_memory``) as it arrives: one copy per dtype, and the batch is the caller's to keep."""
    rings: dict[int, tuple[torch.Tensor, list[dict]]] = {}
    for message in messages:
        if message.headers is not None:
            rings[message.worker] = (message.headers, [{} for _ in range(RING_SLOTS)])
        headers, slots = rings[message.worker]
        if message.new:
            slots[message.slot].update(message.new)
        sizes: dict[torch.dtype, int] = {}
        for _, dtype, offset, shape in message.layout:
            sizes[dtype] = max(sizes.get(dtype, 0), offset + math.prod(shape))
        if int(headers[message.slot]) != message.seq:
            raise RuntimeError(f"batch {message.seq} of worker {message.worker} was overwritten "
                               f"before it was read (ring slot {message.slot})")
        copies = {}
        for dtype, size in sizes.items():
            copies[dtype] = torch.empty(size, dtype=dtype, pin_memory=pin_memory)
            # one thread: torch's parallel copy would wait on an intra-op thread that the
            # worker has off the CPU (2.4 ms a batch against 0.1 ms on 2 cores)
            copies[dtype].numpy()[:] = slots[message.slot][dtype][:size].numpy()
        if int(headers[message.slot]) != message.seq:
            raise RuntimeError(f"batch {message.seq} of worker {message.worker} was overwritten "
                               f"while it was read (ring slot {message.slot})")
        yield _views(copies, message.layout)


def _one_stream(source: Source, plan: StreamPlan, stream: int, start: int,
                gather=None) -> Iterator:
    """The batches of one stream from its batch ``start`` on (``gather(pieces)`` of each: by
    default a new batch dict).

    The next window is read by a thread while the current one is served (Parquet decoding
    releases the GIL), so a stream waits on a read only at its first window; a stream holds at
    most two windows.
    """
    gather = gather or (lambda pieces: _gather(pieces)[0])
    windows = plan.windows(stream)
    unit_rows = np.asarray(plan.unit_rows, dtype=np.int64)
    window_rows = np.array([int(unit_rows[w].sum()) for w in windows], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(window_rows)])
    total = plan.stream_batches(stream)
    skip = start * plan.batch_size  # the stream's first row to serve
    first = max(int(np.searchsorted(bounds, skip, side="right")) - 1, 0)
    if start >= total or first >= len(windows):
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="hmoe-window")
    try:
        reads = {first: pool.submit(source.window, windows[first])}
        pending, pending_rows, served = [], 0, start
        for w in range(first, len(windows)):
            window = reads.pop(w).result()
            rows = window.rows
            if w + 1 < len(windows):
                reads[w + 1] = pool.submit(source.window, windows[w + 1])
            if len(rows) != window_rows[w]:
                raise RuntimeError(f"the source changed while streaming: window {w} of stream "
                                   f"{stream} has {len(rows)} rows, expected {window_rows[w]}")
            order = plan.permutation(stream, w, len(rows))
            if order is not None:
                rows = rows[order]
            offset = skip - int(bounds[w]) if w == first else 0
            while offset < len(rows):
                take = min(plan.batch_size - pending_rows, len(rows) - offset)
                pending.append((window, rows[offset:offset + take]))
                pending_rows += take
                offset += take
                if pending_rows == plan.batch_size:
                    yield gather(pending)
                    served += 1
                    pending, pending_rows = [], 0
                    if served >= total:
                        return
        if pending_rows:  # the stream's last, smaller batch
            yield gather(pending)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _round_robin(iterators: list[Iterator]) -> Iterator:
    """DataLoader's order over its workers: one item from each live iterator in turn."""
    live = list(iterators)
    position = 0
    while live:
        position %= len(live)
        try:
            item = next(live[position])
        except StopIteration:
            live.pop(position)  # position now names the next one
            continue
        position += 1
        yield item


def _next_stream(plan: StreamPlan, consumed: list[int]) -> int:
    """The stream the round robin serves next after ``consumed``: the first live stream of the
    lowest level (a live stream has batches left; its level is the batches it has served)."""
    live = [s for s in range(plan.num_streams) if consumed[s] < plan.stream_batches(s)]
    if not live:
        return 0
    level = min(consumed[s] for s in live)
    return next(s for s in live if consumed[s] == level)


def _rotation(plan: StreamPlan, consumed: list[int]) -> list[int]:
    """The streams in the order the round robin continues: from the next one, cyclically (a
    fresh epoch: 0, 1, ..., S - 1). Worker i of a DataLoader runs stream rotation[i]."""
    first = _next_stream(plan, consumed)
    return [(first + i) % plan.num_streams for i in range(plan.num_streams)]


class _StreamDataset(torch.utils.data.IterableDataset):
    """The DataLoader face of a plan: worker i runs stream streams[i]."""

    def __init__(self, source: Source, plan: StreamPlan, consumed: list[int],
                 streams: list[int]):
        super().__init__()
        self.source, self.plan, self.consumed, self.streams = source, plan, consumed, streams

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers != self.plan.num_streams:
            raise RuntimeError(f"the plan has {self.plan.num_streams} streams: run it with as "
                               f"many DataLoader workers")
        stream = self.streams[info.id]
        return _one_stream(self.source, self.plan, stream, self.consumed[stream],
                           _Ring(info.id).gather)


class BatchStream:
    """An iterable of batches with ``len()`` (the batches left); see :func:`stream_batches`."""

    def __init__(self, source: Source, plan: StreamPlan, start: int, num_workers: int,
                 pin_memory: bool):
        self.source, self.plan, self.start = source, plan, start
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        consumed = self.plan.consumed(self.start)
        streams = _rotation(self.plan, consumed)
        if self.num_workers == 0:
            batches = _round_robin([_one_stream(self.source, self.plan, s, consumed[s])
                                    for s in streams])
        else:
            dataset = _StreamDataset(self.source, self.plan, consumed, streams)
            loader = torch.utils.data.DataLoader(dataset, batch_size=None,
                                                 num_workers=self.num_workers,
                                                 prefetch_factor=RING_SLOTS - 2)
            batches = _receive(iter(loader), self.pin_memory)
        return itertools.islice(batches, len(self))  # ranks: the common number of steps


def stream_batches(data, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                   epoch: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                   num_workers: int = 0, start: int = 0, drop_last: bool = False,
                   pin_memory: bool = False, schema: Schema | None = None, rank: int = 0,
                   num_ranks: int = 1, lockstep: bool = True) -> BatchStream:
    """The batches of ``data`` (a Source or in-memory columns) by the plan of the module
    docstring, from batch ``start`` of the epoch on.

    Args:
        batch_size: rows per batch (the last batch of each stream may be smaller unless
            ``drop_last``).
        shuffle, seed, epoch: unit order and window permutations drawn from (seed, epoch).
        shuffle_buffer: rows per window (the shuffle buffer), >= 1.
        num_workers: DataLoader worker processes reading, decoding and assembling batches (0:
            in this process); the plan has max(1, num_workers) streams.
        start: batches of this epoch already consumed (a resume).
        pin_memory: page-locked batches for fast copies to a CUDA device.
        rank, num_ranks: this process's share of the data in multi-process training: rank r
            runs streams r·S .. r·S + S - 1 of all num_ranks·S, so ranks read disjoint units,
            and every rank yields as many batches as the rank with the fewest (``lockstep``)
            or all of its own (not ``lockstep``: every row once, as evaluation needs; the
            ranks then yield different numbers of batches).
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    source = as_source(data, schema)
    plan = StreamPlan(tuple(int(r) for r in source.unit_rows), batch_size, shuffle,
                      shuffle_buffer, seed, epoch, max(1, num_workers), drop_last, num_ranks,
                      rank, lockstep)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(plan):
        raise ValueError(f"start must be an int in [0, {len(plan)}], got {start!r}")
    return BatchStream(source, plan, start, num_workers, pin_memory)
