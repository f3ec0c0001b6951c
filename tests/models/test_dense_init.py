"""ModelConfig.dense_init: "xavier_normal" re-draws every dense layer (experts, cross layers,
DIN's attention MLP, gates, towers) from N(0, 2 / (fan_in + fan_out)) with zero biases and
leaves the embedding tables as "torch" (the default) draws them."""

import math

import pytest
import torch
from torch import nn

from hmoe.data.schema import CategoricalFeature, SequenceFeature
from hmoe.models import HMoE, preset
from hmoe.nn import CrossLayerV2

CATEGORICAL = (CategoricalFeature("user", vocab_size=50), CategoricalFeature("item", vocab_size=40),
               CategoricalFeature("category", vocab_size=7))
SEQUENCES = (SequenceFeature("hist_item", item="item", max_len=6),)


def config(**options) -> dict:
    return {"sets": [{"name": "a", "dim": 8}, {"name": "b", "dim": 8}],
            "experts": [{"name": "x", "type": "dcnv2", "set": "a", "hidden": [96, 64]},
                        {"name": "y", "type": "dnn", "set": "b", "hidden": [64]}],
            "tasks": [{"name": "click", "tower": [16], "gate_hidden": [8]}],
            "sequence_encoder": "din", "din_hidden": [24], **options}


@pytest.fixture
def schema(schema_with):
    return schema_with(categorical=CATEGORICAL, sequence=SEQUENCES, numeric=(), pretrained=(),
                       labels=(schema_with().labels[0],))


def build(schema, **options) -> HMoE:
    torch.manual_seed(11)
    return HMoE(config(**options), schema)


def test_xavier_normal_redraws_every_dense_layer_and_only_them(schema):
    default, xavier = build(schema), build(schema, dense_init="xavier_normal")
    matrices = 0
    for (name, a), (_, b) in zip(default.named_modules(), xavier.named_modules()):
        if isinstance(b, nn.Linear):
            weights = [(a.weight, b.weight)]
            assert torch.count_nonzero(b.bias) == 0, name
        elif isinstance(b, CrossLayerV2):
            weights = [(getattr(a, p), getattr(b, p)) for p in ("weight", "u", "v")
                       if hasattr(b, p)]
            assert torch.count_nonzero(b.bias) == 0, name
        else:
            continue
        for old, new in weights:
            assert not torch.equal(old, new), name
            fan_out, fan_in = new.shape  # xavier is symmetric in the two
            expected = math.sqrt(2.0 / (fan_in + fan_out))
            if new.numel() >= 1000:  # enough draws for the std to sit within 10 %
                assert abs(new.std().item() / expected - 1) < 0.1, (name, new.shape)
            matrices += 1
    assert matrices >= 8  # the cross matrix, the MLPs, DIN's MLP, the gate and the tower
    for k in ("a", "b"):  # drawn before the dense layers: the same tables either way
        torch.testing.assert_close(xavier.embedding_table(k), default.embedding_table(k),
                                   rtol=0, atol=0)


def test_default_is_pytorchs_own_init(schema):
    default, explicit = build(schema), build(schema, dense_init="torch")
    for a, b in zip(default.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(a, b)
    linear = next(m for m in default.modules() if isinstance(m, nn.Linear))
    assert torch.count_nonzero(linear.bias) > 0  # uniform in ±1/sqrt(fan_in), not zeroed


def test_xavier_model_trains_and_scores(schema, batch_of):
    model = build(schema, dense_init="xavier_normal")
    batch = batch_of(schema, batch_size=9, seed=2)
    logits = model(batch)["logits"]["click"]
    assert logits.shape == (9,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.experts.parameters())


def test_preset_takes_dense_init(schema):
    model = preset("dnn", schema, dense_init="xavier_normal")
    assert model.config.dense_init == "xavier_normal"
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules()
               if isinstance(m, nn.Linear))


def test_unknown_dense_init_is_a_value_error_naming_it(schema):
    with pytest.raises(ValueError, match=r"dense_init must be one of .*'xavier_normal'.*'he'"):
        build(schema, dense_init="he")
