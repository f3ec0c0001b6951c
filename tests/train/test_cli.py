"""The command line: hmoe train | eval | predict (in-process through hmoe.cli.main), overrides,
errors as one line with exit status 2, and configs/quickstart.yaml's validity."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.csv
import pyarrow.parquet
import pytest

from hmoe.cli import main
from hmoe.train import load_run_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--data.synthetic.num_rows=2000", "--data.synthetic.num_users=200",
        "--data.synthetic.num_ads=400", "--data.synthetic.max_len=8", "--model.options.dim=8",
        "--train.batch_size=256", "--train.epochs=1", "--train.threads=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(out), "--train.lr=3e-3", *TINY]) == 0
    return out


def test_train_writes_the_run_and_applies_overrides(run_dir, capsys):
    config = load_run_config(str(run_dir / "config.resolved.yaml"))
    assert config.train.lr == 0.003 and config.model.options == {"dim": 8}
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["test"]) == {"click", "conversion"}


def test_eval_prints_and_writes_metrics(run_dir, capsys):
    assert main(["eval", str(run_dir), "--split", "valid"]) == 0
    written = json.loads((run_dir / "eval_valid_best.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert written == results["valid"]
    out = capsys.readouterr().out
    assert "click" in out and f"{results['valid']['click']['auc']:.4f}" in out


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_writes_scores_next_to_ids(run_dir, tmp_path, suffix):
    output = tmp_path / f"scores{suffix}"
    assert main(["predict", str(run_dir), "--output", str(output)]) == 0
    table = (pyarrow.csv.read_csv(output) if suffix == ".csv"
             else pyarrow.parquet.read_table(output))
    assert table.column_names == ["row", "group_id", "score_click", "score_conversion"]
    scores = table.column("score_click").to_numpy()
    assert len(scores) == 200 and ((scores > 0) & (scores < 1)).all()
    assert table.column("row").to_pylist() == list(range(200))


@pytest.mark.parametrize("argv, match", [
    (["train", "--train.nope=1"], r"unknown key\(s\) \['train.nope'\]"),
    (["train", "--model.preset=nope"], "model.preset: must be one of"),
    (["train", "--config", "/nonexistent.yaml"], "cannot read it"),
    (["train", "--resume"], "--resume needs --out"),
    (["eval", "/nonexistent-run"], "not a run directory"),
])
def test_errors_are_one_line_with_status_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hmoe {argv[0]}: error:")
    assert pytest.importorskip("re").search(match, err), err


def test_a_malformed_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--lr"])
    assert exit_info.value.code == 2
    assert "--section.key=value" in capsys.readouterr().err


def test_eval_with_a_missing_checkpoint(run_dir, capsys):
    assert main(["eval", str(run_dir), "--checkpoint", "nope"]) == 2
    assert "has no checkpoint 'nope' (neither checkpoints/nope.pt nor nope.dcp" in \
        capsys.readouterr().err
    assert main(["eval", str(run_dir), "--checkpoint", str(run_dir / "gone.pt")]) == 2
    assert "gone.pt does not exist" in capsys.readouterr().err


def test_quickstart_config_is_valid():
    config = load_run_config(str(ROOT / "configs" / "quickstart.yaml"))
    assert config.model.preset == "stem" and config.loss.ipw_gamma > 0
    assert config.train.gradient_cosine_every > 0  # the report's gradient-cosine curve


def test_yaml_on_off_and_exponents_read_as_meant():
    config = load_run_config(None, ["train.progress=off", "train.lr=5e-4", "train.tensorboard=no"])
    assert config.train.progress == "off" and config.train.lr == 5e-4
    assert config.train.tensorboard is False


def test_snapshots_feed_the_ia_over_training_figure(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--train.snapshot_every=2", *TINY]) == 0
    from hmoe.train.trainer import load_snapshots
    steps = [step for step, _ in load_snapshots(out)]
    assert steps == list(range(2, 2 * len(steps) + 1, 2)) and len(steps) >= 3
    assert main(["analyze", str(out)]) == 0
    assert (out / "report" / "collapse_training.png").stat().st_size > 0


def test_generate_then_train_eval_predict_analyze_streamed_from_disk(tmp_path, capsys):
    """A world written by `hmoe generate` trains, evaluates, predicts and is analysed streamed
    from disk (one worker), and predict writes every test row in order."""
    world = tmp_path / "world"
    assert main(["generate", "--rows", "2000", "--out", str(world), "--row-group-rows", "300",
                 "--num_users=200", "--num_ads=400", "--max_len=8"]) == 0
    assert "written:" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data.source=world", f"--data.world={world}",
                 "--train.num_workers=1", "--data.shuffle_buffer=700",
                 *[a for a in TINY if not a.startswith("--data.synthetic")]]) == 0
    assert main(["eval", str(out), "--split", "valid"]) == 0
    results = json.loads((out / "results.json").read_text())
    written = json.loads((out / "eval_valid_best.json").read_text())
    assert written["click"]["auc"] == results["valid"]["click"]["auc"]
    scores = tmp_path / "scores.parquet"
    assert main(["predict", str(out), "--output", str(scores)]) == 0
    table = pyarrow.parquet.read_table(scores)
    assert table.column("row").to_pylist() == list(range(200))  # the test split, in order
    assert main(["analyze", str(out)]) == 0
    assert (out / "report" / "report.html").is_file()


@pytest.mark.parametrize("argv, match", [
    (["generate", "--rows", "10", "--out", "{tmp}/w", "--nope=1"], "not --<field>=<value>"),
    (["generate", "--rows", "0", "--out", "{tmp}/w"], "num_rows"),
    (["generate", "--rows", "10", "--out", "{tmp}/w", "--row-group-rows", "0"],
     "--row-group-rows must be >= 1"),
])
def test_generate_errors(tmp_path, argv, match, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert match in capsys.readouterr().err
