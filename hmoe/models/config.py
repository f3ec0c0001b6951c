r"""The typed configuration of the HMoE graph (hmoe.models.HMoE), as YAML gives it.

Design section 3.4: embedding sets -> experts -> per-task gates -> per-task towers. A config is
four lists and a few model-wide switches:

    sets:    EmbeddingSetConfig   name, dim, scope ("shared" | "task" | "auxiliary"), task
    experts: ExpertConfig         name, type, set (the embedding set it reads), hidden, options
    tasks:   TaskConfig           name (a schema label), the experts it sees, which of them
                                  through stop-gradient, its aggregation, gate input and tower
    model:   sequence_encoder, numeric_encoder, mnse_mode, num_heads, init_std, dense_init,
             joint_sequences, din_hidden

Routing defaults (a YAML config may leave them out):
    TaskConfig.experts None      every expert.
    TaskConfig.detach None       the task's experts that read a set scoped to another task
                                 (scope "task" or "auxiliary" with task != this one): STEM's
                                 rule, "task t's loss never updates other tasks' experts or
                                 embeddings" (paper notes 4.1).
    TaskConfig.gate_inputs None  the sets read by the task's experts outside ``detach``.
A gate input set scoped to another task is always read through stop-gradient, so a task's loss
trains only sets of its own or shared scope (unless ``detach`` is given explicitly).

``from_dict`` builds a config from plain dicts and lists (lists become tuples) and rejects
unknown keys, naming them with their path (``experts[2].sizes``). Values are checked on
construction; ``ModelConfig.validate(schema)`` checks the references between the lists and
against a dataset schema. Every error is a ValueError that names the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hmoe.data.schema import Schema

__all__ = ["EXPERT_TYPES", "NUMERIC_ENCODERS", "SEQUENCE_ENCODERS", "EmbeddingSetConfig",
           "ExpertConfig", "ModelConfig", "TaskConfig"]

SCOPES = ("shared", "task", "auxiliary")
# expert type -> the options it takes (and their defaults, documented in hmoe.models.hmoe)
EXPERT_TYPES: dict[str, tuple[str, ...]] = {
    "gwpfm": ("field_groups",),
    "ipnn": (),
    "dcnv2": ("num_cross", "low_rank", "structure"),
    "dnn": (),
    "linear": (),  # no ReLU after the interaction: collapses (for analysis only, see hmoe.py)
}
AGGREGATIONS = ("gate", "mean", "weights")
GATE_COMBINES = ("concat", "sum")
SEQUENCE_ENCODERS = ("tim", "tim_no_temporal", "tim_no_target", "din", "mean", "sasrec")
HEADED = ("tim", "tim_no_temporal", "tim_no_target", "sasrec")  # the encoders with heads
NUMERIC_ENCODERS = ("mnse", "bucket", "scaled")
MNSE_MODES = ("sum", "concat")
DENSE_INITS = ("torch", "xavier_normal")
FIELD_GROUPINGS = ("kind", "single")
SIMILARITY_BASES = (2, 3, 10)  # the bases of the pretrained features' similarity MNSE


# --------------------------------------------------------------------------------------------
# Value checks shared by the dataclasses (they raise "<key>: ..." and from_dict adds the path)


def _check_name(key: str, value) -> None:
    if not isinstance(value, str) or not value or "." in value:
        raise ValueError(f"{key} must be a non-empty string without '.', got {value!r}")


def _check_choice(key: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")


def _check_widths(key: str, value, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list of layer widths, got {value!r}")
    widths = tuple(value)
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(f"{key} must hold integers >= 1, got {list(widths)}")
    if not widths and not allow_empty:
        raise ValueError(f"{key} must hold at least one width")
    return widths


def _check_names(key: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list of names, got {value!r}")
    names = tuple(value)
    for name in names:
        _check_name(key, name)
    if len(set(names)) != len(names):
        raise ValueError(f"{key} lists a name twice: {list(names)}")
    return names


def _check_dropout(key: str, value) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must lie in [0, 1), got {value!r}")


def _check_positive_int(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


def _unique(key: str, names: Sequence[str]) -> None:
    seen = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{key}[{i}].name: {name!r} is used twice")
        seen.add(name)


def _check_options(expert_type: str, options: Mapping) -> None:
    groups = options.get("field_groups", "kind")
    if not (groups in FIELD_GROUPINGS or (isinstance(groups, Sequence)
                                          and not isinstance(groups, str)
                                          and all(isinstance(g, int) for g in groups))):
        raise ValueError(f"options.field_groups must be one of {FIELD_GROUPINGS} or a list of "
                         f"group ids, got {groups!r}")
    if "num_cross" in options:
        _check_positive_int("options.num_cross", options["num_cross"])
    if options.get("low_rank") is not None:
        _check_positive_int("options.low_rank", options["low_rank"])
    if "structure" in options:
        _check_choice("options.structure", options["structure"], ("stacked", "parallel"))


def field_kinds(schema: Schema) -> tuple[str, ...]:
    """The kind of each field of a set's (B, F, D) field embeddings, in their order:
    categorical, numeric, one per sequence feature, one per pretrained feature."""
    return (("categorical",) * len(schema.categorical) + ("numeric",) * len(schema.numeric)
            + ("sequence",) * len(schema.sequence) + ("pretrained",) * len(schema.pretrained))


def gwpfm_groups(field_groups, kinds: Sequence[str]) -> tuple[int, ...]:
    """GwPFM's group id of each field from options.field_groups (see ExpertConfig)."""
    if field_groups == "single":
        return (0,) * len(kinds)
    if field_groups == "kind":
        order = list(dict.fromkeys(kinds))
        return tuple(order.index(k) for k in kinds)
    return tuple(field_groups)


# --------------------------------------------------------------------------------------------
# from_dict


def _from_dict(cls, data, where: str):
    """cls(**data) with unknown keys rejected and nested lists built (field metadata "of")."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    required = [name for name, f in known.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    kwargs = {}
    for name, value in data.items():
        item_cls = known[name].metadata.get("of")
        if item_cls is not None:
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
                raise ValueError(f"{where}.{name}: expected a list, got {type(value).__name__}")
            value = tuple(_from_dict(item_cls, item, f"{where}.{name}[{i}]")
                          for i, item in enumerate(value))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


# --------------------------------------------------------------------------------------------
# The dataclasses


@dataclass(frozen=True)
class EmbeddingSetConfig:
    """One embedding set: every feature of the schema gets a ``dim``-wide embedding in it.

    scope: "shared" (any task may read it), "task" (owned by main task ``task``) or
    "auxiliary" (owned by auxiliary task ``task``, a Label with auxiliary=True: STEM-AL).
    Sets of equal dim share one fused table (one lookup for all of them).
    """

    name: str
    dim: int
    scope: str = "shared"
    task: str | None = None

    def __post_init__(self):
        _check_name("name", self.name)
        _check_positive_int("dim", self.dim)
        _check_choice("scope", self.scope, SCOPES)
        if (self.scope == "shared") != (self.task is None):
            raise ValueError(f"task must be given exactly when scope is 'task' or 'auxiliary' "
                             f"(scope {self.scope!r}, task {self.task!r})")
        if self.task is not None:
            _check_name("task", self.task)

    @classmethod
    def from_dict(cls, data, where: str = "set") -> EmbeddingSetConfig:
        return _from_dict(cls, data, where)


@dataclass(frozen=True)
class ExpertConfig:
    """One expert: an interaction of type ``type`` on the field embeddings of set ``set``,
    then a ReLU MLP of widths ``hidden`` (the output width is hidden[-1]).

    type: "gwpfm", "ipnn", "dcnv2", "dnn" (flat DNN) or "linear" (one Linear layer of width
    hidden[0], no ReLU: it collapses into single-embedding, for analysis only).
    options: by type, "gwpfm": field_groups ("kind": one group per feature kind present,
    categorical / numeric / sequence / pretrained (default); "single": one group; or a list of
    F group ids); "dcnv2": num_cross (2), low_rank (None), structure ("stacked" | "parallel").
    """

    name: str
    type: str
    set: str
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    options: Mapping = field(default_factory=dict)

    def __post_init__(self):
        _check_name("name", self.name)
        _check_choice("type", self.type, tuple(EXPERT_TYPES))
        _check_name("set", self.set)
        object.__setattr__(self, "hidden", _check_widths("hidden", self.hidden, False))
        if self.type == "linear" and len(self.hidden) != 1:
            raise ValueError(f"hidden of a 'linear' expert is its one output width, got "
                             f"{list(self.hidden)}")
        _check_dropout("dropout", self.dropout)
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping, got {type(self.options).__name__}")
        unknown = sorted(str(k) for k in self.options if k not in EXPERT_TYPES[self.type])
        if unknown:
            raise ValueError(f"options: unknown key(s) {unknown} for type {self.type!r}; known: "
                             f"{list(EXPERT_TYPES[self.type])}")
        object.__setattr__(self, "options", dict(self.options))
        _check_options(self.type, self.options)

    @classmethod
    def from_dict(cls, data, where: str = "expert") -> ExpertConfig:
        return _from_dict(cls, data, where)


@dataclass(frozen=True)
class TaskConfig:
    """One task (a schema label): the experts it sees, how it mixes them, and its tower.

    experts: names of the experts it mixes (None: every expert).
    detach: those of ``experts`` it reads through stop-gradient (None: the ones on sets scoped
        to another task, see the module docstring).
    aggregation: "gate" (SoftmaxGate over the experts, input ``gate_inputs``), "mean" or
        "weights" (learned per-expert weights): see hmoe.nn.gates.
    gate_inputs: the sets whose flattened field embeddings (B, F·D) feed the gate (None: see
        the module docstring); gate_combine "concat" joins them, "sum" adds them (equal dims;
        STEM's h_t + h_S). gate_hidden: ReLU widths of the gate's MLP (none: a linear gate).
    tower: ReLU widths of the tower before its 1-logit output layer; dropout after each.
    """

    name: str
    experts: tuple[str, ...] | None = None
    detach: tuple[str, ...] | None = None
    aggregation: str = "gate"
    gate_inputs: tuple[str, ...] | None = None
    gate_combine: str = "concat"
    gate_hidden: tuple[int, ...] = ()
    tower: tuple[int, ...] = (64,)
    dropout: float = 0.0

    def __post_init__(self):
        _check_name("name", self.name)
        for key in ("experts", "detach", "gate_inputs"):
            object.__setattr__(self, key, _check_names(key, getattr(self, key)))
        if self.experts is not None and not self.experts:
            raise ValueError("experts must name at least one expert (or be left out: all)")
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("gate_combine", self.gate_combine, GATE_COMBINES)
        if self.gate_inputs is not None and not self.gate_inputs:
            raise ValueError("gate_inputs must name at least one set (or be left out)")
        object.__setattr__(self, "gate_hidden",
                           _check_widths("gate_hidden", self.gate_hidden, True))
        object.__setattr__(self, "tower", _check_widths("tower", self.tower, True))
        _check_dropout("dropout", self.dropout)

    @classmethod
    def from_dict(cls, data, where: str = "task") -> TaskConfig:
        return _from_dict(cls, data, where)


@dataclass(frozen=True)
class ModelConfig:
    """The whole graph (see the module docstring).

    sequence_encoder: "tim" (TemporalInterest), "tim_no_temporal", "tim_no_target" (its
        ablations), "din" (DINAttention), "mean" (MeanPooling) or "sasrec"
        (SelfAttentionTarget, one block).
    numeric_encoder: "mnse" (quantizer, then MNSE), "bucket" (an embedding of the quantised
        code: one-hot) or "scaled" ((x - mean) / std times a learned vector; NaN: a learned
        missing vector).
    mnse_mode: "sum" (bases added, the paper's formula) or "concat" (dim / len(bases) columns
        per base; every set's dim must then be divisible by the number of bases), for numeric
        and pretrained features.
    num_heads: heads of TIM and SASRec; divides every set's dim (with joint_sequences, the
        joint width n·dim).
    init_std: the normal initialisation of the embedding tables.
    dense_init: the initialisation of the dense layers (experts, attention MLPs, gates,
        towers). "torch": PyTorch's own (nn.Linear: weight and bias uniform in
        ±1/sqrt(fan_in)). "xavier_normal": every nn.Linear's weight and DCN V2's cross
        matrices drawn from N(0, 2 / (fan_in + fan_out)), biases 0, as FuxiCTR and DeepCTR
        initialise them; it gave a higher test AUC to each of the peer table's models
        (DCNv2, MMoE, DIN; docs/RESULTS.md, section 0).
    joint_sequences: False: each sequence feature has its own encoder per set. True: the n
        sequence features are attended as one, as the DIN paper does with a behaviour's
        features: behaviour i is the concatenation [e_i(seq_1) | ... | e_i(seq_n)] (n·dim
        wide), the target the concatenation of their item fields, one encoder of width n·dim
        per set; its output is split back into one field per sequence, so experts see the
        same fields either way. The sequences must be aligned (one max_len in the schema, the
        same lengths and positions in every batch, as hist_item / hist_cate are).
    din_hidden: the widths of DIN's attention MLP (default its paper's (80, 40); FuxiCTR's
        benchmark uses (64,)); only read with sequence_encoder "din".
    """

    sets: tuple[EmbeddingSetConfig, ...] = field(metadata={"of": EmbeddingSetConfig})
    experts: tuple[ExpertConfig, ...] = field(metadata={"of": ExpertConfig})
    tasks: tuple[TaskConfig, ...] = field(metadata={"of": TaskConfig})
    sequence_encoder: str = "tim"
    numeric_encoder: str = "mnse"
    mnse_mode: str = "sum"
    num_heads: int = 1
    init_std: float = 0.01
    dense_init: str = "torch"
    joint_sequences: bool = False
    din_hidden: tuple[int, ...] = (80, 40)

    def __post_init__(self):
        for key, cls in (("sets", EmbeddingSetConfig), ("experts", ExpertConfig),
                         ("tasks", TaskConfig)):
            items = getattr(self, key)
            if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
                raise ValueError(f"{key} must be a list, got {type(items).__name__}")
            items = tuple(items)
            if not items:
                raise ValueError(f"{key} must hold at least one entry")
            for i, item in enumerate(items):
                if not isinstance(item, cls):
                    raise ValueError(f"{key}[{i}] must be a {cls.__name__}, got "
                                     f"{type(item).__name__} (use ModelConfig.from_dict)")
            _unique(key, [item.name for item in items])
            object.__setattr__(self, key, items)
        _check_choice("sequence_encoder", self.sequence_encoder, SEQUENCE_ENCODERS)
        _check_choice("numeric_encoder", self.numeric_encoder, NUMERIC_ENCODERS)
        _check_choice("mnse_mode", self.mnse_mode, MNSE_MODES)
        _check_choice("dense_init", self.dense_init, DENSE_INITS)
        _check_positive_int("num_heads", self.num_heads)
        if not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")
        if not isinstance(self.joint_sequences, bool):
            raise ValueError(f"joint_sequences must be true or false, got "
                             f"{self.joint_sequences!r}")
        object.__setattr__(self, "din_hidden",
                           _check_widths("din_hidden", self.din_hidden, True))
        self._check_references()

    @classmethod
    def from_dict(cls, data, where: str = "model") -> ModelConfig:
        return _from_dict(cls, data, where)

    def to_dict(self) -> dict:
        """Plain dicts and lists (tuples as lists): what from_dict takes, what YAML writes."""
        return _plain(dataclasses.asdict(self))

    # ---- lookups

    def set_named(self, name: str) -> EmbeddingSetConfig:
        return next(s for s in self.sets if s.name == name)

    def expert_named(self, name: str) -> ExpertConfig:
        return next(e for e in self.experts if e.name == name)

    def task_experts(self, task: TaskConfig) -> tuple[str, ...]:
        return task.experts if task.experts is not None else tuple(e.name for e in self.experts)

    def owned_by_other(self, set_name: str, task: str) -> bool:
        """Whether set ``set_name`` is scoped to a task other than ``task``."""
        owner = self.set_named(set_name).task
        return owner is not None and owner != task

    def task_detach(self, task: TaskConfig) -> tuple[str, ...]:
        if task.detach is not None:
            return task.detach
        return tuple(e for e in self.task_experts(task)
                     if self.owned_by_other(self.expert_named(e).set, task.name))

    def task_gate_inputs(self, task: TaskConfig) -> tuple[str, ...]:
        if task.gate_inputs is not None:
            return task.gate_inputs
        detached = set(self.task_detach(task))
        sets = [self.expert_named(e).set for e in self.task_experts(task) if e not in detached]
        if not sets:  # every expert detached: gate on their sets (read through stop-gradient)
            sets = [self.expert_named(e).set for e in self.task_experts(task)]
        return tuple(dict.fromkeys(sets))

    # ---- checks

    def _check_references(self) -> None:
        set_names = [s.name for s in self.sets]
        expert_names = [e.name for e in self.experts]
        for i, expert in enumerate(self.experts):
            if expert.set not in set_names:
                raise ValueError(f"experts[{i}].set: unknown embedding set {expert.set!r} "
                                 f"(expert {expert.name!r}); sets: {set_names}")
        task_names = [t.name for t in self.tasks]
        for i, s in enumerate(self.sets):
            if s.task is not None and s.task not in task_names:
                raise ValueError(f"sets[{i}].task: {s.task!r} (of set {s.name!r}) is not one of "
                                 f"the model's tasks {task_names}")
        seen = set()
        for i, task in enumerate(self.tasks):
            where = f"tasks[{i}]"
            for key, names, known in (("experts", task.experts, expert_names),
                                      ("detach", task.detach, expert_names),
                                      ("gate_inputs", task.gate_inputs, set_names)):
                for name in names or ():
                    if name not in known:
                        kind = "embedding set" if key == "gate_inputs" else "expert"
                        raise ValueError(f"{where}.{key}: unknown {kind} {name!r} (task "
                                         f"{task.name!r}); have {known}")
            sees = self.task_experts(task)
            outside = [e for e in task.detach or () if e not in sees]
            if outside:
                raise ValueError(f"{where}.detach: {outside} are not among the experts task "
                                 f"{task.name!r} sees {list(sees)}")
            widths = {e: self.expert_named(e).hidden[-1] for e in sees}
            if len(set(widths.values())) > 1:
                raise ValueError(f"{where}.experts: the experts task {task.name!r} mixes must "
                                 f"have one output width (hidden[-1]), got {widths}")
            if task.aggregation == "gate" and task.gate_combine == "sum":
                dims = {s: self.set_named(s).dim for s in self.task_gate_inputs(task)}
                if len(set(dims.values())) > 1:
                    raise ValueError(f"{where}.gate_inputs: gate_combine 'sum' adds the sets' "
                                     f"embeddings, so their dims must be equal, got {dims}")
            seen.update(sees)
        unused = [e for e in expert_names if e not in seen]
        if unused:
            raise ValueError(f"experts: {unused} are seen by no task (tasks[*].experts)")
        read = {e.set for e in self.experts}
        read.update(s for t in self.tasks if t.aggregation == "gate"
                    for s in self.task_gate_inputs(t))
        unread = [s for s in set_names if s not in read]
        if unread:
            raise ValueError(f"sets: {unread} are read by no expert and no gate")

    def validate(self, schema: Schema) -> None:
        """Checks the config against the schema: tasks are its labels, set scopes match the
        labels' kind, dims fit the encoders. Raises ValueError naming the key."""
        labels = {label.name: label for label in schema.labels}
        for i, task in enumerate(self.tasks):
            if task.name not in labels:
                raise ValueError(f"tasks[{i}].name: {task.name!r} is not a label of schema "
                                 f"{schema.name!r}; labels: {list(labels)}")
        for i, s in enumerate(self.sets):
            if s.task is None:
                continue
            auxiliary = labels[s.task].auxiliary
            if auxiliary != (s.scope == "auxiliary"):
                kind = "an auxiliary" if auxiliary else "a main"
                raise ValueError(f"sets[{i}].scope: {s.task!r} is {kind} task, so set {s.name!r} "
                                 f"needs scope {'auxiliary' if auxiliary else 'task'!r}, got "
                                 f"{s.scope!r}")
        self._check_experts(schema)
        joint = self.joint_sequences and len(schema.sequence) > 1
        shapes = {(f.max_len, f.max_position or f.max_len) for f in schema.sequence}
        if joint and len(shapes) > 1:
            raise ValueError(
                "joint_sequences: the schema's sequences must share one max_len and "
                "max_position, got " + ", ".join(
                    f"{f.name} ({f.max_len}, {f.max_position or f.max_len})"
                    for f in schema.sequence))
        width = len(schema.sequence) if joint else 1  # the encoder's width, in set dims
        for i, s in enumerate(self.sets):
            if (width * s.dim) % self.num_heads and schema.sequence \
                    and self.sequence_encoder in HEADED:
                what = f"{width} x {s.dim}, the joint width," if joint else str(s.dim)
                raise ValueError(f"sets[{i}].dim: {what} is not divisible by num_heads "
                                 f"{self.num_heads} (the sequence encoder's heads)")
            if self.mnse_mode == "concat":
                self._check_concat_dim(i, s, schema)

    def _check_experts(self, schema: Schema) -> None:
        kinds = field_kinds(schema)
        if not kinds:
            raise ValueError(f"schema {schema.name!r} has no features")
        for i, expert in enumerate(self.experts):
            if expert.type != "gwpfm":
                continue
            dim = self.set_named(expert.set).dim
            groups = gwpfm_groups(expert.options.get("field_groups", "kind"), kinds)
            where = f"experts[{i}].options.field_groups"
            if len(kinds) < 2:
                raise ValueError(f"experts[{i}].type: gwpfm needs >= 2 fields, the schema has "
                                 f"{len(kinds)}")
            if len(groups) != len(kinds):
                raise ValueError(f"{where}: needs one group id per field ({len(kinds)}: "
                                 f"{list(kinds)}), got {len(groups)}")
            num_groups = len(set(groups))
            if set(groups) != set(range(num_groups)):
                raise ValueError(f"{where}: group ids must be exactly 0..G-1, got {list(groups)}")
            if dim % num_groups:
                raise ValueError(f"{where}: the dim {dim} of set {expert.set!r} must be divisible "
                                 f"by the {num_groups} groups (each field keeps G parts)")

    def _check_concat_dim(self, i: int, s: EmbeddingSetConfig, schema: Schema) -> None:
        uses_mnse = [(f.name, f.bases) for f in schema.numeric if self.numeric_encoder == "mnse"]
        uses_mnse += [(p.name, SIMILARITY_BASES) for p in schema.pretrained]
        for name, bases in uses_mnse:
            if s.dim % len(bases):
                raise ValueError(f"sets[{i}].dim: {s.dim} is not divisible by the {len(bases)} "
                                 f"bases {tuple(bases)} of feature {name!r} (mnse_mode "
                                 f"'concat'); use mnse_mode 'sum' or another dim")



def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
