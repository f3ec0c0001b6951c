r"""Named presets: small ModelConfigs of the HMoE graph for the paper's models and baselines.

    model = hmoe.models.preset("stem", schema, tasks=["click", "buy"], dim=32)
    config = hmoe.models.preset_config("stem", schema)     # the ModelConfig (YAML: to_dict())

``PRESETS`` maps each name to a one-line description (the table below). Defaults are small
enough for 2 CPU cores: embedding dim 16 (hmoe_me: 24, so GwPFM's feature-kind groups and
MNSE's concatenated bases divide it), experts (128, 64), towers (64,), linear gates.

Tasks. ``tasks`` defaults to the first main (non-auxiliary) label for the single-task presets
(hmoe_me, dcnv2, dnn), to every main label for the others, and to every label for stem_al (which
needs an auxiliary one). Several tasks in dcnv2 or dnn share the one expert as a bottom; several
in hmoe_me each gate over all four experts.

Overrides. Each preset takes the keyword knobs of its builder below (dim, expert_hidden, tower,
gate_hidden, ... ; ``preset_knobs(name)`` lists them), ``dropout`` (the rate after every hidden
layer of every expert and tower; default 0) and any ModelConfig field (sequence_encoder,
numeric_encoder, mnse_mode, num_heads, init_std); anything else is a ValueError naming it.

Set and expert names: "shared" for a shared set, "task_<t>" for the set and expert owned by task
t (scope "task", or "auxiliary" for an auxiliary label).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence

from hmoe.data.schema import Schema
from hmoe.models.config import EmbeddingSetConfig, ExpertConfig, ModelConfig, TaskConfig
from hmoe.models.hmoe import HMoE

__all__ = ["PRESETS", "preset", "preset_config", "preset_knobs"]

PRESETS: dict[str, str] = {
    "hmoe_me": "HMoE-ME (Pan et al. 2024, sec. 4.1): one task; GwPFM, IPNN, DCN V2 and flat-DNN "
               "experts, each on its own embedding set, softmax-gated",
    "stem": "STEM-Net (Su et al. 2024): a shared set and one set per task, one expert each; "
            "gate on h_t + h_S; other tasks' experts seen through stop-gradient",
    "ame": "AME: sets of dims 16/32/64 with one expert each; every task gates over all "
           "experts, no stop-gradient",
    "stem_al": "STEM-AL: every main and auxiliary task owns a set and expert; main tasks see "
               "the others' experts through stop-gradient, auxiliary tasks only their own",
    "dcnv2": "single-embedding DCN V2 (2 stacked cross layers, then the MLP)",
    "dnn": "single-embedding flat DNN",
    "shared_bottom": "Shared-Bottom: one set, one DNN bottom, a tower per task",
    "mmoe": "MMoE: one shared set, 4 DNN experts, a softmax gate per task over all of them",
    "ple": "PLE, one CGC level: one shared set; 2 shared experts + 1 per task; a task gates "
           "over the shared experts and its own",
    "me_mmoe": "ME-MMoE: MMoE whose 4 experts each have their own embedding set",
    "me_ple": "ME-PLE: PLE (one CGC level) with an embedding set per expert (shared experts on "
              "shared sets, task experts on their task's set)",
    "single_task": "Single-Task: each task its own set, expert and tower; nothing shared",
}

EXPERT_HIDDEN = (128, 64)
TOWER = (64,)
SINGLE_TASK = ("hmoe_me", "dcnv2", "dnn")


# --------------------------------------------------------------------------------------------
# Building blocks


def _scope(schema: Schema, task: str) -> str:
    label = next(label for label in schema.labels if label.name == task)
    return "auxiliary" if label.auxiliary else "task"


def _task_set(schema: Schema, task: str, dim: int) -> EmbeddingSetConfig:
    return EmbeddingSetConfig(f"task_{task}", dim, _scope(schema, task), task)


def _dnn(name: str, set_name: str, hidden) -> ExpertConfig:
    return ExpertConfig(name, "dnn", set_name, hidden)


def _towers(tasks: Sequence[str], tower, **routing) -> tuple[TaskConfig, ...]:
    return tuple(TaskConfig(t, tower=tower, **routing) for t in tasks)


def _parts(sets, experts, tasks) -> dict:
    return {"sets": tuple(sets), "experts": tuple(experts), "tasks": tuple(tasks)}


# --------------------------------------------------------------------------------------------
# The presets: schema and tasks -> sets, experts, tasks


def _hmoe_me(schema, tasks, *, dim=24, expert_hidden=EXPERT_HIDDEN, tower=TOWER, gate_hidden=(),
             aggregation="gate", num_cross=2, field_groups="kind"):
    options = {"gwpfm": {"field_groups": field_groups}, "dcnv2": {"num_cross": num_cross}}
    kinds = ("gwpfm", "ipnn", "dcnv2", "dnn")
    sets = [EmbeddingSetConfig(kind, dim) for kind in kinds]
    experts = [ExpertConfig(kind, kind, kind, expert_hidden, options=options.get(kind, {}))
               for kind in kinds]
    return _parts(sets, experts, _towers(tasks, tower, aggregation=aggregation,
                                         gate_hidden=gate_hidden))


def _stem(schema, tasks, *, dim=16, expert_hidden=EXPERT_HIDDEN, tower=TOWER, gate_hidden=()):
    sets = [EmbeddingSetConfig("shared", dim)] + [_task_set(schema, t, dim) for t in tasks]
    experts = [_dnn(s.name, s.name, expert_hidden) for s in sets]
    heads = [TaskConfig(t, gate_inputs=(f"task_{t}", "shared"), gate_combine="sum",
                        gate_hidden=gate_hidden, tower=tower)
             for t in tasks]  # detach: the default, the experts of the other tasks' sets
    return _parts(sets, experts, heads)


def _ame(schema, tasks, *, dims=(16, 32, 64), expert_hidden=EXPERT_HIDDEN, tower=TOWER,
         gate_hidden=()):
    sets = [EmbeddingSetConfig(f"dim{d}", d) for d in dims]
    experts = [_dnn(s.name, s.name, expert_hidden) for s in sets]
    return _parts(sets, experts, _towers(tasks, tower, detach=(), gate_hidden=gate_hidden))


def _stem_al(schema, tasks, *, dim=16, expert_hidden=EXPERT_HIDDEN, tower=TOWER, gate_hidden=()):
    auxiliary = [t for t in tasks if _scope(schema, t) == "auxiliary"]
    if not auxiliary or len(auxiliary) == len(tasks):
        raise ValueError(f"tasks: stem_al needs main and auxiliary tasks (Label.auxiliary), got "
                         f"{list(tasks)} with auxiliary {auxiliary}")
    sets = [_task_set(schema, t, dim) for t in tasks]
    experts = [_dnn(s.name, s.name, expert_hidden) for s in sets]
    heads = [TaskConfig(t, experts=(f"task_{t}",), aggregation="mean", tower=tower)
             if t in auxiliary else
             TaskConfig(t, gate_inputs=(f"task_{t}",), gate_hidden=gate_hidden, tower=tower)
             for t in tasks]  # main tasks: every expert, the others' through stop-gradient
    return _parts(sets, experts, heads)


def _one_set_one_expert(tasks, expert_type: str, dim: int, expert_hidden, tower,
                        options=None) -> dict:
    """Single embedding: one set, one expert, every task's tower on it."""
    sets = [EmbeddingSetConfig("embedding", dim)]
    experts = [ExpertConfig(expert_type, expert_type, "embedding", expert_hidden,
                            options=options or {})]
    return _parts(sets, experts, _towers(tasks, tower, aggregation="mean"))


def _dcnv2(schema, tasks, *, dim=16, expert_hidden=EXPERT_HIDDEN, tower=TOWER, num_cross=2,
           low_rank=None, structure="stacked"):
    options = {"num_cross": num_cross, "low_rank": low_rank, "structure": structure}
    return _one_set_one_expert(tasks, "dcnv2", dim, expert_hidden, tower, options)


def _dnn_preset(schema, tasks, *, dim=16, expert_hidden=EXPERT_HIDDEN, tower=TOWER):
    return _one_set_one_expert(tasks, "dnn", dim, expert_hidden, tower)


def _shared_bottom(schema, tasks, *, dim=16, expert_hidden=EXPERT_HIDDEN, tower=TOWER):
    sets = [EmbeddingSetConfig("shared", dim)]
    return _parts(sets, [_dnn("bottom", "shared", expert_hidden)],
                  _towers(tasks, tower, aggregation="mean"))


def _mmoe(schema, tasks, *, dim=16, num_experts=4, expert_hidden=EXPERT_HIDDEN, tower=TOWER,
          gate_hidden=(), separate_sets=False):
    names = [f"expert_{i}" for i in range(num_experts)]
    sets = [EmbeddingSetConfig(n, dim) for n in names] if separate_sets else \
        [EmbeddingSetConfig("shared", dim)]
    experts = [_dnn(n, n if separate_sets else "shared", expert_hidden) for n in names]
    return _parts(sets, experts, _towers(tasks, tower, gate_hidden=gate_hidden))


def _me_mmoe(schema, tasks, *, dim=16, num_experts=4, expert_hidden=EXPERT_HIDDEN, tower=TOWER,
             gate_hidden=()):
    return _mmoe(schema, tasks, dim=dim, num_experts=num_experts, expert_hidden=expert_hidden,
                 tower=tower, gate_hidden=gate_hidden, separate_sets=True)


def _ple(schema, tasks, *, dim=16, num_shared_experts=2, expert_hidden=EXPERT_HIDDEN,
         tower=TOWER, gate_hidden=(), separate_sets=False):
    shared = [f"shared_{i}" for i in range(num_shared_experts)]
    own = {t: f"task_{t}" for t in tasks}
    if separate_sets:
        sets = [EmbeddingSetConfig(n, dim) for n in shared] + \
               [_task_set(schema, t, dim) for t in tasks]
    else:
        sets = [EmbeddingSetConfig("shared", dim)]
    experts = [_dnn(n, n if separate_sets else "shared", expert_hidden)
               for n in [*shared, *own.values()]]
    heads = [TaskConfig(t, experts=(*shared, own[t]), gate_hidden=gate_hidden, tower=tower)
             for t in tasks]
    return _parts(sets, experts, heads)


def _me_ple(schema, tasks, *, dim=16, num_shared_experts=2, expert_hidden=EXPERT_HIDDEN,
            tower=TOWER, gate_hidden=()):
    return _ple(schema, tasks, dim=dim, num_shared_experts=num_shared_experts,
                expert_hidden=expert_hidden, tower=tower, gate_hidden=gate_hidden,
                separate_sets=True)


def _single_task(schema, tasks, *, dim=16, expert_hidden=EXPERT_HIDDEN, tower=TOWER):
    sets = [_task_set(schema, t, dim) for t in tasks]
    experts = [_dnn(s.name, s.name, expert_hidden) for s in sets]
    heads = [TaskConfig(t, experts=(f"task_{t}",), aggregation="mean", tower=tower)
             for t in tasks]
    return _parts(sets, experts, heads)


BUILDERS: dict[str, Callable[..., dict]] = {
    "hmoe_me": _hmoe_me, "stem": _stem, "ame": _ame, "stem_al": _stem_al, "dcnv2": _dcnv2,
    "dnn": _dnn_preset, "shared_bottom": _shared_bottom, "mmoe": _mmoe, "ple": _ple,
    "me_mmoe": _me_mmoe, "me_ple": _me_ple, "single_task": _single_task,
}
assert set(BUILDERS) == set(PRESETS)
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                     if f.name not in ("sets", "experts", "tasks"))


# --------------------------------------------------------------------------------------------
# Public


def preset_knobs(name: str) -> dict[str, object]:
    """The preset's own keyword knobs and their defaults (ModelConfig fields come on top)."""
    _check_name(name)
    parameters = inspect.signature(BUILDERS[name]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_name(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {list(PRESETS)}")


def _default_tasks(name: str, schema: Schema) -> list[str]:
    main = [label.name for label in schema.labels if not label.auxiliary]
    if name == "stem_al":
        return list(schema.tasks)
    if not main:
        raise ValueError(f"schema {schema.name!r} has no main (non-auxiliary) label")
    return main[:1] if name in SINGLE_TASK else main


def preset_config(name: str, schema: Schema, tasks: Sequence[str] | None = None,
                  **overrides) -> ModelConfig:
    """The ModelConfig of preset ``name`` for ``schema`` (see the module docstring)."""
    _check_name(name)
    tasks = _default_tasks(name, schema) if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one label")
    unknown_tasks = [t for t in tasks if t not in schema.tasks]
    if unknown_tasks:
        raise ValueError(f"tasks: {unknown_tasks} are not labels of schema {schema.name!r}; "
                         f"labels: {list(schema.tasks)}")
    knobs = preset_knobs(name)
    overrides = dict(overrides)
    dropout = overrides.pop("dropout", None)
    unknown = sorted(k for k in overrides if k not in knobs and k not in MODEL_FIELDS)
    if unknown:
        raise ValueError(f"preset {name!r}: unknown override(s) {unknown}; knobs: "
                         f"{list(knobs) + ['dropout']}, model fields: {list(MODEL_FIELDS)}")
    own = {k: v for k, v in overrides.items() if k in knobs}
    model = {k: v for k, v in overrides.items() if k in MODEL_FIELDS}
    parts = BUILDERS[name](schema, tasks, **own)
    if dropout is not None:  # after every hidden layer of every expert and tower
        parts["experts"] = tuple(dataclasses.replace(e, dropout=dropout)
                                 for e in parts["experts"])
        parts["tasks"] = tuple(dataclasses.replace(t, dropout=dropout) for t in parts["tasks"])
    return ModelConfig(**parts, **model)


def preset(name: str, schema: Schema, tasks: Sequence[str] | None = None, **overrides) -> HMoE:
    """The HMoE model of preset ``name`` for ``schema``: ``HMoE(preset_config(...), schema)``."""
    return HMoE(preset_config(name, schema, tasks, **overrides), schema)
