"""Smoke test of benchmarks/bench_tim.py: it runs end to end on the tiny workload and gives every
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

import bench_tim as bench  # noqa: E402

MEASURED_PHASES = ("forward", "fwd+bwd", "train")


def test_tiny_workload_gives_rows_for_every_available_provider(tmp_path, capsys):
    report = bench.main(["--workload", "tiny", "--phase", "all", "--repeats", "2", "--warmup", "1",
                         "--copy-mib", "8", "--out", str(tmp_path)])
    device = torch.device("cpu")
    available = {name for name, cls in bench.PROVIDERS.items() if cls.unavailable(device) is None}
    expected = {"eager_torch", "compiled_torch", "din_eager", "hmoe_reference"}
    if hmoe.ops.reasons("tim_attention", "cpu")["cpu"] is None:
        expected.add("hmoe_cpu")
    assert expected <= available
    assert {row.provider for row in report.rows} == available, report.skipped
    assert all(report.skipped.values())  # every skip says why
    for name in available:
        rows = {row.phase: row for row in report.rows if row.provider == name}
        assert set(rows) == {*MEASURED_PHASES, "backward"}, name
        for phase in MEASURED_PHASES:
            row = rows[phase]
            assert math.isfinite(row.ms) and row.ms > 0 and row.p10_ms <= row.ms <= row.p90_ms
            assert row.gb_per_s > 0 and row.speedup["eager_torch"] > 0
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert len(saved["rows"]) == len(report.rows)
    lengths = bench.WORKLOADS["tiny"].inputs(device)["lengths"]
    S = int(lengths.sum())
    assert saved["bytes_per_phase"]["forward"] == S * (8 * 4 + 16) + 13 * 8 * 12 + 13 * 9 * 4
    assert "provider" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["eager_torch", "din_eager", "hmoe_reference", "hmoe_cpu"])
def test_providers_pass_their_correctness_check(name):
    cls = bench.PROVIDERS[name]
    if cls.unavailable(torch.device("cpu")) is not None:
        pytest.skip(cls.unavailable(torch.device("cpu")))
    bench.check_provider(cls, torch.device("cpu"), lr=0.01)


def test_a_wrong_provider_fails_its_check(monkeypatch):
    right = bench.tim_formula

    def wrong(e, v, position_weight, positions, lengths):  # forgets the target-aware product
        return right(e, torch.ones_like(v), position_weight, positions, lengths)

    monkeypatch.setattr(bench.tim_eager, "__defaults__", (wrong,))
    with pytest.raises(AssertionError, match="forward"):
        bench.check_provider(bench.EagerTorch, torch.device("cpu"), lr=0.01)


def test_saved_activations_are_counted_and_hmoe_saves_only_alpha_and_pooled():
    device = torch.device("cpu")
    workload = bench.WORKLOADS["tiny"]
    batch = workload.inputs(device)
    B, L, D = workload.batch, workload.length, workload.dim
    eager = bench.saved_activation_mib(bench.EagerTorch(workload, device, 0.01), batch)
    assert eager * 2**20 >= B * L * D * 4  # it keeps at least one (B, L, D) float tensor
    if bench.PROVIDERS["hmoe_cpu"].unavailable(device) is None:
        hmoe_mib = bench.saved_activation_mib(bench.PROVIDERS["hmoe_cpu"](workload, device, 0.01),
                                              batch)
        # alpha (B, 1, L) and pooled (B, D) in float32, the target rows (B, D) and the
        # int64 lengths the op makes: nothing of size (B, L, D)
        assert hmoe_mib * 2**20 <= (B * L + 2 * B * D) * 4 + B * 8 + 4096
