"""Smoke test of benchmarks/bench_distributed.py: both phases run end to end on a few steps."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed.py"


def test_both_phases_run_and_report_their_figures():
    done = subprocess.run([sys.executable, str(BENCH), "--steps", "2", "--warmup", "1",
                           "--repeats", "3", "--batch", "256", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rates = re.findall(r"ranks\s+(?:1 process|2 ranks \(auto\s*\))\s+([\d,]+) samples/s", out)
    assert len(rates) == 2 and all(float(r.replace(",", "")) > 0 for r in rates), out
    counted, planned = map(float, re.search(
        r"all-to-all per step:\s+([\d.]+) MiB .*?,\s+([\d.]+) MiB planned", out).groups())
    assert 0 < counted <= planned  # the plan counts max_len ids a sequence: an upper bound
    assert re.search(r"hmoe's kernel is [\d.]+x the speed of FBGEMM's tables", out), out
