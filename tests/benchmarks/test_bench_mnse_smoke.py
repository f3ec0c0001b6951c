"""Smoke test of benchmarks/bench_mnse.py: it runs end to end on the tiny workload and gives every
provider that can run here a row per phase with finite, positive times. This tests the benchmark
code (providers, correctness checks, byte model, output files), not speed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import hmoe.ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_mnse as bench  # noqa: E402

MEASURED_PHASES = ("forward", "fwd+bwd", "train")


def test_tiny_workload_gives_rows_for_every_available_provider(tmp_path, capsys):
    report = bench.main(["--workload", "tiny", "--phase", "all", "--repeats", "2", "--warmup", "1",
                         "--copy-mib", "8", "--out", str(tmp_path)])
    device = torch.device("cpu")
    available = {name for name, cls in bench.PROVIDERS.items() if cls.unavailable(device) is None}
    expected = {"eager_torch", "compiled_torch", "one_hot_matmul", "embedding_bag",
                "hmoe_reference"}
    if hmoe.ops.reasons("mnse", "cpu")["cpu"] is None:
        expected.add("hmoe_cpu")
    assert expected <= available
    measured = {row.provider for row in report.rows}
    assert measured == available, f"providers that did not run: {report.skipped}"
    assert set(report.skipped) == set(bench.PROVIDERS) - available
    assert all(report.skipped.values())  # every skip says why

    for name in available:
        rows = {row.phase: row for row in report.rows if row.provider == name}
        assert set(rows) == {*MEASURED_PHASES, "backward"}, name
        for phase in MEASURED_PHASES:
            row = rows[phase]
            assert math.isfinite(row.ms) and row.ms > 0, (name, phase, row.ms)
            assert row.p10_ms <= row.ms <= row.p90_ms, (name, phase)
            assert math.isfinite(row.gb_per_s) and row.gb_per_s > 0 and row.frac_of_copy > 0
            assert row.speedup["eager_torch"] > 0 and row.speedup["compiled_torch"] > 0
        assert math.isfinite(rows["backward"].ms)  # a difference of two medians: may be noisy
    assert report.first_call_s["compiled_torch"] > 0

    json_files, csv_files = list(tmp_path.glob("*.json")), list(tmp_path.glob("*.csv"))
    assert len(json_files) == 1 and len(csv_files) == 1
    saved = json.loads(json_files[0].read_text())
    assert len(saved["rows"]) == len(report.rows) and saved["copy_roofline_gb_per_s"] > 0
    assert saved["bytes_per_phase"]["forward"] == 37 * 5 * 12 * 4 + 37 * 5 * 8
    assert "provider" in capsys.readouterr().out  # the table was printed


@pytest.mark.parametrize("mode", ["concat", "sum"])
def test_every_runnable_provider_matches_the_reference(mode):
    device = torch.device("cpu")
    for name, cls in bench.PROVIDERS.items():
        if cls.unavailable(device) is None and name != "compiled_torch":  # compiled: above
            bench.check_provider(cls, device, lr=0.01, mode=mode)


def test_unknown_provider_is_a_usage_error(capsys):
    try:
        bench.parse_args(["--providers", "no_such_provider"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("an unknown provider must be rejected")
    assert "no_such_provider" in capsys.readouterr().err
