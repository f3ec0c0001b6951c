r"""In-memory columns -> mini-batches in the batch layout of :mod:`hmoe.data.schema`.

``columns`` is a dict of arrays (numpy or torch) sharing their first dimension N, keyed as in the
batch layout (``"categorical"`` (N, F_c), ``"seq/<name>"`` (N, L), ``"labels"`` (N, T), ...).
Keys outside the layout (e.g. the synthetic world's ``"true/click"``) travel along unchanged.

:func:`iterate_batches` converts every column once to a contiguous tensor of its layout dtype
(:func:`hmoe.data.schema.batch_dtype`), and, when shuffling, gathers each column once by one
permutation per call (``torch.randperm`` seeded by ``seed``: the same seed gives the same batches
on every machine). Each batch is then a slice ``[start, start + batch_size)`` of every column, a
contiguous view with no copy; callers must not modify batches in place. For a new order each
epoch pass ``seed=base_seed + epoch``.

:func:`check_columns` is the boundary check of columns against a schema (shapes, dtypes, id
ranges, lengths, positions, labels), raising ValueError naming the column and the offending value.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hmoe.data.schema import Schema, batch_dtype, batch_keys

__all__ = ["BatchIterator", "check_columns", "iterate_batches", "num_rows", "to_tensors"]

Column = np.ndarray | torch.Tensor


def num_rows(columns: Mapping[str, Column]) -> int:
    """N, the common first dimension of every column; ValueError if they disagree."""
    if not columns:
        raise ValueError("columns is empty: need at least one column")
    sizes = {}
    for key, column in columns.items():
        if column.ndim == 0:
            raise ValueError(f"columns[{key!r}] is a scalar; every column needs a row dimension")
        sizes[key] = int(column.shape[0])
    if len(set(sizes.values())) > 1:
        raise ValueError(f"columns disagree on the number of rows: "
                         f"{', '.join(f'{k}: {n}' for k, n in sizes.items())}")
    return next(iter(sizes.values()))


def _as_tensor(key: str, column: Column) -> torch.Tensor:
    if isinstance(column, torch.Tensor):
        return column
    if isinstance(column, np.ndarray):
        if not column.flags.writeable:  # torch.from_numpy warns on (and shares) read-only memory
            column = column.copy()
        return torch.from_numpy(np.ascontiguousarray(column))
    raise TypeError(f"columns[{key!r}] must be a numpy array or a torch tensor, got "
                    f"{type(column).__name__}")


def _to_tensor(key: str, column: Column) -> torch.Tensor:
    tensor = _as_tensor(key, column)
    dtype = batch_dtype(key)
    if dtype is not None and tensor.dtype != dtype:
        if dtype == torch.int64 and (tensor.is_floating_point() or tensor.is_complex()):
            raise TypeError(f"columns[{key!r}] must hold integer ids (int64), got {tensor.dtype}")
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def to_tensors(columns: Mapping[str, Column]) -> dict[str, torch.Tensor]:
    """Every column as a contiguous tensor of its layout dtype (numpy memory shared where the
    dtype already matches)."""
    tensors = {key: _to_tensor(key, column) for key, column in columns.items()}
    num_rows(tensors)
    return tensors


class BatchIterator:
    """The iterator :func:`iterate_batches` returns; ``len()`` is the number of batches."""

    def __init__(self, tensors: dict[str, torch.Tensor], num_rows: int, batch_size: int,
                 drop_last: bool):
        self._tensors, self._num_rows, self._batch_size = tensors, num_rows, batch_size
        stop = num_rows - num_rows % batch_size if drop_last else num_rows
        self._starts = iter(range(0, stop, batch_size))
        self._len = len(range(0, stop, batch_size))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = next(self._starts)
        stop = min(start + self._batch_size, self._num_rows)
        return {key: tensor[start:stop] for key, tensor in self._tensors.items()}


def iterate_batches(columns: Mapping[str, Column], batch_size: int, *, shuffle: bool = False,
                    seed: int = 0, drop_last: bool = False) -> BatchIterator:
    """Mini-batches of ``columns``: dicts of contiguous tensors of up to ``batch_size`` rows.

    Args:
        columns: arrays sharing the first dimension N, keyed as in the batch layout.
        batch_size: rows per batch, >= 1; the last batch may be smaller unless ``drop_last``.
        shuffle: visit the rows in the order of a permutation drawn from ``seed``; otherwise in
            order.
        seed: the permutation's seed (ignored without shuffle).
        drop_last: skip the final batch when it has fewer than ``batch_size`` rows.
    Raises ValueError for columns with different N or a bad batch_size, TypeError for a
    non-integer id column. Validation and conversion happen here, before the first batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tensors = to_tensors(columns)
    n = num_rows(tensors)
    if shuffle:
        generator = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=generator)  # (N,)
        tensors = {key: t.index_select(0, order.to(t.device)) for key, t in tensors.items()}
    return BatchIterator(tensors, n, batch_size, drop_last)


# --------------------------------------------------------------------------------------------
# The boundary check.


def _fail(key: str, message: str):
    raise ValueError(f"columns[{key!r}]: {message}")


def _check_shape(key: str, tensor: torch.Tensor, shape: tuple) -> None:
    """``shape`` entries None match any size."""
    if tensor.dim() != len(shape) or any(s is not None and s != t
                                         for s, t in zip(shape, tensor.shape)):
        expected = str(tuple("*" if s is None else s for s in shape)).replace("'", "")
        _fail(key, f"expected shape {expected}, got {tuple(tensor.shape)}")


def _check_ids(key: str, ids: torch.Tensor, vocab_size: int | None, what: str,
               bounds: tuple[int, int] | None = None) -> None:
    """Ids in [0, vocab_size); ``bounds`` their (min, max) when already known."""
    if ids.numel() == 0:
        return
    low, high = bounds if bounds is not None else (int(v) for v in torch.aminmax(ids))
    if low < 0:
        _fail(key, f"{what} has negative id {low}")
    if vocab_size is not None and high >= vocab_size:
        _fail(key, f"{what} has id {high} >= its vocab_size {vocab_size}")


def check_columns(columns: Mapping[str, Column], schema: Schema, *,
                  check_values: bool = True) -> None:
    """Checks that ``columns`` follow the batch layout of ``schema``.

    Shapes and dtypes always; with ``check_values`` also the values: categorical and sequence
    ids in [0, vocab_size) (where the vocab size is known), lengths in [0, L] with L <= max_len,
    positions in [1, max_position] at valid steps, labels in {0, 1}, exposure counts >= 1.
    Extra keys are allowed. Raises ValueError naming the column.
    """
    n = num_rows(columns)
    missing = [key for key in batch_keys(schema) if key not in columns]
    if missing:
        raise ValueError(f"columns lack {missing} (the batch layout of schema {schema.name!r} "
                         f"has {list(batch_keys(schema))})")
    tensors = {key: _as_tensor(key, columns[key]) for key in batch_keys(schema)}
    for key, tensor in tensors.items():
        expected = batch_dtype(key)
        if tensor.dtype != expected:
            _fail(key, f"expected dtype {expected}, got {tensor.dtype}")
    if schema.categorical:
        ids = tensors["categorical"]
        _check_shape("categorical", ids, (n, len(schema.categorical)))
        if check_values and n:
            lows, highs = (v.tolist() for v in torch.aminmax(ids, dim=0))  # one pass, all fields
            for f, feature in enumerate(schema.categorical):
                # (raw ids of dynamic and hash vocabularies: any id >= 0, the model maps them)
                _check_ids("categorical", ids[:, f], None if feature.raw_ids
                           else feature.vocab_size, f"field {feature.name!r}",
                           (lows[f], highs[f]))
    if schema.numeric:
        _check_shape("numeric", tensors["numeric"], (n, len(schema.numeric)))
    for seq in schema.sequence:
        key = f"seq/{seq.name}"
        ids, lengths, positions = (tensors[key], tensors[f"{key}/lengths"],
                                   tensors[f"{key}/positions"])
        _check_shape(key, ids, (n, None))
        steps = ids.shape[1]
        if steps > seq.max_len:
            _fail(key, f"has {steps} steps, more than max_len {seq.max_len}")
        _check_shape(f"{key}/lengths", lengths, (n,))
        _check_shape(f"{key}/positions", positions, (n, steps))
        if not check_values:
            continue
        item = schema.categorical[schema.categorical_index(seq.item)]
        _check_ids(key, ids, None if item.raw_ids else item.vocab_size,
                   f"sequence {seq.name!r}")
        shortest, longest = (int(v) for v in torch.aminmax(lengths)) if n else (0, 0)
        if shortest < 0 or longest > steps:
            _fail(f"{key}/lengths", f"lengths must lie in [0, {steps}], got "
                                    f"[{shortest}, {longest}]")
        if longest > 0:
            valid = torch.arange(steps, device=lengths.device) < lengths[:, None]  # (N, L)
            # padding read as a valid 1: one pass, no gather of the valid steps
            low, high = torch.aminmax(positions.masked_fill(~valid, 1))
            if int(low) < 1 or int(high) > seq.num_positions:
                _fail(f"{key}/positions", f"positions at valid steps must lie in "
                                          f"[1, {seq.num_positions}], got [{int(low)}, "
                                          f"{int(high)}]")
    for pre in schema.pretrained:
        for side in ("user", "item"):
            key = f"pretrained/{pre.name}/{side}"
            _check_shape(key, tensors[key], (n, pre.dim))
    labels = tensors["labels"]
    _check_shape("labels", labels, (n, len(schema.labels)))
    if check_values and not bool(((labels == 0) | (labels == 1)).all()):
        _fail("labels", "labels must be 0 or 1")
    if schema.group_id is not None:
        _check_shape("group_id", tensors["group_id"], (n,))
    if schema.exposure_count is not None:
        counts = tensors["exposure_count"]
        _check_shape("exposure_count", counts, (n,))
        if check_values and n and not bool((counts >= 1).all()):
            _fail("exposure_count", f"exposure counts must be >= 1, got minimum "
                                    f"{float(counts.min())}")
