"""Post-hoc calibration (hmoe.train.calibrate): Platt scaling fitted on valid, saved in the run,
applied by eval and predict; the map is increasing, so AUC is unchanged."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from hmoe.cli import main
from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.train import Dataset, Trainer, load_run
from hmoe.train.calibrate import Calibration, Platt, fit_platt, load_calibration
from hmoe.train.config import RunConfig


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize(("a", "b"), [(0.6, -1.2), (1.7, 0.4), (1.0, -3.0)])
def test_fit_platt_recovers_the_map_and_matches_the_rate(a, b):
    rng = np.random.default_rng(0)
    z = rng.normal(size=40_000) * 2
    y = (rng.random(len(z)) < _sigmoid(a * z + b)).astype(float)
    found = fit_platt(z, y)
    assert found.a == pytest.approx(a, abs=0.06) and found.b == pytest.approx(b, abs=0.06)
    assert found.rows == len(z) and found.positives == int(y.sum())
    # at the optimum the mean calibrated prediction is the observed rate of the fitting rows
    assert _sigmoid(found.logits(z)).mean() == pytest.approx(y.mean(), abs=1e-9)


def test_the_map_stays_increasing_and_one_class_is_left_alone():
    rng = np.random.default_rng(1)
    z = rng.normal(size=5000)
    y = (rng.random(len(z)) < _sigmoid(-2 * z)).astype(float)  # the logit points the wrong way
    found = fit_platt(z, y)
    assert found.a == 1.0  # only the level is fitted: the scores' order is kept
    assert _sigmoid(found.logits(z)).mean() == pytest.approx(y.mean(), abs=1e-9)
    assert fit_platt(z, np.zeros(len(z))) == Platt(1.0, 0.0, len(z), 0)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        fit_platt(z, np.full(len(z), 0.5))
    with pytest.raises(ValueError, match="same length"):
        fit_platt(z, np.zeros(3))
    with pytest.raises(ValueError, match="not all finite"):
        fit_platt(np.array([0.0, np.nan]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="a > 0"):
        Platt(a=-1.0)


def test_save_load_and_apply(tmp_path):
    calibration = Calibration({"click": Platt(0.5, -1.0, 10, 3)})
    calibration.save(tmp_path / "calibration.json")
    again = load_calibration(tmp_path)
    assert dict(again) == dict(calibration) and load_calibration(tmp_path / "none") is None
    z = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    out = again.apply({"click": z, "other": z})
    assert torch.allclose(out["click"], 0.5 * z - 1.0) and out["other"] is z
    (tmp_path / "bad.json").write_text(json.dumps({"method": "isotonic"}))
    with pytest.raises(ValueError, match="not a calibration"):
        load_calibration(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    world = generate(SyntheticConfig(num_rows=6000, num_users=100, num_ads=200, max_len=8,
                                     seed=2))
    dataset = Dataset(world.schema, dict(world.splits), world.ground_truth)
    config = RunConfig.from_dict({
        "data": {"synthetic": {"num_rows": 6000, "num_users": 100, "num_ads": 200,
                               "max_len": 8, "seed": 2}},
        "model": {"preset": "stem", "options": {"dim": 8}},
        "loss": {"ipw_gamma": 1.0},  # moves the level: something to calibrate
        "train": {"epochs": 2, "batch_size": 128, "progress": "off", "threads": 1}})
    out = tmp_path_factory.mktemp("calibrated") / "run"
    results = Trainer(config, out, dataset=dataset).fit()
    return out, results, dataset


def test_training_fits_calibration_on_valid_and_reports_both(run):
    out, results, _ = run
    assert (out / "calibration.json").is_file()
    assert set(results["calibration"]) == set(results["tasks"])
    for task in results["tasks"]:
        raw, calibrated = results["test"][task], results["test_calibrated"][task]
        assert calibrated["auc"] == raw["auc"] and calibrated["gauc"] == raw["gauc"]
        # fitted on every valid row here: their mean prediction is their rate
        assert results["valid_calibrated"][task]["calibration"] == pytest.approx(1.0, abs=1e-6)


def test_eval_and_predict_apply_the_calibration(run, tmp_path, capsys):
    out, results, dataset = run
    assert main(["eval", str(out), "--split", "test"]) == 0
    assert "calibrated (calibration.json)" in capsys.readouterr().out
    written = json.loads((out / "eval_test_best_calibrated.json").read_text())
    assert written["click"]["calibration"] == \
        pytest.approx(results["test_calibrated"]["click"]["calibration"], rel=1e-9)
    assert json.loads((out / "eval_test_best.json").read_text())["click"]["auc"] == \
        results["test"]["click"]["auc"]
    for raw in (False, True):
        path = tmp_path / f"scores_{raw}.csv"
        assert main(["predict", str(out), "--split", "test", "--output", str(path),
                     *(["--raw"] if raw else [])]) == 0
        with path.open() as f:
            got = np.array([float(r["score_click"]) for r in csv.DictReader(f)])
        loaded = load_run(out, dataset=dataset)
        test = {k: torch.as_tensor(v) for k, v in dataset.splits["test"].items()}
        with torch.no_grad():
            z = loaded.model.eval()(test)["logits"]["click"].double()
        if not raw:
            z = loaded.calibration["click"].logits(z)
        np.testing.assert_allclose(got, torch.sigmoid(z).numpy(), rtol=1e-6)


def test_calibrate_false_turns_it_off(tmp_path):
    world = generate(SyntheticConfig(num_rows=2000, num_users=50, num_ads=80, max_len=6,
                                     seed=3))
    config = RunConfig.from_dict({"model": {"preset": "dnn", "tasks": ["click"],
                                            "options": {"dim": 4}},
                                  "train": {"epochs": 1, "batch_size": 128, "progress": "off",
                                            "calibrate": False}})
    results = Trainer(config, tmp_path / "run", dataset=Dataset(
        world.schema, dict(world.splits), world.ground_truth)).fit()
    assert "test_calibrated" not in results and not (tmp_path / "run" /
                                                     "calibration.json").exists()
    with pytest.raises(ValueError, match="train.calibrate"):
        RunConfig.from_dict({"train": {"calibrate": "yes"}})
