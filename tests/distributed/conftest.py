"""The distributed tests need TorchRec (the optional extra). Where it is missing they are
skipped, except under CI (CI=true), which installs it and must run them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hmoe.distributed import INSTALL, available


def pytest_collection_modifyitems(config, items):
    if available():
        return
    if os.environ.get("CI", "").lower() in ("1", "true"):
        raise pytest.UsageError(f"CI must run the distributed tests, but TorchRec is missing: "
                                f"{INSTALL}")
    skip = pytest.mark.skip(reason=f"TorchRec is not installed: {INSTALL}")
    for item in items:
        if "tests/distributed" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """run(script): tests/distributed/<script> under torchrun on 2 gloo ranks, given an output
    directory; the JSON each rank wrote there (rank<r>.json), in rank order."""

    def run(script: str) -> list[dict]:
        out = tmp_path_factory.mktemp(Path(script).stem.strip("_"))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2", str(Path(__file__).resolve().parent / script),
                   str(out)]
        job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=True)
        try:
            output, _ = job.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)  # the ranks too, not only torchrun
            raise
        assert job.returncode == 0, output[-5000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    return run
