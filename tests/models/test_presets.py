"""hmoe.models.presets: every preset builds, runs, trains, and routes as its description says."""

import pytest
import torch
import torch.nn.functional as F

from hmoe.models import PRESETS, HMoE, ModelConfig, preset, preset_config, preset_knobs
from hmoe.nn import MultiEmbedding

B = 24


def all_tasks_loss(out, batch, schema):
    return sum(F.binary_cross_entropy_with_logits(logits, batch["labels"][:, schema.tasks.index(t)])
               for t, logits in out["logits"].items())


def test_every_preset_has_a_one_line_description():
    assert len(PRESETS) == 12
    assert {"hmoe_me", "stem", "ame", "stem_al", "dcnv2", "dnn", "shared_bottom", "mmoe", "ple",
            "me_mmoe", "me_ple", "single_task"} == set(PRESETS)
    assert all(isinstance(d, str) and d and "\n" not in d for d in PRESETS.values())


@pytest.mark.parametrize("name", list(PRESETS))
def test_shapes_and_dtypes(schema, batch, name):
    model = preset(name, schema)
    assert isinstance(model, HMoE) and isinstance(model.config, ModelConfig)
    out = model(batch, return_gates=True, return_attention=True)
    assert out["aux_losses"] == {}
    assert set(out["logits"]) == set(model.tasks) == set(out["gates"])
    for task, logits in out["logits"].items():
        assert logits.shape == (B,) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        gates = out["gates"][task]
        assert gates.shape == (B, len(model.heads[task].expert_names))
        assert gates.dtype == torch.float32
        if model.config.tasks[model.tasks.index(task)].aggregation == "gate":
            torch.testing.assert_close(gates.sum(1), torch.ones(B))
    assert set(out["attention"]) == {f"history/{s.name}" for s in model.config.sets}
    for weights in out["attention"].values():
        assert weights.shape == (B, 1, 6) and weights.dtype == torch.float32


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_few_training_steps_decrease_the_loss_on_a_fixed_batch(schema, batch, name):
    torch.manual_seed(0)
    model = preset(name, schema)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad(set_to_none=True)
        loss = all_tasks_loss(model(batch), batch, schema)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_default_tasks(schema):
    assert preset("hmoe_me", schema).tasks == ("click",)
    assert preset("dcnv2", schema).tasks == ("click",)
    assert preset("stem", schema).tasks == ("click", "buy")  # main labels
    assert preset("stem_al", schema).tasks == ("click", "buy", "view")  # with the auxiliary
    assert preset("dnn", schema, tasks=["buy", "click"]).tasks == ("buy", "click")


def test_hmoe_me_has_four_heterogeneous_experts_on_one_fused_table(schema):
    model = preset("hmoe_me", schema)
    types = {e.name: e.type for e in model.config.experts}
    assert types == {"gwpfm": "gwpfm", "ipnn": "ipnn", "dcnv2": "dcnv2", "dnn": "dnn"}
    assert {e.name: e.set for e in model.config.experts} == {n: n for n in types}
    tables = [m for m in model.modules() if isinstance(m, MultiEmbedding)]
    assert len(tables) == 1 and tables[0].num_sets == 4  # one lookup for the four sets
    assert model.experts["gwpfm"].num_groups == 4  # the feature kinds
    assert model.heads["click"].detach == (False,) * 4


def test_stem_routing(schema):
    config = preset_config("stem", schema)
    assert [(s.name, s.scope, s.task) for s in config.sets] == [
        ("shared", "shared", None), ("task_click", "task", "click"), ("task_buy", "task", "buy")]
    model = HMoE(config, schema)
    for task, other in (("click", "buy"), ("buy", "click")):
        head = model.heads[task]
        assert head.expert_names == ("shared", "task_click", "task_buy")
        assert dict(zip(head.expert_names, head.detach)) == {
            "shared": False, f"task_{task}": False, f"task_{other}": True}
        assert head.gate_inputs == (f"task_{task}", "shared") and head.gate_combine == "sum"


def test_ame_routing(schema):
    model = preset("ame", schema)
    assert [s.dim for s in model.config.sets] == [16, 32, 64]
    assert len(model.groups) == 3  # one table per dim
    for head in model.heads.values():
        assert head.expert_names == ("dim16", "dim32", "dim64") and not any(head.detach)


def test_ple_and_me_ple_routing(schema):
    for name in ("ple", "me_ple"):
        model = preset(name, schema)
        assert model.heads["click"].expert_names == ("shared_0", "shared_1", "task_click")
        assert model.heads["buy"].expert_names == ("shared_0", "shared_1", "task_buy")
    assert [s.name for s in preset_config("ple", schema).sets] == ["shared"]
    assert [s.name for s in preset_config("me_ple", schema).sets] == [
        "shared_0", "shared_1", "task_click", "task_buy"]


def test_mmoe_shared_bottom_single_task_routing(schema):
    mmoe, me_mmoe = preset("mmoe", schema), preset("me_mmoe", schema)
    assert {e.set for e in mmoe.config.experts} == {"shared"}
    assert len({e.set for e in me_mmoe.config.experts}) == 4
    assert len(mmoe.heads["click"].expert_names) == 4
    bottom = preset("shared_bottom", schema)
    assert all(h.expert_names == ("bottom",) for h in bottom.heads.values())
    single = preset("single_task", schema)
    assert single.heads["click"].expert_names == ("task_click",)
    assert single.heads["buy"].expert_names == ("task_buy",)


def test_single_task_shares_nothing(schema, batch):
    model = preset("single_task", schema)
    loss = F.binary_cross_entropy_with_logits(model(batch)["logits"]["click"],
                                              batch["labels"][:, 0])
    loss.backward()
    for s in model.set_parameters("task_buy").values():
        assert s.parameter.grad is None or bool((s.of(s.parameter.grad) == 0).all())


def test_overrides_reach_the_config(schema):
    config = preset_config("stem", schema, dim=32, expert_hidden=(16,), tower=(8,),
                           sequence_encoder="din", numeric_encoder="bucket")
    assert {s.dim for s in config.sets} == {32}
    assert {e.hidden for e in config.experts} == {(16,)}
    assert {t.tower for t in config.tasks} == {(8,)}
    assert (config.sequence_encoder, config.numeric_encoder) == ("din", "bucket")
    assert preset_config("ame", schema, dims=(8, 16)).sets[1].dim == 16
    assert "num_experts" in preset_knobs("mmoe") and "dims" in preset_knobs("ame")


def test_bad_preset_arguments_name_themselves(schema, schema_with):
    with pytest.raises(ValueError, match="unknown preset 'stemm'"):
        preset("stemm", schema)
    with pytest.raises(ValueError, match=r"preset 'stem': unknown override\(s\) \['dims'\]"):
        preset("stem", schema, dims=(8,))
    with pytest.raises(ValueError, match=r"tasks: \['like'\] are not labels"):
        preset("mmoe", schema, tasks=["like"])
    with pytest.raises(ValueError, match="stem_al needs main and auxiliary tasks"):
        preset("stem_al", schema, tasks=["click", "buy"])
    from hmoe.data.schema import Label
    with pytest.raises(ValueError, match="stem_al needs main and auxiliary tasks"):
        preset("stem_al", schema_with(labels=(Label("click"),)))
