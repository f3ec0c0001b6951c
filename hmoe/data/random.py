"""Random batches in a schema's layout (hmoe.data.schema), for tests and benchmarks.

Every value is valid for the schema: categorical ids uniform in [0, vocab_size); numeric values
spread over the feature's quantizer range (uniform: [lo, lo + (max_code + 1)·step); log:
e^U(0, 6) - 1; quantile: between the first and last boundary, or mean + std·N(0, 1) without
boundaries), a fraction ``missing_rate`` of them NaN (missing); sequences of uniform length in
[0, L] with item ids in [1, vocab) at valid steps and 0 at padding, rank positions 1..length
(most recent first; with a temporal column, non-decreasing random time buckets in
[1, max_position]) and 0 at padding; pre-trained vectors N(0, 1); labels Bernoulli(0.3);
group ids in [0, max(1, B // 4)); exposure counts in {1, ..., 4}. No structure is planted:
a model can only memorise such a batch.
"""

from __future__ import annotations

import torch

from hmoe.data.schema import NumericFeature, Schema, SequenceFeature

__all__ = ["random_batch"]


def random_batch(schema: Schema, batch_size: int, *, seq_len: int | None = None,
                 generator: torch.Generator | None = None,
                 missing_rate: float = 0.05) -> dict[str, torch.Tensor]:
    """A batch of ``batch_size`` random rows (see the module docstring).

    Args:
        schema: categorical features need their vocab_size.
        batch_size: B >= 0.
        seq_len: L of every sequence (default: each feature's max_len; must not exceed it).
        generator: a torch.Generator for reproducible batches (default: the global one).
        missing_rate: the probability that a numeric value is NaN, in [0, 1].
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if not 0.0 <= missing_rate <= 1.0:
        raise ValueError(f"missing_rate must lie in [0, 1], got {missing_rate}")
    B, g = batch_size, generator
    batch: dict[str, torch.Tensor] = {}
    if schema.categorical:
        columns = []
        for f in schema.categorical:
            if f.vocab_size is None:
                raise ValueError(f"categorical feature {f.name!r} has no vocab_size")
            columns.append(torch.randint(0, f.vocab_size, (B,), generator=g))
        batch["categorical"] = torch.stack(columns, dim=1)  # (B, F_c)
    if schema.numeric:
        values = torch.stack([_numeric(f, B, g) for f in schema.numeric], dim=1)  # (B, F_n)
        missing = torch.rand(values.shape, generator=g) < missing_rate
        batch["numeric"] = torch.where(missing, float("nan"), values)
    for s in schema.sequence:
        batch.update(_sequence(schema, s, B, seq_len, g))
    for p in schema.pretrained:
        batch[f"pretrained/{p.name}/user"] = torch.randn(B, p.dim, generator=g)  # (B, P)
        batch[f"pretrained/{p.name}/item"] = torch.randn(B, p.dim, generator=g)
    batch["labels"] = (torch.rand(B, len(schema.labels), generator=g) < 0.3).float()  # (B, T)
    if schema.group_id is not None:
        batch["group_id"] = torch.randint(0, max(1, B // 4), (B,), generator=g)
    if schema.exposure_count is not None:
        batch["exposure_count"] = torch.randint(1, 5, (B,), generator=g).float()
    return batch


def _numeric(f: NumericFeature, B: int, g) -> torch.Tensor:
    u = torch.rand(B, generator=g)  # (B,)
    if f.quantizer == "uniform" and f.max_code is not None:
        return f.lo + u * (f.max_code + 1) * f.step
    if f.quantizer == "log":
        return torch.expm1(6.0 * u)
    if f.quantizer == "quantile" and f.boundaries:
        lo, hi = min(f.boundaries), max(f.boundaries)
        return lo + u * (hi - lo)
    return f.mean + f.std * torch.randn(B, generator=g)


def _sequence(schema: Schema, s: SequenceFeature, B: int, seq_len: int | None,
              g) -> dict[str, torch.Tensor]:
    L = s.max_len if seq_len is None else seq_len
    if not 0 <= L <= s.max_len:
        raise ValueError(f"seq_len must lie in [0, max_len={s.max_len}] for sequence {s.name!r}, "
                         f"got {L}")
    vocab = schema.categorical[schema.categorical_index(s.item)].vocab_size
    if vocab is None:
        raise ValueError(f"categorical feature {s.item!r} (items of {s.name!r}) has no vocab_size")
    lengths = torch.randint(0, L + 1, (B,), generator=g)  # (B,)
    valid = torch.arange(L) < lengths[:, None]  # (B, L)
    ids = torch.randint(1, max(vocab, 2), (B, L), generator=g) % vocab  # (B, L)
    max_position = s.max_position or s.max_len
    if s.temporal_column is None:
        positions = torch.arange(1, L + 1).expand(B, L)  # ranks, most recent first
    else:
        buckets = torch.randint(1, max_position + 1, (B, L), generator=g)
        positions = buckets.sort(dim=1).values  # time buckets grow with the distance
    key = f"seq/{s.name}"
    return {key: torch.where(valid, ids, 0),
            f"{key}/lengths": lengths,
            f"{key}/positions": torch.where(valid, positions.clamp(max=max_position), 0)}
