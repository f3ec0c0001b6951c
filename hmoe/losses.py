r"""Training losses: weighted BCE, the auxiliary ranking losses, IPW, multi-task weighting.

Design section 3.5; paper notes section 5 (Pan et al., KDD 2024, "Gradient Vanishing and Ranking
Loss" and "Repeated Exposure and Weighted Sampling", after Lin, Pan et al., arXiv 2403.14144).

Every loss reads one task's logits z (B,), labels y (B,) in {0, 1} and optional sample weights
w (B,) >= 0 (all ones when absent). P = {i : y_i = 1}, N = {j : y_j = 0}, W_P = Σ_{i∈P} w_i,
W_N = Σ_{j∈N} w_j, ℓ_i = BCE(σ(z_i), y_i) = softplus(z_i) − y_i·z_i.

Weighted BCE, :func:`bce`, by ``reduction``:

    "mean"           Σ_i w_i ℓ_i / B        (torch's BCE with ``weight``, as in the paper's code)
    "weighted_mean"  Σ_i w_i ℓ_i / Σ_i w_i
    "sum"            Σ_i w_i ℓ_i            "none": w_i ℓ_i (B,)

The two means agree when the weights average 1, as :func:`ipw_weights` arranges.

Pairwise (RankNet) term, :func:`pairwise_loss`, over all in-batch (positive, negative) pairs with
pair weight w_i·w_j (a weighted mean; the plain mean over the B_P·B_N pairs when w = 1):

    L_pair = Σ_{i∈P} Σ_{j∈N} w_i w_j · (−log σ(z_i − z_j)) / (W_P · W_N)

Combined-Pair (notes 5.1), :func:`combined_pair_loss`:  L = α·L_BCE + (1−α)·L_pair,  α = 0.7.

Listwise term, :func:`listwise_loss`: a softmax cross-entropy over the whole batch for each
positive, the softmax mass of sample k weighted by w_k, averaged over positives with weights w_i:

    L_list = −Σ_{i∈P} w_i · log( e^{z_i} / Σ_k w_k e^{z_k} ) / W_P

With w = β on positives and 1 on negatives this is exactly the repo's Combined-List term
mean_{i∈P} −log(e^{z_i} / (β Σ_P e^z + Σ_N e^z)) (notes 5.1). Other positives stay in the
denominator, as there. :func:`combined_list_loss`:  L = α·L_BCE + (1−α)·L_list.

Why the ranking term (notes 5.1, gradient vanishing): for a negative j, ∂L_BCE/∂z_j = w_j p_j / B
with p_j = σ(z_j), which vanishes once the model predicts the low base rate for everything, while
∂L_pair/∂z_j = w_j Σ_{i∈P} w_i σ(z_j − z_i) / (W_P W_N) depends on relative scores only and stays
O(1/|N|) however small p_j is.

A batch without a positive or without a negative (zero total weight counts as without) has no
pair and no list term: the ranking term contributes 0, so the loss is α·L_BCE, not L_BCE. Keeping
the BCE's share fixed keeps its per-sample weight the same in every batch; raising it to 1 in
the (all-negative) batches that lack a positive would over-weight negatives and bias the
calibration downwards. (The repo's code would give NaN, a mean over an empty set.)

Memory of the pair term: the direct form materialises the (B_P, B_N) margins. Beyond
``max_pairs`` pairs (default 4M) it runs the same sum in chunks of positives under a custom
autograd function that computes the exact gradient in the same pass, so memory stays at about
``max_pairs`` elements whatever the batch (no sampling: the loss and its gradient are exact; only
double backward is unsupported on that path).

Repeated exposure (notes 5.2, REW), :func:`ipw_weights`: the positive of a (user, ad) pair seen
for the c-th time is down-weighted by inverse propensity, w_i = c_i^{−γ} for positives, 1 for
negatives; ``normalize`` rescales the positives so that Σ_{i∈P} w_i = |P|: exposure redistributes
weight among positives but leaves the positive class's total weight, hence the base rate the model
learns and its calibration, unchanged (and the weights average 1, so both BCE means agree). The
exact Tencent weighting is not public (notes 5.2); this is the standard IPW form.

Multi-task weighting, :class:`MultiTaskLoss`: L = Σ_t λ_t · L_t with one :class:`TaskLossConfig`
(kind, α, λ) per task.

Sample weights are data, never parameters: no gradient flows into them. An empty batch (B = 0)
gives a loss of 0 that still belongs to the graph. Bad input (wrong shape, labels outside {0, 1}
or NaN, non-finite logits, negative or non-finite weights) raises ValueError naming the argument.
The value checks and class counts of one call (of all tasks, for MultiTaskLoss) come back in a
single device-to-host transfer, the only one the losses make (none for ``bce(validate=False)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_ALPHA", "DEFAULT_MAX_PAIRS", "LOSS_KINDS", "MultiTaskLoss", "TaskLossConfig",
           "bce", "combined_list_loss", "combined_pair_loss", "ipw_weights", "listwise_loss",
           "pairwise_loss"]

DEFAULT_ALPHA = 0.7  # best α at β = 0.1 in the ranking-loss repo's configs (notes 5.1)
DEFAULT_MAX_PAIRS = 1 << 22  # 4M pairs: the direct (B_P, B_N) margins stay at ~16 MiB in fp32
LOSS_KINDS = ("bce", "combined_pair", "listwise")
REDUCTIONS = ("mean", "weighted_mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# Validation: python shape checks, then value checks gathered into one device-to-host transfer.


@dataclass(frozen=True)
class _Names:
    """How the error messages name the arguments of one task."""
    logits: str = "logits"
    labels: str = "labels"
    weight: str = "weight"


@dataclass(frozen=True)
class _BatchFacts:
    """Class counts and total weights of one task's batch, read back from the device."""
    num_positive: int
    num_negative: int
    weight_positive: float
    weight_negative: float

    @property
    def has_pairs(self) -> bool:
        return self.weight_positive > 0 and self.weight_negative > 0


_NUM_FLAGS = 4  # non-finite logits, NaN labels, labels outside {0, 1}, bad weights


def _check_shapes(logits, labels, weight, names: _Names) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{names.logits} must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() != 1:
        raise ValueError(f"{names.logits} must be (B,), got shape {tuple(logits.shape)}"
                         + (" (squeeze the last dim)" if logits.dim() == 2 else ""))
    companions = [(names.labels, labels)] + ([] if weight is None else [(names.weight, weight)])
    for name, t in companions:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != logits.shape:
            raise ValueError(f"{name} must have the shape of {names.logits} "
                             f"{tuple(logits.shape)}, got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but {names.logits} on {logits.device}")


def _label_flags(labels, is_positive) -> list[torch.Tensor]:
    """Lazy (NaN labels?, labels outside {0, 1}?) flags; NaN alone gets its own message."""
    nan = labels.isnan().any() if labels.is_floating_point() else is_positive.new_zeros(())
    return [nan, ((labels != 0) & ~is_positive).any()]


def _lazy_facts(logits, labels, weight, validate: bool) -> torch.Tensor:
    """(_NUM_FLAGS + 4,) float64 on the device: the value-check flags, then the class facts.

    Nothing here synchronises; the caller reads all of it back at once.
    """
    is_positive = labels == 1
    if validate:
        flags = [(~torch.isfinite(logits)).any(), *_label_flags(labels, is_positive)]
        if weight is not None:
            flags.append(((~torch.isfinite(weight)) | (weight < 0)).any())
        else:
            flags.append(is_positive.new_zeros(()))
    else:
        flags = [is_positive.new_zeros(())] * _NUM_FLAGS
    count_positive = is_positive.sum()
    if weight is None:
        weight_positive = count_positive
        weight_negative = labels.numel() - count_positive
    else:
        w = weight.detach().to(torch.float64)
        weight_positive = torch.where(is_positive, w, 0.0).sum()
        weight_negative = w.sum() - weight_positive
    facts = [count_positive, labels.numel() - count_positive, weight_positive, weight_negative]
    return torch.stack([torch.as_tensor(f, dtype=torch.float64, device=logits.device)
                        for f in flags + facts])


def _first_bad(bad: torch.Tensor, values: torch.Tensor) -> str:
    index = int(torch.nonzero(bad)[0, 0])
    return f"{values[index].item()} at index {index}"


def _decode(values: Sequence[float], logits, labels, weight, names: _Names) -> _BatchFacts:
    """Raise on the first failed value check (error path only: may synchronise again)."""
    logits_bad, labels_nan, labels_bad, weight_bad = values[:_NUM_FLAGS]
    if logits_bad:
        raise ValueError(f"{names.logits} must be finite, found "
                         f"{_first_bad(~torch.isfinite(logits), logits)}")
    if labels_nan:
        raise ValueError(f"{names.labels} must be 0 or 1, found NaN at index "
                         f"{int(torch.nonzero(labels.isnan())[0, 0])}")
    if labels_bad:
        raise ValueError(f"{names.labels} must be 0 or 1, found "
                         f"{_first_bad((labels != 0) & (labels != 1), labels)}")
    if weight_bad:
        raise ValueError(f"{names.weight} must be finite and >= 0, found "
                         f"{_first_bad(~torch.isfinite(weight) | (weight < 0), weight)}")
    num_positive, num_negative, weight_positive, weight_negative = values[_NUM_FLAGS:]
    return _BatchFacts(int(num_positive), int(num_negative), float(weight_positive),
                       float(weight_negative))


def _inspect(logits, labels, weight, validate: bool = True,
             names: _Names = _Names()) -> _BatchFacts:
    _check_shapes(logits, labels, weight, names)
    values = _lazy_facts(logits, labels, weight, validate).tolist()  # the one sync
    return _decode(values, logits, labels, weight, names)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def _check_max_pairs(max_pairs: int) -> int:
    if isinstance(max_pairs, bool) or int(max_pairs) != max_pairs or max_pairs < 1:
        raise ValueError(f"max_pairs must be an integer >= 1, got {max_pairs}")
    return int(max_pairs)


def _constant_weight(weight, logits) -> torch.Tensor | None:
    return None if weight is None else weight.detach().to(logits.dtype)


# --------------------------------------------------------------------------------------------
# The loss terms on validated input.


def _bce(logits, labels, weight, reduction: str) -> torch.Tensor:
    per_sample = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype),
                                                    reduction="none")  # (B,)
    if weight is not None:
        per_sample = per_sample * weight
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    # An empty batch, or all weights 0, gives 0 rather than 0/0: nothing to learn, no NaN.
    if reduction == "weighted_mean" and weight is not None:
        weight_sum = weight.sum()
        return total / torch.where(weight_sum > 0, weight_sum, 1.0)
    return total / max(logits.numel(), 1)


class _ChunkedPairLoss(torch.autograd.Function):
    """Σ_{i,j} a_i b_j softplus(z_neg_j − z_pos_i), with its exact gradient, in positive chunks.

    The gradient is computed in the forward pass, chunk by chunk, so nothing of size
    (B_P, B_N) outlives a chunk:  ∂/∂z_neg_j = b_j Σ_i a_i σ(z_neg_j − z_pos_i),
    ∂/∂z_pos_i = −a_i Σ_j b_j σ(z_neg_j − z_pos_i).
    """

    @staticmethod
    def forward(ctx, z_pos, z_neg, a, b, rows_per_chunk: int):
        total = torch.zeros((), dtype=torch.float64, device=z_pos.device)
        grad_pos = torch.empty_like(z_pos, dtype=torch.float64)
        grad_neg = torch.zeros_like(z_neg, dtype=torch.float64)
        for start in range(0, z_pos.numel(), rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            reversed_margin = z_neg[None, :] - z_pos[rows, None]  # (chunk, B_N)
            total += (a[rows] @ F.softplus(reversed_margin) @ b).double()
            slope = torch.sigmoid(reversed_margin)  # (chunk, B_N)
            grad_pos[rows] = -(a[rows] * (slope @ b)).double()
            grad_neg += (a[rows] @ slope).double()
        ctx.save_for_backward(grad_pos.to(z_pos.dtype), (grad_neg * b.double()).to(z_neg.dtype))
        return total.to(z_pos.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_pos, grad_neg = ctx.saved_tensors
        return grad_output * grad_pos, grad_output * grad_neg, None, None, None


def _pairwise(logits, labels, weight, facts: _BatchFacts, max_pairs: int) -> torch.Tensor:
    if not facts.has_pairs:
        return logits.sum() * 0.0  # no pair: a zero that keeps the graph
    # Positives first, by a stable sort: with |P| already on the host, splitting needs no
    # further sync (boolean-mask indexing would wait for the device to count).
    order = torch.argsort((labels == 1).to(torch.int8), descending=True, stable=True)  # (B,)
    positives, negatives = order[:facts.num_positive], order[facts.num_positive:]
    z_pos, z_neg = logits[positives], logits[negatives]  # (B_P,), (B_N,)
    if weight is None:
        a = torch.ones_like(z_pos)
        b = torch.ones_like(z_neg)
    else:
        a, b = weight[positives], weight[negatives]
    normaliser = facts.weight_positive * facts.weight_negative
    if facts.num_positive * facts.num_negative <= max_pairs:
        # −log σ(z_i − z_j) = softplus(z_j − z_i), stable for any margin.
        pair_loss = F.softplus(z_neg[None, :] - z_pos[:, None])  # (B_P, B_N)
        return (a @ pair_loss @ b) / normaliser
    rows_per_chunk = max(1, max_pairs // facts.num_negative)
    return _ChunkedPairLoss.apply(z_pos, z_neg, a, b, rows_per_chunk) / normaliser


def _listwise(logits, labels, weight, facts: _BatchFacts) -> torch.Tensor:
    if not facts.has_pairs:
        return logits.sum() * 0.0
    is_positive = (labels == 1).to(logits.dtype)
    if weight is None:
        log_partition = torch.logsumexp(logits, dim=0)
        positive_weight = is_positive
    else:
        # log w_k = −inf drops zero-weight samples from the softmax.
        log_partition = torch.logsumexp(logits + torch.log(weight), dim=0)
        positive_weight = is_positive * weight
    log_softmax = logits - log_partition  # (B,)
    return -(positive_weight @ log_softmax) / facts.weight_positive


def _combine(alpha: float, classification, ranking) -> torch.Tensor:
    if alpha == 1.0:
        return classification
    if alpha == 0.0:
        return ranking()
    return alpha * classification + (1.0 - alpha) * ranking()


def _combined(kind: str, logits, labels, weight, facts: _BatchFacts, alpha: float,
              max_pairs: int) -> torch.Tensor:
    """α·BCE + (1−α)·ranking term for one validated task (kind "bce" ignores α)."""
    classification = _bce(logits, labels, weight, "mean")
    if kind == "bce":
        return classification
    if kind == "combined_pair":
        return _combine(alpha, classification,
                        lambda: _pairwise(logits, labels, weight, facts, max_pairs))
    return _combine(alpha, classification, lambda: _listwise(logits, labels, weight, facts))


# --------------------------------------------------------------------------------------------
# Public single-task losses.


def bce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None, *,
        reduction: str = "mean", validate: bool = True) -> torch.Tensor:
    """Weighted binary cross-entropy on logits (see the module docstring for ``reduction``).

    Args:
        logits: (B,) floating point.  labels: (B,) in {0, 1}, any real or bool dtype.
        weight: optional (B,) sample weights >= 0, treated as constants.
        reduction: "mean" (Σ w ℓ / B, default), "weighted_mean" (Σ w ℓ / Σ w), "sum", "none".
        validate: check values (one sync); False skips it and then never synchronises.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if validate:
        _inspect(logits, labels, weight)
    else:
        _check_shapes(logits, labels, weight, _Names())
    return _bce(logits, labels, _constant_weight(weight, logits), reduction)


def pairwise_loss(logits: torch.Tensor, labels: torch.Tensor,
                  weight: torch.Tensor | None = None, *, max_pairs: int = DEFAULT_MAX_PAIRS,
                  validate: bool = True) -> torch.Tensor:
    """The RankNet term alone: weighted mean of −log σ(z_pos − z_neg) over in-batch pairs.

    Pair weight w_pos·w_neg, normalised by W_P·W_N; 0 when the batch lacks a class. Above
    ``max_pairs`` pairs it is computed exactly in chunks (see the module docstring).
    """
    max_pairs = _check_max_pairs(max_pairs)
    facts = _inspect(logits, labels, weight, validate)
    return _pairwise(logits, labels, _constant_weight(weight, logits), facts, max_pairs)


def combined_pair_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = DEFAULT_ALPHA,
                       weight: torch.Tensor | None = None, *,
                       max_pairs: int = DEFAULT_MAX_PAIRS, validate: bool = True) -> torch.Tensor:
    """Combined-Pair: α·BCE ("mean" reduction) + (1−α)·:func:`pairwise_loss` (notes 5.1).

    A batch without both classes gives α·BCE (the pair term is 0; module docstring says why).
    """
    alpha, max_pairs = _check_alpha(alpha), _check_max_pairs(max_pairs)
    facts = _inspect(logits, labels, weight, validate)
    return _combined("combined_pair", logits, labels, _constant_weight(weight, logits), facts,
                     alpha, max_pairs)


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor,
                  weight: torch.Tensor | None = None, *, validate: bool = True) -> torch.Tensor:
    """The listwise term alone: −Σ_P w_i log(e^{z_i} / Σ_k w_k e^{z_k}) / W_P (0 without both
    classes). O(B) memory."""
    facts = _inspect(logits, labels, weight, validate)
    return _listwise(logits, labels, _constant_weight(weight, logits), facts)


def combined_list_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = DEFAULT_ALPHA,
                       weight: torch.Tensor | None = None, *,
                       validate: bool = True) -> torch.Tensor:
    """Combined-List: α·BCE ("mean" reduction) + (1−α)·:func:`listwise_loss`."""
    alpha = _check_alpha(alpha)
    facts = _inspect(logits, labels, weight, validate)
    return _combined("listwise", logits, labels, _constant_weight(weight, logits), facts, alpha,
                     DEFAULT_MAX_PAIRS)


# --------------------------------------------------------------------------------------------
# Repeated exposure.


def ipw_weights(exposure_count: torch.Tensor, labels: torch.Tensor, gamma: float = 1.0,
                normalize: bool = True) -> torch.Tensor:
    """Inverse propensity weights for repeated exposure: c^−γ on positives, 1 on negatives.

    Args:
        exposure_count: (B,) how many times this (user, ad) pair had been shown, >= 1, finite.
        labels: (B,) in {0, 1}.
        gamma: strength, finite and >= 0 (0: no reweighting).
        normalize: rescale the positives' weights to sum to their count |P| (so all weights
            average 1); with no positive there is nothing to rescale.

    Returns (B,) weights in exposure_count's floating dtype (the default dtype for integer
    counts), without gradient.
    """
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    if not isinstance(exposure_count, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("exposure_count and labels must be tensors, got "
                        f"{type(exposure_count).__name__} and {type(labels).__name__}")
    if exposure_count.dim() != 1 or labels.shape != exposure_count.shape:
        raise ValueError(f"exposure_count and labels must both be (B,), got "
                         f"{tuple(exposure_count.shape)} and {tuple(labels.shape)}")
    dtype = (exposure_count.dtype if exposure_count.is_floating_point()
             else torch.get_default_dtype())
    count = exposure_count.detach().to(dtype)
    is_positive = labels == 1
    flags = torch.stack([(~torch.isfinite(count) | (count < 1)).any(),
                         *_label_flags(labels, is_positive)]).tolist()  # the one sync
    if flags[0]:
        raise ValueError(f"exposure_count must be finite and >= 1, found "
                         f"{_first_bad(~torch.isfinite(count) | (count < 1), count)}")
    if flags[1] or flags[2]:
        bad = labels.isnan() if flags[1] else (labels != 0) & (labels != 1)
        raise ValueError(f"labels must be 0 or 1, found {_first_bad(bad, labels)}")
    positive_weight = count.pow(-gamma)  # (B,)
    if normalize:
        num_positive = is_positive.sum()
        # Σ_P c^−γ > 0 whenever |P| > 0, since c is finite; clamp only guards |P| = 0.
        scale = num_positive / torch.where(is_positive, positive_weight, 0.0).sum().clamp_min(
            torch.finfo(dtype).tiny)
        positive_weight = positive_weight * scale
    return torch.where(is_positive, positive_weight, torch.ones_like(positive_weight))


# --------------------------------------------------------------------------------------------
# Several tasks.


@dataclass(frozen=True)
class TaskLossConfig:
    """The loss of one task.

    kind: "bce"; "combined_pair" (α·BCE + (1−α)·pair term); "listwise" (α·BCE + (1−α)·list
        term, so alpha = 0 gives the pure listwise loss).
    alpha: the BCE share α in [0, 1] (ignored by "bce").
    weight: the task weight λ_t >= 0 in the total Σ_t λ_t L_t.
    max_pairs: the pair-term memory cap of "combined_pair".
    """

    kind: str = "bce"
    alpha: float = DEFAULT_ALPHA
    weight: float = 1.0
    max_pairs: int = DEFAULT_MAX_PAIRS

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}")
        _check_alpha(self.alpha)
        if not (math.isfinite(float(self.weight)) and self.weight >= 0):
            raise ValueError(f"weight must be finite and >= 0, got {self.weight}")
        _check_max_pairs(self.max_pairs)

    @classmethod
    def from_dict(cls, config: Mapping) -> TaskLossConfig:
        """From a parsed YAML mapping; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown task loss keys {unknown}; known: {sorted(known)}")
        return cls(**config)


class MultiTaskLoss(nn.Module):
    """L = Σ_t λ_t · L_t over the configured tasks (module docstring; design section 3.5).

    Args:
        tasks: task name -> :class:`TaskLossConfig` (or a mapping of its fields).

    forward(logits, labels, task_order, sample_weight=None) -> (total, {task: L_t}):
        logits: task -> (B,) logits, exactly the configured tasks.
        labels: (B, T) in {0, 1}, column k holding task_order[k]; every configured task must
            be in task_order (extra columns are ignored).
        sample_weight: None, (B,) shared by all tasks, (B, T) columns in task_order, or
            task -> (B,) (per-task IPW weights differ, since each task has its own positives).
    The per-task losses keep their graphs, so a caller can differentiate each one alone (the
    task-gradient analysis does). All value checks of a call share one device-to-host transfer.
    """

    def __init__(self, tasks: Mapping[str, TaskLossConfig | Mapping]):
        super().__init__()
        if not tasks:
            raise ValueError("tasks must name at least one task")
        self.tasks: dict[str, TaskLossConfig] = {
            str(name): config if isinstance(config, TaskLossConfig)
            else TaskLossConfig.from_dict(config) for name, config in tasks.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={config}" for name, config in self.tasks.items())

    def _task_weight(self, sample_weight, name: str, column: int, num_tasks: int):
        if sample_weight is None:
            return None, "sample_weight"
        if isinstance(sample_weight, Mapping):
            if name not in sample_weight:
                raise ValueError(f"sample_weight has no entry for task {name!r}")
            return sample_weight[name], f"sample_weight[{name!r}]"
        if not isinstance(sample_weight, torch.Tensor):
            raise TypeError(f"sample_weight must be a tensor or a mapping, got "
                            f"{type(sample_weight).__name__}")
        if sample_weight.dim() == 2:
            if sample_weight.shape[1] != num_tasks:
                raise ValueError(f"sample_weight (B, T) must have T={num_tasks} columns, like "
                                 f"labels, got shape {tuple(sample_weight.shape)}")
            return sample_weight[:, column], f"sample_weight[:, {column}] (task {name!r})"
        return sample_weight, "sample_weight"

    def forward(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor,
                task_order: Sequence[str],
                sample_weight: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        task_order = list(task_order)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ValueError(f"labels must be a (B, T) tensor, got "
                             f"{tuple(getattr(labels, 'shape', ())) or type(labels).__name__}")
        if labels.shape[1] != len(task_order):
            raise ValueError(f"labels has {labels.shape[1]} columns but task_order names "
                             f"{len(task_order)} tasks: {task_order}")
        for name in self.tasks:
            if name not in task_order:
                raise ValueError(f"task {name!r} is not in task_order {task_order}, so labels "
                                 f"have no column for it")
            if name not in logits:
                raise ValueError(f"logits has no entry for task {name!r}")
        unexpected = sorted(set(logits) - set(self.tasks))
        if unexpected:
            raise ValueError(f"logits has tasks {unexpected} with no loss configured; "
                             f"configured: {list(self.tasks)}")

        inputs, lazy = {}, []
        for name in self.tasks:
            column = task_order.index(name)
            task_weight, weight_name = self._task_weight(sample_weight, name, column,
                                                         len(task_order))
            names = _Names(f"logits[{name!r}]", f"labels[:, {column}] (task {name!r})",
                           weight_name)
            task_logits, task_labels = logits[name], labels[:, column]
            _check_shapes(task_logits, task_labels, task_weight, names)
            inputs[name] = (task_logits, task_labels, task_weight, names)
            lazy.append(_lazy_facts(task_logits, task_labels, task_weight, validate=True))
        values = torch.stack(lazy).tolist()  # the one sync of the call

        losses = {}
        for (name, config), task_values in zip(self.tasks.items(), values):
            task_logits, task_labels, task_weight, names = inputs[name]
            facts = _decode(task_values, task_logits, task_labels, task_weight, names)
            losses[name] = _combined(config.kind, task_logits, task_labels,
                                     _constant_weight(task_weight, task_logits), facts,
                                     config.alpha, config.max_pairs)
        total = sum(config.weight * losses[name] for name, config in self.tasks.items())
        return total, losses
