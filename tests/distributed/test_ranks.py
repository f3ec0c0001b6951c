"""Real processes: 2 gloo ranks under torchrun, the sharded model against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hmoe.distributed.model import SHARDINGS

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(HERE / "_ranks.py"), str(out)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the ranks too, not only torchrun
        raise
    assert job.returncode == 0, output[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_sharded_forward_equals_the_whole_model(ranks, sharding):
    for rank in ranks:
        assert rank[sharding]["forward"] <= 1e-5


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_twenty_sgd_steps_on_two_ranks_equal_one_process(ranks, sharding):
    for rank in ranks:
        assert rank[sharding]["moved"] > 1e-3  # the steps changed the model
        assert rank[sharding]["sgd"] <= 1e-5


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_the_gathered_state_is_the_whole_models_and_loads_back(ranks, sharding):
    """After the 20 steps, rank 0's gathered state (single-process layout) equals the state of
    the one-process model; a single-process state loaded into the sharded model computes what
    that model computes (a resume at another world size)."""
    assert ranks[0][sharding]["gather"] <= 1e-5
    for rank in ranks:
        assert rank[sharding]["reload"] <= 1e-5
