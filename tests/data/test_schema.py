"""Schema YAML: parsing, the dict/YAML round trip, and one test per validation error."""

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmoe.data.schema import (
    CategoricalFeature,
    Label,
    NumericFeature,
    PretrainedFeature,
    Schema,
    SequenceFeature,
    batch_dtype,
    batch_keys,
    dump_schema,
    load_schema,
    schema_to_dict,
)

EXAMPLE_YAML = """\
name: synthetic
features:
  - {name: user_id, type: categorical, min_count: 2}
  - {name: ad_id, type: categorical, vocab_size: 101}
  - {name: price, type: numeric, quantizer: log, bases: [2, 3, 10]}
  - {name: hist_items, type: sequence, item: ad_id, max_len: 50, temporal_column: hist_dt}
  - {name: text_sim, type: pretrained, user_column: u_vec, item_column: i_vec, dim: 32}
labels:
  - {name: click}
  - {name: like, auxiliary: true}
group_id: user_id
exposure_count: exposures
"""

EXAMPLE = {
    "name": "synthetic",
    "features": [
        {"name": "user_id", "type": "categorical", "min_count": 2},
        {"name": "ad_id", "type": "categorical", "vocab_size": 101},
        {"name": "price", "type": "numeric", "quantizer": "log", "bases": [2, 3, 10]},
        {"name": "hist_items", "type": "sequence", "item": "ad_id", "max_len": 50,
         "temporal_column": "hist_dt"},
        {"name": "text_sim", "type": "pretrained", "user_column": "u_vec",
         "item_column": "i_vec", "dim": 32},
    ],
    "labels": [{"name": "click"}, {"name": "like", "auxiliary": True}],
    "group_id": "user_id",
    "exposure_count": "exposures",
}


def test_example_parses_into_the_dataclasses():
    schema = load_schema(EXAMPLE_YAML)
    assert schema.name == "synthetic"
    assert schema.categorical == (CategoricalFeature("user_id", min_count=2),
                                  CategoricalFeature("ad_id", vocab_size=101))
    assert schema.numeric == (NumericFeature("price", quantizer="log", bases=(2, 3, 10)),)
    assert schema.sequence == (SequenceFeature("hist_items", item="ad_id", max_len=50,
                                               temporal_column="hist_dt"),)
    assert schema.pretrained == (PretrainedFeature("text_sim", "u_vec", "i_vec", 32),)
    assert schema.labels == (Label("click"), Label("like", auxiliary=True))
    assert schema.tasks == ("click", "like")
    assert (schema.group_id, schema.exposure_count) == ("user_id", "exposures")
    assert schema == load_schema(EXAMPLE)


def test_features_are_grouped_by_kind_keeping_their_order():
    data = copy.deepcopy(EXAMPLE)
    data["features"].insert(0, {"name": "age", "type": "numeric", "quantizer": "uniform",
                                "max_code": 99})
    data["features"].append({"name": "device", "type": "categorical"})
    schema = load_schema(data)
    assert [f.name for f in schema.categorical] == ["user_id", "ad_id", "device"]
    assert [f.name for f in schema.numeric] == ["age", "price"]
    assert [f.name for f in schema.features] == ["user_id", "ad_id", "device", "age", "price",
                                                 "hist_items", "text_sim"]


def test_round_trip_through_dict_and_yaml():
    schema = load_schema(EXAMPLE_YAML)
    assert load_schema(schema_to_dict(schema)) == schema
    text = dump_schema(schema)
    assert load_schema(text) == schema
    # Only non-default keys are written: min_count 1 of ad_id is not.
    assert "min_count" not in schema_to_dict(schema)["features"][1]


def test_round_trip_of_every_non_default_value():
    schema = Schema(
        "full",
        categorical=(CategoricalFeature("a", column="raw_a", min_count=3, vocab_size=7),),
        numeric=(NumericFeature("q", column="raw_q", quantizer="quantile", bases=(2, 5),
                                num_bins=4, boundaries=(-1.5, 0.0, 2.25), mean=0.5, std=2.0),
                 NumericFeature("u", quantizer="uniform", lo=-3.0, step=0.5, max_code=40),
                 NumericFeature("l", quantizer="log", log_transform="criteo", log_scale=2.0,
                                max_code=100)),
        sequence=(SequenceFeature("s", item="a", max_len=7, column="raw_s", separator=",",
                                  temporal_column="dt", max_position=12),),
        pretrained=(PretrainedFeature("p", "uu", "ii", 4, separator=";", resolution=64),),
        labels=(Label("y", column="raw_y", weight=0.5), Label("z", auxiliary=True, weight=0.0)),
        group_id="a", exposure_count="n").validate()
    assert load_schema(schema_to_dict(schema)) == schema
    assert load_schema(dump_schema(schema)) == schema


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(-1e6, 1e6), step=st.floats(1e-3, 1e3), max_code=st.integers(0, 10**6),
       bases=st.lists(st.integers(2, 40), min_size=1, max_size=4),
       boundaries=st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=8),
       weight=st.floats(0, 10), max_len=st.integers(1, 1000))
def test_round_trip_property(lo, step, max_code, bases, boundaries, weight, max_len):
    boundaries = sorted(boundaries)
    schema = Schema(
        "p",
        categorical=(CategoricalFeature("item"),),
        numeric=(NumericFeature("u", quantizer="uniform", lo=lo, step=step, max_code=max_code,
                                bases=tuple(bases)),
                 NumericFeature("q", num_bins=len(boundaries) + 1,
                                boundaries=tuple(boundaries))),
        sequence=(SequenceFeature("s", item="item", max_len=max_len),),
        labels=(Label("y", weight=weight),)).validate()
    assert load_schema(schema_to_dict(schema)) == schema
    assert load_schema(dump_schema(schema)) == schema


def test_load_from_a_file_path(tmp_path):
    path = tmp_path / "dataset.yaml"
    path.write_text(EXAMPLE_YAML)
    assert load_schema(path) == load_schema(EXAMPLE_YAML)
    assert load_schema(str(path)) == load_schema(EXAMPLE_YAML)
    other = tmp_path / "schema.txt"  # no .yaml suffix: still a path because the file exists
    other.write_text(EXAMPLE_YAML)
    assert load_schema(str(other)) == load_schema(EXAMPLE_YAML)
    with pytest.raises(FileNotFoundError):
        load_schema(str(tmp_path / "missing.yaml"))


def test_errors_from_a_file_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(EXAMPLE_YAML.replace("max_len: 50", "max_len: 0"))
    with pytest.raises(ValueError) as error:
        load_schema(path)
    assert str(error.value) == f"{path}: features[3].max_len: must be an int >= 1, got 0"


@pytest.mark.parametrize("text", ["name: [unclosed\n", "name: x\nfeatures: {a: 1, a: 2}\n",
                                  "name: x\nname: y\n", "\tname: x\n"])
def test_bad_yaml_in_a_file_names_the_file(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="broken.yaml: invalid YAML"):
        load_schema(path)


def test_duplicate_yaml_keys_are_rejected():
    with pytest.raises(ValueError, match="duplicate key 'min_count'"):
        load_schema(EXAMPLE_YAML.replace("min_count: 2", "min_count: 2, min_count: 3"))


def _set(path, value):
    """A mutation of EXAMPLE setting ``path`` (keys and list indices) to ``value``."""
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _append_feature(entry):
    return lambda data: data["features"].append(entry)


# (case id, mutation of EXAMPLE, the start of the expected message, a fragment of it)
BAD = [
    ("unknown top key", _set(["colour"], "red"), "colour: unknown key", "allowed keys"),
    ("unknown feature key", _set(["features", 0, "colour"], 1), "features[0].colour: unknown key",
     "categorical feature"),
    ("unknown label key", _set(["labels", 1, "aux"], True), "labels[1].aux: unknown key", "label"),
    ("missing name", _delete(["name"]), "name: required key missing", ""),
    ("missing features", _delete(["features"]), "features: required key missing", ""),
    ("missing labels", _delete(["labels"]), "labels: required key missing", ""),
    ("missing type", _delete(["features", 1, "type"]), "features[1].type: required key missing",
     "categorical"),
    ("unknown type", _set(["features", 1, "type"], "sparse"), "features[1].type: unknown type",
     "'sparse'"),
    ("missing item", _delete(["features", 3, "item"]), "features[3].item: required key missing",
     "sequence"),
    ("missing dim", _delete(["features", 4, "dim"]), "features[4].dim: required key missing", ""),
    ("missing label name", _delete(["labels", 0, "name"]), "labels[0].name: required key", ""),
    ("string int", _set(["features", 0, "min_count"], "2"), "features[0].min_count: must be an int",
     "'2'"),
    ("bool int", _set(["features", 0, "min_count"], True), "features[0].min_count: must be an int",
     "True"),
    ("max_len 0", _set(["features", 3, "max_len"], 0),
     "features[3].max_len: must be an int >= 1, got 0", ""),
    ("vocab_size 0", _set(["features", 1, "vocab_size"], 0), "features[1].vocab_size: must be",
     ">= 1"),
    ("max_position 0", _set(["features", 3, "max_position"], 0), "features[3].max_position:", ""),
    ("empty separator", _set(["features", 3, "separator"], ""), "features[3].separator:", ""),
    ("dim 0", _set(["features", 4, "dim"], 0), "features[4].dim: must be an int >= 1", ""),
    ("resolution 1", _set(["features", 4, "resolution"], 1), "features[4].resolution:", ">= 2"),
    ("unknown quantizer", _set(["features", 2, "quantizer"], "bucket"),
     "features[2].quantizer: unknown quantizer 'bucket'", "log, uniform, quantile"),
    ("base 1", _set(["features", 2, "bases"], [1, 3]), "features[2].bases:", "ints >= 2"),
    ("float base", _set(["features", 2, "bases"], [2.5]), "features[2].bases:", "ints >= 2"),
    ("empty bases", _set(["features", 2, "bases"], []), "features[2].bases:", "non-empty"),
    ("scalar bases", _set(["features", 2, "bases"], 2), "features[2].bases:", "list"),
    ("num_bins 1", _set(["features", 2, "num_bins"], 1), "features[2].num_bins:", ">= 2"),
    ("log transform", _set(["features", 2, "log_transform"], "ln"),
     "features[2].log_transform: unknown log_transform 'ln'", "criteo"),
    ("log scale", _set(["features", 2, "log_scale"], -1.0), "features[2].log_scale:", "> 0"),
    ("step 0", _set(["features", 2, "step"], 0), "features[2].step:", "> 0"),
    ("lo inf", _set(["features", 2, "lo"], float("inf")), "features[2].lo:", "finite"),
    ("std 0", _set(["features", 2, "std"], 0.0), "features[2].std:", "> 0"),
    ("mean string", _set(["features", 2, "mean"], "a"), "features[2].mean:", "number"),
    ("negative max_code", _set(["features", 2, "max_code"], -1), "features[2].max_code:", ">= 0"),
    ("uniform without max_code", _set(["features", 2, "quantizer"], "uniform"),
     "features[2].max_code: required for quantizer 'uniform'", ""),
    ("boundaries descending",
     _append_feature({"name": "q", "type": "numeric", "num_bins": 4, "boundaries": [1, 3, 2]}),
     "features[5].boundaries: must be ascending", "value 2"),
    ("boundaries length",
     _append_feature({"name": "q", "type": "numeric", "num_bins": 4, "boundaries": [1, 2]}),
     "features[5].boundaries: must have num_bins - 1 = 3 values, got 2", ""),
    ("boundaries nan",
     _append_feature({"name": "q", "type": "numeric", "num_bins": 2,
                      "boundaries": [float("nan")]}),
     "features[5].boundaries:", "finite"),
    ("boundaries with log", _set(["features", 2, "boundaries"], [1.0]),
     "features[2].boundaries: only quantizer 'quantile'", ""),
    ("duplicate feature", _append_feature({"name": "price", "type": "categorical"}),
     "features[5].name: duplicate feature name 'price'", "features[2]"),
    ("item is numeric", _set(["features", 3, "item"], "price"),
     "features[3].item: must name a categorical feature", "'price' is a numeric feature"),
    ("item unknown", _set(["features", 3, "item"], "video_id"),
     "features[3].item: must name a categorical feature", "no feature named 'video_id'"),
    ("no labels", _set(["labels"], []), "labels: at least one label is required", ""),
    ("duplicate label", _set(["labels", 1, "name"], "click"),
     "labels[1].name: duplicate label name 'click'", "labels[0]"),
    ("label weight", _set(["labels", 0, "weight"], -1), "labels[0].weight:", ">= 0"),
    ("auxiliary string", _set(["labels", 1, "auxiliary"], "yes"), "labels[1].auxiliary:",
     "true or false"),
    ("group_id int", _set(["group_id"], 3), "group_id: must be a non-empty string", ""),
    ("exposure_count empty", _set(["exposure_count"], ""), "exposure_count: must be", ""),
    ("empty name", _set(["name"], ""), "name: must be a non-empty string", ""),
    ("features not a list", _set(["features"], {"user_id": "categorical"}),
     "features: must be a list", "dict"),
    ("feature not a mapping", _set(["features", 0], "user_id"), "features[0]: must be a mapping",
     "str"),
    ("labels not a list", _set(["labels"], "click"), "labels: must be a list", ""),
    ("label not a mapping", _set(["labels", 0], "click"), "labels[0]: must be a mapping", ""),
    ("no features", _set(["features"], []), "features: at least one feature is required", ""),
    ("feature name int", _set(["features", 0, "name"], 7), "features[0].name:", "string"),
    ("column empty", _set(["features", 0, "column"], ""), "features[0].column:", "string"),
]


@pytest.mark.parametrize("mutate, start, fragment", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_each_validation_error_names_its_key(mutate, start, fragment):
    data = copy.deepcopy(EXAMPLE)
    mutate(data)
    with pytest.raises(ValueError) as error:
        load_schema(data)
    message = str(error.value)
    assert message.startswith(start), message
    assert fragment in message, message


def test_the_same_errors_through_yaml_text():
    text = dump_schema(load_schema(EXAMPLE)).replace("max_len", "max_length", 1)
    text = text.replace("hist_items, type: sequence, item: ad_id",
                        "hist_items, type: sequence, item: ad_id, max_len: 0")
    with pytest.raises(ValueError, match=r"^features\[3\]\.max_len: must be an int >= 1, got 0$"):
        load_schema(text)


@pytest.mark.parametrize("text, expected", [
    ("", "schema: the document must be a mapping, got nothing"),
    ("- a\n- b\n", "schema: the document must be a mapping, got list"),
    ("just words", "schema: the document must be a mapping, got str"),
])
def test_a_document_that_is_not_a_mapping(text, expected):
    with pytest.raises(ValueError, match=expected):
        load_schema(text)


def test_validate_a_hand_built_schema():
    good = Schema("s", categorical=(CategoricalFeature("a"),), labels=(Label("y"),))
    assert good.validate() is good
    bad = dataclasses.replace(good, categorical=(CategoricalFeature("a"),
                                                 CategoricalFeature("b", min_count=0)))
    with pytest.raises(ValueError, match=r"^categorical\[1\]\.min_count: must be an int >= 1"):
        bad.validate()
    seq = dataclasses.replace(good, sequence=(SequenceFeature("s", item="nope"),))
    with pytest.raises(ValueError, match=r"^sequence\[0\]\.item: must name a categorical"):
        seq.validate()
    with pytest.raises(ValueError, match="^labels: at least one"):
        dataclasses.replace(good, labels=()).validate()
    wrong_class = dataclasses.replace(good, numeric=(CategoricalFeature("n"),))
    with pytest.raises(ValueError, match=r"^numeric\[0\]: must be a NumericFeature"):
        wrong_class.validate()


def test_with_vocab_sizes_and_indices():
    schema = load_schema(EXAMPLE)
    sized = schema.with_vocab_sizes({"user_id": 11})
    assert sized.categorical[0].vocab_size == 11 and sized.categorical[1].vocab_size == 101
    assert schema.categorical[0].vocab_size is None  # frozen: the original is unchanged
    with pytest.raises(KeyError, match="price"):
        schema.with_vocab_sizes({"price": 3})
    with pytest.raises(ValueError, match=r"categorical\[0\]\.vocab_size"):
        schema.with_vocab_sizes({"user_id": 0})
    assert schema.categorical_index("ad_id") == 1
    assert schema.numeric_index("price") == 0
    assert schema.task_index("like") == 1
    assert schema.sequence[0].num_positions == 50
    with pytest.raises(KeyError):
        schema.categorical_index("price")


def test_batch_keys_and_dtypes():
    schema = load_schema(EXAMPLE)
    assert batch_keys(schema) == (
        "categorical", "numeric", "seq/hist_items", "seq/hist_items/lengths",
        "seq/hist_items/positions", "pretrained/text_sim/user", "pretrained/text_sim/item",
        "labels", "group_id", "exposure_count")
    expected = {"categorical": torch.int64, "numeric": torch.float32,
                "seq/hist_items": torch.int64, "seq/hist_items/lengths": torch.int64,
                "seq/hist_items/positions": torch.int64, "pretrained/text_sim/user": torch.float32,
                "pretrained/text_sim/item": torch.float32, "labels": torch.float32,
                "group_id": torch.int64, "exposure_count": torch.float32}
    assert {key: batch_dtype(key) for key in batch_keys(schema)} == expected
    assert batch_dtype("true/click") is None
    minimal = Schema("m", categorical=(CategoricalFeature("a"),), labels=(Label("y"),))
    assert batch_keys(minimal) == ("categorical", "labels")
