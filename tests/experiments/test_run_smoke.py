"""experiments/run.py end to end on a tiny world: the page and its JSON are written, every
experiment's table has a row per variant, and a bad argument is a usage error."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(scope="module")
def runner():
    sys.path.insert(0, str(EXPERIMENTS_DIR))
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(str(EXPERIMENTS_DIR))


def test_smoke_run_writes_the_page(runner, tmp_path):
    out = tmp_path / "RESULTS.md"
    argv = ["--only", "numerics,ipw", "--rows", "3000", "--seeds", "0,1", "--no-real",
            "--out", str(out)]
    assert runner.main(argv) == 0
    page = out.read_text()
    assert "## 3. Numeric features (synthetic)" in page and "## 6. IPW" in page
    for variant in ("| mnse |", "| bucket |", "| scaled |", "| gamma=0 |", "| gamma=1 |"):
        assert variant in page
    numbers = json.loads((tmp_path / "results.json").read_text())
    aucs = numbers["3. Numeric features (synthetic)"]["mnse"]["auc"]
    assert len(aucs) == 2 and all(0.0 <= a <= 1.0 for a in aucs)


def test_update_replaces_only_the_sections_it_runs(runner, tmp_path):
    """--update with the online experiment (its own world of 7 days) keeps the page's other
    sections and numbers, adds its section and figure, and records the command."""
    out = tmp_path / "RESULTS.md"
    assert runner.main(["--only", "ipw", "--rows", "3000", "--seeds", "0,1", "--no-real",
                        "--out", str(out)]) == 0
    assert runner.main(["--only", "online", "--rows", "3000", "--seeds", "0,1", "--no-real",
                        "--out", str(out), "--update"]) == 0
    page = out.read_text()
    assert "## 6. IPW" in page and "## 8. Online learning in a drifting world" in page
    assert "- updated 8. Online learning" in page and "--update" in page
    assert "figures/online_auc_per_day.png" in page
    numbers = json.loads((tmp_path / "results.json").read_text())
    assert any(k.startswith("6. IPW") for k in numbers)
    online = next(v for k, v in numbers.items() if k.startswith("8. Online"))
    assert set(online["auc"]) == {"online, dynamic vocabulary", "frozen after day 1",
                                  "online, static vocabulary (days 0-1)"}
    assert all(len(runs) == 2 and len(runs[0]) == 7 for runs in online["auc"].values())


def test_bad_arguments(runner):
    with pytest.raises(SystemExit):
        runner.main(["--only", "nope"])
    with pytest.raises(SystemExit):
        runner.main(["--seeds", "0"])


def test_noise_verdicts(runner):
    common = importlib.import_module("common")
    assert common.verdict([0.80, 0.81, 0.80], [0.70, 0.71, 0.70]) == "better"
    assert common.verdict([0.70, 0.71, 0.70], [0.80, 0.81, 0.80]) == "worse"
    assert common.verdict([0.80, 0.70, 0.75], [0.76, 0.74, 0.75]) == "within noise"
    assert common.verdict([0.3, 0.31], [0.5, 0.52], higher_is_better=False) == "better"
