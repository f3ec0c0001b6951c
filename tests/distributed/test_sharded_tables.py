"""hmoe.distributed in one process: ShardedTables against the MultiEmbedding it stands in for."""

from __future__ import annotations

import copy

import pytest
import torch

from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.distributed import INSTALL, require
from hmoe.distributed.embedding import ShardedTables
from hmoe.distributed.model import distribute, shard_tables
from hmoe.models.presets import preset
from hmoe.nn import MultiEmbedding


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticConfig(num_rows=400, num_users=40, num_ads=50, num_advertisers=8,
                                    max_len=9, seed=5))


def _batch(world, n=48):
    return {key: torch.as_tensor(value[:n]).clone() for key, value in world.splits["train"].items()}


@pytest.mark.parametrize("name,encoder", [("hmoe_me", "tim"), ("stem", "din"), ("mmoe", "mean")])
def test_the_swapped_model_computes_the_same_and_gets_the_same_gradients(world, name, encoder):
    torch.manual_seed(0)
    model = preset(name, world.schema, sequence_encoder=encoder, dim=8, expert_hidden=(16,),
                   tower=())
    swapped = shard_tables(copy.deepcopy(model))
    assert all(isinstance(g.categorical, ShardedTables) for g in swapped.groups)
    batch = _batch(world)
    expected, got = model(batch)["logits"], swapped(batch)["logits"]
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-5, atol=1e-6)
    sum(v.sum() for v in expected.values()).backward()
    sum(v.sum() for v in got.values()).backward()
    for group, other in zip(model.groups, swapped.groups):
        tables = other.categorical
        grads = {key: value.grad for key, value in
                 ((f"embeddings.{n}.weight", tables.collection.embeddings[n].weight)
                  for n in tables.table_names)}
        merged = ShardedTables.weight_from_state(grads, tables.table_names, tables.num_sets,
                                                 tables.dim)
        torch.testing.assert_close(merged, group.categorical.weight.grad, rtol=1e-5, atol=1e-7)


def test_rows_round_trip_through_the_tables(world):
    table = MultiEmbedding([f.vocab_size for f in world.schema.categorical], dim=4, num_sets=3)
    tables = ShardedTables.from_multi_embedding(table, world.schema)
    state = tables.collection.state_dict()
    assert [tuple(state[f"embeddings.{n}.weight"].shape) for n in tables.table_names] == \
        [(f.vocab_size, 12) for f in world.schema.categorical]
    back = ShardedTables.weight_from_state(state, tables.table_names, 3, 4)
    torch.testing.assert_close(back, table.weight.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"weight: expected shape"):
        tables.rows_state(torch.zeros(3, 3, 4))


def test_padding_is_never_read_and_bad_ids_are_refused_by_name(world):
    torch.manual_seed(1)
    model = shard_tables(preset("hmoe_me", world.schema, dim=8, expert_hidden=(16,), tower=()))
    batch = _batch(world, 16)
    seq = world.schema.sequence[0].name
    expected = model(batch)["logits"]
    dirty = dict(batch)
    ids, lengths = batch[f"seq/{seq}"].clone(), batch[f"seq/{seq}/lengths"]
    padded = torch.arange(ids.shape[1]) >= lengths[:, None]
    item = world.schema.categorical[world.schema.categorical_index(world.schema.sequence[0].item)]
    dirty[f"seq/{seq}"] = ids.masked_fill(padded, item.vocab_size - 1)  # never looked up
    for task, value in model(dirty)["logits"].items():
        torch.testing.assert_close(value, expected[task], rtol=0, atol=0)
    field = world.schema.categorical[2]
    bad = dict(batch, categorical=batch["categorical"].clone())
    bad["categorical"][5, 2] = field.vocab_size
    tables = model.groups[0].categorical  # its own check (the model checks batches too)
    with pytest.raises(IndexError, match=rf"sample 5, field '{field.name}' holds id "
                                         rf"{field.vocab_size}, outside \[0, {field.vocab_size}\)"):
        tables.lookup(bad)
    row = int(torch.nonzero(lengths > 0)[0])
    worse = dict(batch, **{f"seq/{seq}": ids.clone()})
    worse[f"seq/{seq}"][row, 0] = -3
    with pytest.raises(IndexError, match=rf"seq/{seq}'\]: a valid step holds id -3"):
        tables.lookup(worse)


def test_distribute_refuses_bad_arguments_and_an_uninitialised_world(world):
    model = preset("hmoe_me", world.schema, dim=8, expert_hidden=(16,), tower=())
    with pytest.raises(ValueError, match="sharding must be one of"):
        distribute(model, sharding="diagonal", lr=0.1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        distribute(model, optimizer="adam", lr=0.1)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        distribute(model, lr=0.1)


def test_require_names_the_recipe_when_torchrec_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchrec" else real(name, *a))
    with pytest.raises(ImportError, match="--no-deps torchrec"):
        require()
    assert "fbgemm-gpu" in INSTALL
