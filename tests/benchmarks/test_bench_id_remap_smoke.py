"""Smoke test of benchmarks/bench_id_remap.py: it runs end to end on the tiny workload and gives
every provider that can run here its rows with finite, positive rates. This tests the benchmark
code (providers, phases, output file), not speed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import hmoe.ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_id_remap as bench


def test_tiny_workload_gives_rows_for_every_available_provider(tmp_path, capsys):
    providers = ["hmoe_cpu", "hmoe_cuda", "hmoe_reference", "python_dict", "static_map"]
    report = bench.main(["--workload", "tiny", "--providers", ",".join(providers),
                         "--out", str(tmp_path)])
    ran = {r.provider for r in report.results}
    expected = {"hmoe_reference", "python_dict", "static_map"}
    if hmoe.ops.reasons("id_remap", "cpu")["cpu"] is None:
        expected.add("hmoe_cpu")
    assert ran == expected and set(report.skipped) == set(providers) - expected
    for r in report.results:
        assert math.isfinite(r.ids_per_s) and r.ids_per_s > 0, r
    by_key = {(r.provider, r.phase): r for r in report.results}
    # Every implementation of the rule admits the same ids: the same number of rows assigned.
    for provider in expected - {"static_map", "python_dict"}:
        assert by_key[provider, "stream"].assigned == by_key["python_dict", "stream"].assigned
    evict = {r.phase: r.assigned for r in report.results if r.provider == "python_dict"}
    assert evict["fill C=2000"] == evict["evict C=2000"] == 2000  # every new id got a row
    for provider in expected - {"static_map", "hmoe_reference"}:
        assert math.isfinite(report.extra[f"{provider}_ns_per_eviction"])
    saved = json.loads(next(tmp_path.glob("bench_id_remap_*.json")).read_text())
    assert len(saved["results"]) == len(report.results)
    assert "ids/s" in capsys.readouterr().out
