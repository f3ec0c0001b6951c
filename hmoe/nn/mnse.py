"""hmoe.nn.MNSE: numeric features as digit codes in several bases (see hmoe/ops/mnse.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hmoe.ops.mnse import MISSING, MODES, digits_needed, mnse, num_rows

__all__ = ["MNSE"]


class MNSE(nn.Module):
    """Multiple Numeral Systems Encoding of F quantised numeric fields.

    Args:
        num_fields: F.
        dim: output width per field; in mode "concat" each base gets dim / len(bases) columns.
        max_values: the largest code of each field (one int for all, or F ints). Larger codes
            are clamped to it and counted in ``num_clipped`` (or raise with ``strict=True``).
        bases: the numeral systems, e.g. (2, 3, 10).
        mode: "concat" (bases side by side) or "sum" (bases added).
        num_sets: K embedding sets (one per expert); K > 1 returns (K, B, F, dim).
        num_digits: digits per base; default: just enough for max(max_values). Given explicitly,
            each base must be able to write max(max_values).
        strict: raise instead of clamping codes above max_values.

    Parameters: ``weight`` (F, R, E), or (F, R, K, E) with K sets, R = sum_b b·K_b;
    ``missing`` (F, dim), or (K, F, dim): the vector of a missing (NaN) value.

    forward(codes): (B, F) int32/int64 codes in [0, max_values[f]], or floats that are floored,
    NaN meaning missing. Returns (B, F, dim), or (K, B, F, dim) with K sets.
    """

    def __init__(
        self,
        num_fields: int,
        dim: int,
        max_values: int | Sequence[int],
        bases: Sequence[int] = (2, 3, 10),
        mode: str = "concat",
        num_sets: int = 1,
        *,
        num_digits: Sequence[int] | None = None,
        strict: bool = False,
        init_std: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_fields < 1 or dim < 1 or num_sets < 1:
            raise ValueError(f"num_fields, dim and num_sets must be >= 1, got {num_fields}, {dim}, "
                             f"{num_sets}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        bases = tuple(int(b) for b in bases)
        if not bases or any(b < 2 for b in bases):
            raise ValueError(f"bases must be a non-empty sequence of integers >= 2, got {bases}")
        if mode == "concat" and dim % len(bases) != 0:
            raise ValueError(f"dim ({dim}) must be divisible by len(bases) ({len(bases)}) in mode "
                             f"'concat'")
        if isinstance(max_values, int):
            max_values = [max_values] * num_fields
        max_values = [int(v) for v in max_values]
        if len(max_values) != num_fields or min(max_values) < 0:
            raise ValueError(f"max_values must be {num_fields} integers >= 0, got {max_values}")
        top = max(max_values)
        if num_digits is None:
            num_digits = tuple(digits_needed(top, b) for b in bases)
        else:
            num_digits = tuple(int(k) for k in num_digits)
            if len(num_digits) != len(bases):
                raise ValueError(f"num_digits must have one entry per base {bases}, got {num_digits}")
            for b, k in zip(bases, num_digits):
                if k < 1 or b ** k <= top:
                    raise ValueError(f"base {b} with {k} digits writes codes up to {b ** k - 1}, "
                                     f"below max_values {top}")
        self.num_fields, self.dim, self.num_sets = num_fields, dim, num_sets
        self.bases, self.num_digits, self.mode, self.strict = bases, num_digits, mode, strict
        self.embedding_dim = dim // len(bases) if mode == "concat" else dim  # E
        R = num_rows(bases, num_digits)
        factory = {"device": device, "dtype": dtype}
        shape = (num_fields, R, self.embedding_dim) if num_sets == 1 else \
            (num_fields, R, num_sets, self.embedding_dim)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        missing_shape = (num_fields, dim) if num_sets == 1 else (num_sets, num_fields, dim)
        self.missing = nn.Parameter(torch.empty(missing_shape, **factory))
        self.register_buffer("max_values", torch.tensor(max_values, dtype=torch.int64, device=device))
        self.register_buffer("num_clipped", torch.zeros((), dtype=torch.int64, device=device))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A code sums sum_b K_b rows: scale them so an output column has std about init_std.
        per_column = math.sqrt(max(self.num_digits) if self.mode == "concat" else sum(self.num_digits))
        nn.init.normal_(self.weight, std=self.init_std / per_column)
        nn.init.normal_(self.missing, std=self.init_std)

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, dim={self.dim}, bases={self.bases}, "
                f"num_digits={self.num_digits}, mode={self.mode!r}, num_sets={self.num_sets}")

    def _codes(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validated int64 codes with -1 for missing, and the missing mask (None for int input)."""
        if codes.dim() != 2 or codes.shape[1] != self.num_fields:
            raise ValueError(f"codes must be (B, F={self.num_fields}), got shape {tuple(codes.shape)}")
        compiling = torch.compiler.is_compiling()
        missing = None
        if codes.is_floating_point():
            missing = torch.isnan(codes)
            raw = torch.where(missing, 0.0, codes)
            if not compiling and bool((raw < 0).any()):
                raise ValueError(f"codes must be >= 0 (NaN for missing), got {float(raw.min())}")
            floored = raw.floor()
            above = floored > self.max_values  # 5.5 with max 5 is code 5: not clipped
            # Clamp in float first: a huge float would overflow int64.
            values = torch.minimum(floored, self.max_values.to(floored.dtype)).long()
        elif codes.dtype in (torch.int32, torch.int64):
            values = codes.long()
            if not compiling and values.numel() > 0 and int(values.min()) < 0:
                raise ValueError(f"codes must be >= 0, got {int(values.min())} (use float codes with "
                                 f"NaN for missing values)")
            above = values > self.max_values
            values = torch.minimum(values, self.max_values)
        else:
            raise TypeError(f"codes must be int32, int64 or floating point, got {codes.dtype}")
        if self.strict and not compiling and bool(above.any()):
            b, f = (int(i) for i in above.nonzero()[0])
            raise ValueError(f"codes: field {f} (sample {b}) has code {codes[b, f].item()}, above "
                             f"max_values[{f}] = {int(self.max_values[f])} (strict=True)")
        with torch.no_grad():
            self.num_clipped += above.sum()
        if missing is not None:
            values = torch.where(missing, MISSING, values)
        return values, missing

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        values, missing = self._codes(codes)
        weight = self.weight if self.num_sets > 1 else self.weight.unsqueeze(2)  # (F, R, K, E)
        out = mnse(weight, values, self.bases, self.num_digits, self.mode)  # (K, B, F, dim)
        if missing is not None:
            vector = self.missing if self.num_sets > 1 else self.missing.unsqueeze(0)  # (K, F, dim)
            out = torch.where(missing[None, :, :, None], vector[:, None], out)
        return out if self.num_sets > 1 else out[0]
