"""Smoke test of benchmarks/bench_train.py: the tiny workload runs end to end, every backend
that can run here gives a row per model with finite, positive times and a samples/s figure,
and the result files are written. This tests the benchmark code, not speed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

import hmoe.ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_train as bench  # noqa: E402


def test_tiny_workload_gives_a_row_per_model_and_backend(tmp_path, capsys):
    report = bench.main(["--workload", "tiny", "--repeats", "2", "--warmup", "1",
                         "--copy-mib", "8", "--out", str(tmp_path)])
    backends = ["reference"]
    if hmoe.ops.reasons("multi_embedding", "cpu")["cpu"] is None:
        backends.insert(0, "cpu")
    expected = {f"{m}/{b}" for m in bench.MODELS for b in backends}
    assert {row.provider for row in report.rows} == expected, report.skipped
    for row in report.rows:
        assert math.isfinite(row.ms) and row.ms > 0 and row.p10_ms <= row.ms <= row.p90_ms
        model = row.provider.split("/")[0]
        assert row.speedup[f"{model}/reference"] > 0
        assert report.samples_per_s[row.provider] == pytest.approx(32 / (row.ms * 1e-3))
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert len(saved["rows"]) == len(report.rows) and saved["workload"]["batch"] == 32
    assert len(list(tmp_path.glob("*.csv"))) == 1
    assert "samples/s" in capsys.readouterr().out  # the table was printed


def test_unavailable_backend_is_skipped_with_the_reason(tmp_path):
    report = bench.main(["--workload", "tiny", "--models", "stem", "--backends", "cuda",
                         "--repeats", "1", "--warmup", "0", "--copy-mib", "8",
                         "--out", str(tmp_path)])
    assert "stem/cuda" in report.skipped and "cuda" in report.skipped["stem/cuda"]
    assert [row.provider for row in report.rows] == ["stem/reference"]


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--models", "xdeepfm"])
    assert exit_.value.code == 2 and "xdeepfm" in capsys.readouterr().err
