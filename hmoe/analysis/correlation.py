r"""Behaviour–target correlation: the ground truth from counts, and what a sequence encoder learned.

Design section 3.8; paper notes sections 6.1 and 6.2 (TIM paper, Pan et al. 2024, Fig. 1/4).

Ground truth (notes 6.1). Among the rows whose target has category c_t, let X_{c,p} be the
indicator "the behaviour at target-relative position p (1 = most recent) has category c" and Y
the label. From the counts

    x_p = #positive rows with X_{c,p} = 1,   x_n = #negative rows with X_{c,p} = 1,
    t_p, t_n = #positive, #negative rows,    s = t_p + t_n,

    MI(c, p) = Σ_{x, y ∈ {0, 1}} n_xy / s · log2(n_xy · s / (n_x· · n_·y))        (bits)
             = x_p/s·log2(x_p·s/((x_p+x_n)·t_p)) + x_n/s·log2(x_n·s/((x_p+x_n)·t_n))
             + (t_p−x_p)/s·log2((t_p−x_p)·s/((s−x_p−x_n)·t_p))
             + (t_n−x_n)/s·log2((t_n−x_n)·s/((s−x_p−x_n)·t_n)),

every zero count replaced by 1e-5 (so empty cells add ~0). MI is 0 when X and Y are
independent and H(Y) when X decides Y. :func:`ground_truth_mi` counts with ``np.bincount``.

Learned correlation (notes 6.2), for behaviour item c at position p and the target item t, with
E the set's table of the sequence's item field (row = item id) and D its dim:

    TIM (hmoe.nn.TemporalInterest):  ẽ = E[c] + P[p],  ṽ = E[t] + P[0]
        corr(c, p) = exp(⟨ẽ, ṽ⟩ / √D) · ‖ẽ ⊙ ṽ‖            (the unnormalised attention weight of
                                                            the behaviour times the norm of what
                                                            it adds to u)
        with H heads: the mean over heads of exp(⟨ẽ_h, ṽ_h⟩ / √(D/H)), the heads' own scale;
        without temporal encoding P = 0 (constant in p); without the target-aware
        representation the value is ẽ, so the norm is ‖ẽ‖.
        ``gauss_softmax=True`` gives the paper script's variant instead of exp(·): the logits
        over the whole (C, P) grid Gauss-normalised, then a softmax over the grid.
    DIN (hmoe.nn.DINAttention): the activation unit's weight w = MLP([e, v, e−v, e⊙v]) of
        e = E[c] for v = E[t] (eval mode, Dice's running statistics), times the value norm:
        corr(c, p) = |w| · ‖E[c]‖, the size of the behaviour's term w·e of u. DIN has no
        positions, so every column is the same.
    SASRec-style (hmoe.nn.SelfAttentionTarget): each (c, p) as a one-step sequence, behaviour
        E[c] at position p, through the encoder: h = Encoder(E[c] + PE[p]); then the target
        attention's logit and value: corr(c, p) = exp(⟨h, E[t]⟩ / √D) · ‖h‖. (A one-step
        sequence isolates (c, p); in longer sequences h also mixes in the older steps.)
    Mean pooling: the behaviour adds e / n whatever the target: corr(c, p) = ‖E[c]‖.

All in float64 on copies, so the model is left untouched. Maps are (C, P): row c − 1 holds item
id c (category ids 1..C in the synthetic world's ``hist_categories`` sequence, whose item is
``ad_category``), column p − 1 position p.

:func:`similarity` scores a learned map against the truth (Spearman's rank correlation of the
flattened maps by default: only the order matters, as the two are on different scales), and
:func:`plot_correlation_maps` draws maps side by side, each min-max normalised (as the paper).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hmoe.analysis._common import as_array, check_model, check_set, field_slices, new_figure

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from hmoe.models.hmoe import HMoE

__all__ = ["ground_truth_mi", "learned_correlation", "min_max", "plot_correlation_maps",
           "sequence_encoder", "similarity"]

ZERO_COUNT = 1e-5  # notes 6.1: zero counts replaced by this


# --------------------------------------------------------------------------------------------
# Ground truth: mutual information from counts


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_sequences(categories, positions, lengths, labels, targets):
    """The inputs of :func:`ground_truth_mi` as numpy arrays, shapes and values checked."""
    categories = as_array(categories, "categories", ndim=2, kind="int", dtype=np.int64)  # (N, L)
    positions = as_array(positions, "positions", ndim=2, kind="int", dtype=np.int64)  # (N, L)
    lengths = as_array(lengths, "lengths", ndim=1, kind="int", dtype=np.int64)  # (N,)
    labels = as_array(labels, "labels", ndim=1, kind="real", dtype=np.float64)  # (N,)
    targets = as_array(targets, "targets", ndim=1, kind="int", dtype=np.int64)  # (N,)
    n, steps = categories.shape
    if positions.shape != (n, steps):
        raise ValueError(f"positions must have the shape of categories {(n, steps)}, got "
                         f"{positions.shape}")
    for name, array in (("lengths", lengths), ("labels", labels), ("targets", targets)):
        if array.shape != (n,):
            raise ValueError(f"{name} must have shape (N,) = ({n},), got {array.shape}")
    if n and (lengths.min() < 0 or lengths.max() > steps):
        raise ValueError(f"lengths must lie in [0, L={steps}], got [{lengths.min()}, "
                         f"{lengths.max()}]")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    valid = np.arange(steps)[None, :] < lengths[:, None]  # (N, L)
    if (categories[valid] < 0).any():
        raise ValueError("categories must be >= 0 at valid steps (0: out of vocabulary)")
    if (positions[valid] < 1).any():
        raise ValueError("positions must be >= 1 at valid steps (1 = most recent)")
    return categories, positions, valid, labels, targets


def _binary_mi(x_p: np.ndarray, x_n: np.ndarray, t_p: float, t_n: float) -> np.ndarray:
    """MI (bits) between a binary feature and a binary label from the counts of notes 6.1."""
    s = t_p + t_n

    def safe(count):
        count = np.asarray(count, dtype=np.float64)
        return np.where(count == 0, ZERO_COUNT, count)

    shown, hidden = safe(x_p + x_n), safe(s - x_p - x_n)  # n_1·, n_0·
    positives, negatives = safe(t_p), safe(t_n)  # n_·1, n_·0
    cells = ((x_p, shown, positives), (x_n, shown, negatives),
             (t_p - x_p, hidden, positives), (t_n - x_n, hidden, negatives))
    return sum(safe(n) / s * np.log2(safe(n) * s / (row * column)) for n, row, column in cells)


def ground_truth_mi(categories: Any, positions: Any, lengths: Any, labels: Any, targets: Any,
                    target_category: int, num_categories: int, max_position: int) -> np.ndarray:
    """MI (bits) between "behaviour at position p has category c" and the label, (C, P).

    Args:
        categories: (N, L) behaviour category ids (item ids of a category sequence); 0 is OOV.
        positions: (N, L) target-relative positions, >= 1 at valid steps (1 = most recent).
        lengths: (N,) valid steps per row, in [0, L]; steps >= length are padding.
        labels: (N,) in {0, 1}.
        targets: (N,) the category id of each row's target.
        target_category: c_t; only rows whose target is c_t are counted.
        num_categories: C, the grid's rows hold category ids 1..C.
        max_position: P, the grid's columns hold positions 1..P.
    Returns (C, P) float64: entry [c − 1, p − 1] is MI(c, p) of the module docstring. A row
    counts once per (c, p) even if several of its steps share that cell (time buckets);
    categories outside [1, C] and positions above P lie outside the grid and are not counted.
    Raises ValueError when no row has target c_t, or for bad shapes and values (TypeError for
    non-integer ids).
    """
    num_categories = _check_positive_int(num_categories, "num_categories")
    max_position = _check_positive_int(max_position, "max_position")
    categories, positions, valid, labels, targets = _check_sequences(
        categories, positions, lengths, labels, targets)
    rows = targets == int(target_category)  # (N,)
    if not rows.any():
        raise ValueError(f"target_category: no row has target {target_category}")
    categories, positions, valid, labels = (categories[rows], positions[rows], valid[rows],
                                            labels[rows])
    C, P = num_categories, max_position
    in_grid = valid & (categories >= 1) & (categories <= C) & (positions <= P)  # (n, L)
    row, step = np.nonzero(in_grid)  # (m,)
    cell = (categories[row, step] - 1) * P + (positions[row, step] - 1)  # (m,) in [0, C·P)
    row_cell = np.unique(row * (C * P) + cell)  # one count per (row, cell)
    row, cell = row_cell // (C * P), row_cell % (C * P)
    shown = np.bincount(cell, minlength=C * P).astype(np.float64)  # (C·P,) x_p + x_n
    x_p = np.bincount(cell, weights=labels[row], minlength=C * P)  # (C·P,)
    t_p = float(labels.sum())
    t_n = float(labels.size) - t_p
    return _binary_mi(x_p, shown - x_p, t_p, t_n).reshape(C, P)


# --------------------------------------------------------------------------------------------
# Learned correlation


def sequence_encoder(model: HMoE, sequence_name: str, set_name: str) -> torch.nn.Module:
    """The encoder of sequence ``sequence_name`` in embedding set ``set_name`` (with
    ModelConfig.joint_sequences, the one encoder of all the set's sequences)."""
    model = check_model(model)
    group, plane = check_set(model, set_name)
    names = [s.name for s in model.schema.sequence]
    if sequence_name not in names:
        raise ValueError(f"sequence_name: unknown sequence feature {sequence_name!r}; the "
                         f"schema has {names}")
    if model.groups[group].joint:  # one encoder reads every sequence (joint_sequences)
        return model.groups[group].sequences[0][plane]
    return model.groups[group].sequences[names.index(sequence_name)][plane]


def _item_table(model: HMoE, sequence_name: str, set_name: str) -> np.ndarray:
    """The set's rows of the sequence's item field (V, D) float64: row i embeds item id i."""
    feature = next(s for s in model.schema.sequence if s.name == sequence_name)
    start, stop = field_slices(model)[feature.item]
    table = model.embedding_table(set_name)[start:stop]  # (V, D)
    return table.detach().to("cpu", torch.float64).numpy()


def learned_correlation(model: HMoE, sequence_name: str, set_name: str, target_category: int,
                        *, num_categories: int | None = None, max_position: int | None = None,
                        gauss_softmax: bool = False) -> np.ndarray:
    """The correlation map (C, P) that set ``set_name``'s encoder of ``sequence_name`` learned.

    Args:
        model: an HMoE whose schema has the sequence feature.
        sequence_name: the sequence; its item field's rows of the set's table are E.
        set_name: the embedding set (each set has its own encoder).
        target_category: the target's item id t (a category id for a category sequence).
        num_categories: C, rows for item ids 1..C (default: every item id, vocab_size − 1).
        max_position: P, columns for positions 1..P (default: the encoder's largest position).
        gauss_softmax: TIM only, the paper script's normalisation (module docstring).
    Returns (C, P) float64, the quantity of the module docstring for the encoder's kind.
    """
    from hmoe.nn import DINAttention, MeanPooling, SelfAttentionTarget, TemporalInterest

    encoder = sequence_encoder(model, sequence_name, set_name)
    if model.config.joint_sequences and len(model.schema.sequence) > 1:
        raise ValueError("model: its sequences are attended jointly (joint_sequences), so no "
                         f"encoder reads {sequence_name!r} alone to map")
    items = _item_table(model, sequence_name, set_name)  # (V, D)
    vocab = items.shape[0]
    feature = next(s for s in model.schema.sequence if s.name == sequence_name)
    largest = getattr(encoder, "max_position", feature.num_positions)
    C = vocab - 1 if num_categories is None else _check_positive_int(num_categories,
                                                                     "num_categories")
    P = largest if max_position is None else _check_positive_int(max_position, "max_position")
    if C > vocab - 1:
        raise ValueError(f"num_categories must be <= {vocab - 1} (the item ids of "
                         f"{feature.item!r}), got {C}")
    if P > largest:
        raise ValueError(f"max_position must be <= {largest} (the encoder's), got {P}")
    if isinstance(target_category, bool) or not isinstance(target_category, (int, np.integer)) \
            or not 0 <= target_category < vocab:
        raise ValueError(f"target_category must be an item id in [0, {vocab}), got "
                         f"{target_category!r}")
    behaviours, target = items[1:C + 1], items[int(target_category)]  # (C, D), (D,)
    if isinstance(encoder, TemporalInterest):
        return _tim_map(encoder, behaviours, target, P, gauss_softmax)
    if gauss_softmax:
        raise ValueError("gauss_softmax applies to TIM encoders only")
    if isinstance(encoder, DINAttention):
        return _din_map(encoder, behaviours, target, P)
    if isinstance(encoder, SelfAttentionTarget):
        return _sasrec_map(encoder, behaviours, target, P)
    if isinstance(encoder, MeanPooling):
        return np.repeat(np.linalg.norm(behaviours, axis=1)[:, None], P, axis=1)  # (C, P)
    raise TypeError(f"no learned correlation for encoder {type(encoder).__name__}")


def _tim_map(encoder, behaviours: np.ndarray, target: np.ndarray, P: int,
             gauss_softmax: bool) -> np.ndarray:
    C, D = behaviours.shape
    H = encoder.num_heads
    table = encoder.position_embedding.detach().to("cpu", torch.float64).numpy()  # (P_max+1, D)
    e = behaviours[:, None, :] + table[None, 1:P + 1, :]  # (C, P, D) ẽ
    v = target + table[0]  # (D,) ṽ
    logits = (e * v).reshape(C, P, H, D // H).sum(-1) / math.sqrt(D // H)  # (C, P, H)
    if gauss_softmax:
        flat = logits.reshape(C * P, H)
        flat = (flat - flat.mean(0)) / np.where(flat.std(0) > 0, flat.std(0), 1.0)
        flat = np.exp(flat - flat.max(0))
        weight = (flat / flat.sum(0)).mean(-1).reshape(C, P)  # (C, P)
    else:
        weight = np.exp(logits).mean(-1)  # (C, P)
    value = e * v if encoder.target_aware else e  # (C, P, D)
    return weight * np.linalg.norm(value, axis=-1)


def _float64_copy(encoder: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode float64 copy (Dice uses its running statistics, dropout is off)."""
    return copy.deepcopy(encoder).to("cpu", torch.float64).eval()


def _din_map(encoder, behaviours: np.ndarray, target: np.ndarray, P: int) -> np.ndarray:
    din = _float64_copy(encoder)
    e = torch.from_numpy(behaviours)[None]  # (1, C, D)
    v = torch.from_numpy(target)[None]  # (1, D)
    with torch.no_grad():
        score = din.scores(e, v, torch.ones(e.shape[:2], dtype=torch.bool))[0].numpy()  # (C,)
    size = np.abs(score) * np.linalg.norm(behaviours, axis=1)  # (C,)
    return np.repeat(size[:, None], P, axis=1)  # (C, P)


def _sasrec_map(encoder, behaviours: np.ndarray, target: np.ndarray, P: int) -> np.ndarray:
    sasrec = _float64_copy(encoder)
    C, D = behaviours.shape
    steps = torch.from_numpy(np.repeat(behaviours, P, axis=0))[:, None]  # (C·P, 1, D)
    positions = torch.arange(1, P + 1).repeat(C)[:, None]  # (C·P, 1): row c·P + p − 1
    lengths = torch.ones(C * P, dtype=torch.int64)
    with torch.no_grad():
        h = sasrec.encode(steps, positions, lengths)[:, 0].numpy()  # (C·P, D)
    logits = h @ target / math.sqrt(D)  # (C·P,)
    return (np.exp(logits) * np.linalg.norm(h, axis=1)).reshape(C, P)


# --------------------------------------------------------------------------------------------
# Scores and figures


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n−1 of ``values``, ties sharing their average rank."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / norm if norm > 0 else float("nan")


def similarity(learned: Any, truth: Any, method: str = "spearman") -> float:
    """How well ``learned`` reproduces ``truth`` (maps of one shape), in [−1, 1].

    method "spearman" (default): Pearson's correlation of the ranks of the flattened maps (ties
    averaged), so any monotone rescaling of either map leaves it unchanged; "pearson": of the
    values themselves. NaN when either map is constant.
    """
    learned = as_array(learned, "learned", kind="real", dtype=np.float64)
    truth = as_array(truth, "truth", kind="real", dtype=np.float64)
    if learned.shape != truth.shape:
        raise ValueError(f"learned and truth must have one shape, got {learned.shape} and "
                         f"{truth.shape}")
    if learned.size < 2:
        raise ValueError(f"the maps need >= 2 entries, got shape {learned.shape}")
    for name, array in (("learned", learned), ("truth", truth)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} holds NaN or infinite values")
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    a, b = learned.ravel(), truth.ravel()
    if method == "spearman":
        a, b = _ranks(a), _ranks(b)
    return _pearson(a, b)


def min_max(values: Any) -> np.ndarray:
    """(x − min) / (max − min), float64 (all zeros for a constant map)."""
    values = as_array(values, "values", kind="real", dtype=np.float64)
    span = float(values.max() - values.min()) if values.size else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def plot_correlation_maps(maps: Mapping[str, Any], *, target_category: int | None = None,
                          title: str | None = None) -> Figure:
    """Side-by-side heatmaps (category x position) of correlation maps, each min-max normalised.

    ``maps``: {panel title: (C, P) map}, e.g. {"ground truth MI": mi, "TIM (shared)": learned};
    row c − 1 is category c, column p − 1 position p (1 = most recent).
    """
    if not isinstance(maps, Mapping) or not maps:
        raise TypeError("maps must be a non-empty dict {title: (C, P) map}")
    arrays = {str(k): as_array(v, f"maps[{k!r}]", ndim=2, kind="real", dtype=np.float64)
              for k, v in maps.items()}
    C, P = next(iter(arrays.values())).shape
    figure = new_figure(min(3.0 + 0.12 * P, 6.0) * len(arrays) + 0.8, 0.22 * C + 1.8)
    axes = figure.subplots(1, len(arrays), squeeze=False)[0]
    image = None
    for ax, (name, array) in zip(axes, arrays.items()):
        image = ax.imshow(min_max(array), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0,
                          interpolation="nearest",
                          extent=(0.5, array.shape[1] + 0.5, array.shape[0] + 0.5, 0.5))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("position (1 = most recent)")
        ax.set_ylabel("behaviour category")
    figure.colorbar(image, ax=list(axes), label="min-max normalised", shrink=0.9)
    suffix = f" (target category {target_category})" if target_category is not None else ""
    figure.suptitle((title or "Behaviour-target correlation") + suffix, fontsize=10)
    return figure
