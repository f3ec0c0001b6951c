"""The report: write_report's PNGs, offline report.html (figures as data URIs, no URL) and strict
report.json (NaN -> null); analyze end to end on the tiny world (every section, the planted
ground truth, a trainer's gradient records), on a schema where most analyses do not apply
(skipped with notes), its input errors, and ``hmoe analyze RUN_DIR`` on a tiny trained run."""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pytest

from hmoe.analysis import Section, analyze, to_jsonable, write_report
from hmoe.analysis._common import new_figure
from hmoe.data.random import random_batch
from hmoe.data.schema import CategoricalFeature, Label, Schema
from hmoe.models.presets import preset

PNG = b"\x89PNG\r\n\x1a\n"
EXTERNAL = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", re.IGNORECASE)


def _strict_json(path):
    def no_constants(name):
        raise AssertionError(f"report.json holds {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


def _check_offline(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    assert not EXTERNAL.search(html)
    assert "<script" not in html and "<link" not in html


def _check_pngs(out_dir, names) -> None:
    for name in names:
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name


def _figure():
    figure = new_figure(3, 2)
    figure.subplots().plot([0, 1], [1, 0])
    return figure


def test_write_report_writes_pngs_offline_html_and_strict_json(tmp_path):
    sections = [
        Section("first", "First <section>", text="One paragraph.\n\nAnother & more.",
                figures={"line": _figure()},
                numbers={"ia": {"shared": {"a": 1.5, "b": float("nan")}},
                         "array": np.arange(3.0), ("a", "b"): np.float32(0.5), "inf": np.inf},
                notes=["skipped: nothing"]),
        {"key": "second", "title": "Second", "numbers": {"count": np.int64(3)}},
    ]
    path = write_report(tmp_path / "report", sections, title="Test report")
    out = tmp_path / "report"
    assert path == out / "report.html"
    _check_pngs(out, ["line.png"])
    html = path.read_text(encoding="utf-8")
    _check_offline(html)
    assert html.count('src="data:image/png;base64,') == 1
    assert "First &lt;section&gt;" in html and "Another &amp; more." in html
    assert "skipped: nothing" in html
    document = _strict_json(out / "report.json")
    first = document["sections"]["first"]
    assert first["numbers"]["ia"]["shared"] == {"a": 1.5, "b": None}
    assert first["numbers"]["array"] == [0.0, 1.0, 2.0] and first["numbers"]["inf"] is None
    assert first["numbers"]["a|b"] == 0.5 and first["figures"] == ["line.png"]
    assert document["sections"]["second"]["numbers"] == {"count": 3}


@pytest.mark.parametrize("sections, error, match", [
    ("report", TypeError, "sections must be a list"),
    ([Section("a", "A"), Section("a", "B")], ValueError, r"sections\[1\].key must be a unique"),
    ([Section("a b", "A")], ValueError, r"sections\[0\].key"),
    ([{"key": "a"}], ValueError, r"sections\[0\]: needs 'key' and 'title'"),
    ([{"key": "a", "title": "A", "colour": 1}], ValueError, r"unknown \['colour'\]"),
    ([Section("a", "A", figures={"../x": b""})], ValueError, "file stem"),
    ([Section("a", "A", figures={"x": "figure"})], TypeError, "must be a matplotlib Figure"),
    ([Section("a", "A", figures={"x": b"GIF89a"})], ValueError, "not a PNG"),
    ([Section("a", "A", numbers={"x": object()})], TypeError, r"\['x'\]: cannot write"),
    ([3], TypeError, r"sections\[0\] must be a Section"),
])
def test_write_report_bad_inputs(tmp_path, sections, error, match):
    with pytest.raises(error, match=match):
        write_report(tmp_path, sections)


def test_to_jsonable_converts_numpy_and_tensors():
    import torch

    value = {"t": torch.tensor([1.0, float("nan")]), "n": np.bool_(True), 3: (1, 2)}
    assert to_jsonable(value) == {"t": [1.0, None], "n": True, "3": [1, 2]}


def _trainer_records():
    return [{"kind": "grad_cosine", "step": s, "epoch": 0,
             "cosine": {"click|conversion": None if s == 20 else math.cos(s / 10)}}
            for s in (10, 20, 30, 40)]


# what an online run's metrics.jsonl holds: a "window" record per window
_WINDOWS = [{"kind": "window", "window": w, "start": w * 86400, "rows": 100, "step": 10 * w,
             "metrics": {t: {"auc": 0.5 + 0.1 * w, "logloss": 0.7 - 0.1 * w}
                         for t in ("click", "conversion")}} for w in range(3)]


def test_analyze_runs_every_section_on_the_tiny_world(world, make_model, tmp_path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    model = make_model()
    out = tmp_path / "report"
    results = analyze(model, world.schema, world.splits["test"], ground_truth=world.ground_truth,
                      gradient_history=_trainer_records(), out_dir=out, max_rows=250,
                      snapshots=[(0, model.state_dict()), (1, model)], windows=_WINDOWS)
    assert set(results) == {"collapse", "correlation", "entanglement", "gradients", "online",
                            "notes", "report"}
    assert set(results["collapse"]["field_ia"]) == {"shared", "task_click", "task_conversion"}
    correlation = results["correlation"]["hist_categories"]
    assert correlation["mi"].shape == (16, 10) and correlation["planted"].shape == (16, 10)
    assert set(correlation["learned"]) == {"shared", "task_click", "task_conversion"}
    assert {"mi vs planted", "shared vs mi", "shared vs planted"} <= set(correlation["similarity"])
    assert any("hist_ads: skipped" in note for note in results["notes"])
    pairs = results["entanglement"]["pairs"]
    assert set(pairs) == {"labels", "interest_conflict"}
    assert pairs["labels"]["summary"]["shared"]["all"]["count"] == 250
    assert results["gradients"]["pairs"]["click|conversion"]["records"] == 4
    online = results["online"]
    assert online["windows"] == 3
    assert [w["click/auc"] for w in online["per_window"]] == [0.5, 0.6, 0.7]
    figures = ["collapse_spectra.png", "collapse_ia.png", "collapse_training.png",
               "correlation_hist_categories.png", "entanglement_labels.png",
               "entanglement_interest_conflict.png", "gradient_cosine.png",
               "online_windows.png"]
    _check_pngs(out, figures)
    html = (out / "report.html").read_text(encoding="utf-8")
    _check_offline(html)
    assert html.count('src="data:image/png;base64,') == len(figures)
    document = _strict_json(out / "report.json")
    assert set(document["sections"]) == {"collapse", "correlation", "entanglement", "gradients",
                                         "online"}
    numbers = document["sections"]["correlation"]["numbers"]["hist_categories"]
    assert np.array(numbers["mi"]).shape == (16, 10)
    history = document["sections"]["gradients"]["numbers"]["history"]
    assert history[1]["cosine"]["click|conversion"] is None  # NaN -> null
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # no pyplot, no global state


def test_analyze_skips_what_does_not_apply(tmp_path):
    schema = Schema("plain", categorical=(CategoricalFeature("u", vocab_size=20),
                                          CategoricalFeature("i", vocab_size=30)),
                    labels=(Label("click"),))
    model = preset("dnn", schema, dim=8, expert_hidden=(8,), tower=())
    columns = {k: v.numpy() for k, v in random_batch(schema, 100).items()}
    results = analyze(model, schema, columns, out_dir=tmp_path)
    notes = "\n".join(results["notes"])
    assert "correlation: skipped: the schema has no behaviour sequence" in notes
    assert "entanglement: skipped: needs a user and an item" in notes
    assert "gradients: skipped: no gradient history" in notes
    assert results["correlation"] == {} and results["entanglement"] == {}
    assert set(results["collapse"]["field_ia"]["embedding"]) == {"u", "i"}
    _check_offline((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert _strict_json(tmp_path / "report.json")["sections"]["gradients"]["notes"]
    with_fields = analyze(model, schema, columns, out_dir=tmp_path / "b", user_field="u",
                          item_field="i")
    assert "entanglement: no label contradictions: the schema has a single label" in \
        with_fields["notes"]


def test_analyze_without_ground_truth_uses_the_data_only(world, make_model, tmp_path):
    results = analyze(make_model("dnn", "din"), world.schema, world.splits["test"],
                      out_dir=tmp_path, max_rows=200)
    correlation = results["correlation"]["hist_categories"]
    assert "planted" not in correlation and correlation["learned"]["embedding"].shape == (16, 10)
    assert set(results["entanglement"]["pairs"]) == {"labels"}
    assert any("no ground truth" in note for note in results["notes"])


def test_analyze_bad_inputs(world, make_model, tmp_path):
    model = make_model()
    columns = world.splits["test"]
    other = Schema("other", categorical=(CategoricalFeature("u", vocab_size=3),),
                   labels=(Label("click"),))
    cases = [
        (dict(model="model"), TypeError, "model must be an hmoe.models.HMoE"),
        (dict(schema=other), ValueError, "schema is not the schema the model was built on"),
        (dict(schema="schema"), TypeError, "schema must be a hmoe.data.schema.Schema"),
        (dict(columns=[]), TypeError, "columns must be a dict"),
        (dict(columns={"labels": columns["labels"]}), ValueError, r"columns lack \['categorical'"),
        (dict(max_rows=0), ValueError, "max_rows must be an int >= 1"),
        (dict(task="buy"), ValueError, "task: 'buy' is not a label"),
        (dict(gradient_history=3), TypeError, "gradient_history must be"),
    ]
    for change, error, match in cases:
        arguments = {**dict(model=model, schema=world.schema, columns=columns,
                            out_dir=tmp_path, max_rows=50), **change}
        with pytest.raises(error, match=match):
            analyze(arguments.pop("model"), arguments.pop("schema"), arguments.pop("columns"),
                    **arguments)


def test_hmoe_analyze_on_a_tiny_trained_run(tmp_path, capsys):
    from hmoe.cli import main

    run = tmp_path / "run"
    tiny = ["--data.synthetic.num_rows=1500", "--data.synthetic.num_users=100",
            "--data.synthetic.num_ads=200", "--data.synthetic.max_len=6",
            "--model.options.dim=8", "--train.batch_size=256", "--train.epochs=1",
            "--train.threads=1", "--train.gradient_cosine_every=2"]
    assert main(["train", "--out", str(run), *tiny]) == 0
    assert main(["analyze", str(run)]) == 0
    report = run / "report"
    _check_offline((report / "report.html").read_text(encoding="utf-8"))
    document = _strict_json(report / "report.json")
    assert document["sections"]["gradients"]["numbers"]["pairs"]["click|conversion"]["records"]
    _check_pngs(report, ["collapse_spectra.png", "gradient_cosine.png"])
