r"""hmoe.models.HMoE: embedding sets -> experts -> per-task gates -> per-task towers.

Design section 3.4; paper notes sections 1.1 (the HMoE-ME forward pass), 3.2 (multi-embedding),
3.4 (HMoE) and 4 (STEM, AME, STEM-AL). One configurable graph (hmoe.models.config) covers
HMoE-ME, STEM, AME, STEM-AL and the classic multi-task baselines (hmoe.models.presets).

Field embeddings. Every embedding set s (dim D_s) embeds every feature of the schema, so each
set has the same F = F_c + F_n + F_s + F_p fields, in this order:

    categorical   x_f = E_s[id_f]                                  (B, F_c, D_s)
    numeric       MNSE(quantize(x))  ("mnse", notes 2.2),  or E_s[quantize(x)] ("bucket",
                  one-hot), or  ((x - mean) / std) · w_{s,f}  ("scaled"); NaN: a learned
                  missing vector                                  (B, F_n, D_s)
    sequence      u = Encoder_s(behaviours E_s[item ids], target E_s[id of the item field])
                  with TIM (notes 2.1) or a baseline encoder       (B, 1, D_s) per feature
    pretrained    MNSE(quantised cos(user vector, item vector))    (B, 1, D_s) per feature

Sets of equal dim are the K planes of one table: one hmoe.nn.MultiEmbedding (N, K, D) looks up
all of them in one fused gather (K, B, F_c, D); likewise one MNSE (F, R, K, E) per numeral-base
tuple and one SimilarityEncoder per pretrained feature. The behaviour sequences read the item
field's rows of the same table, so the categorical ids and every sequence's item ids go through
one lookup (MultiEmbedding.forward_rows over the global rows): backward accumulates all of them
into one gradient of the table, and each set's sequence encoder gets its plane of the gathered
behaviours (B, L, D).

Experts (hmoe.nn.experts), each reading the field embeddings x_s (B, F, D_s) of one set:
    h_e = Expert_e(x_{set(e)})                                                   (B, H)
Tasks (hmoe.nn.gates): task t mixes the E_t experts it sees, those in its ``detach`` list
through stop-gradient SG (STEM eq. 4: forward-only):
    o_t = Σ_e g_{t,e} · [SG](h_e),   g_t = softmax(W_t MLP(gate input)) | 1/E_t | learned w_t
    gate input = concat or sum of flatten(x_s) over the task's gate sets (STEM: h_t + h_S)
    logit_t = Tower_t(o_t) = w_t · MLP_t(o_t) + b_t                              (B,)

PLE is expressed as one Customized Gate Control (CGC) level: task t gates over the shared
experts and its own task-specific experts; stacked extraction levels are not built (one level
is what the presets use, as STEM's code does with num_layers=1).

forward(batch) returns {"logits": {task: (B,)}, "aux_losses": {}, and on request "gates":
{task: (B, E_t)} (the mixture weights, in the order of ``heads[task].expert_names``) and
"attention": {"<sequence>/<set>": (B, H, L)} (TIM's α per head; (B, 1, L) weights for the
other encoders)}. No component adds an auxiliary loss yet; the key is there for the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from hmoe.data.schema import NumericFeature, Schema
from hmoe.models.config import (
    HEADED, SIMILARITY_BASES, ExpertConfig, ModelConfig, TaskConfig, field_kinds, gwpfm_groups,
)
from hmoe.nn import (
    IPNN, MLP, MNSE, AffineQuantizer, CrossLayerV2, DCNv2, DINAttention, FlatDNN, GwPFM,
    LearnedWeightGate, LogQuantizer, MeanGate, MeanPooling, MultiEmbedding, QuantileQuantizer,
    SelfAttentionTarget, SimilarityEncoder, SoftmaxGate, TemporalInterest, stack_experts,
)

__all__ = ["HMoE", "LinearExpert", "SetSlice", "remap_ids"]


# --------------------------------------------------------------------------------------------
# Numeric features: raw values -> codes (or standardised values) -> K sets of embeddings


def make_quantizer(feature: NumericFeature) -> nn.Module:
    """The quantizer of one numeric feature (one field), from its schema entry."""
    where = f"numeric feature {feature.name!r}"
    if feature.quantizer == "log":
        scale = feature.log_scale if feature.log_transform == "log1p" else 1.0
        return LogQuantizer(1, feature.log_transform, scale=scale, max_value=feature.max_code)
    if feature.quantizer == "uniform":
        if feature.max_code is None:
            raise ValueError(f"{where}: quantizer 'uniform' needs max_code")
        return AffineQuantizer(feature.lo, feature.step, feature.max_code, num_fields=1)
    if feature.quantizer == "quantile":
        quantizer = QuantileQuantizer(feature.num_bins, num_fields=1)
        if feature.boundaries is not None:
            if len(feature.boundaries) != feature.num_bins - 1:
                raise ValueError(f"{where}: boundaries must hold num_bins - 1 = "
                                 f"{feature.num_bins - 1} values, got {len(feature.boundaries)}")
            boundaries = torch.tensor([feature.boundaries], dtype=torch.float64)  # (1, n - 1)
            quantizer.load_state_dict({"boundaries": boundaries, "fitted": torch.tensor(True)})
        return quantizer  # without boundaries: fit it (HMoE.numeric_input.quantizers[f].fit)
    raise ValueError(f"{where}: quantizer must be 'log', 'uniform' or 'quantile', got "
                     f"{feature.quantizer!r}")


class NumericInput(nn.Module):
    """Raw numeric columns (B, F_n) -> what the numeric encoder reads, once for all sets:
    float codes (B, F_n) from each field's quantizer ("mnse", "bucket"), or the standardised
    values (x - mean) / std ("scaled"); NaN stays NaN (missing)."""

    def __init__(self, features: Sequence[NumericFeature], encoder: str):
        super().__init__()
        self.scaled = encoder == "scaled"
        self.quantizers = nn.ModuleList([] if self.scaled else map(make_quantizer, features))
        if self.scaled:
            for feature in features:
                if not feature.std > 0:
                    raise ValueError(f"numeric feature {feature.name!r}: std must be > 0 for "
                                     f"numeric_encoder 'scaled', got {feature.std}")
            self.register_buffer("mean", torch.tensor([f.mean for f in features]))  # (F_n,)
            self.register_buffer("std", torch.tensor([f.std for f in features]))  # (F_n,)

    @property
    def max_values(self) -> list[int]:
        return [q.max_values[0] for q in self.quantizers]

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self.scaled:
            return (values - self.mean) / self.std  # (B, F_n)
        return torch.cat([q(values[:, f:f + 1]) for f, q in enumerate(self.quantizers)], dim=1)


def _as_sets(x: torch.Tensor, num_sets: int) -> torch.Tensor:
    """An encoder's output with the set axis first, (K, B, F, D) (K = 1 outputs lack it)."""
    return x if num_sets > 1 else x.unsqueeze(0)


class MNSENumeric(nn.Module):
    """Numeric codes through MNSE (one MNSE per distinct bases tuple) -> (K, B, F_n, D)."""

    def __init__(self, bases: Sequence[tuple[int, ...]], max_values: Sequence[int], dim: int,
                 num_sets: int, mode: str, init_std: float):
        super().__init__()
        by_bases = {b: [f for f, fb in enumerate(bases) if fb == b] for b in dict.fromkeys(bases)}
        self.num_sets, self.field_lists = num_sets, list(by_bases.values())
        self.encoders = nn.ModuleList(
            MNSE(len(fields), dim, [max_values[f] for f in fields], b, mode, num_sets,
                 init_std=init_std)
            for b, fields in by_bases.items())
        order = [f for fields in self.field_lists for f in fields]
        self.restore = None if order == sorted(order) else \
            sorted(range(len(order)), key=order.__getitem__)  # schema order of the output

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        parts = [_as_sets(encoder(codes[:, fields]), self.num_sets)  # (K, B, F_group, D)
                 for encoder, fields in zip(self.encoders, self.field_lists)]
        out = torch.cat(parts, dim=2)  # (K, B, F_n, D)
        return out if self.restore is None else out[:, :, self.restore]


class BucketNumeric(nn.Module):
    """One-hot numeric encoding: an embedding row per code, and one for missing -> (K, B, F_n, D).
    Field f has max_values[f] + 2 rows: codes 0..max, then the missing row."""

    def __init__(self, max_values: Sequence[int], dim: int, num_sets: int, init_std: float):
        super().__init__()
        self.table = MultiEmbedding([m + 2 for m in max_values], dim, num_sets, init_std=init_std)
        self.register_buffer("missing_id", torch.tensor(max_values, dtype=torch.float32) + 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        ids = torch.where(torch.isnan(codes), self.missing_id, codes).long()  # (B, F_n)
        return self.table(ids)  # (K, B, F_n, D)


class ScaledNumeric(nn.Module):
    """out[k, b, f] = z[b, f] · vector[k, f], z the standardised value; NaN: missing[k, f].

    Parameters: ``vector``, ``missing`` (K, F_n, D)."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, init_std: float):
        super().__init__()
        self.vector = nn.Parameter(torch.randn(num_sets, num_fields, dim) * init_std)
        self.missing = nn.Parameter(torch.randn(num_sets, num_fields, dim) * init_std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(z)[None, :, :, None]  # (1, B, F_n, 1)
        scaled = torch.nan_to_num(z)[None, :, :, None] * self.vector[:, None]  # (K, B, F_n, D)
        return torch.where(missing, self.missing[:, None], scaled)


def make_numeric_encoder(schema: Schema, config: ModelConfig, numeric: NumericInput, dim: int,
                         num_sets: int) -> nn.Module:
    if config.numeric_encoder == "scaled":
        return ScaledNumeric(len(schema.numeric), dim, num_sets, config.init_std)
    if config.numeric_encoder == "bucket":
        return BucketNumeric(numeric.max_values, dim, num_sets, config.init_std)
    bases = [tuple(f.bases) for f in schema.numeric]
    return MNSENumeric(bases, numeric.max_values, dim, num_sets, config.mnse_mode, config.init_std)


# --------------------------------------------------------------------------------------------
# Sequence encoders


def make_sequence_encoder(name: str, dim: int, max_position: int, num_heads: int,
                          din_hidden: Sequence[int] = (80, 40)) -> nn.Module:
    if name == "tim":
        return TemporalInterest(dim, max_position, num_heads)
    if name == "tim_no_temporal":
        return TemporalInterest(dim, max_position, num_heads, temporal_encoding=False)
    if name == "tim_no_target":
        return TemporalInterest(dim, max_position, num_heads, target_aware=False)
    if name == "din":
        return DINAttention(dim, din_hidden)
    if name == "mean":
        return MeanPooling()
    return SelfAttentionTarget(dim, max_position, num_heads, num_layers=1)


class SetSlice(NamedTuple):
    """Where one embedding set lives in a parameter: the whole of it (axis None) or the plane
    ``index`` of its set axis ``axis``."""

    parameter: nn.Parameter
    axis: int | None
    index: int

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The set's part of ``tensor`` (the parameter itself, or its .grad)."""
        return tensor if self.axis is None else tensor.select(self.axis, self.index)


# --------------------------------------------------------------------------------------------
# K embedding sets of one dim


class EmbeddingGroup(nn.Module):
    """The K embedding sets of one dim D: every feature looked up once for all K sets.

    forward(batch, numeric (B, F_n) or None, return_attention) -> (fields (K, B, F, D),
    attention {(sequence index, k): (B, H, L)}).
    """

    def __init__(self, schema: Schema, config: ModelConfig, numeric: NumericInput | None,
                 dim: int, num_sets: int):
        super().__init__()
        self.dim, self.num_sets = dim, num_sets
        heads = config.num_heads if config.sequence_encoder in HEADED else 1
        self.categorical = None
        if schema.categorical:
            self.categorical = MultiEmbedding([f.vocab_size for f in schema.categorical], dim,
                                              num_sets, init_std=config.init_std)
        self.numeric = None
        if schema.numeric:
            self.numeric = make_numeric_encoder(schema, config, numeric, dim, num_sets)
        self.sequence_features = schema.sequence
        # joint: one encoder over all sequences, n·dim wide (ModelConfig.joint_sequences)
        self.joint = config.joint_sequences and len(schema.sequence) > 1
        groups = [schema.sequence] if self.joint else [[s] for s in schema.sequence]
        self.sequences = nn.ModuleList(
            nn.ModuleList(make_sequence_encoder(config.sequence_encoder, len(group) * dim,
                                                group[0].max_position or group[0].max_len,
                                                heads, config.din_hidden)
                          for _ in range(num_sets))
            for group in groups)  # [sequence group][set]
        self.item_fields = [schema.categorical_index(s.item) for s in schema.sequence]
        offsets = [0]
        for f in schema.categorical:
            offsets.append(offsets[-1] + f.vocab_size)
        self.item_rows = [(offsets[i], offsets[i + 1]) for i in self.item_fields]  # (lo, hi)
        self.pretrained_features = schema.pretrained
        self.pretrained = nn.ModuleList(
            SimilarityEncoder(dim, p.resolution, SIMILARITY_BASES, config.mnse_mode,
                              num_sets=num_sets)
            for p in schema.pretrained)

    def _lookup(self, batch: Mapping[str, torch.Tensor]):
        """One lookup of the categorical ids and every sequence's item ids:
        ((K, B, F_c, D), [behaviours (K, B, L_i, D) per sequence]).

        ``categorical`` may also be tables that TorchRec shards across ranks
        (hmoe.distributed.ShardedTables): they do the same lookup themselves."""
        if not isinstance(self.categorical, MultiEmbedding):
            return self.categorical.lookup(batch)
        ids = batch["categorical"]  # (B, F_c)
        pieces = [self.categorical.global_rows(ids)]
        for i, feature in enumerate(self.sequence_features):
            pieces.append(batch[f"seq/{feature.name}"].to(torch.int64) + self.item_rows[i][0])
        if len(pieces) == 1:
            return self.categorical(ids), []
        looked = self.categorical.forward_rows(torch.cat(pieces, dim=1))  # (K, B, W, D)
        widths = [p.shape[1] for p in pieces]
        categorical, *behaviours = torch.split(looked, widths, dim=2)
        return categorical, behaviours

    def forward(self, batch: Mapping[str, torch.Tensor], numeric: torch.Tensor | None,
                return_attention: bool = False, norms: list | None = None):
        parts, attention = [], {}
        categorical, behaviours = None, []
        if self.categorical is not None:
            categorical, behaviours = self._lookup(batch)  # (K, B, F_c, D), [(K, B, L, D)]
            parts.append(categorical)
            if norms is not None:  # Σ ||row||² over the table rows this batch read
                norms.append(self._read_norm(batch, categorical, behaviours))
        if self.numeric is not None:
            parts.append(self.numeric(numeric))  # (K, B, F_n, D)
        if self.joint and behaviours:
            pooled, weights = self._joint_sequences(batch, categorical, behaviours,
                                                    return_attention)
            parts.append(pooled)  # (K, B, n, D)
            attention.update(((i, k), w) for i in range(len(behaviours))
                             for k, w in enumerate(weights))  # the same weights for each
        for i in range(0 if self.joint else len(self.sequences)):
            pooled, weights = self._sequence(i, batch, categorical, behaviours[i],
                                             return_attention)
            parts.append(pooled)  # (K, B, 1, D)
            attention.update(((i, k), w) for k, w in enumerate(weights))
        for feature, encoder in zip(self.pretrained_features, self.pretrained):
            user = batch[f"pretrained/{feature.name}/user"]  # (B, P)
            item = batch[f"pretrained/{feature.name}/item"]
            parts.append(_as_sets(encoder(user, item), self.num_sets))  # (K, B, 1, D)
        return torch.cat(parts, dim=2), attention  # (K, B, F, D)

    def _read_norm(self, batch, categorical: torch.Tensor, behaviours) -> torch.Tensor:
        """Σ of the squared entries of every categorical row read, the sequences' valid steps
        included (their padding is not a read)."""
        total = categorical.pow(2).sum()
        for feature, rows in zip(self.sequence_features, behaviours):  # (K, B, L, D)
            lengths = batch[f"seq/{feature.name}/lengths"]
            valid = torch.arange(rows.shape[2], device=rows.device) < lengths[:, None]  # (B, L)
            total = total + (rows.pow(2).sum(-1) * valid).sum()
        return total

    def _sequence(self, i: int, batch, categorical: torch.Tensor, behaviours: torch.Tensor,
                  return_attention: bool):
        """Sequence feature i in every set, from its gathered behaviours (K, B, L, D):
        ((K, B, 1, D), [α (B, H, L)] * K or [])."""
        name = self.sequence_features[i].name
        positions, lengths = batch[f"seq/{name}/positions"], batch[f"seq/{name}/lengths"]
        targets = categorical[:, :, self.item_fields[i]]  # (K, B, D)
        results = [encoder(behaviours[k], targets[k], positions, lengths,
                           return_attention=return_attention)
                   for k, encoder in enumerate(self.sequences[i])]
        if not return_attention:
            return torch.stack(results)[:, :, None], []  # (K, B, 1, D)
        pooled = torch.stack([u for u, _ in results])[:, :, None]  # (K, B, 1, D)
        weights = [w if w.dim() == 3 else w[:, None] for _, w in results]  # (B, H, L)
        return pooled, weights

    def _joint_sequences(self, batch, categorical: torch.Tensor, behaviours, return_attention):
        """All n sequences through one encoder per set (ModelConfig.joint_sequences): the
        behaviours [(K, B, L, D)] * n and their targets concatenated to n·D, the output split
        back into n fields: ((K, B, n, D), [α (B, H, L)] * K or [])."""
        names = [f.name for f in self.sequence_features]
        positions, lengths = batch[f"seq/{names[0]}/positions"], batch[f"seq/{names[0]}/lengths"]
        if not torch.compiler.is_compiling():
            for name in names[1:]:
                if not (torch.equal(batch[f"seq/{name}/lengths"], lengths)
                        and torch.equal(batch[f"seq/{name}/positions"], positions)):
                    raise ValueError(
                        f"joint_sequences: seq/{name} is not aligned with seq/{names[0]} "
                        "(their lengths or positions differ); attend them separately "
                        "(joint_sequences: false)")
        K, B, L, D = behaviours[0].shape
        joined = torch.cat(behaviours, dim=-1)  # (K, B, L, n·D)
        targets = categorical[:, :, self.item_fields].reshape(K, B, -1)  # (K, B, n·D)
        results = [encoder(joined[k], targets[k], positions, lengths,
                           return_attention=return_attention)
                   for k, encoder in enumerate(self.sequences[0])]
        if not return_attention:
            return torch.stack(results).reshape(K, B, len(names), D), []
        pooled = torch.stack([u for u, _ in results]).reshape(K, B, len(names), D)
        return pooled, [w if w.dim() == 3 else w[:, None] for _, w in results]

    def set_parameters(self, k: int) -> dict[str, SetSlice]:
        """The parameters of set k (plane k of the shared ones, and its own encoders)."""
        slices = {}
        for module_name, module in self.named_modules():
            if isinstance(module, (MultiEmbedding, MNSE, ScaledNumeric)):
                for name, param in module.named_parameters(recurse=False):
                    axis = _set_axis(module, name, self.num_sets)
                    slices[f"{module_name}.{name}"] = SetSlice(param, axis, k)
        for i, encoders in enumerate(self.sequences):
            for name, param in encoders[k].named_parameters():
                slices[f"sequences.{i}.{k}.{name}"] = SetSlice(param, None, k)
        return slices


def _set_axis(module: nn.Module, name: str, num_sets: int) -> int | None:
    """The set axis of a parameter: MultiEmbedding.weight (N, K, D): 1; MNSE.weight
    (F, R, K, E): 2 and MNSE.missing (K, F, dim): 0 (no set axis when K = 1);
    ScaledNumeric's (K, F, D): 0."""
    if isinstance(module, MultiEmbedding):
        return 1
    if isinstance(module, MNSE):
        return None if num_sets == 1 else {"weight": 2, "missing": 0}[name]
    return 0


# --------------------------------------------------------------------------------------------
# Experts and task heads


class LinearExpert(nn.Module):
    """h = W flatten(x) + b, (B, F, D) -> (B, H): an expert WITHOUT the ReLU after interaction.

    Only for analysis: by the Multi-Embedding paper's rule (notes 3.2) a mixture of such experts
    over K sets of dim D is a single-embedding model of dim K·D (tests/models prove it)."""

    def __init__(self, num_fields: int, dim: int, out_dim: int):
        super().__init__()
        self.num_fields, self.dim, self.out_dim = num_fields, dim, out_dim
        self.linear = nn.Linear(num_fields * dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # (B, H)


def build_expert(config: ExpertConfig, kinds: Sequence[str], dim: int) -> nn.Module:
    """The expert of an ExpertConfig, on F = len(kinds) fields of width dim."""
    F, options = len(kinds), config.options
    common = {"hidden": config.hidden, "dropout": config.dropout}
    if config.type == "gwpfm":
        groups = gwpfm_groups(options.get("field_groups", "kind"), kinds)
        return GwPFM(F, dim, groups, **common)
    if config.type == "ipnn":
        return IPNN(F, dim, **common)
    if config.type == "dcnv2":
        return DCNv2(F, dim, num_cross=options.get("num_cross", 2),
                     low_rank=options.get("low_rank"),
                     structure=options.get("structure", "stacked"), **common)
    if config.type == "dnn":
        return FlatDNN(F, dim, **common)
    return LinearExpert(F, dim, config.hidden[0])


class Tower(nn.Module):
    """logit = w · MLP(o) + b (just a Linear without hidden widths): (B, H) -> (B,)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float):
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout) if hidden else nn.Identity()
        self.output = nn.Linear(hidden[-1] if hidden else in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.mlp(x)).squeeze(-1)  # (B,)


class TaskHead(nn.Module):
    """One task's mixture of its experts (some through stop-gradient) and its tower.

    forward(fields {set: (B, F, D)}, expert outputs {expert: (B, H)}) -> (logit (B,),
    weights (B, E_t)). Attributes: ``expert_names``, ``detach`` (per expert), ``gate_inputs``
    and ``gate_input_detach`` (per gate set; empty without a softmax gate).
    """

    def __init__(self, config: ModelConfig, task: TaskConfig, num_fields: int):
        super().__init__()
        self.expert_names = config.task_experts(task)
        detached = set(config.task_detach(task))
        self.detach = tuple(e in detached for e in self.expert_names)
        num_experts = len(self.expert_names)
        self.gate_inputs, self.gate_input_detach = (), ()
        self.gate_combine = task.gate_combine
        if task.aggregation == "gate":
            self.gate_inputs = config.task_gate_inputs(task)
            self.gate_input_detach = tuple(config.owned_by_other(s, task.name)
                                           for s in self.gate_inputs)
            widths = [config.set_named(s).dim * num_fields for s in self.gate_inputs]
            in_dim = widths[0] if task.gate_combine == "sum" else sum(widths)
            self.gate = SoftmaxGate(in_dim, num_experts, task.gate_hidden)
        elif task.aggregation == "mean":
            self.gate = MeanGate(num_experts)
        else:
            self.gate = LearnedWeightGate(num_experts)
        width = config.expert_named(self.expert_names[0]).hidden[-1]
        self.tower = Tower(width, task.tower, task.dropout)

    def gate_input(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """concat or sum of the gate sets' flattened field embeddings (B, I)."""
        flat = [fields[s].flatten(1).detach() if d else fields[s].flatten(1)  # (B, F·D)
                for s, d in zip(self.gate_inputs, self.gate_input_detach)]
        return torch.stack(flat).sum(0) if self.gate_combine == "sum" else torch.cat(flat, 1)

    def forward(self, fields, expert_outputs):
        experts = stack_experts([expert_outputs[e] for e in self.expert_names],
                                self.detach)  # (B, E, H)
        x = self.gate_input(fields) if self.gate_inputs else None
        mixed, weights = self.gate(experts, x)  # (B, H), (B, E)
        return self.tower(mixed), weights


# --------------------------------------------------------------------------------------------
# The model


def _xavier_dense(model: nn.Module) -> None:
    """ModelConfig.dense_init "xavier_normal": each nn.Linear's weight and each cross layer's
    matrices from N(0, 2 / (fan_in + fan_out)), biases 0. Embedding tables, MNSE, TIM's
    position table, GwPFM's field-pair weights and the gates' fixed weights keep their own."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, CrossLayerV2):
                for name in ("weight", "u", "v"):
                    if hasattr(module, name):
                        nn.init.xavier_normal_(getattr(module, name))
                module.bias.zero_()


def _make_vocab(feature) -> nn.Module:
    from hmoe.nn.vocab import DynamicVocab, HashVocab

    if feature.vocab == "hash":
        return HashVocab(feature.capacity)
    return DynamicVocab(feature.capacity, min_count=feature.min_count,
                        pending_capacity=feature.pending_capacity)


def _check_schema(schema: Schema) -> None:
    for f in schema.categorical:
        if f.vocab_size is None or f.vocab_size < 1:
            raise ValueError(f"categorical feature {f.name!r}: vocab_size must be set (>= 1; "
                             f"preprocessing sets it), got {f.vocab_size}")
    names = [f.name for f in schema.categorical]
    for s in schema.sequence:
        if s.item not in names:
            raise ValueError(f"sequence feature {s.name!r}: item {s.item!r} is not a "
                             f"categorical feature; have {names}")
        if s.max_len < 1 or (s.max_position is not None and s.max_position < 1):
            raise ValueError(f"sequence feature {s.name!r}: max_len and max_position must be "
                             f">= 1, got {s.max_len} and {s.max_position}")
    for p in schema.pretrained:
        if p.dim < 1 or p.resolution < 2:
            raise ValueError(f"pretrained feature {p.name!r}: dim must be >= 1 and resolution "
                             f">= 2, got {p.dim} and {p.resolution}")


def remap_ids(schema: Schema, vocabs: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor],
              *, update: bool = False, on_assigned=None) -> Mapping[str, torch.Tensor]:
    """``batch`` with the raw ids of the features in ``vocabs`` (their categorical column and
    the sequences of such an item) replaced by table rows; raw id 0 (none, padding) is row 0.

    ``update``: the vocabularies admit and evict ids (training), and ``on_assigned(field,
    rows)`` is called with the rows given to new ids; otherwise ids are only looked up (an id
    never admitted is row 0). Used by :meth:`HMoE.remap` and by the prediction service, which
    remaps outside the exported program (:mod:`hmoe.serving`)."""
    if not vocabs:
        return batch
    if not isinstance(batch, Mapping) or "categorical" not in batch:
        return batch  # _check_batch names what is wrong
    batch = dict(batch)
    ids = batch["categorical"].to(torch.int64).clone()
    for f, feature in enumerate(schema.categorical):
        if feature.name not in vocabs:
            continue
        keys = [f"seq/{s.name}" for s in schema.sequence if s.item == feature.name]
        for key in keys:
            if key not in batch:
                raise ValueError(f"batch is missing {key!r} (see hmoe.data.schema for the "
                                 f"layout)")
        parts = [ids[:, f]] + [batch[key].to(torch.int64) for key in keys]
        flat = torch.cat([part.reshape(-1) for part in parts])
        if flat.numel() and int(flat.min()) < 0:
            raise ValueError(f"batch: raw ids of {feature.name!r} (vocab "
                             f"{feature.vocab}) must be >= 0 (0: none), got "
                             f"{int(flat.min())}")
        present = (flat != 0).nonzero().squeeze(1)  # (index_select: faster than a mask)
        raw = flat.index_select(0, present)
        vocab = vocabs[feature.name]
        if update:
            found, assigned = vocab(raw)
            if assigned.numel() and on_assigned is not None:
                on_assigned(f, assigned)
        else:
            found = vocab.lookup(raw)
        rows = torch.zeros_like(flat).index_copy_(0, present, found)
        pieces = torch.split(rows, [part.numel() for part in parts])
        ids[:, f] = pieces[0]
        for key, piece in zip(keys, pieces[1:]):
            batch[key] = piece.view(batch[key].shape)
    batch["categorical"] = ids
    return batch


class HMoE(nn.Module):
    """The HMoE graph of a ModelConfig over a Schema (see the module docstring).

    Args:
        config: a ModelConfig, or a dict that ModelConfig.from_dict takes.
        schema: the dataset schema (hmoe.data.schema.Schema); categorical vocab sizes must be
            set.

    Attributes:
        groups: one EmbeddingGroup per distinct set dim; ``set_location[set] = (group, plane)``.
        numeric_input: the quantizers (or standardisation) of the numeric features, or None.
        experts: ModuleDict expert name -> expert; heads: ModuleDict task name -> TaskHead.
        kinds: the kind of each of the F fields ("categorical", "numeric", ...).

    forward(batch, *, return_gates=False, return_attention=False, rows=False,
    embedding_l2=False) -> dict (module docstring; ``rows``: see :meth:`embed`;
    ``embedding_l2``: aux_losses["embedding_l2"] = the batch mean of Σ ||row||² over the
    embedding-table rows each sample read, for an L2 penalty on those rows only);
    ``embed(batch)`` -> ({set: (B, F, D_s)}, attention); ``set_parameters(set)`` -> where that
    set lives in the parameters; ``embedding_table(set)`` -> its categorical table (N, D_s).
    """

    def __init__(self, config: ModelConfig | Mapping, schema: Schema):
        super().__init__()
        if isinstance(config, Mapping):
            config = ModelConfig.from_dict(config)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig or a dict, got {type(config).__name__}")
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a hmoe.data.schema.Schema, got "
                            f"{type(schema).__name__}")
        config.validate(schema)
        _check_schema(schema)
        self.config, self.schema = config, schema
        self.kinds = field_kinds(schema)
        self.numeric_input = NumericInput(schema.numeric, config.numeric_encoder) \
            if schema.numeric else None
        dims = list(dict.fromkeys(s.dim for s in config.sets))
        self.group_sets = [[s.name for s in config.sets if s.dim == d] for d in dims]
        self.set_location = {name: (g, k) for g, names in enumerate(self.group_sets)
                             for k, name in enumerate(names)}
        self.groups = nn.ModuleList(
            EmbeddingGroup(schema, config, self.numeric_input, d, len(names))
            for d, names in zip(dims, self.group_sets))
        self.expert_sets = {e.name: e.set for e in config.experts}
        self.experts = nn.ModuleDict(
            {e.name: build_expert(e, self.kinds, config.set_named(e.set).dim)
             for e in config.experts})
        self.heads = nn.ModuleDict(
            {t.name: TaskHead(config, t, len(self.kinds)) for t in config.tasks})
        # ids that come and go: raw ids -> rows (CategoricalFeature.vocab dynamic or hash)
        self.vocabs = nn.ModuleDict({f.name: _make_vocab(f) for f in schema.categorical
                                     if f.raw_ids})
        self._reclaimed: list[tuple[nn.Parameter, torch.Tensor]] = []
        if config.dense_init == "xavier_normal":
            _xavier_dense(self)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def embed(self, batch: Mapping[str, torch.Tensor], *, return_attention: bool = False,
              rows: bool = False, norms: list | None = None):
        """({set name: field embeddings (B, F, D_s)}, {"<sequence>/<set>": α (B, H, L)}).
        ``rows``: the ids of dynamic and hash vocabularies are rows already (:func:`remap_ids`
        was applied by the caller, as the exported program's caller does). ``norms``: a list
        that each group appends Σ ||row||² of the table rows the batch read to."""
        if not rows:
            batch = self.remap(batch)
        self._check_batch(batch)
        numeric = self.numeric_input(batch["numeric"]) if self.numeric_input is not None else None
        fields, attention = {}, {}
        for group, names in zip(self.groups, self.group_sets):
            planes, weights = group(batch, numeric, return_attention, norms)  # (K, B, F, D)
            fields.update((name, planes[k]) for k, name in enumerate(names))
            attention.update((f"{self.schema.sequence[i].name}/{names[k]}", w)
                             for (i, k), w in weights.items())
        return fields, attention

    def forward(self, batch: Mapping[str, torch.Tensor], *, return_gates: bool = False,
                return_attention: bool = False, rows: bool = False,
                embedding_l2: bool = False) -> dict:
        norms = [] if embedding_l2 else None
        fields, attention = self.embed(batch, return_attention=return_attention, rows=rows,
                                       norms=norms)
        outputs = {name: expert(fields[self.expert_sets[name]])  # (B, H)
                   for name, expert in self.experts.items()}
        logits, gates = {}, {}
        for task, head in self.heads.items():
            logits[task], gates[task] = head(fields, outputs)  # (B,), (B, E_t)
        result = {"logits": logits, "aux_losses": {}}
        if norms:  # the mean over the batch's rows of Σ ||row||² of the table rows each read
            rows_in_batch = next(iter(logits.values())).shape[0]
            result["aux_losses"]["embedding_l2"] = torch.stack(norms).sum() / max(
                rows_in_batch, 1)
        if return_gates:
            result["gates"] = gates
        if return_attention:
            result["attention"] = attention
        return result

    # ---- ids that come and go

    def remap(self, batch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``batch`` with the raw ids of dynamic and hash vocabularies (the categorical column
        and the sequences of such an item) replaced by rows (:func:`remap_ids`). Training (grad
        enabled) admits and evicts ids: the rows given to ids are re-initialised in every
        group's table, with their fused optimizer state, and :meth:`take_reclaimed` hands them
        to the trainer to reset the dense optimizer's state. Evaluation only looks ids up (an
        id never admitted is row 0). Other batches pass unchanged."""
        return remap_ids(self.schema, self.vocabs, batch,
                         update=self.training and torch.is_grad_enabled(),
                         on_assigned=self._reset_rows)

    @torch.no_grad()
    def _reset_rows(self, field: int, rows: torch.Tensor) -> None:
        """Rows of field ``field`` given to new ids: fresh weights in every group, and no
        optimizer state (the fused one here, the dense one through take_reclaimed)."""
        for group in self.groups:
            table = group.categorical
            if not isinstance(table, MultiEmbedding):
                raise TypeError("dynamic and hash vocabularies need the MultiEmbedding tables "
                                 "(one process, or data_parallel sharding)")
            where = rows.to(table.weight.device) + table.offsets[field]
            table.reset_rows(where)
            self._reclaimed.append((table.weight, where))

    def take_reclaimed(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, rows) given to new ids since the last call: their optimizer state (Adam's
        moments, Adagrad's sums) belongs to the ids that had them and must be reset."""
        taken, self._reclaimed = self._reclaimed, []
        return taken

    def set_parameters(self, name: str) -> dict[str, SetSlice]:
        """Where embedding set ``name`` lives: its plane of the fused tables and its own
        sequence encoders, by parameter name (``SetSlice.of(p.grad)`` reads its gradient)."""
        if name not in self.set_location:
            raise ValueError(f"unknown embedding set {name!r}; sets: {list(self.set_location)}")
        g, k = self.set_location[name]
        return {f"groups.{g}.{key}": s for key, s in self.groups[g].set_parameters(k).items()}

    def embedding_table(self, name: str) -> torch.Tensor:
        """Set ``name``'s categorical embedding table, a (N, D_s) view of the fused weight
        (field f owns rows offsets[f]:offsets[f+1]); for the collapse analysis."""
        if name not in self.set_location:
            raise ValueError(f"unknown embedding set {name!r}; sets: {list(self.set_location)}")
        g, k = self.set_location[name]
        if self.groups[g].categorical is None:
            raise ValueError("the schema has no categorical features")
        return self.groups[g].categorical.weight[:, k]

    # ---- input checks

    def _check_batch(self, batch) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        schema, sizes = self.schema, {}
        if schema.categorical:
            _check_tensor(batch, "categorical", (len(schema.categorical),), "int", sizes)
        if schema.numeric:
            _check_tensor(batch, "numeric", (len(schema.numeric),), "float", sizes)
        for s in schema.sequence:
            key = f"seq/{s.name}"
            ids = _check_tensor(batch, key, (None,), "int", sizes)
            _check_tensor(batch, f"{key}/positions", tuple(ids.shape[1:]), "int", sizes)
            _check_tensor(batch, f"{key}/lengths", (), "int", sizes)
            if not torch.compiler.is_compiling() and ids.numel() > 0:
                vocab = schema.categorical[schema.categorical_index(s.item)].vocab_size
                low, high = int(ids.min()), int(ids.max())
                if low < 0 or high >= vocab:
                    raise ValueError(f"batch[{key!r}]: item ids must lie in [0, {vocab}) (the "
                                     f"vocabulary of {s.item!r}), got {low if low < 0 else high}")
        for p in schema.pretrained:
            for side in ("user", "item"):
                _check_tensor(batch, f"pretrained/{p.name}/{side}", (p.dim,), "float", sizes)
        first = next(iter(sizes.values()), None)
        if any(n != first for n in sizes.values()):  # (not a set: sizes may be symbolic)
            raise ValueError(f"batch tensors must have one batch size B, got {sizes}")


def _check_tensor(batch, key: str, tail: tuple, kind: str, sizes: dict) -> torch.Tensor:
    """batch[key] must be a (B, *tail) int or float tensor (None in tail: any size)."""
    if key not in batch:
        raise ValueError(f"batch is missing {key!r} (see hmoe.data.schema for the layout)")
    t = batch[key]
    ok = isinstance(t, torch.Tensor) and (
        t.dtype in (torch.int32, torch.int64) if kind == "int" else t.is_floating_point())
    if not ok:
        want = "int32 or int64" if kind == "int" else "floating point"
        raise TypeError(f"batch[{key!r}] must be a {want} tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != 1 + len(tail) or any(w is not None and w != n for w, n in zip(tail, t.shape[1:])):
        shape = "(B" + "".join(f", {'*' if w is None else w}" for w in tail) + ")"
        raise ValueError(f"batch[{key!r}] must have shape {shape}, got {tuple(t.shape)}")
    sizes[key] = t.shape[0]
    return t
