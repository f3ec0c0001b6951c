"""Shared fixtures of the analysis tests: a tiny synthetic world and tiny HMoE presets on it
(embedding dim 8, one small hidden layer), built once per session: all fast on 2 CPU cores."""

from __future__ import annotations

import pytest

from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.models.presets import preset

TINY_WORLD = dict(num_rows=3000, num_users=200, num_ads=300, num_advertisers=50, max_len=10)
TINY_MODEL = dict(dim=8, expert_hidden=(16,), tower=())


@pytest.fixture(scope="session")
def world():
    """3000 rows, 16 categories, sequences of up to 10 steps."""
    return generate(SyntheticConfig(**TINY_WORLD))


@pytest.fixture
def make_model(world):
    """make_model(name="stem", encoder="tim", **overrides): a fresh tiny preset on the world."""

    def make(name: str = "stem", encoder: str = "tim", **overrides):
        return preset(name, world.schema, sequence_encoder=encoder, **{**TINY_MODEL, **overrides})

    return make
