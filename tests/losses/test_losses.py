"""hmoe.losses against hand computations (python loops in float64), gradients, bad input, and
the gradient-vanishing claim of the ranking-loss paper (notes 5.1)."""

import math

import pytest
import torch

from hmoe import losses
from hmoe.losses import (MultiTaskLoss, TaskLossConfig, bce, combined_list_loss,
                         combined_pair_loss, ipw_weights, listwise_loss, pairwise_loss)


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def loop_bce(z, y, w=None):
    w = w or [1.0] * len(z)
    return [wi * (softplus(zi) - yi * zi) for zi, yi, wi in zip(z, y, w)]


def loop_pair(z, y, w=None):
    w = w or [1.0] * len(z)
    total = norm = 0.0
    for i in range(len(z)):
        for j in range(len(z)):
            if y[i] == 1 and y[j] == 0:
                total += w[i] * w[j] * -math.log(1 / (1 + math.exp(-(z[i] - z[j]))))
                norm += w[i] * w[j]
    return total / norm if norm else 0.0


def loop_list(z, y, w=None):
    w = w or [1.0] * len(z)
    partition = sum(wk * math.exp(zk) for zk, wk in zip(z, w))
    positives = [i for i in range(len(z)) if y[i] == 1]
    total = sum(w[i] * -math.log(math.exp(z[i]) / partition) for i in positives)
    return total / sum(w[i] for i in positives)


def t(values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


Z = [2.0, -1.0, 0.5, -0.3, 1.2]
Y = [1.0, 0.0, 0.0, 1.0, 0.0]
W = [0.5, 2.0, 1.0, 1.5, 0.25]


# ------------------------------------------------------------------------------ hand values

def test_bce_reductions_by_hand():
    per_sample = loop_bce(Z, Y, W)
    z, y, w = t(Z), t(Y), t(W)
    assert bce(z, y).item() == pytest.approx(sum(loop_bce(Z, Y)) / 5, rel=1e-12)
    assert bce(z, y, w).item() == pytest.approx(sum(per_sample) / 5, rel=1e-12)
    assert bce(z, y, w, reduction="weighted_mean").item() == pytest.approx(
        sum(per_sample) / sum(W), rel=1e-12)
    assert bce(z, y, w, reduction="sum").item() == pytest.approx(sum(per_sample), rel=1e-12)
    torch.testing.assert_close(bce(z, y, w, reduction="none"), t(per_sample))


def test_bce_matches_torch_weighted_bce():
    z, y, w = torch.randn(64), (torch.rand(64) < 0.3).float(), torch.rand(64)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(z, y, weight=w)
    torch.testing.assert_close(bce(z, y, w), expected)


def test_tiny_pair_by_hand():
    # one positive (2) against negatives (-1, 0.5): mean of softplus(-3) and softplus(-1.5)
    value = pairwise_loss(t([2.0, -1.0, 0.5]), t([1.0, 0.0, 0.0])).item()
    assert value == pytest.approx((softplus(-3.0) + softplus(-1.5)) / 2, rel=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_pair_list_and_combined_against_loops(weighted):
    w_list = W if weighted else None
    z, y, w = t(Z), t(Y), (t(W) if weighted else None)
    assert pairwise_loss(z, y, w).item() == pytest.approx(loop_pair(Z, Y, w_list), rel=1e-12)
    assert listwise_loss(z, y, w).item() == pytest.approx(loop_list(Z, Y, w_list), rel=1e-12)
    bce_mean = sum(loop_bce(Z, Y, w_list)) / len(Z)
    assert combined_pair_loss(z, y, 0.7, w).item() == pytest.approx(
        0.7 * bce_mean + 0.3 * loop_pair(Z, Y, w_list), rel=1e-12)
    assert combined_list_loss(z, y, 0.4, w).item() == pytest.approx(
        0.4 * bce_mean + 0.6 * loop_list(Z, Y, w_list), rel=1e-12)


def test_listwise_with_beta_weights_is_the_repo_combined_list_term():
    beta = 0.1
    z, y = torch.randn(50, dtype=torch.float64), (torch.rand(50) < 0.2).double()
    y[0], y[1] = 1.0, 0.0
    weight = torch.where(y == 1, beta, 1.0).double()
    exp = z.exp()
    denominator = beta * exp[y == 1].sum() + exp[y == 0].sum()
    expected = (-(exp[y == 1] / denominator).log()).mean()
    torch.testing.assert_close(listwise_loss(z, y, weight), expected)


def test_missing_class_gives_alpha_times_bce():
    z = t([0.3, -1.0, 2.0])
    for labels in ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]):
        y = t(labels)
        assert pairwise_loss(z, y).item() == 0.0
        assert listwise_loss(z, y).item() == 0.0
        torch.testing.assert_close(combined_pair_loss(z, y, 0.7), 0.7 * bce(z, y))
        torch.testing.assert_close(combined_list_loss(z, y, 0.7), 0.7 * bce(z, y))
    # zero total weight on the positives counts as no positive
    y, w = t([1.0, 0.0, 0.0]), t([0.0, 1.0, 1.0])
    assert pairwise_loss(z, y, w).item() == 0.0


def test_alpha_extremes():
    z, y = t(Z), t(Y)
    torch.testing.assert_close(combined_pair_loss(z, y, 1.0), bce(z, y))
    torch.testing.assert_close(combined_pair_loss(z, y, 0.0), pairwise_loss(z, y))
    torch.testing.assert_close(combined_list_loss(z, y, 0.0), listwise_loss(z, y))


def test_empty_batch_is_zero_and_differentiable():
    z = torch.zeros(0, requires_grad=True)
    y = torch.zeros(0)
    for loss in (bce(z, y), combined_pair_loss(z, y), combined_list_loss(z, y),
                 bce(z, y, torch.zeros(0), reduction="weighted_mean")):
        assert loss.item() == 0.0
        loss.backward()


def test_labels_of_int_and_bool_dtype():
    z, y = t(Z), t(Y)
    expected = combined_pair_loss(z, y)
    torch.testing.assert_close(combined_pair_loss(z, y.long()), expected)
    torch.testing.assert_close(combined_pair_loss(z, y.bool()), expected)


# ------------------------------------------------------------------------------ chunking

@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_pair_equals_direct_in_value_and_gradient(weighted):
    z = torch.randn(300, dtype=torch.float64)
    y = (torch.rand(300) < 0.1).double()
    w = torch.rand(300, dtype=torch.float64) + 0.1 if weighted else None
    results = []
    for max_pairs in (losses.DEFAULT_MAX_PAIRS, 50, 1):  # direct, chunks of rows, row by row
        logits = z.clone().requires_grad_()
        value = combined_pair_loss(logits, y, 0.7, w, max_pairs=max_pairs)
        value.backward()
        results.append((value.detach(), logits.grad))
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


def test_chunked_pair_float32_stays_accurate():
    z = torch.randn(2000) * 3
    y = (torch.rand(2000) < 0.3).float()
    direct = pairwise_loss(z.double(), y)
    chunked = pairwise_loss(z, y, max_pairs=1000)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(direct.item(), rel=1e-5)


@pytest.mark.parametrize("max_pairs", [losses.DEFAULT_MAX_PAIRS, 2])
def test_gradcheck(max_pairs):
    z = torch.randn(9, dtype=torch.float64, requires_grad=True)
    y = t([1, 0, 0, 1, 0, 0, 1, 0, 0])
    w = torch.rand(9, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda logits: combined_pair_loss(logits, y, 0.6, w, max_pairs=max_pairs), (z,))
    assert torch.autograd.gradcheck(lambda logits: combined_list_loss(logits, y, 0.6, w), (z,))
    assert torch.autograd.gradcheck(lambda logits: bce(logits, y, w), (z,))


def test_pair_gradient_formula():
    # ∂L_pair/∂z_j = w_j Σ_{i∈P} w_i σ(z_j − z_i) / (W_P W_N) for a negative j
    z, y, w = t(Z, grad=True), t(Y), t(W)
    pairwise_loss(z, y, w).backward()
    positives = [i for i in range(5) if Y[i] == 1]
    negatives = [j for j in range(5) if Y[j] == 0]
    norm = sum(W[i] for i in positives) * sum(W[j] for j in negatives)
    for j in negatives:
        expected = W[j] * sum(W[i] / (1 + math.exp(-(Z[j] - Z[i]))) for i in positives) / norm
        assert z.grad[j].item() == pytest.approx(expected, rel=1e-12)


def test_weights_get_no_gradient():
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    loss = combined_pair_loss(t(Z, grad=True), t(Y), 0.5, w)
    loss.backward()
    assert w.grad is None


# ------------------------------------------------------------------------------ the claim

def _negative_gradient(loss_fn, logits, labels, weight):
    z = logits.clone().requires_grad_()
    loss_fn(z, labels, weight).backward()
    return z.grad[labels == 0].abs().mean().item()


@pytest.mark.parametrize("positive_rate", [0.02, 0.005])
def test_ranking_term_keeps_gradients_on_negatives_alive(positive_rate):
    """Notes 5.1: sparse positives (β = 0.1 weights them further down, as in the paper's
    Criteo runs), a model that already predicts about the base rate for everything. The mean
    negative gradient of Combined-Pair (α = 0.7) is several times that of BCE."""
    generator = torch.Generator().manual_seed(7)
    batch = 4096
    labels = (torch.rand(batch, generator=generator) < positive_rate).double()
    labels[0] = 1.0
    weight = torch.where(labels == 1, 0.1, 1.0).double()
    base_logit = math.log(positive_rate / (1 - positive_rate))
    logits = base_logit + 0.3 * torch.randn(batch, generator=generator, dtype=torch.float64)

    bce_grad = _negative_gradient(lambda z, y, w: bce(z, y, w), logits, labels, weight)
    pair_grad = _negative_gradient(lambda z, y, w: combined_pair_loss(z, y, 0.7, w),
                                   logits, labels, weight)
    assert pair_grad > 4.0 * bce_grad
    # BCE's negative gradient is p_j / B: it shrinks with the predictions ...
    assert bce_grad == pytest.approx(torch.sigmoid(logits[labels == 0]).mean().item() / batch,
                                     rel=1e-9)
    # ... while the pair term's stays near (1 − α)·½/|N| (σ of a near-zero margin is about ½).
    pair_only = pair_grad - 0.7 * bce_grad
    assert pair_only == pytest.approx(0.3 * 0.5 / (labels == 0).sum().item(), rel=0.2)


# ------------------------------------------------------------------------------ IPW

def test_ipw_weights_by_hand():
    count = torch.tensor([1, 2, 4, 3, 1])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    raw = [1.0, 0.5, 0.25]
    scale = 3 / sum(raw)
    expected = torch.tensor([r * scale for r in raw] + [1.0, 1.0])
    torch.testing.assert_close(ipw_weights(count, labels), expected)
    torch.testing.assert_close(ipw_weights(count, labels, normalize=False),
                               torch.tensor(raw + [1.0, 1.0]))
    gamma_half = ipw_weights(count.double(), labels, gamma=0.5, normalize=False)
    torch.testing.assert_close(gamma_half[:3], torch.tensor([1.0, 2 ** -0.5, 0.5]).double())
    torch.testing.assert_close(ipw_weights(count, labels, gamma=0.0), torch.ones(5))


def test_ipw_normalised_positives_sum_to_their_count():
    count = torch.randint(1, 20, (1000,)).float()
    labels = (torch.rand(1000) < 0.1).float()
    weights = ipw_weights(count, labels, gamma=1.3)
    assert weights[labels == 1].sum().item() == pytest.approx((labels == 1).sum().item(), rel=1e-5)
    assert (weights[labels == 0] == 1).all()
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    # no positive: all ones
    torch.testing.assert_close(ipw_weights(count, torch.zeros(1000)), torch.ones(1000))


@pytest.mark.parametrize("count, match", [
    (torch.tensor([1.0, 0.5, 2.0]), "exposure_count must be finite and >= 1"),
    (torch.tensor([1.0, float("nan"), 2.0]), "exposure_count"),
    (torch.tensor([1.0, float("inf"), 2.0]), "exposure_count"),
    (torch.tensor([1.0, 2.0]), "exposure_count and labels"),
])
def test_ipw_bad_input(count, match):
    with pytest.raises(ValueError, match=match):
        ipw_weights(count, torch.tensor([1.0, 0.0, 1.0]))


def test_ipw_bad_gamma_and_labels():
    with pytest.raises(ValueError, match="gamma"):
        ipw_weights(torch.ones(3), torch.ones(3), gamma=-1.0)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        ipw_weights(torch.ones(3), torch.tensor([1.0, 2.0, 0.0]))


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("fn", [
    bce, pairwise_loss, listwise_loss,
    lambda z, y, w=None: combined_pair_loss(z, y, 0.7, w),
    lambda z, y, w=None: combined_list_loss(z, y, 0.7, w),
])
def test_bad_input_names_the_argument(fn):
    z, y = torch.randn(4), torch.tensor([1.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="labels must have the shape of logits"):
        fn(z, y[:3])
    with pytest.raises(ValueError, match=r"logits must be \(B,\)"):
        fn(z[:, None], y[:, None])
    with pytest.raises(ValueError, match="labels must be 0 or 1, found NaN at index 2"):
        fn(z, torch.tensor([1.0, 0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="labels must be 0 or 1, found 0.5 at index 1"):
        fn(z, torch.tensor([1.0, 0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="logits must be finite, found nan at index 3"):
        fn(torch.tensor([0.0, 1.0, 2.0, float("nan")]), y)
    with pytest.raises(ValueError, match="weight must have the shape"):
        fn(z, y, torch.ones(5))
    with pytest.raises(ValueError, match="weight must be finite and >= 0, found -1.0"):
        fn(z, y, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(4, dtype=torch.long), y)


def test_bad_options():
    z, y = torch.randn(4), torch.tensor([1.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="alpha"):
        combined_pair_loss(z, y, alpha=1.5)
    with pytest.raises(ValueError, match="max_pairs"):
        combined_pair_loss(z, y, max_pairs=0)
    with pytest.raises(ValueError, match="reduction"):
        bce(z, y, reduction="avg")


def test_validate_false_skips_value_checks():
    z, y = torch.randn(4), torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(bce(z, y, validate=False), bce(z, y))
    torch.testing.assert_close(combined_pair_loss(z, y, validate=False), combined_pair_loss(z, y))


# ------------------------------------------------------------------------------ multi-task

def _multitask_batch():
    logits = {"click": torch.randn(32, requires_grad=True),
              "convert": torch.randn(32, requires_grad=True)}
    labels = torch.stack([(torch.rand(32) < 0.4).float(), (torch.rand(32) < 0.2).float()], 1)
    labels[0] = 1.0
    labels[1] = 0.0
    return logits, labels


def test_multitask_total_is_weighted_sum_of_task_losses():
    logits, labels = _multitask_batch()
    loss = MultiTaskLoss({"click": TaskLossConfig(kind="combined_pair", alpha=0.7, weight=1.0),
                          "convert": {"kind": "listwise", "alpha": 0.5, "weight": 0.3}})
    # labels columns may be in any order and may hold extra tasks
    extra = torch.cat([labels[:, 1:], torch.zeros(32, 1), labels[:, :1]], 1)
    total, per_task = loss(logits, extra, ["convert", "unused", "click"])
    expected_click = combined_pair_loss(logits["click"], labels[:, 0], 0.7)
    expected_convert = combined_list_loss(logits["convert"], labels[:, 1], 0.5)
    torch.testing.assert_close(per_task["click"], expected_click)
    torch.testing.assert_close(per_task["convert"], expected_convert)
    torch.testing.assert_close(total, expected_click + 0.3 * expected_convert)
    total.backward()
    assert logits["click"].grad is not None and logits["convert"].grad is not None


def test_multitask_sample_weight_forms_agree():
    logits, labels = _multitask_batch()
    loss = MultiTaskLoss({"click": TaskLossConfig(kind="combined_pair"),
                          "convert": TaskLossConfig()})
    weights = torch.rand(32, 2)
    order = ["click", "convert"]
    matrix = loss(logits, labels, order, weights)[0]
    mapping = loss(logits, labels, order, {"click": weights[:, 0], "convert": weights[:, 1]})[0]
    torch.testing.assert_close(matrix, mapping)
    shared = loss(logits, labels, order, weights[:, 0])[1]
    torch.testing.assert_close(shared["convert"], bce(logits["convert"], labels[:, 1],
                                                      weights[:, 0]))


def test_multitask_errors_name_the_task():
    logits, labels = _multitask_batch()
    loss = MultiTaskLoss({"click": TaskLossConfig(), "convert": TaskLossConfig()})
    with pytest.raises(ValueError, match="task 'convert' is not in task_order"):
        loss(logits, labels[:, :1], ["click"])
    with pytest.raises(ValueError, match="logits has no entry for task 'convert'"):
        loss({"click": logits["click"]}, labels, ["click", "convert"])
    with pytest.raises(ValueError, match=r"logits has tasks \['like'\]"):
        loss({**logits, "like": logits["click"]}, labels, ["click", "convert"])
    with pytest.raises(ValueError, match="2 columns but task_order names 3"):
        loss(logits, labels, ["click", "convert", "x"])
    bad = labels.clone()
    bad[3, 1] = 2.0
    with pytest.raises(ValueError, match=r"labels\[:, 1\] \(task 'convert'\) must be 0 or 1"):
        loss(logits, bad, ["click", "convert"])
    with pytest.raises(ValueError, match="sample_weight has no entry for task 'convert'"):
        loss(logits, labels, ["click", "convert"], {"click": torch.ones(32)})
    with pytest.raises(ValueError, match="T=2 columns"):
        loss(logits, labels, ["click", "convert"], torch.ones(32, 3))


def test_task_config_validation():
    with pytest.raises(ValueError, match="kind"):
        TaskLossConfig(kind="focal")
    with pytest.raises(ValueError, match="alpha"):
        TaskLossConfig(alpha=-0.1)
    with pytest.raises(ValueError, match="weight"):
        TaskLossConfig(weight=float("nan"))
    with pytest.raises(ValueError, match=r"unknown task loss keys \['beta'\]"):
        MultiTaskLoss({"click": {"kind": "bce", "beta": 0.1}})
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskLoss({})
