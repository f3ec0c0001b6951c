"""Vocabularies of raw 64-bit ids: id -> embedding row, for features whose ids come and go.

Both layers map ids (int64, any shape) to rows of an embedding table of ``num_rows`` rows, row 0
being the shared out-of-vocabulary row, and return (rows, assigned):

- :class:`DynamicVocab`: the id remap of hmoe/ops/id_remap.py (admission after ``min_count``
  sightings, LRU reclaim of rows when full). ``assigned`` lists the rows given to new ids in this
  call: re-initialise those embedding rows and reset their optimizer state.
- :class:`HashVocab`: the hashing trick, row = 1 + (mix64(id) mod buckets), stateless; distinct
  ids may share a row, and ``assigned`` is always empty.
"""

from __future__ import annotations

import torch
from torch import nn

from hmoe.ops.id_remap import (
    META_FIELDS,
    SENTINEL,
    IdRemapState,
    id_remap,
    mix64,
    new_state,
    state_bytes,
)

__all__ = ["DynamicVocab", "HashVocab"]


class DynamicVocab(nn.Module):
    """A dynamic vocabulary of ``capacity`` rows (see hmoe/ops/id_remap.py for the exact rule).

    Args:
        capacity: C, the rows 1..C that ids can own.
        min_count: sightings before an id gets its own row (until then it maps to row 0).
        pending_capacity: how many not-yet-admitted ids are counted at once (default C); the
            least recently seen count is dropped when full.

    Buffers (persistent: saved in state_dict and checkpoints, moved by ``.to(device)``):
    ``table`` (S, 2), ``nodes`` (C + P + 2, 4), ``meta`` (6,), all int64 — the state, mutated in
    place by every forward.

    forward(ids): ids int64 of any shape -> (rows (shape of ids) int64 in [0, num_rows),
    assigned (A,) int64: the rows assigned in this call, in admission order).
    """

    def __init__(self, capacity: int, min_count: int = 1, pending_capacity: int | None = None,
                 *, device: torch.device | str | None = None):
        super().__init__()
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
        state = new_state(capacity, pending_capacity, device=device)
        self.capacity = capacity
        self.pending_capacity = capacity if pending_capacity is None else pending_capacity
        self.min_count = min_count
        self.num_rows = capacity + 1
        for name, tensor in zip(IdRemapState._fields, state):
            self.register_buffer(name, tensor)

    @property
    def state(self) -> IdRemapState:
        return IdRemapState(self.table, self.nodes, self.meta)

    def state_bytes(self) -> int:
        """Bytes held by the state: 64 to 96 per row and pending entry, so 128 to 192 per row
        with the default pending capacity (the hash table rounds up to a power of two)."""
        return state_bytes(self.state)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return id_remap(self.state, ids, self.min_count)

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` as the vocabulary stands, changing nothing (evaluation): an
        admitted id's row, 0 for any other id. Probes the hash table as the kernels do (linear
        probing from mix64(id) mod S), all ids at once."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an int32 or int64 tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        flat = ids.reshape(-1).to(device=self.table.device, dtype=torch.int64)
        size = self.table.shape[0]  # a power of two
        slot = mix64(flat) & (size - 1)
        rows = torch.zeros_like(flat)
        active = flat != SENTINEL
        all_keys, all_nodes = self.table[:, 0].contiguous(), self.table[:, 1].contiguous()
        for _ in range(size):  # the table is at most half full: a few probes
            if not bool(active.any()):
                break
            keys, nodes = all_keys.index_select(0, slot), all_nodes.index_select(0, slot)
            hit = active & (keys == flat)
            rows = torch.where(hit & (nodes >= 1) & (nodes <= self.capacity), nodes, rows)
            active &= ~hit & (keys != SENTINEL)
            slot = (slot + 1) & (size - 1)
        return rows.view(ids.shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Same shapes do not mean same capacities (C + P is what sizes the tensors).
        meta = state_dict.get(prefix + "meta")
        if meta is not None and meta.shape == (META_FIELDS,):
            saved = tuple(meta[-2:].tolist())
            if saved != (self.capacity, self.pending_capacity):
                error_msgs.append(
                    f"{prefix}meta: the saved vocabulary has capacity {saved[0]} and "
                    f"pending_capacity {saved[1]}, this DynamicVocab has {self.capacity} and "
                    f"{self.pending_capacity}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity}, min_count={self.min_count}, "
                f"pending_capacity={self.pending_capacity}")


class HashVocab(nn.Module):
    """The hashing trick: row = 1 + (mix64(id) mod buckets), mix64 being splitmix64's finaliser
    of the id read as uint64 (hmoe.data.hashing.mix64). Stateless; row 0 is never used, so a
    HashVocab and a DynamicVocab of buckets = capacity size the same table (``num_rows``).

    forward(ids): ids int32/int64 of any shape -> (rows int64, assigned: an empty int64 tensor).
    """

    def __init__(self, buckets: int):
        super().__init__()
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets < 2**62:
            raise ValueError(f"buckets must be an integer in [1, 2**62), got {buckets!r}")
        self.buckets = buckets
        self.num_rows = buckets + 1

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an int32 or int64 tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        h = mix64(ids)
        # h as uint64, mod buckets, in int64 arithmetic: (2 (h >>> 1) + (h & 1)) mod buckets.
        half = (h >> 1) & (2**63 - 1)  # logical shift: h >>> 1, non-negative
        rows = ((half % self.buckets) * 2 + (h & 1)) % self.buckets + 1
        return rows, ids.new_empty(0, dtype=torch.int64)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` (the same as forward's: nothing to change)."""
        return self(ids)[0]

    def extra_repr(self) -> str:
        return f"buckets={self.buckets}"
