"""The small schema and batches the model tests share: every feature kind (3 categorical fields,
3 numeric ones with the three quantizers and two base tuples, one behaviour sequence, one
pretrained pair) and two main tasks plus one auxiliary."""

import pytest
import torch

from hmoe.data.random import random_batch
from hmoe.data.schema import (
    CategoricalFeature, Label, NumericFeature, PretrainedFeature, Schema, SequenceFeature,
)

MAX_LEN = 6


def make_schema(**kinds) -> Schema:
    defaults = dict(
        categorical=(CategoricalFeature("user", vocab_size=50),
                     CategoricalFeature("item", vocab_size=40),
                     CategoricalFeature("context", vocab_size=5)),
        numeric=(NumericFeature("age", quantizer="uniform", max_code=99),
                 NumericFeature("price", quantizer="log", max_code=200),
                 NumericFeature("rank", quantizer="quantile", num_bins=8,
                                boundaries=tuple(float(v) for v in range(7)), bases=(2,))),
        sequence=(SequenceFeature("history", item="item", max_len=MAX_LEN),),
        pretrained=(PretrainedFeature("graph", user_column="u", item_column="i", dim=8),),
        labels=(Label("click"), Label("buy"), Label("view", auxiliary=True)),
    )
    return Schema(name="test", **{**defaults, **kinds})


def make_batch(schema: Schema, batch_size: int = 24, seed: int = 0) -> dict:
    batch = random_batch(schema, batch_size, generator=torch.Generator().manual_seed(seed))
    if "numeric" in batch and batch_size > 0:  # row 0: every numeric value missing
        batch["numeric"][0] = float("nan")
    return batch


@pytest.fixture
def schema() -> Schema:
    return make_schema()


@pytest.fixture
def batch(schema) -> dict:
    return make_batch(schema)


@pytest.fixture
def schema_with():
    """make_schema: the test schema with some kinds replaced, e.g. schema_with(sequence=())."""
    return make_schema


@pytest.fixture
def batch_of():
    """make_batch(schema, batch_size=24, seed=0)."""
    return make_batch
