r"""Interest entanglement: where each table puts contradictory user–item pairs, and how the
tasks' gradients on shared embeddings agree.

Design section 3.8; paper notes section 6.4 (STEM paper, Su et al. 2024, Fig. 5).

Distances. For one embedding table (one set), user u and item i with embeddings e_u, e_i (rows
of the user and item fields' slices):

    d(u, i) = ‖e_u − e_i‖_2                    (Euclidean: the experts are MLPs, as the paper)

A contradictory pair is one the tasks judge differently: the user clicks but does not convert
(:func:`label_contradictions`: the two labels disagree), or, in the synthetic world, the target
category is one of the user's browse interests but not the purchase category, or the reverse
(:func:`interest_conflicts`), or the paper's rule from two single-task models' distances
(:func:`distance_contradictions`: far for one task, near for the other). A shared table must
place such pairs at one distance for both tasks (entangled); a task's own table can place them
as its task needs. :func:`entanglement_distances` gives the distances of every row's pair and of
the contradictory rows, per set; :func:`plot_distance_histograms` their histograms.

Gradients. For task losses L_t and shared parameters θ (e.g. the shared set's slices),

    cos(a, b) = ⟨∇_θ L_a, ∇_θ L_b⟩ / (‖∇_θ L_a‖ ‖∇_θ L_b‖)                      NaN if a norm is 0

(:func:`task_gradient_cosine`); negative values mean the tasks pull the shared embeddings in
opposite directions (negative transfer). :class:`GradientCosineRecorder` keeps a history over
training in the trainer's metrics.jsonl record format, ``{"step", "cosine": {"a|b": c}}``, and
:func:`plot_gradient_cosine` draws it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hmoe.analysis._common import as_array, check_model, check_set, field_slices, new_figure, \
    set_table
from hmoe.models.hmoe import SetSlice

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from hmoe.data.schema import Schema
    from hmoe.models.hmoe import HMoE

__all__ = ["GradientCosineRecorder", "distance_contradictions", "entanglement_distances",
           "entanglement_summary", "interest_conflicts", "label_contradictions",
           "pair_distances", "plot_distance_histograms", "plot_gradient_cosine",
           "task_gradient_cosine"]

PAIR_SEPARATOR = "|"  # "a|b", as the trainer's grad_cosine records


# --------------------------------------------------------------------------------------------
# Distances of user-item pairs


def pair_distances(user_emb: Any, item_emb: Any, pairs: Any) -> np.ndarray:
    """‖user_emb[u] − item_emb[i]‖_2 for each (u, i) of ``pairs``, float64 (M,).

    Args:
        user_emb: (U, D) user embeddings (row = user id).
        item_emb: (I, D) item embeddings (row = item id), the same D.
        pairs: (M, 2) int (user id, item id) pairs.
    """
    user_emb = as_array(user_emb, "user_emb", ndim=2, kind="real", dtype=np.float64)
    item_emb = as_array(item_emb, "item_emb", ndim=2, kind="real", dtype=np.float64)
    pairs = as_array(pairs, "pairs", ndim=2, kind="int", dtype=np.int64)
    if user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"user_emb and item_emb must have one width D, got shapes "
                         f"{user_emb.shape} and {item_emb.shape}")
    if pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (M, 2) (user id, item id), got shape {pairs.shape}")
    for column, (name, table) in enumerate((("user", user_emb), ("item", item_emb))):
        ids = pairs[:, column]
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise ValueError(f"pairs[:, {column}]: {name} ids must lie in [0, "
                             f"{table.shape[0]}), got [{ids.min()}, {ids.max()}]")
    return np.linalg.norm(user_emb[pairs[:, 0]] - item_emb[pairs[:, 1]], axis=1)  # (M,)


def _column(columns: Mapping[str, Any], key: str) -> np.ndarray:
    if not isinstance(columns, Mapping):
        raise TypeError(f"columns must be a dict of arrays, got {type(columns).__name__}")
    if key not in columns:
        raise ValueError(f"columns has no {key!r} (the batch layout of hmoe.data.schema)")
    return as_array(columns[key], f"columns[{key!r}]")


def label_contradictions(columns: Mapping[str, Any], schema: Schema, task_a: str,
                         task_b: str) -> np.ndarray:
    """(N,) bool: the rows whose labels of ``task_a`` and ``task_b`` disagree (for click and
    conversion: clicked but not converted, as conversion follows a click)."""
    labels = _column(columns, "labels")  # (N, T)
    index = []
    for name, task in (("task_a", task_a), ("task_b", task_b)):
        if task not in schema.tasks:
            raise ValueError(f"{name}: {task!r} is not a label of the schema; labels: "
                             f"{list(schema.tasks)}")
        index.append(schema.task_index(task))
    if labels.ndim != 2 or labels.shape[1] != len(schema.tasks):
        raise ValueError(f"columns['labels'] must be (N, T={len(schema.tasks)}), got shape "
                         f"{labels.shape}")
    return labels[:, index[0]] != labels[:, index[1]]


def interest_conflicts(columns: Mapping[str, Any], schema: Schema, ground_truth: Any, *,
                       user_field: str = "user_id", category_field: str = "ad_category"
                       ) -> np.ndarray:
    """(N,) bool, the synthetic world's planted conflict: the target category is one of the
    user's browse interests (what drives clicks) XOR it is the user's purchase category (what
    drives conversions). ``ground_truth``: hmoe.data.synthetic.GroundTruth (user_interests,
    user_purchase_category)."""
    for attribute in ("user_interests", "user_purchase_category"):
        if not hasattr(ground_truth, attribute):
            raise TypeError(f"ground_truth must have {attribute!r} (a synthetic GroundTruth), "
                            f"got {type(ground_truth).__name__}")
    categorical = _column(columns, "categorical")  # (N, F_c)
    users = categorical[:, _field_index(schema, user_field, "user_field")]  # (N,)
    targets = categorical[:, _field_index(schema, category_field, "category_field")]  # (N,)
    interests = np.asarray(ground_truth.user_interests)[users]  # (N, I)
    in_interests = (interests == targets[:, None]).any(axis=1)
    is_purchase = np.asarray(ground_truth.user_purchase_category)[users] == targets
    return in_interests != is_purchase


def distance_contradictions(distance_a: Any, distance_b: Any, high: float = 60.0,
                            low: float = 40.0) -> np.ndarray:
    """(M,) bool, the paper's rule (notes 6.4) from two single-task tables' distances of the
    same pairs: d_a above its ``high`` percentile and d_b at or below its ``low`` percentile."""
    distance_a = as_array(distance_a, "distance_a", ndim=1, kind="real", dtype=np.float64)
    distance_b = as_array(distance_b, "distance_b", ndim=1, kind="real", dtype=np.float64)
    if distance_a.shape != distance_b.shape or distance_a.size == 0:
        raise ValueError(f"distance_a and distance_b must be two non-empty (M,) arrays of one "
                         f"M, got {distance_a.shape} and {distance_b.shape}")
    if not (0 <= low <= 100 and 0 <= high <= 100):
        raise ValueError(f"high and low must be percentiles in [0, 100], got {high}, {low}")
    return (distance_a > np.percentile(distance_a, high)) & \
        (distance_b <= np.percentile(distance_b, low))


def _field_index(schema: Schema, name: str, argument: str) -> int:
    names = [f.name for f in schema.categorical]
    if name not in names:
        raise ValueError(f"{argument}: {name!r} is not a categorical feature; have {names}")
    return names.index(name)


def entanglement_distances(model: HMoE, columns: Mapping[str, Any], contradictory: Any, *,
                           user_field: str = "user_id", item_field: str = "ad_id",
                           set_names: Sequence[str] | None = None
                           ) -> dict[str, dict[str, np.ndarray]]:
    """Per embedding set, the user–item distances of every row and of the contradictory rows.

    Args:
        model: the HMoE.
        columns: rows in the batch layout (``"categorical"`` (N, F_c) is read).
        contradictory: (N,) bool mask of the contradictory rows (e.g. label_contradictions).
        user_field, item_field: the categorical fields of the pair.
        set_names: the sets (default: all).
    Returns {set: {"all": (N,), "contradictory": (M,)}} float64 distances.
    """
    model = check_model(model)
    categorical = _column(columns, "categorical")  # (N, F_c)
    mask = as_array(contradictory, "contradictory", ndim=1)
    if mask.dtype != bool or mask.shape != (categorical.shape[0],):
        raise ValueError(f"contradictory must be a (N,) = ({categorical.shape[0]},) bool mask, "
                         f"got {mask.dtype} {mask.shape}")
    pairs = categorical[:, [_field_index(model.schema, user_field, "user_field"),
                            _field_index(model.schema, item_field, "item_field")]]  # (N, 2)
    slices = field_slices(model)
    names = list(model.set_location) if set_names is None else list(set_names)
    out = {}
    for name in names:
        check_set(model, name)
        table = set_table(model, name)  # (N_rows, D)
        users, items = (table[slice(*slices[f])] for f in (user_field, item_field))
        distances = pair_distances(users, items, pairs)
        out[name] = {"all": distances, "contradictory": distances[mask]}
    return out


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"count": 0, "mean": float("nan"), "median": float("nan")}
    return {"count": int(values.size), "mean": float(values.mean()),
            "median": float(np.median(values))}


def entanglement_summary(distances: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """{set: {"all": {count, mean, median}, "contradictory": {...}, "mean_ratio"}} with
    mean_ratio = mean contradictory distance / mean distance of all pairs, and
    "contradictory_percentile": the mean percentile of the contradictory pairs' distances
    among all pairs (50 when the table places them like any pair)."""
    out = {}
    for name, parts in distances.items():
        everything, contradictory = np.asarray(parts["all"]), np.asarray(parts["contradictory"])
        summary = {"all": _stats(everything), "contradictory": _stats(contradictory)}
        mean_all = summary["all"]["mean"]
        summary["mean_ratio"] = summary["contradictory"]["mean"] / mean_all \
            if mean_all and math.isfinite(mean_all) else float("nan")
        if everything.size and contradictory.size:
            ranks = np.searchsorted(np.sort(everything), contradictory, side="right")
            summary["contradictory_percentile"] = float(100.0 * ranks.mean() / everything.size)
        else:
            summary["contradictory_percentile"] = float("nan")
        out[name] = summary
    return out


def plot_distance_histograms(distances: Mapping[str, Mapping[str, np.ndarray]], bins: int = 40,
                             title: str = "User-item distances: contradictory vs all pairs"
                             ) -> Figure:
    """One panel per table: the density histogram (``bins`` equal-width bins) of all pairs'
    distances (hatched) and of the contradictory pairs' (solid), with the 40th and 60th
    percentiles of all pairs (the paper's bottom-40 % / top-40 % split) as dashed lines."""
    if not isinstance(distances, Mapping) or not distances:
        raise TypeError("distances must be a non-empty dict {table: {'all', 'contradictory'}}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    figure = new_figure(3.6 * len(distances) + 0.6, 3.2)
    axes = figure.subplots(1, len(distances), squeeze=False)[0]
    for ax, (name, parts) in zip(axes, distances.items()):
        everything = np.asarray(parts["all"], dtype=np.float64)
        contradictory = np.asarray(parts["contradictory"], dtype=np.float64)
        if everything.size == 0:
            ax.set_title(f"{name}: no pairs", fontsize=9)
            continue
        edges = np.histogram_bin_edges(everything, bins=bins)
        ax.hist(everything, bins=edges, density=True, histtype="step", hatch="///",
                color="tab:gray", label=f"all ({everything.size})")
        if contradictory.size:
            ax.hist(contradictory, bins=edges, density=True, alpha=0.6, color="tab:red",
                    label=f"contradictory ({contradictory.size})")
        for q in (40, 60):
            ax.axvline(np.percentile(everything, q), color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel("‖e_u − e_i‖")
        ax.set_title(str(name), fontsize=9)
        ax.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    return figure


# --------------------------------------------------------------------------------------------
# Task gradients on shared parameters


def _check_losses(losses: Any) -> dict[str, torch.Tensor]:
    if not isinstance(losses, Mapping) or len(losses) < 2:
        raise TypeError("losses must be a dict {task: scalar loss tensor} of >= 2 tasks")
    for task, loss in losses.items():
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"losses[{task!r}] must be a scalar tensor, got "
                            f"{getattr(loss, 'shape', type(loss).__name__)}")
    return dict(losses)


def _check_params(params: Any) -> list:
    if isinstance(params, (torch.Tensor, SetSlice, Mapping, str)) or \
            not hasattr(params, "__iter__"):
        raise TypeError(f"params must be a list of tensors (or hmoe SetSlices), got "
                        f"{type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError("params is empty: need at least one shared parameter")
    for i, p in enumerate(params):
        tensor = p.parameter if isinstance(p, SetSlice) else p
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"params[{i}] must be a tensor or a SetSlice, got "
                            f"{type(p).__name__}")
        if not tensor.requires_grad:
            raise ValueError(f"params[{i}] does not require grad")
    return params


def _flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor | SetSlice]
                   ) -> torch.Tensor:
    """∇ of ``loss`` on ``params`` (a SetSlice: its plane), flattened, float64 (zeros where the
    loss does not reach a parameter)."""
    tensors = [p.parameter if isinstance(p, SetSlice) else p for p in params]
    unique = list({id(t): t for t in tensors}.values())
    grads = [None] * len(unique)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, unique, retain_graph=True, allow_unused=True)
    by_id = {id(t): g if g is not None else torch.zeros_like(t) for t, g in zip(unique, grads)}
    parts = []
    for p, t in zip(params, tensors):
        grad = by_id[id(t)]
        if grad.is_sparse:
            grad = grad.to_dense()
        parts.append((p.of(grad) if isinstance(p, SetSlice) else grad).reshape(-1))
    return torch.cat(parts).to(torch.float64)


def task_gradient_cosine(losses: Mapping[str, torch.Tensor],
                         params: Sequence[torch.Tensor | SetSlice]
                         ) -> dict[tuple[str, str], float]:
    """{(task_a, task_b): cos} of the tasks' gradients on ``params``, for every pair in the
    order of ``losses`` (a before b).

    Args:
        losses: {task: scalar loss} whose graphs reach ``params`` (kept: retain_graph, so the
            caller can still backward the total).
        params: leaf tensors (parameters), or hmoe.models.SetSlice (one set's plane of a fused
            table, as ``HMoE.set_parameters`` gives).
    A zero gradient (the loss does not reach the parameters) gives NaN, not an error.
    """
    losses, params = _check_losses(losses), _check_params(params)
    flat = {task: _flat_gradient(loss, params) for task, loss in losses.items()}
    tasks, out = list(flat), {}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            norm = float(flat[a].norm() * flat[b].norm())
            out[(a, b)] = float(flat[a] @ flat[b]) / norm if norm > 0 else float("nan")
    return out


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class GradientCosineRecorder:
    """A history of task-gradient cosines over training.

    A trainer calls ``record(step, losses, params)`` (every k steps, or every step with
    ``every=k``: only steps divisible by k are recorded) before its backward.

    Attributes:
        history: list of {"step": int, "cosine": {"a|b": float}} (NaN for zero gradients), the
            trainer's metrics.jsonl grad_cosine record without its "kind".
    """

    def __init__(self, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = every
        self.history: list[dict] = []

    def record(self, step: int, losses: Mapping[str, torch.Tensor],
               params: Sequence[torch.Tensor | SetSlice]) -> dict | None:
        """Appends and returns the record of ``step`` (None when step % every != 0)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if step % self.every:
            return None
        cosines = task_gradient_cosine(losses, params)
        entry = {"step": int(step),
                 "cosine": {f"{a}{PAIR_SEPARATOR}{b}": c for (a, b), c in cosines.items()}}
        self.history.append(entry)
        return entry

    def to_jsonl(self, path: str | os.PathLike) -> Path:
        """Writes one {"kind": "grad_cosine", "step", "cosine"} line per record (NaN -> null)."""
        path = Path(path)
        lines = [json.dumps({"kind": "grad_cosine", "step": r["step"],
                             "cosine": {k: _finite_or_none(v) for k, v in r["cosine"].items()}},
                            allow_nan=False) for r in self.history]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    @classmethod
    def from_records(cls, records: Sequence[Mapping]) -> GradientCosineRecorder:
        """From records {"step", "cosine": {"a|b": c or None}} (a "kind" other than
        "grad_cosine" is skipped, so a whole metrics.jsonl may be given)."""
        recorder = cls()
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise TypeError(f"records[{i}] must be a dict, got {type(record).__name__}")
            if record.get("kind", "grad_cosine") != "grad_cosine":
                continue
            if "step" not in record or not isinstance(record.get("cosine"), Mapping):
                raise ValueError(f"records[{i}] must have 'step' and a 'cosine' dict, got "
                                 f"{sorted(record)}")
            cosine = {str(k): float("nan") if v is None else float(v)
                      for k, v in record["cosine"].items()}
            recorder.history.append({"step": int(record["step"]), "cosine": cosine})
        return recorder

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> GradientCosineRecorder:
        """Reads :meth:`to_jsonl`'s file (or a trainer's metrics.jsonl: its grad_cosine
        records)."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls.from_records([json.loads(line) for line in lines if line.strip()])

    def series(self) -> dict[str, tuple[list[int], list[float]]]:
        """{"a|b": (steps, cosines)} in step order."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for record in sorted(self.history, key=lambda r: r["step"]):
            for pair, value in record["cosine"].items():
                steps, values = out.setdefault(pair, ([], []))
                steps.append(record["step"])
                values.append(value)
        return out


def plot_gradient_cosine(history: GradientCosineRecorder | Sequence[Mapping],
                         title: str = "Cosine of the task gradients on shared embeddings"
                         ) -> Figure:
    """Cosine against the step, one line per task pair (a recorder or its history records)."""
    recorder = history if isinstance(history, GradientCosineRecorder) else \
        GradientCosineRecorder.from_records(history)
    series = recorder.series()
    if not series:
        raise ValueError("history holds no gradient-cosine record")
    figure = new_figure(5.5, 3.2)
    ax = figure.subplots()
    for pair, (steps, values) in series.items():
        ax.plot(steps, values, marker="o", markersize=3, label=pair.replace(PAIR_SEPARATOR, " vs "))
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("cos(∇L_a, ∇L_b)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return figure
