r"""The analysis report: PNG figures, a self-contained report.html and report.json, and
:func:`analyze`, the entry point of ``hmoe analyze RUN_DIR`` (design section 3.8).

:func:`write_report` takes a list of :class:`Section` (a title, text, figures, numbers and
notes) and writes into ``out_dir``:

    <figure>.png   one file per figure (matplotlib, Agg canvas: no pyplot, no global state)
    report.html    every section; figures embedded as base64 data URIs, inline CSS, no script
                   and no link to anything outside the file: it opens offline
    report.json    {"title", "sections": {key: {"title", "numbers", "notes", "figures"}}}, every
                   number (numpy arrays as lists; NaN and infinities as null)

:func:`analyze` runs what applies to a model and its data (one section each):

    collapse       per set: per-field spectra heatmap, IA per field and of the whole table
                   (hmoe.analysis.collapse); with ``snapshots``, IA over training
    correlation    per sequence whose items are category-like (item vocabulary <= 64 ids):
                   the MI of (category, position) and the label among the rows of the most
                   frequent target (hmoe.analysis.correlation), the planted map when the
                   ground truth has one, and every set's learned map with their similarities
    entanglement   user-item distances per set on contradictory pairs vs all pairs: labels of
                   two tasks disagree, and the planted interest/purchase conflict with a
                   synthetic ground truth (hmoe.analysis.entanglement)
    gradients      the task-gradient cosine curve, from a trainer's grad_cosine records

An analysis that does not apply (no sequence, no second task, no gradient records, ...) is
skipped with a note in its section and in results["notes"].
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmoe.analysis._common import (
    check_model,
    figure_png,
    matplotlib_available,
    new_figure,
    set_table,
)
from hmoe.analysis.collapse import (
    field_spectra, ia_over_training, information_abundance, plot_ia_comparison,
    plot_ia_over_training, plot_spectra_heatmap,
)
from hmoe.analysis.correlation import (
    ground_truth_mi, learned_correlation, plot_correlation_maps, similarity,
)
from hmoe.analysis.entanglement import (
    GradientCosineRecorder, entanglement_distances, entanglement_summary, interest_conflicts,
    label_contradictions, plot_distance_histograms, plot_gradient_cosine,
)
from hmoe.data.schema import Schema

__all__ = ["Section", "analyze", "plot_windows", "to_jsonable", "write_report"]

FIGURE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
SECTION_KEYS = ("key", "title", "text", "figures", "numbers", "notes")
MAX_MAP_PANELS = 6  # correlation figure: ground truth(s) + up to this many panels in all


@dataclass
class Section:
    """One part of the report.

    key: its name in report.json (and the HTML anchor); title: the heading; text: paragraphs
    (plain text, blank-line separated); figures: {file stem: matplotlib Figure or PNG bytes};
    numbers: JSON-able results (numpy arrays and scalars, tensors, nested dicts and lists);
    notes: what was skipped and why.
    """

    key: str
    title: str
    text: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    numbers: Any = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# JSON


def to_jsonable(value: Any, where: str = "numbers") -> Any:
    """``value`` as plain JSON types: dicts (keys as strings, tuple keys joined by "|"), lists,
    finite floats, ints, bools, strings, None; NaN and infinities become None. Raises
    TypeError naming the path of anything else."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        return {("|".join(map(str, k)) if isinstance(k, tuple) else str(k)):
                to_jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{where}: cannot write a {type(value).__name__} to JSON")


# --------------------------------------------------------------------------------------------
# HTML

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #aaa; margin-top: 2em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
.note { color: #8a5a00; background: #fff6e0; padding: 4px 8px; margin: 4px 0; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 0.8em; }
"""


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _table(rows: Mapping[str, Any]) -> str:
    """A two-column table of scalars, or a matrix of dicts of scalars."""
    if all(_is_scalar(v) for v in rows.values()):
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{_format(v)}</td></tr>"
                       for k, v in rows.items())
        return f"<table>{body}</table>"
    columns = list(dict.fromkeys(c for v in rows.values() for c in v))
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = "".join("<tr><td>" + html.escape(k) + "</td>"
                   + "".join(f"<td>{_format(v.get(c))}</td>" for c in columns) + "</tr>"
                   for k, v in rows.items())
    return f"<table>{head}{body}</table>"


def _render(numbers: Any, depth: int = 0) -> str:
    """Small dicts as tables, nested dicts as headed blocks; deep or long lists (spectra, maps)
    are left to report.json."""
    if isinstance(numbers, Mapping) and numbers:
        values = list(numbers.values())
        if all(_is_scalar(v) for v in values) or (
                all(isinstance(v, Mapping) and v and all(_is_scalar(x) for x in v.values())
                    for v in values)):
            return _table(numbers)
        if depth >= 3:
            return "<p><i>(nested: see report.json)</i></p>"
        tag = f"h{min(3 + depth, 6)}"
        return "".join(f"<{tag}>{html.escape(str(k))}</{tag}>{_render(v, depth + 1)}"
                       for k, v in numbers.items())
    if isinstance(numbers, list):
        if depth <= 1 and len(numbers) <= 12 and all(_is_scalar(v) for v in numbers):
            return "<p>" + ", ".join(_format(v) for v in numbers) + "</p>"
        return f"<p><i>(list of {len(numbers)}: see report.json)</i></p>"
    return f"<p>{_format(numbers)}</p>"


def _section_html(section: Section, images: Mapping[str, bytes]) -> str:
    parts = [f'<h2 id="{html.escape(section.key)}">{html.escape(section.title)}</h2>']
    parts += [f"<p>{html.escape(p.strip())}</p>" for p in section.text.split("\n\n") if p.strip()]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in section.notes]
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{html.escape(name)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{html.escape(name)}.png'
                     f'</figcaption></figure>')
    numbers = to_jsonable(section.numbers, f"sections[{section.key!r}].numbers")
    if numbers not in ({}, [], None):
        parts.append(f"<details open><summary>numbers</summary>{_render(numbers)}</details>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# write_report


def _as_section(section: Any, i: int) -> Section:
    if isinstance(section, Section):
        return section
    if not isinstance(section, Mapping):
        raise TypeError(f"sections[{i}] must be a Section or a dict, got "
                        f"{type(section).__name__}")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown or "key" not in section or "title" not in section:
        raise ValueError(f"sections[{i}]: needs 'key' and 'title', may have {list(SECTION_KEYS)}"
                         f"; unknown {unknown}")
    return Section(**section)


def _check_sections(sections: Any) -> list[Section]:
    if isinstance(sections, (Mapping, str)) or not isinstance(sections, Sequence):
        raise TypeError(f"sections must be a list of Section, got {type(sections).__name__}")
    out = [_as_section(s, i) for i, s in enumerate(sections)]
    keys, names = set(), set()
    for i, s in enumerate(out):
        if not isinstance(s.key, str) or not FIGURE_NAME.match(s.key) or s.key in keys:
            raise ValueError(f"sections[{i}].key must be a unique name of letters, digits, "
                             f"'_', '-' and '.', got {s.key!r}")
        keys.add(s.key)
        if not isinstance(s.figures, Mapping):
            raise TypeError(f"sections[{i}].figures must be a dict {{name: Figure}}")
        for name in s.figures:
            if not isinstance(name, str) or not FIGURE_NAME.match(name) or name in names:
                raise ValueError(f"sections[{i}].figures: {name!r} must be a unique file stem "
                                 f"of letters, digits, '_', '-' and '.'")
            names.add(name)
    return out


def _png(figure: Any, where: str) -> bytes:
    if isinstance(figure, (bytes, bytearray)):
        if not bytes(figure[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"{where}: bytes that are not a PNG")
        return bytes(figure)
    if not hasattr(figure, "savefig"):
        raise TypeError(f"{where} must be a matplotlib Figure or PNG bytes, got "
                        f"{type(figure).__name__}")
    return figure_png(figure)


def write_report(out_dir: str | os.PathLike, sections: Sequence[Section | Mapping], *,
                 title: str = "hmoe analysis report") -> Path:
    """Writes the PNG figures, report.html and report.json of ``sections`` into ``out_dir``
    (created if needed) and returns the path of report.html (see the module docstring)."""
    sections = _check_sections(sections)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks, record = [], {}
    for s in sections:
        images = {name: _png(fig, f"sections[{s.key!r}].figures[{name!r}]")
                  for name, fig in s.figures.items()}
        for name, png in images.items():
            (out / f"{name}.png").write_bytes(png)
        blocks.append(_section_html(s, images))
        record[s.key] = {"title": s.title, "numbers": to_jsonable(s.numbers, f"{s.key}.numbers"),
                         "notes": list(map(str, s.notes)),
                         "figures": [f"{name}.png" for name in images]}
    contents = "".join(f'<li><a href="#{html.escape(s.key)}">{html.escape(s.title)}</a></li>'
                       for s in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><ul>{contents}</ul>\n" + "\n".join(blocks)
            + "\n</body></html>\n")
    (out / "report.html").write_text(page, encoding="utf-8")
    document = {"title": title, "sections": record}
    (out / "report.json").write_text(json.dumps(document, indent=1, allow_nan=False) + "\n",
                                     encoding="utf-8")
    return out / "report.html"


# --------------------------------------------------------------------------------------------
# analyze: the sections


def _collapse_section(model, figures_on: bool, snapshots) -> Section:
    section = Section("collapse", "Dimensional collapse", text=(
        "Per categorical field of every embedding set: the singular values of the field's "
        "rows (each row L2-normalised), divided by the largest; information abundance "
        "IA = sum / max, at most the set's dim D. IA far below D means the field's embeddings "
        "collapsed into a low-dimensional subspace. Fields are ordered by cardinality."))
    if not model.schema.categorical:
        section.notes.append("skipped: the schema has no categorical feature")
        return section
    spectra = {name: field_spectra(model, name) for name in model.set_location}
    section.numbers = {
        "dim": {name: model.config.set_named(name).dim for name in model.set_location},
        "table_ia": {name: information_abundance(set_table(model, name))
                     for name in model.set_location},
        "field_ia": {name: {f: float(s.sum()) for f, s in fields.items()}
                     for name, fields in spectra.items()},
        "spectra": spectra,
    }
    if figures_on and any(spectra.values()):
        section.figures["collapse_spectra"] = plot_spectra_heatmap(spectra)
        section.figures["collapse_ia"] = plot_ia_comparison(section.numbers["field_ia"])
    if snapshots:
        history = ia_over_training(model, snapshots)
        section.numbers["over_training"] = history
        if figures_on:
            section.figures["collapse_training"] = plot_ia_over_training(history)
    return section


def _most_frequent(values: np.ndarray) -> int | None:
    values = values[values >= 1]
    return int(np.bincount(values).argmax()) if values.size else None


def _correlation_of(model, columns, ground_truth, sequence, task: str, max_position: int,
                    category_field: str, figures_on: bool, section: Section) -> None:
    """The correlation numbers (and figure) of one category-like sequence, into section."""
    schema = model.schema
    item = schema.categorical[schema.categorical_index(sequence.item)]
    C, P = item.vocab_size - 1, min(sequence.num_positions, max_position)
    key = f"seq/{sequence.name}"
    targets = np.asarray(columns["categorical"])[:, schema.categorical_index(sequence.item)]
    target = _most_frequent(targets)
    if target is None:
        section.notes.append(f"{sequence.name}: skipped: no row has a target item id >= 1")
        return
    labels = np.asarray(columns["labels"])[:, schema.task_index(task)]
    mi = ground_truth_mi(columns[key], columns[f"{key}/positions"], columns[f"{key}/lengths"],
                         labels, targets, target, C, P)
    maps = {"ground-truth MI": mi}
    result = {"target_category": target, "task": task, "rows": int((targets == target).sum()),
              "num_categories": C, "max_position": P, "mi": mi}
    planted_of = getattr(ground_truth, "correlation_map", None)
    if planted_of is not None and sequence.item == category_field:
        planted = np.asarray(planted_of(target))[:C, :P]
        if planted.shape == (C, P):
            maps["planted (w·S·decay)"] = result["planted"] = planted
    learned, scores = {}, {}
    if "planted" in result:
        scores["mi vs planted"] = similarity(mi, result["planted"])
    joint = model.config.joint_sequences and len(schema.sequence) > 1
    if joint:
        section.notes.append(f"{sequence.name}: no learned map: the model attends its "
                             "sequences jointly (joint_sequences), one encoder for all")
    for name in [] if joint else model.set_location:
        learned[name] = learned_correlation(model, sequence.name, name, target,
                                            num_categories=C, max_position=P)
        scores[f"{name} vs mi"] = similarity(learned[name], mi)
        if "planted" in result:
            scores[f"{name} vs planted"] = similarity(learned[name], result["planted"])
    encoder = model.config.sequence_encoder
    for name in list(learned)[:MAX_MAP_PANELS - len(maps)]:
        maps[f"learned {encoder} ({name})"] = learned[name]
    result.update(learned=learned, similarity=scores)
    section.numbers[sequence.name] = result
    if figures_on:
        section.figures[f"correlation_{sequence.name}"] = plot_correlation_maps(
            maps, target_category=target, title=f"{sequence.name}: behaviour-target correlation")


def _correlation_section(model, columns, ground_truth, task, max_position: int,
                         max_categories: int, category_field: str, figures_on: bool) -> Section:
    section = Section("correlation", "Behaviour-target correlation", text=(
        "Ground truth: the mutual information (bits) between 'the behaviour at position p "
        "(1 = most recent) has category c' and the label, among the rows whose target has the "
        "most frequent category. Learned: for TIM exp(<e~, v~>/sqrt(D)) * |e~ * v~| with "
        "e~ = E[c] + P[p], v~ = E[target] + P[0]; DIN: |activation weight| * |E[c]| (no "
        "positions); SASRec-style: a one-step sequence's exp(<h, E[target]>/sqrt(D)) * |h|. "
        "Similarity: Spearman's rank correlation of the flattened maps. A good model shows "
        "the semantic pattern (same and related categories high) and the temporal decay."))
    schema = model.schema
    if not schema.sequence:
        section.notes.append("skipped: the schema has no behaviour sequence")
        return section
    if not schema.categorical:
        section.notes.append("skipped: no categorical feature holds the target item")
        return section
    for sequence in schema.sequence:
        vocab = schema.categorical[schema.categorical_index(sequence.item)].vocab_size
        if vocab - 1 > max_categories:
            section.notes.append(
                f"{sequence.name}: skipped: its items ({sequence.item!r}, {vocab - 1} ids) are "
                f"not category-like (more than {max_categories}); the map needs a category "
                f"sequence")
            continue
        _correlation_of(model, columns, ground_truth, sequence, task, max_position,
                        category_field, figures_on, section)
    if ground_truth is None:
        section.notes.append("no ground truth given: MI from the data only, no planted map")
    return section


def _pair_fields(schema: Schema, user_field, item_field) -> tuple[str | None, str | None]:
    names = [f.name for f in schema.categorical]
    if user_field is None:
        user_field = schema.group_id if schema.group_id in names else \
            ("user_id" if "user_id" in names else None)
    if item_field is None:
        item_field = "ad_id" if "ad_id" in names else next(
            (s.item for s in schema.sequence if s.item != user_field), None)
    return user_field, item_field


def _entanglement_section(model, columns, ground_truth, user_field, item_field,
                          category_field: str, figures_on: bool) -> Section:
    section = Section("entanglement", "Interest entanglement", text=(
        "Euclidean distance |e_user - e_item| in every embedding set, on all rows' (user, "
        "item) pairs and on the contradictory ones, where the tasks disagree. A table shared "
        "by the tasks must place contradictory pairs at one distance for both; a task's own "
        "table is free to place them as its task needs. contradictory_percentile: the mean "
        "percentile of contradictory pairs among all pairs (50: placed like any pair)."))
    schema = model.schema
    user_field, item_field = _pair_fields(schema, user_field, item_field)
    names = [f.name for f in schema.categorical]
    if user_field not in names or item_field not in names or user_field == item_field:
        section.notes.append(f"skipped: needs a user and an item categorical field, got "
                             f"user_field={user_field!r}, item_field={item_field!r}")
        return section
    masks, definitions = {}, {}
    tasks = list(model.tasks) if len(model.tasks) >= 2 else list(schema.tasks)
    if len(tasks) >= 2:
        masks["labels"] = label_contradictions(columns, schema, tasks[0], tasks[1])
        definitions["labels"] = f"labels of {tasks[0]!r} and {tasks[1]!r} disagree"
    else:
        section.notes.append("no label contradictions: the schema has a single label")
    if hasattr(ground_truth, "user_interests") and category_field in names:
        masks["interest_conflict"] = interest_conflicts(
            columns, schema, ground_truth, user_field=user_field, category_field=category_field)
        definitions["interest_conflict"] = ("target category is a browse interest XOR the "
                                            "purchase category (planted)")
    if not masks:
        section.notes.append("skipped: no definition of contradictory pairs applies")
        return section
    section.numbers = {"user_field": user_field, "item_field": item_field, "pairs": {}}
    for kind, mask in masks.items():
        distances = entanglement_distances(model, columns, mask, user_field=user_field,
                                           item_field=item_field)
        section.numbers["pairs"][kind] = {"definition": definitions[kind],
                                          "fraction": float(mask.mean()) if mask.size else None,
                                          "summary": entanglement_summary(distances)}
        if figures_on and mask.size:
            section.figures[f"entanglement_{kind}"] = plot_distance_histograms(
                distances, title=f"User-item distances: {definitions[kind]}")
    return section


def _gradient_recorder(history: Any) -> GradientCosineRecorder:
    if isinstance(history, GradientCosineRecorder):
        return history
    if isinstance(history, (str, os.PathLike)):
        return GradientCosineRecorder.from_jsonl(history)
    if isinstance(history, Sequence):
        return GradientCosineRecorder.from_records(history)
    raise TypeError(f"gradient_history must be a GradientCosineRecorder, a list of records or a "
                    f"jsonl path, got {type(history).__name__}")


def _gradient_section(recorder: GradientCosineRecorder | None, figures_on: bool) -> Section:
    section = Section("gradients", "Task-gradient cosine on shared embeddings", text=(
        "The cosine between two tasks' loss gradients on the shared embedding set's "
        "parameters, over training. Negative: the tasks pull the shared embeddings in opposite "
        "directions (negative transfer); NaN: a gradient was zero."))
    if recorder is None:
        section.notes.append("skipped: no gradient history (train with "
                             "train.gradient_cosine_every > 0 and several tasks)")
        return section
    series = recorder.series()
    if not series:
        section.notes.append("skipped: the gradient history holds no record")
        return section
    pairs = {}
    for pair, (steps, values) in series.items():
        finite = [v for v in values if math.isfinite(v)]
        pairs[pair] = {"records": len(values), "first": values[0], "last": values[-1],
                       "mean": float(np.mean(finite)) if finite else float("nan"),
                       "min": min(finite) if finite else float("nan"),
                       "max": max(finite) if finite else float("nan")}
    section.numbers = {"pairs": pairs, "history": recorder.history}
    if figures_on:
        section.figures["gradient_cosine"] = plot_gradient_cosine(recorder)
    return section


def plot_windows(windows: Sequence[Mapping], metrics: Sequence[str] = ("auc", "logloss")):
    """A figure of each task's progressive-validation ``metrics`` over the windows of an
    online run (the "window" records of its metrics.jsonl)."""
    figure = new_figure(4.2 * len(metrics), 3.2)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    order = [int(w["window"]) for w in windows]
    tasks = list(windows[0]["metrics"]) if windows else []
    for axis, name in zip(axes, metrics):
        for task in tasks:
            values = [w["metrics"][task].get(name, float("nan")) for w in windows]
            axis.plot(order, values, marker="o", markersize=3, label=task)
        axis.set_xlabel("window")
        axis.set_ylabel(name)
        axis.set_title(f"{name}, scored before training")
        axis.grid(alpha=0.3)
    if tasks:
        axes[0].legend()
    return figure


def _online_section(windows: Sequence[Mapping] | None, figures_on: bool) -> Section:
    section = Section("online", "Online training: progressive validation", text=(
        "Each window of the time-ordered log scored by the model as it was before training on "
        "it (train.mode: online): how well the model predicts the next window, over time."))
    if not windows:
        section.notes.append("skipped: not an online run (no window records)")
        return section
    tasks = list(windows[0]["metrics"])
    section.numbers = {"windows": len(windows), "per_window": [
        {"window": w["window"], "rows": w["rows"],
         **{f"{t}/{m}": w["metrics"][t].get(m) for t in tasks for m in ("auc", "logloss")}}
        for w in windows]}
    if figures_on:
        section.figures["online_windows"] = plot_windows(windows)
    return section


# --------------------------------------------------------------------------------------------
# analyze


def _check_columns(columns: Any, schema: Schema, max_rows: int) -> dict[str, Any]:
    if not isinstance(columns, Mapping):
        raise TypeError(f"columns must be a dict of arrays, got {type(columns).__name__}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    needed = ["labels"] + (["categorical"] if schema.categorical else [])
    for s in schema.sequence:
        needed += [f"seq/{s.name}", f"seq/{s.name}/positions", f"seq/{s.name}/lengths"]
    missing = [k for k in needed if k not in columns]
    if missing:
        raise ValueError(f"columns lack {missing} (the batch layout of hmoe.data.schema)")
    out = {}
    for key in needed:
        value = columns[key]
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else \
            np.asarray(value)
        out[key] = value[:max_rows]
    if len({v.shape[0] for v in out.values()}) > 1:
        raise ValueError(f"columns disagree on the number of rows: "
                         f"{ {k: v.shape[0] for k, v in out.items()} }")
    return out


def analyze(model: Any, schema: Schema, columns: Mapping[str, Any], *, out_dir: str | os.PathLike,
            ground_truth: Any = None, gradient_history: Any = None, max_rows: int = 50_000,
            task: str | None = None, max_position: int = 20, max_categories: int = 64,
            user_field: str | None = None, item_field: str | None = None,
            category_field: str = "ad_category", snapshots: Sequence | None = None,
            windows: Sequence[Mapping] | None = None) -> dict:
    """Runs every analysis that applies to ``model`` on ``columns``, writes the report into
    ``out_dir`` and returns the results.

    Args:
        model: the trained HMoE (its weights are read, never changed).
        schema: the schema the model was built on (must be the model's).
        columns: rows in the batch layout (e.g. a run's test split); the first ``max_rows``
            are used.
        out_dir: the report directory.
        ground_truth: the synthetic world's GroundTruth (planted correlation map and
            interest/purchase conflicts), or None (MI from the data only).
        gradient_history: grad_cosine records of the trainer's metrics.jsonl, a
            GradientCosineRecorder or a jsonl path, or None.
        task: the label of the correlation analysis (default: the model's first task).
        max_position: the correlation grid's largest position.
        max_categories: sequences whose item vocabulary has more ids are not category-like and
            get no correlation map.
        user_field, item_field: the pair of the entanglement analysis (default: the schema's
            group_id or "user_id", and "ad_id" or the first sequence's item).
        category_field: the categorical field of the target category (planted structure).
        snapshots: (step, model or state_dict) pairs for IA over training, or None.
        windows: the "window" records of an online run's metrics.jsonl (progressive
            validation), or None.
    Returns {"collapse", "correlation", "entanglement", "gradients", "online": the numbers of each
    section (numpy arrays kept), "notes": [...], "report": path of report.html}.
    """
    model = check_model(model)
    if not isinstance(schema, Schema):
        raise TypeError(f"schema must be a hmoe.data.schema.Schema, got {type(schema).__name__}")
    if schema != model.schema:
        raise ValueError("schema is not the schema the model was built on")
    if task is None:
        task = model.tasks[0]
    if task not in schema.tasks:
        raise ValueError(f"task: {task!r} is not a label of the schema; labels: "
                         f"{list(schema.tasks)}")
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
        raise ValueError(f"max_position must be an int >= 1, got {max_position!r}")
    data = _check_columns(columns, schema, max_rows)
    history = None if gradient_history is None else _gradient_recorder(gradient_history)
    figures_on = matplotlib_available()
    sections = [
        _collapse_section(model, figures_on, snapshots),
        _correlation_section(model, data, ground_truth, task, max_position, max_categories,
                             category_field, figures_on),
        _entanglement_section(model, data, ground_truth, user_field, item_field,
                              category_field, figures_on),
        _gradient_section(history, figures_on),
        _online_section(windows, figures_on),
    ]
    if not figures_on:  # pragma: no cover - matplotlib is installed in the tests
        sections[0].notes.append("matplotlib is not installed: no figures")
    rows = next(iter(data.values())).shape[0]
    title = (f"hmoe analysis: sets {list(model.set_location)}, tasks {list(model.tasks)}, "
             f"sequence encoder {model.config.sequence_encoder!r}, {rows} rows")
    path = write_report(out_dir, sections, title=title)
    results = {s.key: s.numbers for s in sections}
    results["notes"] = [f"{s.key}: {n}" for s in sections for n in s.notes]
    results["report"] = str(path)
    return results
