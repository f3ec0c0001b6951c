"""Ids that come and go, end to end: a model whose categorical features have dynamic or hash
vocabularies (CategoricalFeature.vocab), the trainer resetting the optimizer state of reclaimed
rows, and preprocessing that hands raw ids to the model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hmoe.data.preprocess import preprocess
from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.models import HMoE, preset
from hmoe.ops.id_remap import decode_state
from hmoe.train import Dataset, Trainer
from hmoe.train.config import RunConfig
from hmoe.train.trainer import _with_vocab

CAPACITY = 40


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticConfig(num_rows=1500, num_users=60, num_ads=150, max_len=6,
                                    seed=4))


def _dynamic(schema, capacity=CAPACITY, **vocab):
    return _with_vocab(schema, {"ad_id": {"kind": "dynamic", "capacity": capacity, **vocab}})


def _batch(world, rows: slice):
    return {key: torch.as_tensor(value[rows]) for key, value in world.splits["train"].items()}


def test_training_admits_ids_and_evaluation_only_looks_them_up(world):
    schema = _dynamic(world.schema, capacity=400, min_count=2)  # room for every id
    torch.manual_seed(0)
    model = preset("stem", schema, dim=8)
    vocab = model.vocabs["ad_id"]
    ad = schema.categorical_index("ad_id")
    batch = _batch(world, slice(0, 200))
    raw = batch["categorical"][:, ad]
    seqs = [f"seq/{s.name}" for s in schema.sequence if s.item == "ad_id"]
    model.eval()
    with torch.no_grad():
        model(batch)
    assert decode_state(vocab.state).clock == 0  # evaluation changes nothing
    model.train()
    tables = [g.categorical.weight.detach().clone() for g in model.groups]
    model(batch)
    state = decode_state(vocab.state)
    # every id seen twice or more (in the column and the sequences' valid steps) got a row
    seen = torch.cat([raw] + [batch[k][torch.arange(batch[k].shape[1]) < batch[f"{k}/lengths"]
                                       [:, None]] for k in seqs])
    ids, counts = torch.unique(seen[seen != 0], return_counts=True)
    frequent = set(ids[counts >= 2].tolist())
    assert set(state.admitted) == frequent and set(state.pending) == set(ids.tolist()) - frequent
    # the rows given to ids were drawn afresh in every group's table, the others untouched
    reclaimed = model.take_reclaimed()
    assert len(reclaimed) == len(model.groups) and model.take_reclaimed() == []
    offset = int(model.groups[0].categorical.offsets[ad])
    rows = reclaimed[0][1]
    assert sorted((rows - offset).tolist()) == sorted(state.admitted.values())
    for group, before in zip(model.groups, tables):
        after = group.categorical.weight.detach()
        changed = (after != before).any(dim=(1, 2)).nonzero().squeeze(1)
        assert sorted(changed.tolist()) == sorted(rows.tolist())
    # evaluation maps the admitted ids to their rows, and every other id to row 0
    model.eval()
    with torch.no_grad():
        mapped = model.remap(batch)["categorical"][:, ad]
    expected = torch.tensor([state.admitted.get(int(i), 0) for i in raw])
    assert torch.equal(mapped, expected)


def test_eviction_reinitialises_rows_and_resets_the_dense_optimizer_state(world):
    """Capacity 40 over 150 ads: rows are reclaimed; the trainer zeroes Adam's moments of the
    reclaimed rows before the step, so those rows move like fresh ones."""
    schema = _dynamic(world.schema)
    dataset = Dataset(schema, dict(world.splits), world.ground_truth)
    config = RunConfig.from_dict({"model": {"preset": "stem", "options": {"dim": 8}},
                                  "train": {"epochs": 1, "batch_size": 64, "progress": "off",
                                            "threads": 1, "max_steps": 6}})
    trainer = Trainer(config, "/nonexistent-not-written", dataset=dataset)
    batches = [_batch(world, slice(64 * i, 64 * (i + 1))) for i in range(6)]
    for step, batch in enumerate(batches):
        trainer._step(batch, step, 0, _NoLog())
    state = decode_state(trainer.model.vocabs["ad_id"].state)
    assert len(state.admitted) == CAPACITY  # full
    # one more batch that reclaims rows: their Adam moments are zero when the step begins
    weight = trainer.model.groups[0].categorical.weight
    before = {k: v.clone() for k, v in trainer.optimizer.state[weight].items()}
    fresh = _batch(world, slice(800, 864))
    seen_reset = {}

    def capture():
        for param, rows in trainer.model._reclaimed:
            if param is weight:
                seen_reset["rows"] = rows.clone()
        return original()

    original = trainer._reset_reclaimed
    trainer._reset_reclaimed = capture
    trainer._step(fresh, 6, 0, _NoLog())
    rows = seen_reset["rows"]
    assert len(rows)  # ids of this batch took rows of ids not seen in it
    after = trainer.optimizer.state[weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert bool((before[key][rows] != 0).any())  # the old ids' moments ...
        # ... were zeroed, then Adam took one step: exp_avg = (1 - beta1) * grad
        beta1, beta2 = trainer.optimizer.param_groups[0]["betas"]
        factor = (1 - beta1) if key == "exp_avg" else (1 - beta2)
        grad = weight.grad[rows] if weight.grad is not None else None
        if grad is not None:
            power = 1 if key == "exp_avg" else 2
            assert torch.allclose(after[key][rows], factor * grad ** power, atol=1e-12)


class _NoLog:
    count = 0

    def write(self, record):
        pass


def test_hash_vocab_maps_ids_without_state(world):
    schema = _with_vocab(world.schema, {"user_id": {"kind": "hash", "buckets": 17}})
    assert schema.categorical[schema.categorical_index("user_id")].vocab_size == 18
    model = preset("stem", schema, dim=8)
    batch = _batch(world, slice(0, 100))
    user = schema.categorical_index("user_id")
    rows = model.remap(batch)["categorical"][:, user]
    assert int(rows.min()) >= 0 and int(rows.max()) <= 17
    assert torch.equal(rows, model.vocabs["user_id"].lookup(batch["categorical"][:, user])
                       .where(batch["categorical"][:, user] != 0, 0))
    model(batch)["logits"]["click"].sum().backward()


def test_the_vocabulary_is_saved_with_the_model(world):
    schema = _dynamic(world.schema)
    torch.manual_seed(1)
    model = preset("stem", schema, dim=8)
    model(_batch(world, slice(0, 300)))
    copy = HMoE(model.config, schema)
    copy.load_state_dict(model.state_dict())
    assert decode_state(copy.vocabs["ad_id"].state) == decode_state(model.vocabs["ad_id"].state)
    batch = _batch(world, slice(300, 400))
    copy.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(copy(batch)["logits"]["click"], model(batch)["logits"]["click"])
    smaller = HMoE(model.config, _with_vocab(world.schema, {"ad_id": {"kind": "dynamic",
                                                                        "capacity": 20}}))
    with pytest.raises(RuntimeError, match="capacity"):
        smaller.load_state_dict(model.state_dict())


def test_bad_vocab_settings_are_named(world):
    with pytest.raises(ValueError, match=r"data.vocab: \['nope'\] are not categorical"):
        _with_vocab(world.schema, {"nope": {"kind": "hash", "buckets": 3}})
    with pytest.raises(ValueError, match="data.vocab: .*capacity"):
        _with_vocab(world.schema, {"ad_id": {"kind": "dynamic"}})
    with pytest.raises(ValueError, match="data.vocab: .*vocab"):
        _with_vocab(world.schema, {"ad_id": {"kind": "growing", "capacity": 3}})
    model = preset("stem", _dynamic(world.schema), dim=8)
    batch = _batch(world, slice(0, 10))
    batch["categorical"] = batch["categorical"].clone()
    batch["categorical"][3, world.schema.categorical_index("ad_id")] = -5
    with pytest.raises(ValueError, match="raw ids of 'ad_id' .* must be >= 0"):
        model(batch)


CONFIG = """
name: toy
features:
  - {name: user, type: categorical, vocab: {kind: hash, buckets: 8}}
  - {name: ad, type: categorical, vocab: {kind: dynamic, capacity: 3, min_count: 1}}
  - {name: hist, type: sequence, item: ad, max_len: 3}
labels:
  - {name: click}
"""

TRAIN = """user,ad,hist,click
u1,a,b|a|c,1
u2,b,b,0
u1,,,0
u3,c,d|a,1
"""


def test_preprocessing_hands_raw_ids_to_the_model(tmp_path):
    (tmp_path / "train.csv").write_text(TRAIN)
    data = preprocess(CONFIG, {"train": tmp_path / "train.csv"}, tmp_path / "cache")
    schema = data.schema
    assert [f.vocab_size for f in schema.categorical] == [9, 4]
    columns = data.columns()
    ads = columns["categorical"][:, 1]
    assert ads[2] == 0 and (ads[[0, 1, 3]] > 0).all()  # missing -> 0, values -> raw ids
    assert len(set(ads.tolist())) == 4
    hist = columns["seq/hist"]
    assert hist[0, 1] == ads[0] and hist[0, 0] == ads[1]  # "a" and "b" hash alike everywhere
    assert columns["categorical"][0, 0] == columns["categorical"][2, 0]  # "u1" twice
    model = preset("stem", schema, dim=4, expert_hidden=(8,), tower=())
    batch = {key: torch.as_tensor(np.asarray(value)) for key, value in columns.items()}
    model(batch)["logits"]["click"].sum().backward()
    assert len(decode_state(model.vocabs["ad"].state).admitted) == 3  # a, b, c, d: capacity 3


def test_dynamic_vocabularies_run_on_one_process_only(world):
    from hmoe.distributed.model import distribute

    model = preset("stem", _dynamic(world.schema), dim=8)
    with pytest.raises(ValueError, match="dynamic vocabularies, which run on one process"):
        distribute(model, lr=0.1)


def test_schema_round_trip_keeps_the_vocab(world):
    from hmoe.data.schema import dump_schema, load_schema

    import yaml

    schema = _dynamic(world.schema, min_count=3, pending_capacity=7)
    again = load_schema(yaml.safe_load(dump_schema(schema)))
    assert again == schema
    feature = again.categorical[again.categorical_index("ad_id")]
    assert dataclasses.astuple(feature)[-4:] == ("dynamic", CAPACITY, 7, "lru")
    assert feature.min_count == 3 and feature.vocab_size == CAPACITY + 1


@pytest.mark.parametrize("seed", range(4))
def test_lookup_reads_the_state_without_changing_it(seed):
    """DynamicVocab.lookup against the spec's id -> row map, on Zipf streams that fill the
    table and evict, with ids never seen, pending ids and the sentinel among the probes."""
    from hmoe.nn.vocab import DynamicVocab
    from hmoe.ops.id_remap import SENTINEL

    rng = np.random.default_rng(seed)
    vocab = DynamicVocab(int(rng.integers(1, 60)), min_count=int(rng.integers(1, 4)),
                         pending_capacity=int(rng.integers(1, 30)))
    for _ in range(25):
        vocab(torch.as_tensor(rng.zipf(1.4, int(rng.integers(0, 80))) % 300 + 1))
        probe = torch.as_tensor(np.append(rng.integers(-5, 330, (7, 9)).reshape(-1),
                                          SENTINEL)).view(8, 8)
        spec = decode_state(vocab.state)
        before = [b.clone() for b in vocab.buffers()]
        got = vocab.lookup(probe)
        assert got.shape == probe.shape
        assert got.view(-1).tolist() == [spec.admitted.get(int(i), 0) for i in probe.view(-1)]
        assert all(torch.equal(a, b) for a, b in zip(before, vocab.buffers()))
