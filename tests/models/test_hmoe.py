"""hmoe.models.HMoE and hmoe.models.config: the graph, its config checks, stop-gradient routing,
the collapse of linear multi-embedding, and parameter counts."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from hmoe.data.schema import NumericFeature
from hmoe.models import HMoE, ModelConfig, preset
from hmoe.nn import MNSE, MultiEmbedding, TemporalInterest

FIELDS = 8  # 3 categorical + 3 numeric + 1 sequence + 1 pretrained
SEQUENCE_FIELD = 6  # the history's field in every set's (B, F, D)


def base_config() -> dict:
    return {
        "sets": [{"name": "shared", "dim": 16},
                 {"name": "own", "dim": 16, "scope": "task", "task": "click"}],
        "experts": [{"name": "a", "type": "dnn", "set": "shared", "hidden": [8]},
                    {"name": "b", "type": "ipnn", "set": "own", "hidden": [8]}],
        "tasks": [{"name": "click"}, {"name": "buy", "experts": ["a"]}],
    }


def task_loss(out, batch, schema, task):
    label = batch["labels"][:, schema.tasks.index(task)]
    return F.binary_cross_entropy_with_logits(out["logits"][task], label)


def grads_are_zero(parameters):
    return all(p.grad is None or bool((p.grad == 0).all()) for p in parameters)


def grads_are_nonzero(parameters):
    return all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in parameters)


# --------------------------------------------------------------------------------------------
# Config: from_dict, to_dict and the checks that name the key


def test_from_dict_round_trips_through_to_dict(schema):
    config = ModelConfig.from_dict(base_config())
    assert isinstance(config.sets[0].dim, int) and config.experts[0].hidden == (8,)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert HMoE(config.to_dict(), schema).config == config


def _set(path, value):
    def mutate(config):
        *keys, last = path
        target = config
        for key in keys:
            target = target[key]
        target[last] = value
    return mutate


BAD_CONFIGS = [
    (_set(["sizes"], 3), r"^model: unknown key\(s\) \['sizes'\]"),
    (_set(["experts", 0, "size"], 3), r"^model\.experts\[0\]: unknown key\(s\) \['size'\]"),
    (lambda c: c["experts"][0].pop("set"), r"model\.experts\[0\]: missing required key\(s\) "
                                           r"\['set'\]"),
    (_set(["experts", 1, "set"], "nope"), r"experts\[1\]\.set: unknown embedding set 'nope'"),
    (_set(["experts", 0, "type"], "xdeepfm"), r"experts\[0\]: type must be one of"),
    (_set(["experts", 0, "hidden"], "8"), r"experts\[0\]: hidden must be a list"),
    (_set(["experts", 0, "options"], {"depth": 2}),
     r"experts\[0\]: options: unknown key\(s\) \['depth'\] for type 'dnn'"),
    (lambda c: c["experts"][1].update(type="dcnv2", options={"structure": "wide"}),
     r"experts\[1\]: options\.structure must be one of"),
    (_set(["experts", 1, "name"], "a"), r"experts\[1\]\.name: 'a' is used twice"),
    (_set(["tasks", 1, "name"], "nope"), r"tasks\[1\]\.name: 'nope' is not a label"),
    (_set(["tasks", 1, "experts"], ["nope"]), r"tasks\[1\]\.experts: unknown expert 'nope'"),
    (_set(["tasks", 1, "detach"], ["b"]), r"tasks\[1\]\.detach: \['b'\] are not among"),
    (_set(["tasks", 0, "gate_inputs"], ["nope"]),
     r"tasks\[0\]\.gate_inputs: unknown embedding set 'nope'"),
    (_set(["tasks", 0, "aggregation"], "max"), r"tasks\[0\]: aggregation must be one of"),
    (lambda c: c["sets"][1].update(dim=8) or c["tasks"][0].update(gate_combine="sum"),
     r"tasks\[0\]\.gate_inputs: gate_combine 'sum' .* equal"),
    (_set(["experts", 1, "hidden"], [8, 4]), r"tasks\[0\]\.experts: .* one output width"),
    (_set(["sets", 1, "scope"], "shared"), r"sets\[1\]: task must be given exactly when"),
    (_set(["sets", 1, "scope"], "auxiliary"), r"sets\[1\]\.scope: 'click' is a main task"),
    (_set(["sets", 1, "task"], "view"), r"sets\[1\]\.task: 'view' .* not one of the model's "
                                        r"tasks"),
    (_set(["tasks", 0, "experts"], ["a"]), r"experts: \['b'\] are seen by no task"),
    (lambda c: c["sets"].append({"name": "spare", "dim": 4}),
     r"sets: \['spare'\] are read by no expert and no gate"),
    (lambda c: c["experts"][1].update(type="gwpfm") or c["sets"][1].update(dim=10),
     r"experts\[1\]\.options\.field_groups: the dim 10 of set 'own' must be divisible by the "
     r"4 groups"),
    (lambda c: c["experts"][1].update(type="gwpfm", options={"field_groups": [0, 1]}),
     r"experts\[1\]\.options\.field_groups: needs one group id per field \(8"),
    (_set(["mnse_mode"], "concat"), r"sets\[0\]\.dim: 16 is not divisible by the 3 bases"),
    (_set(["num_heads"], 3), r"sets\[0\]\.dim: 16 is not divisible by num_heads 3"),
    (_set(["sequence_encoder"], "gru"), r"model: sequence_encoder must be one of"),
    (_set(["numeric_encoder"], "raw"), r"model: numeric_encoder must be one of"),
    (_set(["tasks"], []), r"model: tasks must hold at least one entry"),
]


@pytest.mark.parametrize("mutate, match", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_is_a_value_error_naming_the_key(schema, mutate, match):
    config = base_config()
    mutate(config)
    with pytest.raises(ValueError, match=match):
        HMoE(config, schema)


def test_bad_schema_is_a_value_error_naming_the_feature(schema_with):
    from hmoe.data.schema import CategoricalFeature, SequenceFeature
    no_vocab = schema_with(categorical=(CategoricalFeature("user"),
                                        CategoricalFeature("item", vocab_size=40)))
    with pytest.raises(ValueError, match="categorical feature 'user': vocab_size must be set"):
        HMoE(base_config(), no_vocab)
    bad_item = schema_with(sequence=(SequenceFeature("history", item="brand"),))
    with pytest.raises(ValueError, match="sequence feature 'history': item 'brand'"):
        HMoE(base_config(), bad_item)
    bad_uniform = schema_with(numeric=(NumericFeature("age", quantizer="uniform"),))
    with pytest.raises(ValueError, match="numeric feature 'age': quantizer 'uniform' needs "
                                         "max_code"):
        HMoE(base_config(), bad_uniform)


def test_routing_defaults_follow_set_scopes():
    config = ModelConfig.from_dict(base_config())
    click, buy = config.tasks
    assert config.task_experts(click) == ("a", "b") and config.task_experts(buy) == ("a",)
    assert config.task_detach(click) == ()  # "own" belongs to click itself
    assert config.task_gate_inputs(click) == ("shared", "own")
    routed = dict(base_config(), tasks=[{"name": "click"}, {"name": "buy"}])
    buy = ModelConfig.from_dict(routed).tasks[1]
    assert ModelConfig.from_dict(routed).task_detach(buy) == ("b",)  # click's expert: SG
    assert ModelConfig.from_dict(routed).task_gate_inputs(buy) == ("shared",)


# --------------------------------------------------------------------------------------------
# The graph


def test_sets_of_one_dim_share_one_fused_table(schema):
    config = dict(base_config(), sets=[{"name": "shared", "dim": 16},
                                       {"name": "own", "dim": 8, "scope": "task",
                                        "task": "click"},
                                       {"name": "third", "dim": 16}])
    config["experts"].append({"name": "c", "type": "dnn", "set": "third", "hidden": [8]})
    model = HMoE(config, schema)
    assert model.set_location == {"shared": (0, 0), "third": (0, 1), "own": (1, 0)}
    tables = [m for m in model.groups.modules() if isinstance(m, MultiEmbedding)]
    assert [(t.dim, t.num_sets) for t in tables] == [(16, 2), (8, 1)]
    mnse = [m for m in model.groups.modules() if isinstance(m, MNSE)]
    # per group: one MNSE per base tuple ((2, 3, 10) and (2,)) and one for the similarity
    assert sorted((m.dim, m.num_sets) for m in mnse) == [(8, 1)] * 3 + [(16, 2)] * 3


def test_forward_returns_the_documented_dict(schema, batch):
    model = HMoE(base_config(), schema)
    out = model(batch, return_gates=True, return_attention=True)
    assert set(out) == {"logits", "aux_losses", "gates", "attention"}
    assert out["aux_losses"] == {}
    for task in ("click", "buy"):
        assert out["logits"][task].shape == (24,) and out["logits"][task].dtype == torch.float32
    assert out["gates"]["click"].shape == (24, 2) and out["gates"]["buy"].shape == (24, 1)
    torch.testing.assert_close(out["gates"]["click"].sum(1), torch.ones(24))
    assert set(out["attention"]) == {"history/shared", "history/own"}
    assert out["attention"]["history/own"].shape == (24, 1, 6)
    plain = model(batch)
    assert set(plain) == {"logits", "aux_losses"}
    torch.testing.assert_close(plain["logits"]["click"], out["logits"]["click"])


@pytest.mark.parametrize("encoder", ["tim", "tim_no_temporal", "tim_no_target", "din", "mean",
                                     "sasrec"])
def test_every_sequence_encoder_trains(schema, batch, encoder):
    model = HMoE(dict(base_config(), sequence_encoder=encoder, num_heads=2), schema)
    out = model(batch, return_attention=True)
    # TIM returns α per head; the others one weight row (SASRec's 2 heads are its encoder's)
    heads = 2 if encoder.startswith("tim") else 1
    weights = out["attention"]["history/own"]  # (B, H, L)
    assert weights.shape == (24, heads, 6)
    lengths = batch["seq/history/lengths"]
    assert (weights[lengths == 0] == 0).all()  # an empty history attends to nothing
    sum(out["logits"].values()).sum().backward()
    encoders = model.groups[0].sequences[0]
    assert all(torch.isfinite(p.grad).all() for e in encoders for p in e.parameters())
    assert torch.isfinite(model.groups[0].categorical.weight.grad).all()


@pytest.mark.parametrize("encoder", ["mnse", "bucket", "scaled"])
def test_every_numeric_encoder_trains_and_handles_missing(schema, batch, encoder):
    model = HMoE(dict(base_config(), numeric_encoder=encoder), schema)
    fields, _ = model.embed(batch)
    numeric = fields["own"][:, 3:6]  # (B, 3, D)
    assert torch.isfinite(numeric).all()
    # row 0 is all missing: every set gets the learned missing vectors, the same for any row
    twin = {k: v.clone() for k, v in batch.items()}
    twin["numeric"][1] = float("nan")
    torch.testing.assert_close(model.embed(twin)[0]["own"][1, 3:6], numeric[0])
    sum(model(batch)["logits"].values()).sum().backward()
    grads = [p.grad for p in model.groups[0].numeric.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_sequence_field_is_tim_over_the_sets_own_item_rows(schema, batch):
    """A set's sequence field is TIM over the behaviours' rows of that set's plane of the item
    field (read in place), with that set's embedding of the target item."""
    model = preset("stem", schema, tasks=["click", "buy"])
    fields, _ = model.embed(batch)
    lo, hi = 50, 90  # the item field's rows (user owns 0..49)
    ids, items = batch["seq/history"], batch["categorical"][:, 1]
    for name in ("shared", "task_click", "task_buy"):
        g, k = model.set_location[name]
        table = model.embedding_table(name)[lo:hi]  # (40, D)
        tim = model.groups[g].sequences[0][k]
        assert isinstance(tim, TemporalInterest)
        expected = tim(table[ids], table[items], batch["seq/history/positions"],
                       batch["seq/history/lengths"])
        torch.testing.assert_close(fields[name][:, SEQUENCE_FIELD], expected)


def test_empty_batch(schema, batch_of):
    model = preset("stem", schema, tasks=["click", "buy"])
    out = model(batch_of(schema, batch_size=0), return_gates=True)
    assert out["logits"]["click"].shape == (0,) and out["gates"]["buy"].shape == (0, 3)


def test_unfitted_quantile_quantizer_raises_until_fitted(schema_with, batch_of):
    schema = schema_with(numeric=(NumericFeature("rank", quantizer="quantile", num_bins=8),))
    model = HMoE(base_config(), schema)
    batch = batch_of(schema)
    with pytest.raises(RuntimeError, match="not fitted"):
        model(batch)
    model.numeric_input.quantizers[0].fit(batch["numeric"])
    assert torch.isfinite(model(batch)["logits"]["click"]).all()


def test_compiled_model_matches_eager(schema, batch):
    model = preset("stem", schema, tasks=["click", "buy"])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got, want = compiled(batch)["logits"], model(batch)["logits"]
    for task in want:
        torch.testing.assert_close(got[task], want[task])
    sum(got.values()).sum().backward()
    assert model.groups[0].categorical.weight.grad.abs().sum() > 0


BAD_BATCHES = [
    (lambda b: b.pop("categorical"), ValueError, r"batch is missing 'categorical'"),
    (lambda b: b.update(categorical=b["categorical"].float()), TypeError,
     r"batch\['categorical'\] must be a int32 or int64 tensor"),
    (lambda b: b["categorical"].__setitem__((3, 0), 50), IndexError,  # user has 50 rows
     r"field 0 \(sample 3\) has id 50, outside \[0, 50\)"),
    (lambda b: b.update(numeric=b["numeric"][:, :2]), ValueError,
     r"batch\['numeric'\] must have shape \(B, 3\)"),
    (lambda b: b.update({"seq/history/lengths": b["seq/history/lengths"][:5]}), ValueError,
     r"one batch size B"),
    (lambda b: b.update({"seq/history": b["seq/history"] + 40}), ValueError,
     r"batch\['seq/history'\]: item ids must lie in \[0, 40\)"),
    (lambda b: b.pop("pretrained/graph/item"), ValueError,
     r"batch is missing 'pretrained/graph/item'"),
]


@pytest.mark.parametrize("mutate, error, match", BAD_BATCHES, ids=[m for *_, m in BAD_BATCHES])
def test_bad_batch_names_the_key(schema, batch, mutate, error, match):
    model = HMoE(base_config(), schema)
    mutate(batch)
    with pytest.raises(error, match=match):
        model(batch)


# --------------------------------------------------------------------------------------------
# Stop-gradient routing (STEM, STEM-AL), checked with autograd per plane of the fused tables


def set_slices_grad(model, set_name):
    return [s.of(s.parameter.grad) if s.parameter.grad is not None else None
            for s in model.set_parameters(set_name).values()]


def set_grad_is_zero(model, set_name):
    return all(g is None or bool((g == 0).all()) for g in set_slices_grad(model, set_name))


def set_grad_is_nonzero(model, set_name):
    """Every table of the set (categorical plane, numeric MNSE rows, TIM positions, similarity
    MNSE rows) gets a gradient; missing vectors of never-missing inputs are exempt."""
    slices = model.set_parameters(set_name)
    trained = {key: s for key, s in slices.items() if not key.endswith("mnse.missing")}
    return all(s.parameter.grad is not None and bool(s.of(s.parameter.grad).abs().sum() > 0)
               for s in trained.values())


def test_stem_task_loss_never_reaches_other_tasks_sets_or_experts(schema, batch):
    model = preset("stem", schema, tasks=["click", "buy"])
    assert model.heads["click"].expert_names == ("shared", "task_click", "task_buy")
    assert model.heads["click"].detach == (False, False, True)
    assert model.heads["click"].gate_inputs == ("task_click", "shared")
    g, _ = model.set_location["task_buy"]
    assert model.groups[g].categorical.num_sets == 3  # all three planes in one table
    task_loss(model(batch), batch, schema, "click").backward()
    assert set_grad_is_zero(model, "task_buy")
    assert grads_are_zero(model.experts["task_buy"].parameters())
    assert grads_are_zero(model.heads["buy"].parameters())
    for own in ("task_click", "shared"):
        assert set_grad_is_nonzero(model, own), own
        assert grads_are_nonzero(model.experts[own].parameters()), own


def test_stem_other_tasks_experts_still_count_forward(schema, batch):
    model = preset("stem", schema, tasks=["click", "buy"])
    before = model(batch)["logits"]["click"]
    with torch.no_grad():
        for p in model.experts["task_buy"].parameters():
            p.add_(0.5)
    assert not torch.allclose(model(batch)["logits"]["click"], before)


def test_stem_al_main_loss_spares_the_auxiliary_set_and_aux_loss_trains_it(schema, batch):
    model = preset("stem_al", schema)
    assert model.tasks == ("click", "buy", "view")
    assert model.heads["view"].expert_names == ("task_view",)
    assert model.heads["click"].detach == (False, True, True)  # buy's and view's experts: SG
    task_loss(model(batch), batch, schema, "click").backward()
    assert set_grad_is_zero(model, "task_view")
    assert grads_are_zero(model.experts["task_view"].parameters())
    assert set_grad_is_nonzero(model, "task_click")

    model.zero_grad(set_to_none=True)
    task_loss(model(batch), batch, schema, "view").backward()
    assert set_grad_is_nonzero(model, "task_view")
    assert grads_are_nonzero(model.experts["task_view"].parameters())
    for main in ("task_click", "task_buy"):
        assert set_grad_is_zero(model, main)
        assert grads_are_zero(model.experts[main].parameters())


def test_set_parameters_partition_the_fused_tables(schema):
    model = preset("stem", schema, tasks=["click", "buy"])
    marked = {}
    for name in ("shared", "task_click", "task_buy"):
        for key, s in model.set_parameters(name).items():
            mark = torch.zeros_like(s.parameter)
            s.of(mark).fill_(1)
            marked[key] = marked.get(key, 0) + mark
    assert all(bool((m == 1).all()) for m in marked.values())  # every entry in exactly one set
    embedding = {n for n, _ in model.groups.named_parameters()}
    assert {k.removeprefix("groups.") for k in marked} == embedding


# --------------------------------------------------------------------------------------------
# Collapse: without the ReLU after interaction, multi-embedding is single-embedding


def _single_column(kind: str, mode: str, k: int, c: int, K: int, D: int, num_bases: int) -> int:
    """The column of the single-embedding field vector (width K·D) that holds column c of set k.
    Categorical and MNSE "sum": the K sets side by side (k·D + c). MNSE "concat": per base j the
    K sets' E = D / num_bases columns side by side, base j of set k at j·K·E + k·E + e."""
    if kind == "categorical" or mode == "sum":
        return k * D + c
    E = D // num_bases
    j, e = divmod(c, E)
    return j * K * E + k * E + e


@pytest.mark.parametrize("mnse_mode", ["sum", "concat"])
def test_linear_multi_embedding_equals_single_embedding_of_k_times_the_dim(
        schema_with, batch_of, mnse_mode):
    """What is proven. Take categorical and MNSE-encoded numeric fields (F of them), K
    embedding sets of dim D, one linear expert per set h_k = W_k flatten(x_k) + b_k (no ReLU
    after the interaction), mean aggregation o = (1/K) Σ_k h_k, and any tower. Then the
    single-embedding model with one set of dim K·D whose table rows are the K sets' rows side
    by side (for MNSE: the digit rows side by side, permuted per base in mode "concat") and
    one linear expert with W = [W_1 ... W_K] / K (columns placed to match, per field) and
    b = mean_k b_k gives exactly the same logits on every batch (here: a random one, in
    float64, with missing numeric values). The map between the two parameterisations is a
    bijection (every W on the K·D-wide input splits into K blocks), so the two function
    classes coincide: K sets add nothing over one K·D-wide set, which is why the experts end
    in a ReLU MLP. Not covered: sequence features under TIM (the attention softmax over one
    K·D dot product differs from K softmaxes over D-wide ones) and pre-trained features."""
    K, D, H = 3, 4, 5
    bases = (2, 3)
    numeric = (NumericFeature("a", quantizer="uniform", max_code=30, bases=bases),
               NumericFeature("b", quantizer="uniform", lo=-1.0, step=0.5, max_code=9,
                              bases=bases))
    schema = schema_with(numeric=numeric, sequence=(), pretrained=())
    kinds = ["categorical"] * 3 + ["numeric"] * 2
    Fields = len(kinds)

    def linear_model(num_sets: int, dim: int) -> HMoE:
        sets = [{"name": f"s{k}", "dim": dim} for k in range(num_sets)]
        experts = [{"name": f"e{k}", "type": "linear", "set": f"s{k}", "hidden": [H]}
                   for k in range(num_sets)]
        tasks = [{"name": "click", "aggregation": "mean", "tower": [6]}]
        return HMoE({"sets": sets, "experts": experts, "tasks": tasks,
                     "mnse_mode": mnse_mode}, schema).double()

    multi, single = linear_model(K, D), linear_model(1, K * D)
    me, se = multi.groups[0], single.groups[0]
    m_mnse, s_mnse = me.numeric.encoders[0], se.numeric.encoders[0]
    column = {(kind, k, c): _single_column(kind, mnse_mode, k, c, K, D, len(bases))
              for kind in ("categorical", "numeric") for k in range(K) for c in range(D)}
    with torch.no_grad():
        N = me.categorical.weight.shape[0]
        se.categorical.weight.copy_(me.categorical.weight.reshape(N, 1, K * D))
        F_n, R = m_mnse.weight.shape[:2]  # (F_n, R, K, E) -> (F_n, R, K·E)
        s_mnse.weight.copy_(m_mnse.weight.reshape(F_n, R, -1))
        weight = torch.zeros(H, Fields, K * D, dtype=torch.float64)
        for k in range(K):
            w_k = multi.experts[f"e{k}"].linear.weight.view(H, Fields, D)
            for c in range(D):
                s_mnse.missing[:, column["numeric", k, c]] = m_mnse.missing[k, :, c]
                for f, kind in enumerate(kinds):
                    weight[:, f, column[kind, k, c]] = w_k[:, f, c] / K
        single.experts["e0"].linear.weight.copy_(weight.reshape(H, -1))
        biases = [multi.experts[f"e{k}"].linear.bias for k in range(K)]
        single.experts["e0"].linear.bias.copy_(torch.stack(biases).mean(0))
        single.heads["click"].tower.load_state_dict(multi.heads["click"].tower.state_dict())

    batch = batch_of(schema)
    torch.testing.assert_close(single(batch)["logits"]["click"],
                               multi(batch)["logits"]["click"], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Parameter counts by formula


def digits(value: int, base: int) -> int:
    return max(1, math.ceil(math.log(value + 1, base) - 1e-12))


def mnse_params(num_fields: int, max_value: int, bases, dim: int, K: int) -> int:
    """MNSE "sum": weight F·R·K·dim with R = Σ_b b·digits_b, plus missing K·F·dim."""
    rows = sum(b * digits(max_value, b) for b in bases)
    return num_fields * rows * K * dim + K * num_fields * dim


def mlp_params(*widths: int) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def embedding_params(dim: int, K: int) -> int:
    """Every table of K sets of dim D for the test schema (conftest): categorical rows
    50 + 40 + 5; numeric age (max 99) and price (max 200) in bases (2, 3, 10), rank (7) in (2,);
    TIM positions (6 + 1) × D per set; the similarity MNSE (max code 1023, bases (2, 3, 10))."""
    categorical = (50 + 40 + 5) * K * dim
    numeric = mnse_params(2, 200, (2, 3, 10), dim, K) + mnse_params(1, 7, (2,), dim, K)
    tim = K * (6 + 1) * dim
    similarity = mnse_params(1, 1023, (2, 3, 10), dim, K)
    return categorical + numeric + tim + similarity


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_digits_formula_examples():
    assert [digits(200, b) for b in (2, 3, 10)] == [8, 5, 3]
    assert [digits(1023, b) for b in (2, 3, 10)] == [10, 7, 4]
    assert digits(7, 2) == 3 and digits(0, 10) == 1


def test_parameter_count_of_dnn(schema):
    model = preset("dnn", schema)  # one set of dim 16, FlatDNN (128, 64), tower (64,)
    expected = (embedding_params(16, 1) + mlp_params(FIELDS * 16, 128, 64)
                + mlp_params(64, 64, 1))
    assert count(model) == expected


def test_parameter_count_of_stem(schema):
    model = preset("stem", schema, tasks=["click", "buy"])
    K, T, D = 3, 2, 16  # shared + 2 task sets, one fused table
    experts = K * mlp_params(FIELDS * D, 128, 64)
    gates = T * mlp_params(FIELDS * D, K)  # linear softmax gate on h_t + h_S (F·D wide)
    towers = T * mlp_params(64, 64, 1)
    assert count(model) == embedding_params(D, K) + experts + gates + towers


def test_config_values_reach_the_modules(schema):
    config = ModelConfig.from_dict(base_config())
    config = dataclasses.replace(config, init_std=0.5)
    model = HMoE(config, schema)
    std = model.groups[0].categorical.weight.std().item()
    assert 0.4 < std < 0.6
