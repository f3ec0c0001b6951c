r"""Pass 2: parsed values -> columns in the batch layout of :mod:`hmoe.data.schema`.

Per row: categorical ids (N, F_c) — a value's id in its feature's vocabulary
(:mod:`hmoe.data.fit`), 0 (OOV/padding) where absent; numerics float32 (N, F_n), NaN where
missing; a sequence's kept items (the most recent ``max_len``, parsed by :mod:`hmoe.data.parse`)
stored oldest first at steps 0..length-1 with positions = recency rank (1 = most recent) or,
with a ``temporal_column``, ``hmoe.nn.time_buckets(delta, max_position)`` (base 2, unit 1 of the
column's unit); pre-trained vectors ``dim`` floats; labels float32 in {0, 1}; ``group_id`` the
group hash; ``exposure_count`` float32 >= 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmoe.data.parse import _Parsed, _Sequence
from hmoe.data.schema import Schema, SequenceFeature


def _encode(schema: Schema, parsed: _Parsed, indexes: Mapping[str, VocabularyIndex]
            ) -> dict[str, np.ndarray]:
    """One parsed chunk -> columns in the batch layout."""
    n = parsed.n
    out: dict[str, np.ndarray] = {}
    if schema.categorical:
        ids = np.zeros((n, len(schema.categorical)), dtype=np.int64)  # (n, F_c)
        for f, (feature, values) in enumerate(zip(schema.categorical, parsed.categorical)):
            ids[:, f] = (_lookup(values, indexes[feature.name]) if feature.name in indexes
                         else values)
        out["categorical"] = ids
    if schema.numeric:
        out["numeric"] = parsed.numeric.astype(np.float32)  # (n, F_n), NaN = missing
    for seq, values in zip(schema.sequence, parsed.sequences):
        out.update(_encode_sequence(seq, values, indexes.get(seq.item), n))
    for pre, (user, item) in zip(schema.pretrained, parsed.pretrained):
        out[f"pretrained/{pre.name}/user"] = user
        out[f"pretrained/{pre.name}/item"] = item
    out["labels"] = parsed.labels
    if schema.group_id is not None:
        out["group_id"] = parsed.group
    if schema.exposure_count is not None:
        out["exposure_count"] = parsed.exposure
    if parsed.times is not None:
        out["timestamp"] = parsed.times  # source.time_column, int64 seconds
    return out


def _encode_sequence(seq: SequenceFeature, values: _Sequence, index: VocabularyIndex | None,
                     n: int) -> dict[str, np.ndarray]:
    from hmoe.nn import time_buckets  # torch; only needed with a temporal column

    L, lengths = seq.max_len, values.lengths
    flat_ids = (_lookup(values.items, index) if index is not None
                else np.asarray(values.items, dtype=np.int64))
    steps = np.arange(L)
    valid = steps[None, :] < lengths[:, None]  # (n, L)
    ids = np.zeros((n, L), dtype=np.int64)
    ids[valid] = flat_ids  # row-major order = each row's items oldest first
    if values.deltas is None:
        positions = np.where(valid, lengths[:, None] - steps[None, :], 0)  # rank 1 = newest
    else:
        import torch

        buckets = time_buckets(torch.from_numpy(values.deltas), seq.num_positions).numpy()
        positions = np.zeros((n, L), dtype=np.int64)
        positions[valid] = buckets
    key = f"seq/{seq.name}"
    return {key: ids, f"{key}/lengths": lengths.astype(np.int64),
            f"{key}/positions": positions.astype(np.int64)}


def _fixed_width(strings: pa.Array) -> np.ndarray:
    """(n,) the UTF-8 bytes of each (non-null) string as a NUL-padded numpy ``S`` array."""
    binary = pc.cast(strings, pa.large_binary())
    if isinstance(binary, pa.ChunkedArray):
        binary = binary.combine_chunks()
    n = len(binary)
    offsets = np.frombuffer(binary.buffers()[1], dtype=np.int64)[binary.offset:
                                                                 binary.offset + n + 1]
    data = np.frombuffer(binary.buffers()[2], dtype=np.uint8) if n else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    width = max(int(lengths.max(initial=0)), 1)
    out = np.zeros((n, width), dtype=np.uint8)
    for column in range(width):  # one pass per byte position: O(n * width), no per-row Python
        rows = np.flatnonzero(lengths > column)
        out[rows, column] = data[offsets[rows] + column]
    return out.view(f"S{width}").reshape(n)


class VocabularyIndex:
    """value -> id of one vocabulary, compact: the values' UTF-8 bytes sorted (a numpy ``S``
    array, about longest-value bytes each) beside their ids, looked up by binary search per
    distinct value of a chunk. A dict of Python strings would cost ~100 bytes a value, too much
    for the 10^7-value vocabularies of ads ids. (numpy ignores trailing NUL bytes when it
    compares, so values that differ only by trailing NULs would share an id.)"""

    def __init__(self, values: pa.Array):
        raw = _fixed_width(values)  # (V,) in id order: id i is values[i - 1]
        order = np.argsort(raw, kind="stable")
        self.sorted_values = raw[order]
        self.sorted_ids = (order + 1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def lookup(self, strings: pa.Array) -> np.ndarray:
        """(n,) int64 ids of ``strings``, 0 where absent or null."""
        if len(strings) == 0:
            return np.zeros(0, dtype=np.int64)
        encoded = pc.dictionary_encode(strings)
        keys = _fixed_width(encoded.dictionary)  # (d,) the chunk's distinct values
        ids = np.zeros(len(keys) + 1, dtype=np.int64)  # the last entry: null -> 0
        if len(self) and len(keys):
            width = self.sorted_values.dtype.itemsize
            fits = np.char.str_len(keys) <= width  # longer keys cannot be in the vocabulary
            probe = keys.astype(self.sorted_values.dtype)
            at = np.minimum(np.searchsorted(self.sorted_values, probe), len(self) - 1)
            found = fits & (self.sorted_values[at] == probe)
            ids[:-1] = np.where(found, self.sorted_ids[at], 0)
        return ids[pc.fill_null(encoded.indices, -1).to_numpy()]


def _lookup(strings: pa.Array, index: VocabularyIndex) -> np.ndarray:
    """(n,) int64 ids of ``strings`` in a vocabulary, 0 where absent."""
    return index.lookup(strings)
