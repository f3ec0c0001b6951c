r"""What the analysis modules share: input conversion, the model's embedding tables, figures.

Figures are ``matplotlib.figure.Figure`` objects drawn on an Agg canvas attached to each figure
(:func:`new_figure`), never through ``pyplot``: no backend switch, no global figure registry, so
importing or running the analysis leaves matplotlib's global state as it was. matplotlib is an
optional dependency (the ``analysis`` extra); it is imported only when a figure is drawn.

An HMoE model keeps the categorical table of every embedding set of dim D as plane k of one
MultiEmbedding weight (N, K, D); field f owns rows ``offsets[f]:offsets[f+1]``
(hmoe.nn.multi_embedding). :func:`field_slices` reads those offsets, :func:`set_table` one plane.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hmoe.models.hmoe import HMoE

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["as_array", "check_model", "field_slices", "figure_png", "new_figure", "set_table"]


# --------------------------------------------------------------------------------------------
# Inputs


def as_array(value: Any, name: str, *, ndim: int | None = None, kind: str | None = None,
             dtype=None) -> np.ndarray:
    """``value`` (numpy array, torch tensor or nested list) as a numpy array.

    Args:
        name: the argument's name, for the error messages.
        ndim: the required number of dimensions (None: any).
        kind: "int" (integer or bool values), "real" (int or float, no complex) or None.
        dtype: the dtype of the result (None: keep).
    Raises TypeError for a non-array or the wrong kind, ValueError for the wrong ndim.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    elif not isinstance(value, np.ndarray):
        if isinstance(value, (str, bytes, Mapping)) or value is None:
            raise TypeError(f"{name} must be an array or tensor, got {type(value).__name__}")
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be an array or tensor: {error}") from None
    if kind == "int" and not (np.issubdtype(value.dtype, np.integer) or value.dtype == bool):
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    if kind == "real" and not (np.issubdtype(value.dtype, np.integer)
                               or np.issubdtype(value.dtype, np.floating)
                               or value.dtype == bool):
        raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {value.shape}")
    return value if dtype is None else value.astype(dtype, copy=False)


def check_model(model: Any, name: str = "model") -> HMoE:
    """``model`` if it is an hmoe.models.HMoE, else TypeError."""
    if not isinstance(model, HMoE):
        raise TypeError(f"{name} must be an hmoe.models.HMoE, got {type(model).__name__}")
    return model


def check_set(model: HMoE, set_name: str) -> tuple[int, int]:
    """(group, plane) of embedding set ``set_name``; ValueError naming the known sets."""
    if set_name not in model.set_location:
        raise ValueError(f"set_name: unknown embedding set {set_name!r}; sets: "
                         f"{list(model.set_location)}")
    return model.set_location[set_name]


# --------------------------------------------------------------------------------------------
# The model's tables


def field_slices(model: HMoE) -> dict[str, tuple[int, int]]:
    """{categorical field name: (first row, end row)} in the fused categorical table, in schema
    order (MultiEmbedding.offsets; every group has the same offsets)."""
    if not model.schema.categorical:
        raise ValueError("the model's schema has no categorical features")
    offsets = model.groups[0].categorical.offsets.tolist()  # (F + 1,)
    return {f.name: (offsets[i], offsets[i + 1]) for i, f in enumerate(model.schema.categorical)}


def set_table(model: HMoE, set_name: str, state: Mapping[str, torch.Tensor] | None = None
              ) -> np.ndarray:
    """Set ``set_name``'s categorical table (N, D_s) as float64 numpy: from the model, or from
    ``state`` (a state_dict of the same architecture, e.g. a training snapshot)."""
    group, plane = check_set(model, set_name)
    if state is None:
        table = model.embedding_table(set_name)  # (N, D)
    else:
        weight = model.groups[group].categorical.weight
        key = next(n for n, p in model.named_parameters() if p is weight)
        if key not in state:
            raise ValueError(f"state has no {key!r} (not a state_dict of this model?)")
        table = state[key][:, plane]  # (N, D)
    return table.detach().to("cpu", torch.float64).numpy()


# --------------------------------------------------------------------------------------------
# Figures


def new_figure(width: float, height: float) -> Figure:
    """A Figure of ``width`` x ``height`` inches with its own Agg canvas (no pyplot)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is installed in the tests
        raise ImportError("figures need matplotlib (pip install 'hmoe[analysis]')") from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """The PNG bytes of ``figure`` (no "Software" metadata: the file names no URL)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True
