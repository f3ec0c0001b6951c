r"""Dimensional collapse: singular spectra and information abundance of embedding tables.

Design section 3.8; paper notes section 3.1 (the Multi-Embedding paper's metric, as its official
notebook computes it). For an embedding matrix E (N, D) of one field, with rows L2-normalised
(e_i / (‖e_i‖ + 1e-8)) and singular values σ_1 >= ... >= σ_D (zero-padded when N < D):

    spectrum(E) = σ / σ_1                                                          (D,)
    IA(E)       = ‖σ‖_1 / ‖σ‖_∞ = Σ_k σ_k / max_k σ_k  = the spectrum's sum,    IA in [1, D]

A table that spans all D directions evenly has IA = D; a collapsed one, whose rows lie near a
low-dimensional subspace, has IA ≪ D. A field with N < D rows has rank <= N, so IA <= N: the
low-cardinality fields collapse by construction, and by interaction they confine the others
(the paper's "interaction-collapse"). Multi-embedding (several sets, one per expert) keeps IA
higher than a single embedding of the same total size.

Per model: :func:`field_spectra` (set -> field -> spectrum, fields by cardinality),
:func:`collapse_summary` (set -> field -> IA), :func:`compare_collapse` (several models), and
:func:`ia_over_training` (IA at training snapshots). Figures: :func:`plot_spectra_heatmap`
(fields x singular index), :func:`plot_ia_comparison` (IA per field, one bar per model/set) and
:func:`plot_ia_over_training` (IA against the step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hmoe.analysis._common import as_array, check_model, check_set, field_slices, new_figure, \
    set_table

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from hmoe.models.hmoe import HMoE

__all__ = ["collapse_summary", "compare_collapse", "field_spectra", "ia_over_training",
           "information_abundance", "plot_ia_comparison", "plot_ia_over_training",
           "plot_spectra_heatmap", "singular_spectrum"]

ROW_EPS = 1e-8  # the notebook's row-normalisation guard


def _check_table(table: Any, name: str = "table") -> np.ndarray:
    table = as_array(table, name, ndim=2, kind="real", dtype=np.float64)  # (N, D)
    if table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {table.shape}")
    if not np.isfinite(table).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return table


def singular_spectrum(table: Any, normalize_rows: bool = True) -> np.ndarray:
    """σ / σ_max of ``table`` (N, D), descending, float64, length D (zero-padded when N < D).

    Args:
        table: (N, D) numpy array or tensor of real numbers, finite.
        normalize_rows: divide every row by its L2 norm (+ 1e-8) first, as the paper's analysis
            does, so that frequent ids with large norms do not dominate the spectrum.
    An all-zero table has no direction: its spectrum is all zeros.
    """
    table = _check_table(table)
    if normalize_rows:
        table = table / (np.linalg.norm(table, axis=1, keepdims=True) + ROW_EPS)  # (N, D)
    sigma = np.linalg.svd(table, compute_uv=False)  # (min(N, D),) descending
    spectrum = np.zeros(table.shape[1])
    if sigma.size and sigma[0] > 0:
        spectrum[:sigma.size] = sigma / sigma[0]
    return spectrum


def information_abundance(table: Any, normalize_rows: bool = True) -> float:
    """IA = Σσ / max σ of ``table`` (N, D), in [1, D]; NaN for an all-zero table.

    ``normalize_rows`` as in :func:`singular_spectrum` (rows L2-normalised first, the paper's
    rule; pass False for the plain matrix IA)."""
    spectrum = singular_spectrum(table, normalize_rows)
    return float(spectrum.sum()) if spectrum[0] > 0 else float("nan")


def _field_spectra_of(table: np.ndarray, slices: Mapping[str, tuple[int, int]]
                      ) -> dict[str, np.ndarray]:
    """{field: spectrum (D,)} of the fields with >= 2 rows, by cardinality (ties: schema
    order)."""
    fields = [(stop - start, i, name) for i, (name, (start, stop)) in enumerate(slices.items())
              if stop - start >= 2]
    return {name: singular_spectrum(table[slices[name][0]:slices[name][1]])
            for _, _, name in sorted(fields)}


def field_spectra(model: HMoE, set_name: str, *, state: Mapping[str, torch.Tensor] | None = None
                  ) -> dict[str, np.ndarray]:
    """{categorical field: normalised spectrum (D_s,)} of embedding set ``set_name``.

    Each field's spectrum is :func:`singular_spectrum` of its rows of the set's table (every row
    of the field's slice, the out-of-vocabulary id 0 included). Fields with fewer than 2 rows are
    skipped; the dict is ordered by cardinality, smallest first. ``state``: read the table from
    this state_dict of the model's architecture instead of the model's current weights.
    """
    model = check_model(model)
    check_set(model, set_name)
    return _field_spectra_of(set_table(model, set_name, state), field_slices(model))


def collapse_summary(model: HMoE, *, state: Mapping[str, torch.Tensor] | None = None
                     ) -> dict[str, dict[str, float]]:
    """{set: {field: IA}} for every embedding set of ``model`` (fields by cardinality, as in
    :func:`field_spectra`); ``state`` as there."""
    model = check_model(model)
    return {name: {field: float(s.sum()) if s[0] > 0 else float("nan")
                   for field, s in field_spectra(model, name, state=state).items()}
            for name in model.set_location}


def compare_collapse(models: Mapping[str, HMoE]) -> dict[str, dict[str, float]]:
    """{"<model label>/<set>": {field: IA}} over several models, e.g. {"single": dnn model,
    "multi": me_mmoe model}: the input of :func:`plot_ia_comparison`."""
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty dict {label: HMoE}")
    return {f"{label}/{name}": ia
            for label, model in models.items()
            for name, ia in collapse_summary(check_model(model, f"models[{label!r}]")).items()}


def ia_over_training(model: HMoE, snapshots: Sequence[tuple[int, Any]],
                     set_names: Sequence[str] | None = None) -> dict:
    """IA per field at training snapshots.

    Args:
        model: an HMoE of the snapshots' architecture (its own weights are not used when a
            snapshot is a state_dict).
        snapshots: (step, HMoE or state_dict) pairs, e.g. collected every k steps.
        set_names: the sets to follow (default: all).
    Returns {"steps": [step, ...], "sets": {set: {field: [IA at each step]}}}.
    """
    model = check_model(model)
    if isinstance(snapshots, (str, bytes, Mapping)) or not isinstance(snapshots, Sequence) \
            or not snapshots:
        raise TypeError("snapshots must be a non-empty list of (step, model or state_dict)")
    names = list(model.set_location) if set_names is None else list(set_names)
    for name in names:
        check_set(model, name)
    steps, sets = [], {name: {} for name in names}
    for i, snapshot in enumerate(snapshots):
        if not (isinstance(snapshot, (tuple, list)) and len(snapshot) == 2):
            raise TypeError(f"snapshots[{i}] must be a (step, model or state_dict) pair")
        step, source = snapshot
        holder, state = (source, None) if not isinstance(source, Mapping) else (model, source)
        holder = check_model(holder, f"snapshots[{i}][1]")
        steps.append(int(step))
        for name in names:
            for field, spectrum in field_spectra(holder, name, state=state).items():
                sets[name].setdefault(field, []).append(float(spectrum.sum()))
    return {"steps": steps, "sets": sets}


# --------------------------------------------------------------------------------------------
# Figures


def plot_spectra_heatmap(spectra: Mapping[str, Mapping[str, np.ndarray]],
                         title: str = "Normalised singular spectra per field") -> Figure:
    """Heatmaps of per-field spectra, one panel per table.

    ``spectra``: {table label: {field: spectrum (D,)}} (e.g. {set: field_spectra(model, set)}),
    fields in the order given (by cardinality: :func:`field_spectra` orders them). Row = field,
    labelled "name (IA)"; column = singular-value index 1..D; colour = σ_k / σ_1.
    """
    if not isinstance(spectra, Mapping) or not spectra:
        raise TypeError("spectra must be a non-empty dict {table: {field: spectrum}}")
    panels = [(label, fields) for label, fields in spectra.items() if fields]
    if not panels:
        raise ValueError("spectra holds no field spectrum to draw")
    rows = max(len(fields) for _, fields in panels)
    figure = new_figure(4.2 * len(panels) + 1.0, 0.32 * rows + 1.6)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (label, fields) in zip(axes, panels):
        matrix = _stack_spectra(label, fields)  # (F, D)
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest",
                          extent=(0.5, matrix.shape[1] + 0.5, matrix.shape[0] - 0.5, -0.5))
        ax.set_yticks(range(len(fields)))
        ax.set_yticklabels([f"{f} ({s.sum():.1f})" for f, s in fields.items()], fontsize=7)
        ax.set_xlabel("singular value index")
        ax.set_title(str(label), fontsize=9)
    figure.colorbar(image, ax=list(axes), label="σ_k / σ_1", shrink=0.9)
    figure.suptitle(title, fontsize=10)
    return figure


def _stack_spectra(label, fields: Mapping[str, np.ndarray]) -> np.ndarray:
    arrays = [as_array(s, f"spectra[{label!r}][{f!r}]", ndim=1, kind="real", dtype=np.float64)
              for f, s in fields.items()]
    width = max(a.size for a in arrays)
    matrix = np.zeros((len(arrays), width))
    for i, a in enumerate(arrays):
        matrix[i, :a.size] = a
    return matrix


def plot_ia_comparison(summaries: Mapping[str, Mapping[str, float]],
                       title: str = "Information abundance per field") -> Figure:
    """Grouped bars of IA per field, one bar per table (model/set): single- vs multi-embedding.

    ``summaries``: {table label: {field: IA}} (e.g. :func:`compare_collapse`, or the values of
    :func:`collapse_summary`). Fields on x in the order they first appear.
    """
    if not isinstance(summaries, Mapping) or not summaries:
        raise TypeError("summaries must be a non-empty dict {table: {field: IA}}")
    fields = list(dict.fromkeys(f for ia in summaries.values() for f in ia))
    if not fields:
        raise ValueError("summaries holds no field")
    figure = new_figure(max(5.0, 0.55 * len(fields) * max(1, len(summaries)) ** 0.5 + 2.0), 3.4)
    ax = figure.subplots()
    width = 0.8 / len(summaries)
    x = np.arange(len(fields))
    for i, (label, ia) in enumerate(summaries.items()):
        values = [float(ia.get(f, np.nan)) for f in fields]
        ax.bar(x - 0.4 + (i + 0.5) * width, values, width, label=str(label))
    ax.set_xticks(x)
    ax.set_xticklabels(fields, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IA = Σσ / max σ")
    ax.margins(y=0.2)  # room for the legend above the bars
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(4, len(summaries)))
    return figure


def plot_ia_over_training(history: Mapping, title: str = "Information abundance over training"
                          ) -> Figure:
    """IA per field against the step (the output of :func:`ia_over_training`), one panel per
    set."""
    if not isinstance(history, Mapping) or "steps" not in history or "sets" not in history:
        raise TypeError("history must be the dict ia_over_training returns")
    steps, sets = list(history["steps"]), dict(history["sets"])
    if not sets:
        raise ValueError("history holds no set")
    figure = new_figure(4.0 * len(sets) + 1.0, 3.2)
    axes = figure.subplots(1, len(sets), squeeze=False)[0]
    for ax, (name, fields) in zip(axes, sets.items()):
        for field, values in fields.items():
            ax.plot(steps, values, marker="o", markersize=3, label=field)
        ax.set_xlabel("step")
        ax.set_ylabel("IA")
        ax.set_title(str(name), fontsize=9)
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(title, fontsize=10)
    return figure
