"""experiments/run.py end to end on a tiny world: the page and its JSON are written, every
experiment's table has a row per variant, a rerun reads finished runs from the cache, the
summary at the top collects the computed verdicts, the dose-response sweeps judge and plot
their gains, and a bad argument is a usage error."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """experiments/run.py as a module, its run cache in a temporary directory (not the
    checkout's .cache)."""
    sys.path.insert(0, str(EXPERIMENTS_DIR))
    common = importlib.import_module("common")
    saved = common.CACHE_DIR
    common.CACHE_DIR = tmp_path_factory.mktemp("run-cache")
    try:
        yield importlib.import_module("run")
    finally:
        common.CACHE_DIR = saved
        sys.path.remove(str(EXPERIMENTS_DIR))


def test_smoke_run_writes_the_page(runner, tmp_path):
    out = tmp_path / "RESULTS.md"
    argv = ["--quick", "--only", "numerics,ipw", "--out", str(out)]  # 3000 rows, seeds 0,1
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
    assert runner.main(["--quick", "--only", "ipw", "--out", str(out)]) == 0
    assert runner.main(["--quick", "--only", "online", "--out", str(out), "--update"]) == 0
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


def test_a_rerun_reads_its_runs_from_the_cache_and_fresh_retrains(runner, tmp_path):
    common = importlib.import_module("common")
    argv = ["--quick", "--only", "numerics"]
    before = dict(common.LEDGER)
    assert runner.main([*argv, "--out", str(tmp_path / "a.md")]) == 0
    first = common.LEDGER["runs"] - before["runs"]
    assert first > 0
    cached = common.LEDGER["cached"]
    assert runner.main([*argv, "--out", str(tmp_path / "b.md")]) == 0
    assert common.LEDGER["cached"] - cached == first  # every run of the rerun came from it
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    title = "3. Numeric features (synthetic)"
    assert a[title]["mnse"] == b[title]["mnse"]
    assert b[title]["_cost"]["cached"] == first
    assert f"({first} read from the run cache)" in (tmp_path / "b.md").read_text()
    assert "1 epoch each (--quick)" in (tmp_path / "b.md").read_text()
    # --fresh retrains what is cached
    cached = common.LEDGER["cached"]
    assert runner.main([*argv, "--fresh", "--out", str(tmp_path / "c.md")]) == 0
    assert common.LEDGER["cached"] == cached


def test_summary_collects_the_computed_verdicts(runner):
    page = "\n".join([
        "# Results", "", "- command: x", "",
        "## 0. hmoe beside FuxiCTR on the same splits", "",
        "| dataset | task | model | test AUC | best epoch | verdict |", "|---|---|---|---|---|---|",
        "| adult | income_50k | mmoe | 0.91 ± 0.00 |  |  |",
        "| adult | income_50k | **hmoe's best (stem)** | 0.9133 ± 0.0004 |  | ahead of the peer "
        "(+0.0034) |", "",
        "## 2. Behaviour sequences (synthetic)", "", "**Claim** (notes 2.1): TIM wins.", "",
        "**Here**: TIM is better than din.", "",
        "## 3. Numeric features (adult)", "", "**Here**: MNSE is better than scaled.", "",
        "*trained to early stopping: up to 20 epochs; 6 training runs.*", "",
        "## 9. Dose-response on the synthetic world", "", "### TIM over DIN (notes 2.1)", "",
        "**Verdict**: holds: the gain grows.", ""])
    out = runner._with_summary(page)
    assert out.startswith("# Results")
    summary = out[out.index("## What holds"):out.index("## 0. hmoe")]
    assert "adult / income_50k: hmoe's best (stem) 0.9133 ± 0.0004, ahead of the peer" in summary
    # a section without a budget line is an old 1-epoch screen, and the summary says so
    assert "**2. Behaviour sequences (synthetic)**: (1-epoch screen) TIM is better than din." \
        in summary
    assert "**3. Numeric features (adult)**: MNSE is better than scaled." in summary
    assert "**9. Dose-response on the synthetic world, TIM over DIN (notes 2.1)**: holds" \
        in summary
    # grouped by claim: the sequence section and the TIM sweep together, after the peers
    groups = summary.split("\n### ")[1:]
    assert [g.split("\n")[0] for g in groups] == [
        "hmoe beside FuxiCTR (PEERS.md)", "TIM vs other sequence encoders (notes 2.1)",
        "MNSE for numeric features"]
    assert "**2. Behaviour sequences" in groups[1] and "TIM over DIN (notes 2.1)" in groups[1]
    assert runner._with_summary(out) == out  # rebuilt, not stacked, on an --update


def test_dose_response_judges_from_the_gains():
    dose = importlib.import_module("dose_response")
    grows = dose.judge([(0.0001, 0.001), (0.01, 0.001), (0.03, 0.002)])
    assert grows["grows"] and grows["vanishes_without"] and grows["verdict"].startswith("holds")
    flat = dose.judge([(0.0, 0.002), (0.001, 0.002), (0.0005, 0.002)])
    assert not flat["grows"] and flat["verdict"].startswith("not shown: no level")
    loses = dose.judge([(-0.01, 0.001), (-0.012, 0.001)])
    assert loses["verdict"].startswith("not shown: the method loses")
    always = dose.judge([(0.02, 0.001), (0.05, 0.001)])
    assert always["grows"] and not always["vanishes_without"]
    assert always["verdict"].startswith("partly")


def test_dose_response_quick_sweep_writes_its_table_and_figure(runner, tmp_path):
    dose = importlib.import_module("dose_response")
    section = dose.run(None, [0, 1], log=lambda _: None, figures=tmp_path, rows=3000,
                       only=("rank_vs_bce",), quick=True)
    numbers = section.numbers["rank_vs_bce"]
    assert [level["level"] for level in numbers["levels"]] == [0.3, 0.1]
    for level in numbers["levels"]:
        assert len(level["method"]) == len(level["baseline"]) == 2
        gain, se = level["gain"]
        assert gain == pytest.approx(sum(level["method"]) / 2 - sum(level["baseline"]) / 2)
        assert se >= 0
    assert numbers["verdict"] in section.markdown
    assert "| click_rate | combined_pair AUC | bce AUC | gain ± 2 SE |" in section.markdown
    (figure,) = section.figures
    assert Path(figure).name == "dose_rank_vs_bce.png" and Path(figure).stat().st_size > 10_000


def test_scale_quick_streams_its_world_and_judges_both_comparisons(runner, tmp_path,
                                                                    monkeypatch):
    """experiments/scale.py at its --quick size: the world is written to disk once and
    streamed (not held in memory), each run keeps its valid curve, the truth's AUC is the
    ceiling, and both verdicts reach the page's summary."""
    scale = importlib.import_module("scale")
    monkeypatch.setattr(scale, "WORLDS", tmp_path / "worlds")
    data = scale.world(scale.QUICK_ROWS, log=lambda _: None)
    assert type(data.splits["train"]).__name__ == "StoreSource"  # read from Parquet
    assert sorted(p.name for p in data.directory.glob("*.parquet")) == [
        "test.parquet", "train.parquet", "valid.parquet"]
    assert scale.world(scale.QUICK_ROWS).fingerprint == data.fingerprint  # reused, same key
    section = scale.run(None, [0, 1], log=lambda _: None, quick=True)
    numbers = section.numbers
    assert numbers["rows"] == scale.QUICK_ROWS and set(numbers["runs"]) == set(scale.VARIANTS)
    train_rows = numbers["train_rows"]
    for runs in numbers["runs"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            seen = [rows for rows, _ in r["curve"]]  # training rows seen, over the passes
            assert seen == sorted(seen) and 0 < seen[0]
            assert seen[-1] <= scale.EPOCHS * (train_rows + scale.BATCH)
            assert all(0 <= a <= 1 for _, a in r["curve"])
    assert all(0.5 < numbers["truth_auc"][t] <= 1 for t in ("click", "conversion"))
    assert section.markdown.count("**Verdict**:") == 2
    page = runner._with_summary(f"# page\n\n## {section.title}\n\n{section.markdown}\n")
    assert "ME against SE, click AUC:" in page.split("## 10.")[0]  # collected in the summary
    assert "STEM against MMoE, mean AUC:" in page.split("## 10.")[0]
