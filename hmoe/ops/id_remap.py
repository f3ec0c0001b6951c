r"""Id remap of dynamic vocabularies: raw 64-bit ids -> embedding rows, for ids that come and go.

In online learning new ad and user ids appear every day and old ones go away. A categorical
feature with a dynamic vocabulary of ``capacity`` rows gives an id its own embedding row once the
id has been seen ``min_count`` times (until then it shares the out-of-vocabulary row 0), and when
every row is taken the least recently seen id's row is reclaimed. The remap runs on every batch.

State of one vocabulary: rows 1..C (C = capacity; row 0 is the shared OOV row and is never
assigned); a map id -> row of the admitted ids, in LRU order; a bounded table of pending (not yet
admitted) ids with their counts, of P = ``pending_capacity`` entries (default C), also in LRU
order; a call counter ``clock``.

One call ``remap(ids)``, ids an int64 tensor of any shape (any int64 is an id except the reserved
SENTINEL = INT64_MIN), processes the batch as a whole:

1. U = the distinct ids of the batch in order of first occurrence (flattened row-major);
   c_u = occurrences of u in the batch. clock += 1.
2. Every admitted u in U is touched: moved to the most recent end of the admitted LRU order, in
   first-occurrence order.
3. Then, for each not-admitted u in U, in first-occurrence order: its pending count += c_u (a new
   pending entry is created if absent; if the pending table is full, the least recently seen
   pending entry is dropped first); it moves to the most recent end of the pending order. If its
   count >= min_count it is admitted: it takes the smallest never-used row if any remains;
   otherwise the least recently seen admitted id is evicted and its row taken — but only if that
   id was not seen in this call (if it was, every row is in use by ids of this batch: u stays
   pending, OOV for this call). An admitted id leaves the pending table; an evicted id is
   forgotten entirely (its count starts from 0 if it comes back). The newly admitted id goes to
   the most recent end of the admitted order.
4. Returns (rows, assigned): rows, the shape of ids, is the row of each id after this call's
   admissions (0 for ids still pending); assigned (A,) int64 holds the rows given to ids in this
   call, in admission order (fresh and reclaimed alike): the caller re-initialises those
   embedding rows and resets their optimizer state.

Rows are only ever reclaimed, never freed, so the rows in use are always 1..(number of admitted
ids) and "the smallest never-used row" is that number + 1.

``id_remap_ref`` implements this on collections.OrderedDict (:class:`VocabState`): it is the spec.

The state as tensors (:class:`IdRemapState`, all int64, contiguous, on the device of the ids; it
lives in module buffers, moves between devices and round-trips through state_dict / checkpoints).
``id_remap`` and the compiled kernels **mutate it in place**.

    table (S, 2)        an open-addressing hash table, [key, node] per slot, linear probing from
                        slot mix64(id) mod S (splitmix64's finaliser, as hmoe.data.hashing),
                        S = the power of two >= 2 (C + P) (load factor <= 1/2); key SENTINEL marks a
                        free slot. Deletion shifts the following entries back (no tombstones).
    nodes (C+P+2, 4)    [id, value, prev, next] per node, 32 bytes, so a node is one cache line
                        access. Node 0: sentinel of the admitted LRU list; nodes 1..C: the rows
                        (an admitted id's node is its row); nodes C+1..C+P: pending entries;
                        node C+P+1: sentinel of the pending LRU list. The lists are circular
                        doubly-linked through their sentinel (next[sentinel] = least recent,
                        prev[sentinel] = most recent). value: a pending node's count, an admitted
                        node's clock of the last call that saw it (how step 3 knows that the
                        least recent admitted id was seen in this call). Free pending nodes form
                        a stack chained through next.
    meta (6,)           [clock, rows used (= admitted ids), pending size, top of the free
                        pending-node stack (-1: none), C, P].

Memory: 16·S + 32·(C + P + 2) + 48 bytes, about 64·(C + P) to 96·(C + P) bytes (S rounds up).
Cost of a call (CPU and CUDA kernels): O(1) amortised per id: the batch is deduplicated, each
distinct id is probed once, and every LRU move, admission and eviction is O(1); no scan of the
state ever. The reference backend of ``id_remap`` (:func:`decode_state`, ``id_remap_ref``,
:func:`encode_state`) costs O(C + P) Python work per call: it is the spec and the fallback, not
a fast path.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import torch

from hmoe.ops import _backend, _extension

__all__ = [
    "SENTINEL",
    "IdRemapState",
    "VocabState",
    "decode_state",
    "encode_state",
    "id_remap",
    "id_remap_ref",
    "mix64",
    "new_state",
    "state_bytes",
    "table_size",
]

OP = _backend.register_op("id_remap", has_triton=False)
SENTINEL = -(2**63)  # INT64_MIN: reserved, marks a free hash-table slot
NODE_FIELDS = 4  # id, value, prev, next
META_FIELDS = 6  # clock, rows used, pending size, free top, C, P
_ID, _VALUE, _PREV, _NEXT = range(NODE_FIELDS)
_CLOCK, _ROWS_USED, _PENDING_SIZE, _FREE_TOP, _CAPACITY, _PENDING_CAPACITY = range(META_FIELDS)


# --------------------------------------------------------------------------------------------
# Reference: readable, the spec.


@dataclasses.dataclass
class VocabState:
    """One dynamic vocabulary as the spec states it (see the module docstring)."""

    capacity: int
    pending_capacity: int
    admitted: collections.OrderedDict[int, int] = dataclasses.field(
        default_factory=collections.OrderedDict)  # id -> row, least recently seen first
    pending: collections.OrderedDict[int, int] = dataclasses.field(
        default_factory=collections.OrderedDict)  # id -> count, least recently seen first
    clock: int = 0


def id_remap_ref(state: VocabState, ids: torch.Tensor, min_count: int):
    """Steps 1-4 of the module docstring on ``state`` (mutated); returns (rows, assigned)."""
    flat = ids.reshape(-1).tolist()
    counts = collections.Counter(flat)  # keys in order of first occurrence
    state.clock += 1
    admitted, pending = state.admitted, state.pending
    for u in counts:  # step 2
        if u in admitted:
            admitted.move_to_end(u)
    assigned = []
    for u, c in counts.items():  # step 3
        if u in admitted:
            continue
        if u in pending:
            pending[u] += c
            pending.move_to_end(u)
        else:
            if len(pending) == state.pending_capacity:
                pending.popitem(last=False)
            pending[u] = c
        if pending[u] < min_count:
            continue
        if len(admitted) < state.capacity:
            row = len(admitted) + 1  # rows in use are exactly 1..len(admitted)
        else:
            oldest, row = next(iter(admitted.items()))
            if oldest in counts:  # seen in this call: every row is in use by this batch
                continue
            del admitted[oldest]
        del pending[u]
        admitted[u] = row
        assigned.append(row)
    rows = torch.tensor([admitted.get(u, 0) for u in flat], dtype=torch.int64)
    return rows.reshape(ids.shape), torch.tensor(assigned, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# The state as tensors.


class IdRemapState(NamedTuple):
    """The tensors of one vocabulary's state (layout: the module docstring)."""

    table: torch.Tensor  # (S, 2) [key, node]
    nodes: torch.Tensor  # (C + P + 2, 4) [id, value, prev, next]
    meta: torch.Tensor  # (6,) [clock, rows used, pending size, free top, C, P]


def _lsr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _as_int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


_MIX1, _MIX2 = _as_int64(0xBF58476D1CE4E5B9), _as_int64(0x94D049BB133111EB)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors, bit for bit hmoe.data.hashing.mix64 with the
    uint64 values read as int64 (wrapping arithmetic). The hash of the kernels' tables."""
    x = x.to(torch.int64)
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    return x ^ _lsr(x, 31)


def table_size(capacity: int, pending_capacity: int) -> int:
    """S: the power of two >= 2 (C + P), so the table is at most half full."""
    size = 1
    while size < 2 * (capacity + pending_capacity):
        size *= 2
    return size


def _check_capacities(capacity, pending_capacity):
    for name, value in (("capacity", capacity), ("pending_capacity", pending_capacity)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def new_state(capacity: int, pending_capacity: int | None = None,
              device: torch.device | str | None = None) -> IdRemapState:
    """The empty state of a vocabulary of ``capacity`` rows and ``pending_capacity`` (default:
    capacity) pending entries."""
    pending_capacity = capacity if pending_capacity is None else pending_capacity
    _check_capacities(capacity, pending_capacity)
    C, P = capacity, pending_capacity
    table = torch.full((table_size(C, P), 2), SENTINEL, dtype=torch.int64, device=device)
    table[:, 1] = -1
    nodes = torch.full((C + P + 2, NODE_FIELDS), -1, dtype=torch.int64, device=device)
    nodes[:, _ID], nodes[:, _VALUE] = SENTINEL, 0
    for sentinel in (0, C + P + 1):  # empty circular lists
        nodes[sentinel, _PREV] = nodes[sentinel, _NEXT] = sentinel
    nodes[C + 1:C + P, _NEXT] = torch.arange(C + 2, C + P + 1, device=device)  # free stack
    meta = torch.tensor([0, 0, 0, C + 1, C, P], dtype=torch.int64, device=device)
    return IdRemapState(table, nodes, meta)


def state_bytes(state: IdRemapState) -> int:
    """Bytes of the state's tensors."""
    return sum(t.numel() * t.element_size() for t in state)


def _walk(nodes: list[list[int]], sentinel: int) -> list[int]:
    """The nodes of a circular list, least recent first."""
    order, n = [], nodes[sentinel][_NEXT]
    while n != sentinel:
        order.append(n)
        n = nodes[n][_NEXT]
    return order


def decode_state(state: IdRemapState) -> VocabState:
    """The VocabState that the tensors hold (a copy; O(C + P))."""
    clock, _, _, _, C, P = state.meta.tolist()
    nodes = state.nodes.tolist()
    admitted = collections.OrderedDict((nodes[r][_ID], r) for r in _walk(nodes, 0))
    pending = collections.OrderedDict((nodes[n][_ID], nodes[n][_VALUE])
                                      for n in _walk(nodes, C + P + 1))
    return VocabState(C, P, admitted, pending, clock)


def encode_state(vocab: VocabState, out: IdRemapState | None = None,
                 device: torch.device | str | None = None) -> IdRemapState:
    """Tensors holding ``vocab``; written into ``out`` (in place) when given. Admitted nodes'
    last-seen clocks are written as 0: only their comparison with a later call's clock matters."""
    C, P = vocab.capacity, vocab.pending_capacity
    if out is not None:
        device = out.meta.device
    state = new_state(C, P)
    nodes = state.nodes
    rows = list(vocab.admitted.values())
    pending_nodes = list(range(C + 1, C + 1 + len(vocab.pending)))
    for sentinel, order in ((0, rows), (C + P + 1, pending_nodes)):
        chain = [sentinel, *order, sentinel]
        nodes[chain[1:], _PREV] = torch.tensor(chain[:-1])
        nodes[chain[:-1], _NEXT] = torch.tensor(chain[1:])
    if rows:
        nodes[rows, _ID] = torch.tensor(list(vocab.admitted), dtype=torch.int64)
        nodes[rows, _VALUE] = 0
    if pending_nodes:
        nodes[pending_nodes, _ID] = torch.tensor(list(vocab.pending), dtype=torch.int64)
        nodes[pending_nodes, _VALUE] = torch.tensor(list(vocab.pending.values()),
                                                    dtype=torch.int64)
    free_top = C + 1 + len(vocab.pending) if len(vocab.pending) < P else -1
    state.meta.copy_(torch.tensor([vocab.clock, len(rows), len(vocab.pending), free_top, C, P]))
    _fill_table(state.table, [*vocab.admitted, *vocab.pending], [*rows, *pending_nodes])
    if out is None:
        return IdRemapState(*(t.to(device) for t in state))
    for target, source in zip(out, state):
        if target.shape != source.shape:
            raise ValueError(f"encode_state: out has shape {tuple(target.shape)}, the state of "
                             f"capacity {C} and pending_capacity {P} needs {tuple(source.shape)}")
        target.copy_(source)
    return out


def _fill_table(table: torch.Tensor, keys: list[int], values: list[int]) -> None:
    """Inserts (key, node) pairs by linear probing, as the kernels do."""
    if not keys:
        return
    mask = table.shape[0] - 1
    homes = (mix64(torch.tensor(keys, dtype=torch.int64)) & mask).tolist()
    used = set()
    slots = []
    for home in homes:
        slot = home
        while slot in used:
            slot = (slot + 1) & mask
        used.add(slot)
        slots.append(slot)
    table[slots, 0] = torch.tensor(keys, dtype=torch.int64)
    table[slots, 1] = torch.tensor(values, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Fake kernel of the compiled op (no autograd: ids and rows are integers).


if _extension.has_schema("id_remap"):

    @torch.library.register_fake("hmoe::id_remap")
    def _(table, nodes, meta, ids, min_count):
        num_assigned = torch.library.get_ctx().new_dynamic_size()
        return torch.empty_like(ids), ids.new_empty(num_assigned)


# --------------------------------------------------------------------------------------------
# Public entry point: validates once, then dispatches.


def _validate(state, ids, min_count):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64 (raw 64-bit ids), got {ids.dtype}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    if not isinstance(state, IdRemapState):
        raise TypeError(f"state must be an IdRemapState (see new_state), got "
                        f"{type(state).__name__}")
    expected = {"table": (2,), "nodes": (NODE_FIELDS,), "meta": ()}
    for name, t in zip(IdRemapState._fields, state):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise TypeError(f"state.{name} must be an int64 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != ids.device:
            raise ValueError(f"state.{name} is on {t.device} but ids is on {ids.device}")
        if t.dim() != len(expected[name]) + 1 or tuple(t.shape[1:]) != expected[name]:
            raise ValueError(f"state.{name} must have shape (n, {', '.join(map(str, expected[name]))})"
                             .replace(", )", ")") + f", got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"state.{name} must be contiguous, got strides {t.stride()}")
    if state.meta.shape[0] != META_FIELDS:
        raise ValueError(f"state.meta must have shape ({META_FIELDS},), got "
                         f"{tuple(state.meta.shape)}")
    if torch.compiler.is_compiling():
        return
    C, P = state.meta[_CAPACITY:].tolist()
    if C < 1 or P < 1:
        raise ValueError(f"state.meta holds capacity {C} and pending capacity {P}: both must "
                         f"be >= 1")
    if state.nodes.shape[0] != C + P + 2:
        raise ValueError(f"state.nodes must have C + P + 2 = {C + P + 2} rows (capacity {C}, "
                         f"pending capacity {P}), got shape {tuple(state.nodes.shape)}")
    if state.table.shape[0] != table_size(C, P):
        raise ValueError(f"state.table must have {table_size(C, P)} slots (capacity {C}, "
                         f"pending capacity {P}), got shape {tuple(state.table.shape)}")
    if ids.numel() > 0 and bool((ids == SENTINEL).any()):
        raise ValueError(f"ids must not contain the reserved id {SENTINEL} (INT64_MIN), found "
                         f"at flat position {int((ids.reshape(-1) == SENTINEL).nonzero()[0, 0])}")


def id_remap(state: IdRemapState, ids: torch.Tensor, min_count: int = 1):
    """Remaps ``ids`` (int64, any shape) to rows and updates ``state`` in place (see the module
    docstring). Returns (rows, assigned): rows (shape of ids, 0 = not admitted) and the rows
    assigned in this call (A,), in admission order, which the caller re-initialises."""
    _validate(state, ids, min_count)
    backend_name = _backend.select(OP.name, ids.device.type)
    if backend_name == "reference":
        vocab = decode_state(state)
        rows, assigned = id_remap_ref(vocab, ids, min_count)
        encode_state(vocab, out=state)
        return rows.to(ids.device), assigned.to(ids.device)
    return torch.ops.hmoe.id_remap(state.table, state.nodes, state.meta, ids, min_count)
