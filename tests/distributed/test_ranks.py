"""Real processes: 2 gloo ranks under torchrun, the sharded model against one process."""

from __future__ import annotations

import pytest

from hmoe.distributed.model import SHARDINGS


@pytest.fixture(scope="module")
def ranks(two_ranks):
    return two_ranks("_ranks.py")


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
