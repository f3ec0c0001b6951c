"""ModelConfig.joint_sequences and din_hidden: aligned sequences attended as one (DIN's design),
checked against the encoder applied by hand to the concatenated behaviours, in float64."""

import pytest
import torch

from hmoe.data.schema import CategoricalFeature, SequenceFeature
from hmoe.models import HMoE
from hmoe.nn import DINAttention

CATEGORICAL = (CategoricalFeature("user", vocab_size=50), CategoricalFeature("item", vocab_size=40),
               CategoricalFeature("category", vocab_size=7))
SEQUENCES = (SequenceFeature("hist_item", item="item", max_len=6),
             SequenceFeature("hist_category", item="category", max_len=6))
FIELDS = 5  # user, item, category, hist_item, hist_category


def config(**options) -> dict:
    return {"sets": [{"name": "a", "dim": 8}, {"name": "b", "dim": 8}],
            "experts": [{"name": "x", "type": "dnn", "set": "a", "hidden": [8]},
                        {"name": "y", "type": "dnn", "set": "b", "hidden": [8]}],
            "tasks": [{"name": "click"}], "joint_sequences": True, **options}


@pytest.fixture
def schema(schema_with):
    return schema_with(categorical=CATEGORICAL, sequence=SEQUENCES, numeric=(), pretrained=(),
                       labels=(schema_with().labels[0],))


@pytest.fixture
def aligned(schema, batch_of):
    """A batch whose two histories share lengths and positions (as hist_item / hist_cate do);
    irregular lengths, 0 included."""
    batch = batch_of(schema, batch_size=13, seed=3)
    for key in ("lengths", "positions"):
        batch[f"seq/hist_category/{key}"] = batch[f"seq/hist_item/{key}"].clone()
    return batch


@pytest.mark.parametrize("encoder", ["din", "tim", "sasrec", "mean"])
def test_joint_attention_is_the_encoder_on_the_concatenated_behaviours(schema, aligned, encoder):
    model = HMoE(config(sequence_encoder=encoder, num_heads=2, din_hidden=[5]), schema).double()
    model.eval()  # Dice's running statistics, no dropout: a deterministic reference
    (group,) = model.groups
    assert len(group.sequences) == 1  # one encoder per set, 2 x 8 wide
    assert getattr(group.sequences[0][0], "dim", 16) == 16
    fields, attention = model.embed(aligned, return_attention=True)
    rows = torch.cat([aligned["categorical"][:, 1:2], aligned["categorical"][:, 2:3]], 1)
    offsets = torch.tensor([50, 90])  # the item and category fields' first rows
    for k, name in enumerate(("a", "b")):
        table = model.embedding_table(name)  # (N, 8) float64
        behaviours = torch.cat([table[aligned["seq/hist_item"] + offsets[0]],
                                table[aligned["seq/hist_category"] + offsets[1]]], -1)
        target = table[rows + offsets].reshape(13, 16)  # [item | category]
        expected, weights = group.sequences[0][k](
            behaviours, target, aligned["seq/hist_item/positions"],
            aligned["seq/hist_item/lengths"], return_attention=True)
        got = fields[name][:, 3:5].reshape(13, 16)  # the two sequence fields, side by side
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        for sequence in ("hist_item", "hist_category"):  # one attention, reported for both
            w = attention[f"{sequence}/{name}"]
            torch.testing.assert_close(w, weights if w.dim() == weights.dim() else weights[:, None])


def test_joint_din_trains_and_its_hidden_widths_are_configurable(schema, aligned):
    model = HMoE(config(sequence_encoder="din", din_hidden=[64]), schema)
    encoder = model.groups[0].sequences[0][0]
    assert isinstance(encoder, DINAttention) and encoder.hidden == (64,)
    assert encoder.linears[0].in_features == 4 * 16
    model(aligned)["logits"]["click"].sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in encoder.parameters())
    separate = HMoE(config(sequence_encoder="din", joint_sequences=False), schema)
    assert len(separate.groups[0].sequences) == 2
    assert separate.groups[0].sequences[0][0].hidden == (80, 40)  # DIN's paper default


def test_misaligned_sequences_are_a_value_error(schema, aligned):
    model = HMoE(config(sequence_encoder="din"), schema)
    aligned["seq/hist_category/lengths"] = aligned["seq/hist_category/lengths"].flip(0)
    if torch.equal(aligned["seq/hist_category/lengths"], aligned["seq/hist_item/lengths"]):
        aligned["seq/hist_category/lengths"][0] = (aligned["seq/hist_category/lengths"][0] + 1) % 7
    with pytest.raises(ValueError, match="joint_sequences: seq/hist_category is not aligned"):
        model(aligned)


def test_joint_config_checks_name_the_key(schema, schema_with):
    with pytest.raises(ValueError, match="din_hidden must hold integers >= 1"):
        HMoE(config(din_hidden=[0]), schema)
    with pytest.raises(ValueError, match="joint_sequences must be true or false"):
        HMoE(config(joint_sequences="yes"), schema)
    uneven = schema_with(categorical=CATEGORICAL, numeric=(), pretrained=(),
                         sequence=(SEQUENCES[0], SequenceFeature("hist_category",
                                                                 item="category", max_len=4)))
    with pytest.raises(ValueError, match=r"must share one max_len and max_position, got "
                                         r"hist_item \(6, 6\), hist_category \(4, 4\)"):
        HMoE(config(), uneven)
    with pytest.raises(ValueError, match=r"sets\[0\]\.dim: 2 x 8, the joint width, is not "
                                         r"divisible by num_heads 3"):
        HMoE(config(sequence_encoder="tim", num_heads=3), schema)
