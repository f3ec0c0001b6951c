r"""Quantizers: raw numeric features (B, F) -> non-negative integer codes for hmoe.nn.MNSE.

MNSE (Pan et al. 2024, section 3.2) encodes an integer code v >= 0; a raw value x must first be
mapped to one. Each quantizer here is a parameter-free module whose state (the per-field
constants, or the fitted boundaries) lives in buffers, so it is saved and restored with the
model's ``state_dict``:

    AffineQuantizer:    v = clamp(floor((x - lo) / step), 0, max_value)
    LogQuantizer:       "criteo": v = floor(ln(x)^2) if x > 2 else floor(max(x, 0))
                        "log1p":  v = floor(ln(1 + max(x, 0)) · scale)
                        then clamp(v, 0, max_value)
    QuantileQuantizer:  v = #{boundaries of the field <= x}, boundaries the field's quantiles at
                        1/n, ..., (n-1)/n fitted on data, so v in [0, n - 1]

forward(x): x (B, F), any real dtype, NaN meaning missing. Returns float codes (B, F), already
floored, in [0, max_values[f]], NaN where x is NaN (MNSE maps NaN to its learned missing vector).
Codes are float32 (float64 for float64 input); float32 holds every integer code below 2**24
exactly. Build the matching encoder with ``MNSE(F, dim, quantizer.max_values)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["AffineQuantizer", "LogQuantizer", "QuantileQuantizer", "Quantizer"]

Scalars = float | Sequence[float]


def _is_scalar(value) -> bool:
    return isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.dim() == 0)


def _per_field(name: str, value: Scalars, num_fields: int) -> list[float]:
    """``value`` as num_fields floats: a scalar is repeated, a sequence must have F entries."""
    if _is_scalar(value):
        return [float(value)] * num_fields
    values = [float(v) for v in value]
    if len(values) != num_fields:
        raise ValueError(f"{name} must be a scalar or {num_fields} values (one per field), got "
                         f"{len(values)} values")
    return values


def _infer_num_fields(num_fields: int | None, **per_field: Scalars) -> int:
    """F from the lengths of the sequence arguments, checked against ``num_fields`` if given."""
    lengths = {name: len(v) for name, v in per_field.items() if not _is_scalar(v)}
    if num_fields is None:
        if not lengths:
            raise ValueError(f"num_fields is needed when {', '.join(per_field)} are all scalars")
        if len(set(lengths.values())) > 1:
            got = ", ".join(f"{name}: {length}" for name, length in lengths.items())
            raise ValueError(f"the per-field arguments must have one length F, got {got} values")
        num_fields = next(iter(lengths.values()))
    if num_fields < 1:
        raise ValueError(f"num_fields must be >= 1, got {num_fields}")
    for name, length in lengths.items():
        if length != num_fields:
            raise ValueError(f"{name} must be a scalar or {num_fields} values (one per field), got "
                             f"{length} values")
    return num_fields


def _int_per_field(name: str, value: int | Sequence[int], num_fields: int) -> list[int]:
    values = _per_field(name, value, num_fields)
    if any(not math.isfinite(v) or v < 0 or v != math.floor(v) for v in values):
        raise ValueError(f"{name} must be integers >= 0, got {values}")
    return [int(v) for v in values]


class KeepBufferDtypes(nn.Module):
    """A module whose own buffers follow ``.to(device)`` but ignore dtype casts (``.half()``).

    For buffers that define a mapping (boundaries, projections): rounding them to a lower
    precision would silently change the codes a trained model was fitted with.
    """

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self


class Quantizer(KeepBufferDtypes):
    """Base class: input checks, NaN passthrough, flooring and clamping to [0, max_value].

    Subclasses implement ``_raw_codes(x)`` (x checked and float64, NaN where missing; returns
    the values before flooring and clamping, whatever they are at NaN) and ``max_values``.

    The floating buffers (constants, boundaries) are float64 and keep that dtype under
    ``module.to(dtype)`` / ``.half()`` (see KeepBufferDtypes).
    """

    num_fields: int | None

    @property
    def max_values(self) -> list[int]:
        """The largest code of each field (F ints): pass it to ``MNSE(F, dim, max_values)``."""
        raise NotImplementedError

    def _raw_codes(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"x must be a real (integer or floating point) tensor, got {x.dtype}")
        F = self.num_fields
        if x.dim() != 2 or (F is not None and x.shape[1] != F):
            expected = f"(B, F={F})" if F is not None else "(B, F)"
            raise ValueError(f"x must be {expected}, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, F), NaN = missing -> float codes (B, F) in [0, max_values[f]], NaN kept."""
        self._check_input(x)
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(torch.float64)
        missing = torch.isnan(x)
        codes = self._raw_codes(x).floor().clamp(min=0)  # (B, F)
        # ±inf inputs land on 0 or max_value; missing entries are restored to NaN below.
        codes = torch.minimum(codes, self.max_value.to(codes.dtype))
        return torch.where(missing, float("nan"), codes).to(out_dtype)



class AffineQuantizer(Quantizer):
    """Uniform buckets: code = clamp(floor((x - lo) / step), 0, max_value), per field.

    Args:
        lo: the value of code 0's lower edge (a scalar for all fields, or F values).
        step: the bucket width, > 0 (scalar or F values).
        max_value: the largest code (scalar or F ints >= 0); x at or above
            lo + max_value · step gets max_value, x below lo gets 0.
        num_fields: F; needed only when lo, step and max_value are all scalars.

    Buffers: ``lo``, ``step`` (F,) float64, ``max_value`` (F,) int64.
    """

    def __init__(
        self,
        lo: Scalars,
        step: Scalars,
        max_value: int | Sequence[int],
        *,
        num_fields: int | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        F = _infer_num_fields(num_fields, lo=lo, step=step, max_value=max_value)
        lo_values, step_values = _per_field("lo", lo, F), _per_field("step", step, F)
        if not all(math.isfinite(v) for v in lo_values):
            raise ValueError(f"lo must be finite, got {lo_values}")
        if not all(math.isfinite(v) and v > 0 for v in step_values):
            raise ValueError(f"step must be finite and > 0, got {step_values}")
        self.num_fields = F
        factory = {"dtype": torch.float64, "device": device}
        self.register_buffer("lo", torch.tensor(lo_values, **factory))  # (F,)
        self.register_buffer("step", torch.tensor(step_values, **factory))  # (F,)
        self.register_buffer("max_value", torch.tensor(_int_per_field("max_value", max_value, F),
                                                       dtype=torch.int64, device=device))  # (F,)

    @property
    def max_values(self) -> list[int]:
        return self.max_value.tolist()

    def _raw_codes(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.lo) / self.step  # (B, F)

    def extra_repr(self) -> str:
        return f"num_fields={self.num_fields}, max_values={self.max_values}"


LOG_TRANSFORMS = ("criteo", "log1p")


class LogQuantizer(Quantizer):
    r"""Logarithmic buckets for heavy-tailed counts, per field.

    transform "criteo" (the Criteo Display Advertising Challenge winners' transform, also used by
    the ME paper's Criteo loader: ``int(log(v) ** 2) if v > 2``):

        code = floor(ln(x)^2)      for x > 2
        code = floor(max(x, 0))    for x <= 2     (0, 1, 2 kept as codes; negatives -> 0)

    Note it is not monotonic just above 2: ln(2.5)^2 = 0.84, so 2 -> 2 but 2.5 -> 0 and 3 -> 1
    (the original shares those tokens too); codes grow monotonically from x = e^sqrt(2) ≈ 4.11.

    transform "log1p" (monotonic): code = floor(ln(1 + max(x, 0)) · scale).

    Both are then clamped to [0, max_value].

    Args:
        num_fields: F.
        transform: "criteo" or "log1p".
        scale: codes per unit of ln(1 + x), > 0 ("log1p" only).
        max_value: the largest code (scalar or F ints). Default: the code of the largest finite
            float32 (3.4e38), i.e. 7871 for "criteo" and floor(88.72 · scale) for "log1p", so that
            no float32 input is clamped.

    Buffers: ``max_value`` (F,) int64.
    """

    def __init__(
        self,
        num_fields: int,
        transform: str = "criteo",
        *,
        scale: float = 1.0,
        max_value: int | Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {num_fields}")
        if transform not in LOG_TRANSFORMS:
            raise ValueError(f"transform must be one of {LOG_TRANSFORMS}, got {transform!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        if transform == "criteo" and scale != 1.0:
            raise ValueError("scale applies to transform='log1p' only")
        self.num_fields, self.transform, self.scale = num_fields, transform, float(scale)
        if max_value is None:
            top = math.log(torch.finfo(torch.float32).max)
            max_value = math.floor(top ** 2 if transform == "criteo" else top * self.scale)
        self.register_buffer("max_value", torch.tensor(
            _int_per_field("max_value", max_value, num_fields), dtype=torch.int64, device=device))

    @property
    def max_values(self) -> list[int]:
        return self.max_value.tolist()

    def _raw_codes(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(min=0)  # NaN stays NaN
        if self.transform == "log1p":
            return torch.log1p(x) * self.scale
        return torch.where(x > 2, torch.log(x.clamp(min=2)) ** 2, x)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale}" if self.transform == "log1p" else ""
        return (f"num_fields={self.num_fields}, transform={self.transform!r}{scale}, "
                f"max_values={self.max_values}")


class QuantileQuantizer(Quantizer):
    """Equal-frequency buckets fitted on data: code = number of the field's boundaries <= x.

    ``fit(x)`` sets the boundaries of field f to the quantiles of its finite values at
    q = 1/n, ..., (n-1)/n (n = num_bins, linear interpolation as numpy's default), so codes lie in
    [0, n - 1]. A value that fills more than 1/n of a field repeats a boundary; the codes in
    between are then never emitted (harmless to MNSE).

    Args:
        num_bins: n >= 2.
        num_fields: F, if known now: the ``boundaries`` buffer then has its shape (F, n - 1) from
            the start. Otherwise F is taken from the data at ``fit`` or from the loaded state_dict.

    Buffers: ``boundaries`` (F, n - 1) float64, ``fitted`` () bool. Using an unfitted quantizer
    raises RuntimeError.
    """

    def __init__(
        self,
        num_bins: int,
        num_fields: int | None = None,
        *,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if num_fields is not None and num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {num_fields}")
        self.num_bins = num_bins
        self._fixed_fields = num_fields is not None
        self._is_fitted = False  # mirrors the ``fitted`` buffer; a Python bool for torch.compile
        self.register_buffer("boundaries", torch.full((num_fields or 0, num_bins - 1), float("nan"),
                                                      dtype=torch.float64, device=device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))

    @property
    def num_fields(self) -> int | None:  # type: ignore[override]
        return self.boundaries.shape[0] if self._fixed_fields or self._is_fitted else None

    @property
    def max_value(self) -> torch.Tensor:
        return torch.full((self.boundaries.shape[0],), self.num_bins - 1, dtype=torch.int64,
                          device=self.boundaries.device)

    @property
    def max_values(self) -> list[int]:
        if self.num_fields is None:
            raise RuntimeError("QuantileQuantizer does not know its number of fields yet: call "
                               ".fit(x) or give num_fields")
        return [self.num_bins - 1] * self.num_fields

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> QuantileQuantizer:
        """Fit each field's boundaries on x (B, F), ignoring NaN and ±inf. Returns self."""
        self._check_input(x)
        if self.num_fields is None and self.boundaries.shape[0] != x.shape[1]:
            self.boundaries = self.boundaries.new_empty(x.shape[1], self.num_bins - 1)
        x = x.detach().to(torch.float64)
        q = torch.arange(1, self.num_bins, dtype=torch.float64, device=x.device) / self.num_bins
        for f in range(x.shape[1]):
            values = x[:, f][torch.isfinite(x[:, f])].sort().values  # (n_f,)
            if values.numel() == 0:
                raise ValueError(f"x: field {f} has no finite values to fit quantiles on")
            position = q * (values.numel() - 1)  # (num_bins - 1,)
            below = position.floor().long()
            above = position.ceil().long()
            boundary = values[below] + (values[above] - values[below]) * (position - below)
            self.boundaries[f] = boundary.to(self.boundaries.device)
        self.fitted.fill_(True)
        self._is_fitted = True
        return self

    def _raw_codes(self, x: torch.Tensor) -> torch.Tensor:
        if not self._is_fitted:
            raise RuntimeError("QuantileQuantizer is not fitted: call .fit(x) on training data "
                               "first, or load a fitted state_dict")
        values = torch.where(torch.isnan(x), 0.0, x).T.contiguous()  # (F, B)
        codes = torch.searchsorted(self.boundaries, values, right=True)  # (F, B)
        return codes.T.to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Without a fixed num_fields the buffer takes the saved number of fields.
        saved = state_dict.get(prefix + "boundaries")
        if (not self._fixed_fields and isinstance(saved, torch.Tensor) and saved.dim() == 2
                and saved.shape[1] == self.num_bins - 1):
            self.boundaries = self.boundaries.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._is_fitted = bool(self.fitted)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, num_fields={self.num_fields}, fitted={self._is_fitted}"
