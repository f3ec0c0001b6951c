"""torch.distributed.checkpoint round trips and evaluation across ranks, for every sharding type
(real processes: 2 gloo ranks under torchrun, tests/distributed/_checkpoints.py)."""

from __future__ import annotations

import pytest

from hmoe.distributed.model import SHARDINGS


@pytest.fixture(scope="module")
def ranks(two_ranks):
    return two_ranks("_checkpoints.py")


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_a_checkpoint_loads_back_and_the_run_continues_exactly(ranks, sharding):
    found = ranks[0][sharding]
    assert found["reload"] == 0.0
    assert found["resumed"] == 0.0
    if sharding != "data_parallel":  # (its table's optimizer is the dense one, in extra)
        assert found["afresh"] > 1e-6  # the tables' row-wise Adagrad state was in it


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_one_process_reads_the_sharded_checkpoint_as_the_gathered_state(ranks, sharding):
    assert ranks[0][sharding]["single"] == 0.0


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_evaluation_across_ranks_equals_one_process(ranks, sharding):
    found = ranks[0][sharding]
    assert [ranks[r][sharding]["rows"] for r in range(2)] == [512, 488]  # unequal shares
    assert found["counts"] == [1000, 1000]
    assert found["metrics"] <= 1e-6
