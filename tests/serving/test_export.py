"""hmoe export and hmoe.serving.load: the inference artifact round trip.

A run is trained by the CLI, exported, loaded without the trainer and scored on raw rows made
from its test split; the scores must equal the trained model's (``hmoe predict``'s) within
1e-5 for the eager model, the exported program and (one slow test) the AOTInductor package.
Every preset family exports; so do TIM, DIN, SASRec-style self-attention, MNSE, bucket and scaled
numerics, dynamic and hash vocabularies, raw files with vocabularies and time-bucketed
sequences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import hmoe.serving as serving
from hmoe.cli import main
from hmoe.models import PRESETS

TOLERANCE = 1e-5


def _train(run: Path, *overrides: str, rows: int = 3000) -> Path:
    code = main(["train", "--config", "quickstart", "--out", str(run),
                 f"--data.synthetic.num_rows={rows}", "--train.epochs=1", "--train.max_steps=4",
                 "--train.batch_size=256", "--train.progress=off", "--train.snapshot_every=0",
                 "--train.threads=1", *overrides])
    assert code == 0
    return run


def _columns(run: Path, split: str = "test") -> dict[str, np.ndarray]:
    from hmoe.train.trainer import load_run

    source = load_run(run).dataset.source(split)
    return {key: value.numpy() for key, value in source.tensors.items()}


def _reference(run: Path, columns, calibrated: bool) -> np.ndarray:
    """(B, T) probabilities of the trained model (the trainer's own loading and scoring)."""
    from hmoe.train.trainer import iter_predictions, load_run

    loaded = load_run(run)
    batches = [scores for _, scores in iter_predictions(
        loaded.model, columns, 512, calibration=loaded.calibration if calibrated else None)]
    return np.stack([np.concatenate([b[t] for b in batches]) for t in loaded.model.tasks], 1)


def _served(artifact: Path, rows, mode: str, calibrated: bool = True) -> np.ndarray:
    predictor = serving.load(artifact, mode=mode, calibrated=calibrated)
    return predictor.score(predictor.encode(rows))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """A tiny quickstart run (STEM, TIM, MNSE, calibration) and its artifact (no AOTI)."""
    root = tmp_path_factory.mktemp("quickstart")
    run = _train(root / "run")
    artifact = root / "artifact"
    serving.export(run, artifact, devices=())
    return run, artifact


def test_the_artifact_holds_what_its_manifest_says(quickstart):
    run, artifact = quickstart
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert manifest["tasks"] == ["click", "conversion"]
    assert manifest["calibrated"] is True and manifest["raw_ids"] == "integers"
    for name in ("dataset", "model", "weights", "calibration", "program"):
        assert (artifact / manifest["files"][name]).is_file(), name
    assert manifest["files"]["aoti"] == {}
    assert "vocabularies" not in manifest["files"]  # a generated world: pre-indexed ids
    differences = manifest["check"]["max_abs_logit_difference"]
    assert set(differences) == {"exported"} and differences["exported"] <= TOLERANCE
    assert manifest["inputs"] == serving.model_inputs(serving.load(artifact).schema)
    predictor = serving.load(artifact)
    assert predictor.mode == "exported"  # auto without a package
    assert predictor.metadata["model_version"] == manifest["model_version"]
    assert len(manifest["model_version"]) == 16


@pytest.mark.parametrize("mode", ["eager", "exported"])
@pytest.mark.parametrize("calibrated", [True, False])
def test_served_scores_equal_the_trained_models_on_the_test_split(quickstart, mode, calibrated):
    run, artifact = quickstart
    columns = _columns(run)
    rows = serving.load(artifact).encoder.rows(columns)
    assert len(rows) == len(columns["labels"]) > 100
    got = _served(artifact, rows, mode, calibrated)
    want = _reference(run, columns, calibrated)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE


def test_calibration_moves_the_scores_as_the_run_says(quickstart):
    run, artifact = quickstart
    rows = serving.load(artifact).encoder.rows(_columns(run), 0, 200)
    raw = _served(artifact, rows, "exported", calibrated=False)
    calibrated = _served(artifact, rows, "exported")
    maps = json.loads((run / "calibration.json").read_text())["tasks"]
    for t, task in enumerate(["click", "conversion"]):
        logit = np.log(raw[:, t]) - np.log1p(-raw[:, t])
        expected = 1 / (1 + np.exp(-(maps[task]["a"] * logit + maps[task]["b"])))
        np.testing.assert_allclose(calibrated[:, t], expected, rtol=1e-6, atol=1e-9)


def test_hmoe_predict_and_the_predictor_agree(quickstart, tmp_path):
    run, artifact = quickstart
    output = tmp_path / "scores.parquet"
    assert main(["predict", str(run), "--output", str(output)]) == 0
    table = pq.read_table(output)
    rows = serving.load(artifact).encoder.rows(_columns(run))
    got = serving.load(artifact).predict(rows)
    for task in ("click", "conversion"):
        want = table.column(f"score_{task}").to_numpy()
        assert np.abs(np.array([r[task] for r in got]) - want).max() <= TOLERANCE


def test_batches_larger_than_the_programs_limit_are_split(quickstart, monkeypatch):
    run, artifact = quickstart
    predictor = serving.load(artifact)
    rows = predictor.encoder.rows(_columns(run), 0, 50)
    whole = predictor.score(predictor.encode(rows))
    predictor.metadata["max_batch"] = 7
    split = predictor.score(predictor.encode(rows))
    assert split.shape == whole.shape  # (the matrix products' sums depend on the batch size)
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-6)


def test_hand_made_batches_with_ids_out_of_range_are_refused(quickstart):
    run, artifact = quickstart
    predictor = serving.load(artifact)
    batch = predictor.encode(predictor.encoder.rows(_columns(run), 0, 4))
    bad = dict(batch, categorical=batch["categorical"].clone())
    bad["categorical"][2, 1] = predictor.schema.categorical[1].vocab_size
    with pytest.raises(ValueError, match=r"ad_id.*ids must lie in \[0, "):
        predictor.score(bad)
    bad = dict(batch, **{"seq/hist_ads": batch["seq/hist_ads"].clone()})
    bad["seq/hist_ads"][0, 0] = -1
    with pytest.raises(ValueError, match=r"seq/hist_ads"):
        predictor.score(bad)
    with pytest.raises(ValueError, match="batch is missing"):
        predictor.score({"categorical": batch["categorical"]})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_family_exports(preset, tmp_path):
    tasks = {"single_task": "[click]", "stem_al": "[click, conversion, like]"}.get(
        preset, "[click, conversion]")  # (stem_al: the auxiliary task too)
    options = "{}" if preset == "ame" else "{dim: 8}"  # (ame: one dim per set, its default)
    run = _train(tmp_path / "run", f"--model.preset={preset}", f"--model.tasks={tasks}",
                 f"--model.options={options}", rows=1500)
    artifact = tmp_path / "artifact"
    manifest = serving.export(run, artifact, devices=(), check_rows=64)
    assert manifest["check"]["max_abs_logit_difference"]["exported"] <= TOLERANCE
    columns = _columns(run)
    rows = serving.load(artifact).encoder.rows(columns, 0, 300)
    want = _reference(run, {k: v[:300] for k, v in columns.items()}, True)
    for mode in ("exported", "eager"):
        assert np.abs(_served(artifact, rows, mode) - want).max() <= TOLERANCE


@pytest.mark.parametrize("options", [
    "{sequence_encoder: din}", "{sequence_encoder: sasrec}",
    "{sequence_encoder: din, joint_sequences: true, din_hidden: [64]}",
    "{sequence_encoder: tim, joint_sequences: true, num_heads: 2}",
    "{sequence_encoder: mean, numeric_encoder: bucket}",
    "{sequence_encoder: tim_no_temporal, numeric_encoder: scaled}",
])
def test_encoders_export(options, tmp_path):
    run = _train(tmp_path / "run", f"--model.options={options}", rows=1500)
    artifact = tmp_path / "artifact"
    serving.export(run, artifact, devices=(), check_rows=64)
    columns = _columns(run)
    rows = serving.load(artifact).encoder.rows(columns, 0, 300)
    want = _reference(run, {k: v[:300] for k, v in columns.items()}, True)
    assert np.abs(_served(artifact, rows, "exported") - want).max() <= TOLERANCE
    if "joint" in options:  # a row whose sequences differ in length fails alone, named
        predictor = serving.load(artifact, mode="exported")
        long = next(i for i, row in enumerate(rows) if len(row["hist_ads"]) >= 2)
        bad = dict(rows[long], hist_categories=rows[long]["hist_categories"][:-1])
        error, scores = predictor.score_many([[rows[0], bad], rows[:3]])
        assert isinstance(error, serving.RowError)
        assert "rows[1].hist_categories: must hold as many behaviours as hist_ads" in str(error)
        np.testing.assert_allclose(scores, predictor.score_many([rows[:3]])[0])
        batch = predictor.encode(rows[:4])
        batch["seq/hist_categories/lengths"] = batch["seq/hist_categories/lengths"].flip(0)
        with pytest.raises(ValueError, match=r"seq/hist_categories/lengths'\]: must equal"):
            predictor.score(batch)


def test_a_dynamic_vocabulary_of_a_generated_world_is_served_by_its_raw_ids(tmp_path):
    """The id map travels in weights.pt and is applied before the program; a world's raw ids
    are integers, which requests give as they are."""
    run = _train(tmp_path / "run", "--data.vocab={ad_id: {kind: dynamic, capacity: 300, "
                                   "min_count: 1}, user_id: {kind: hash, buckets: 64}}",
                 rows=2000)
    artifact = tmp_path / "artifact"
    manifest = serving.export(run, artifact, devices=(), check_rows=64)
    assert manifest["raw_ids"] == "integers"
    columns = _columns(run)
    predictor = serving.load(artifact)
    rows = predictor.encoder.rows(columns, 0, 400)
    assert rows[0]["ad_id"] == int(columns["categorical"][0, 1])  # raw, not a row
    want = _reference(run, {k: v[:400] for k, v in columns.items()}, True)
    for mode in ("exported", "eager"):
        assert np.abs(_served(artifact, rows, mode) - want).max() <= TOLERANCE
    # an id never admitted scores as the out-of-vocabulary row, not as an error
    unseen = dict(rows[0], ad_id=10**9)
    assert np.isfinite(predictor.score(predictor.encode([unseen]))).all()
    with pytest.raises(serving.RowError, match=r"rows\[0\]\.ad_id: must be a raw id"):
        predictor.encode([dict(rows[0], ad_id=-3)])


FILES_CONFIG = """
name: tiny_files
features:
  - {name: user, type: categorical}
  - {name: ad, type: categorical}
  - {name: site, type: categorical, vocab: {kind: dynamic, capacity: 8, min_count: 1}}
  - {name: price, type: numeric, quantizer: quantile, num_bins: 4}
  - {name: hist, type: sequence, item: ad, max_len: 4, temporal_column: hist_dt,
     max_position: 8}
labels:
  - {name: click}
group_id: user
source:
  null_values: ["", "NA"]
"""


def _files(tmp_path: Path, rows: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["user,ad,site,price,hist,hist_dt,click"]
    for _ in range(rows):
        k = int(rng.integers(0, 5))
        hist = "|".join(f"a{rng.integers(12)}" for _ in range(k))
        dt = "|".join(str(int(rng.integers(0, 5000))) for _ in range(k))
        price = "NA" if rng.random() < 0.1 else f"{rng.random() * 10:.2f}"
        lines.append(f"u{rng.integers(20)},a{rng.integers(14)},s{rng.integers(6)},{price},"
                     f"{hist},{dt},{int(rng.integers(2))}")
    path = tmp_path / f"log{seed}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_run_on_raw_files_serves_raw_rows(tmp_path, monkeypatch):
    """Strings through the run's vocabularies, hashed raw ids of a dynamic vocabulary,
    time-bucketed sequence positions, null values: the rows of the test file score as
    hmoe predict scores the same file, and the cache is found where the run's config says
    (relative to the directory the run started in)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(FILES_CONFIG)
    train, test = _files(tmp_path, 600, 1), _files(tmp_path, 150, 2)
    code = main(["train", "--out", "run", "--data.source=files", "--data.dataset=tiny.yaml",
                 f"--data.files={{train: {train}, valid: {train}, test: {test}}}",
                 "--model.preset=stem", "--model.tasks=[click]", "--model.options={dim: 4}",
                 "--train.epochs=1", "--train.batch_size=64", "--train.progress=off",
                 "--train.threads=1"])
    assert code == 0
    manifest = serving.export("run", tmp_path / "artifact", devices=(), check_rows=64)
    assert manifest["raw_ids"] == "hashed" and "vocabularies" in manifest["files"]
    assert main(["predict", "run", "--output", "scores.parquet"]) == 0
    want = pq.read_table("scores.parquet").column("score_click").to_numpy()
    rows = _csv_rows(test)  # text, as in the file; the label column is ignored
    for mode in ("exported", "eager"):
        got = [r["click"] for r in serving.load(tmp_path / "artifact", mode=mode).predict(rows)]
        assert np.abs(np.array(got) - want).max() <= TOLERANCE
    # JSON types: numbers for numbers and lists for sequences score the same
    typed = [dict(r, price=None if r["price"] == "NA" else float(r["price"]),
                  hist=r["hist"].split("|") if r["hist"] else [],
                  hist_dt=[int(x) for x in r["hist_dt"].split("|")] if r["hist_dt"] else None)
             for r in rows]
    got = [r["click"] for r in serving.load(tmp_path / "artifact").predict(typed)]
    assert np.abs(np.array(got) - want).max() <= TOLERANCE
    # the cache moved: the export says where to point it
    (tmp_path / ".cache").rename(tmp_path / "moved")
    with pytest.raises(ValueError, match="give --cache DIR"):
        serving.export("run", tmp_path / "again", devices=())
    found = list((tmp_path / "moved").glob("hmoe/*"))
    serving.export("run", tmp_path / "again", devices=(), cache=found[0], check_rows=16)


def test_the_cli_exports_and_refuses_clearly(quickstart, tmp_path, capsys):
    run, _ = quickstart
    out = tmp_path / "art"
    assert main(["export", str(run), "--out", str(out), "--no-aoti"]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and "exported 0.0e+00" in printed
    assert main(["export", str(run), "--out", str(out), "--no-aoti"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x"), "--no-aoti"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "y"), "--checkpoint", "nope"]) == 2
    assert "no checkpoint 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not an hmoe inference artifact"):
        serving.load(tmp_path)
    with pytest.raises(ValueError, match="no AOTInductor package for 'cpu'"):
        serving.load(out, mode="aoti")
    if not torch.cuda.is_available():
        assert main(["export", str(run), "--out", str(tmp_path / "z"), "--device", "cuda"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_the_aoti_package_agrees_on_the_test_split(quickstart, tmp_path):
    """AOTInductor compiles the program into a C++ package (~40 s): its scores agree with the
    eager model's within 1e-5 on every row of the test split."""
    run, _ = quickstart
    artifact = tmp_path / "artifact"
    manifest = serving.export(run, artifact, devices=("cpu",))
    assert manifest["files"]["aoti"] == {"cpu": "aoti_cpu.pt2"}
    assert manifest["check"]["max_abs_logit_difference"]["aoti_cpu"] <= TOLERANCE
    predictor = serving.load(artifact)
    assert predictor.mode == "aoti"
    columns = _columns(run)
    rows = predictor.encoder.rows(columns)
    want = _reference(run, columns, True)
    assert np.abs(predictor.score(predictor.encode(rows)) - want).max() <= TOLERANCE
    eager = _served(artifact, rows, "eager")
    assert np.abs(predictor.score(predictor.encode(rows)) - eager).max() <= TOLERANCE
