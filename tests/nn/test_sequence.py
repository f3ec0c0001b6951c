"""hmoe.nn.sequence: MeanPooling, DINAttention (+ Dice), SelfAttentionTarget and time_buckets."""

import math

import pytest
import torch

from hmoe.nn.sequence import DINAttention, Dice, MeanPooling, SelfAttentionTarget, time_buckets

D, P = 4, 6  # embedding width and max_position of the small cases


def make_module(name, dtype=torch.float32):
    torch.manual_seed(0)
    if name == "mean":
        module = MeanPooling()
    elif name == "din":
        module = DINAttention(D, hidden=(5, 3))
    elif name == "din_prelu":
        module = DINAttention(D, hidden=(5,), activation="prelu")
    else:
        module = SelfAttentionTarget(D, P, num_heads=2, num_layers=2)
    return module.to(dtype)


MODULES = ["mean", "din", "din_prelu", "sasrec"]
# torch.compile checks use aot_eager: it traces the full graph (fullgraph=True, fake tensors,
# functionalised buffer updates) in seconds; inductor passes too but compiles for ~50 s on CPU.
BACKEND = "aot_eager"


def make_inputs(lengths, L=5, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    B = lengths.shape[0]
    behaviors = torch.randn(B, L, D, generator=generator, dtype=dtype)
    target = torch.randn(B, D, generator=generator, dtype=dtype)
    positions = torch.arange(1, L + 1).repeat(B, 1)  # ranks: 1 = most recent = step 0
    return behaviors, target, positions, lengths


def fill_padding(behaviors, positions, lengths, value):
    """Copies with every padded step overwritten: behaviours by value (or noise), positions by
    ids no table has."""
    behaviors, positions = behaviors.clone(), positions.clone()
    padding = torch.arange(behaviors.shape[1]) >= lengths[:, None]  # (B, L)
    if value == "random":
        behaviors[padding] = torch.randn(int(padding.sum()), behaviors.shape[2],
                                         dtype=behaviors.dtype) * 1e3
    else:
        behaviors[padding] = value
    positions[padding] = torch.randint(-10**6, 10**6, (int(padding.sum()),))
    return behaviors, positions


# --------------------------------------------------------------------------------------------
# time_buckets


def test_time_buckets_worked_example():
    delta_t = torch.tensor([0, 0.5, 1, 1.9, 2, 3, 4, 7, 8, 1e9, math.inf])
    assert time_buckets(delta_t, 4).tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4]
    assert time_buckets(delta_t, 100).tolist()[:10] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 31]


def test_time_buckets_exact_boundaries_base_and_unit():
    # unit = 60 (minutes from seconds), base 10: [0, 60) -> 1, [60, 600) -> 2, [600, 6000) -> 3
    seconds = torch.tensor([[0, 59, 60], [599, 600, 6000]], dtype=torch.int64)
    buckets = time_buckets(seconds, 10, base=10.0, unit=60.0)
    assert buckets.dtype == torch.int64 and buckets.shape == (2, 3)
    assert buckets.tolist() == [[1, 1, 2], [2, 3, 4]]
    # log rounding: every power of the base starts a new bucket, one below stays in the previous
    for base in (2.0, 3.0, 10.0):
        powers = torch.tensor([base ** k for k in range(12)], dtype=torch.float64)
        assert time_buckets(powers, 50, base=base).tolist() == list(range(2, 14))
        below = torch.nextafter(powers, torch.zeros_like(powers))
        assert time_buckets(below, 50, base=base).tolist() == [1] + list(range(2, 13))
    assert time_buckets(torch.tensor([0.0, 5.0, 1e6]), 1).tolist() == [1, 1, 1]
    assert time_buckets([3, 9], 5).tolist() == [3, 5]  # array-likes; int input
    assert time_buckets(torch.zeros(0), 3).shape == (0,)


@pytest.mark.parametrize("bad", [[1.0, -0.5], [float("nan"), 2.0]])
def test_time_buckets_rejects_negative_and_nan(bad):
    with pytest.raises(ValueError, match="delta_t"):
        time_buckets(torch.tensor(bad), 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_buckets": 0}, "num_buckets"), ({"num_buckets": 2.5}, "num_buckets"),
    ({"num_buckets": 4, "base": 1.0}, "base"), ({"num_buckets": 4, "unit": 0.0}, "unit"),
])
def test_time_buckets_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_buckets(torch.tensor([1.0]), **kwargs)


# --------------------------------------------------------------------------------------------
# MeanPooling


def test_mean_pooling_by_hand():
    behaviors = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]],
                              [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]],
                              [[float("nan")] * 2] * 3])
    target = torch.zeros(3, 2)
    positions = torch.ones(3, 3, dtype=torch.int32)
    lengths = torch.tensor([2, 3, 0], dtype=torch.int32)
    u, weights = MeanPooling()(behaviors, target, positions, lengths, return_attention=True)
    assert u.tolist() == [[2.0, 4.0], [7.0, 7.0], [0.0, 0.0]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5, 0.0], [1 / 3] * 3, [0.0] * 3]))
    assert MeanPooling()(behaviors, target, None, lengths).tolist() == u.tolist()


# --------------------------------------------------------------------------------------------
# DIN and Dice


def test_din_linear_score_by_hand():
    # hidden=() -> w_i = a·[e_i, v, e_i - v, e_i ⊙ v] + c. With a picking e_i[0] + (e_i ⊙ v)[1]:
    din = DINAttention(2, hidden=())
    with torch.no_grad():
        din.linears[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 1.0]]))
        din.linears[0].bias.fill_(0.5)
    behaviors = torch.tensor([[[2.0, 1.0], [3.0, -1.0], [9.0, 9.0]]])
    target = torch.tensor([[0.0, 2.0]])
    u, w = din(behaviors, target, None, torch.tensor([2]), return_attention=True)
    # w_0 = 2 + 1·2 + 0.5 = 4.5, w_1 = 3 + (-1)·2 + 0.5 = 1.5; no softmax, padding w = 0
    assert w.tolist() == [[4.5, 1.5, 0.0]]
    assert u.tolist() == [[4.5 * 2 + 1.5 * 3, 4.5 * 1 + 1.5 * -1]]  # [13.5, 3.0]


def test_din_mlp_formula_and_no_renormalisation():
    torch.manual_seed(3)
    din = DINAttention(D, hidden=(3,), activation="relu").double()
    behaviors, target, positions, lengths = make_inputs([4, 2], dtype=torch.float64)
    u, w = din(behaviors, target, positions, lengths, return_attention=True)
    W1, b1 = din.linears[0].weight, din.linears[0].bias
    W2, b2 = din.linears[1].weight, din.linears[1].bias
    for b in range(2):
        v = target[b]
        expected_u = torch.zeros(D, dtype=torch.float64)
        for i in range(behaviors.shape[1]):
            if i >= lengths[b]:
                assert w[b, i] == 0
                continue
            e = behaviors[b, i]
            score = W2 @ torch.relu(W1 @ torch.cat([e, v, e - v, e * v]) + b1) + b2
            torch.testing.assert_close(w[b, i], score[0])
            expected_u += score[0] * e
        torch.testing.assert_close(u[b], expected_u)
    assert not torch.allclose(w.sum(1), torch.ones(2, dtype=torch.float64))
    # Scaling every score by 3 scales u by 3: nothing renormalises the weights.
    with torch.no_grad():
        din.linears[1].weight.mul_(3.0)
        din.linears[1].bias.mul_(3.0)
    u3, w3 = din(behaviors, target, positions, lengths, return_attention=True)
    torch.testing.assert_close(w3, 3 * w)
    torch.testing.assert_close(u3, 3 * u)


def test_dice_statistics_over_masked_rows_and_running_estimates():
    torch.manual_seed(0)
    dice = Dice(3).double()
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.25, -1.0]))
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    mask = torch.rand(4, 5) < 0.6
    kept = x[mask]  # (N, 3)
    mean, var = kept.mean(0), kept.var(0, unbiased=False)
    gate = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
    expected = gate * x + (1 - gate) * dice.alpha * x
    torch.testing.assert_close(dice(x, mask), expected)
    # rows outside the mask never move the statistics
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 1e3)
    torch.testing.assert_close(dice(noisy, mask)[mask], expected[mask])
    torch.testing.assert_close(dice.running_mean, 0.19 * mean)  # two updates from 0, momentum 0.1
    running_var = 0.81 + 0.19 * kept.var(0, unbiased=True)
    torch.testing.assert_close(dice.running_var, running_var)
    # an all-False mask leaves them alone, and eval uses them
    dice(x, torch.zeros(4, 5, dtype=torch.bool))
    torch.testing.assert_close(dice.running_var, running_var)
    dice.eval()
    gate = torch.sigmoid((x - dice.running_mean) / torch.sqrt(dice.running_var + 1e-8))
    torch.testing.assert_close(dice(x), gate * x + (1 - gate) * dice.alpha * x)


def test_din_dice_eval_differs_from_train_and_is_per_sample():
    din = make_module("din")
    behaviors, target, positions, lengths = make_inputs([5, 3, 1])
    din(behaviors, target, positions, lengths)  # one running-statistics update
    din.eval()
    alone = din(behaviors[1:2], target[1:2], positions[1:2], lengths[1:2])
    together = din(behaviors, target, positions, lengths)[1:2]
    torch.testing.assert_close(alone, together)  # eval: no batch coupling


# --------------------------------------------------------------------------------------------
# Contract shared by the three modules


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), "random"])
def test_padding_never_matters(name, fill):
    module = make_module(name)
    behaviors, target, positions, lengths = make_inputs([5, 2, 0, 1])
    results = []
    for b, p in [(behaviors, positions), fill_padding(behaviors, positions, lengths, fill)]:
        b = b.clone().requires_grad_(True)
        t = target.clone().requires_grad_(True)
        u, w = module(b, t, p, lengths, return_attention=True)
        (u * torch.arange(1.0, D + 1)).sum().backward()
        if t.grad is None:  # MeanPooling ignores the target
            t.grad = torch.zeros_like(t)
        assert torch.isfinite(u).all() and torch.isfinite(w).all()
        assert torch.isfinite(b.grad).all() and torch.isfinite(t.grad).all()
        assert (b.grad[2] == 0).all() and (b.grad[1, 2:] == 0).all()  # no gradient to padding
        params = [q.grad for q in module.parameters() if q.grad is not None]
        assert all(torch.isfinite(g).all() for g in params)
        results.append((u, w, b.grad, t.grad, [g.clone() for g in params]))
        module.zero_grad()
    (u0, w0, gb0, gt0, gp0), (u1, w1, gb1, gt1, gp1) = results
    assert torch.equal(u0, u1) and torch.equal(w0, w1)
    assert torch.equal(gb0, gb1) and torch.equal(gt0, gt1)
    assert all(torch.equal(a, c) for a, c in zip(gp0, gp1))


@pytest.mark.parametrize("name", MODULES)
def test_extra_padding_steps_do_not_change_the_result(name):
    module = make_module(name, torch.float64)
    behaviors, target, positions, lengths = make_inputs([5, 2, 3], dtype=torch.float64)
    u = module(behaviors, target, positions, lengths)
    wide = torch.cat([behaviors, torch.full((3, 4, D), float("nan"), dtype=torch.float64)], 1)
    wide_positions = torch.cat([positions, torch.zeros(3, 4, dtype=torch.int64)], 1)
    torch.testing.assert_close(module(wide, target, wide_positions, lengths), u)


@pytest.mark.parametrize("name", MODULES)
def test_length_zero_gives_zeros(name):
    module = make_module(name)
    behaviors, target, positions, lengths = make_inputs([0, 0])
    behaviors = torch.full_like(behaviors, float("nan")).requires_grad_(True)
    positions = torch.zeros_like(positions)
    u, w = module(behaviors, target, positions, lengths, return_attention=True)
    assert u.shape == (2, D) and w.shape == (2, 5)
    assert (u == 0).all() and (w == 0).all()
    u.sum().backward()
    assert (behaviors.grad == 0).all()
    empty = module(behaviors[:0], target[:0], positions[:0], lengths[:0])
    assert empty.shape == (0, D)


@pytest.mark.parametrize("name", MODULES)
def test_gradcheck_float64(name):
    module = make_module(name, torch.float64)
    behaviors, target, positions, lengths = make_inputs([3, 1, 0], L=3, dtype=torch.float64)
    behaviors.requires_grad_(True)
    target.requires_grad_(True)

    def run(b, t):
        return module(b, t, positions, lengths, return_attention=True)

    assert torch.autograd.gradcheck(run, (behaviors, target))


def test_gradcheck_dice_in_eval_with_trained_statistics():
    module = make_module("din", torch.float64)
    behaviors, target, positions, lengths = make_inputs([3, 2], L=3, dtype=torch.float64)
    module(behaviors, target, positions, lengths)
    module.eval()
    behaviors.requires_grad_(True)
    target.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b, t: module(b, t, positions, lengths),
                                    (behaviors, target))


@pytest.mark.parametrize("name", ["mean", "din", "sasrec"])
def test_torch_compile_fullgraph(name):
    torch._dynamo.reset()
    eager, compiled_copy = make_module(name), make_module(name)
    behaviors, target, positions, lengths = make_inputs([5, 2, 0])
    behaviors, positions = fill_padding(behaviors, positions, lengths, float("nan"))
    compiled = torch.compile(compiled_copy, fullgraph=True, backend=BACKEND)
    outputs = []
    for module in (eager, compiled):
        b = behaviors.clone().requires_grad_(True)
        u, w = module(b, target, positions, lengths, return_attention=True)
        u.sum().backward()
        outputs.append((u, w, b.grad))
    for expected, actual in zip(*outputs):
        torch.testing.assert_close(actual, expected)
    for expected, actual in zip(eager.state_dict().values(), compiled_copy.state_dict().values()):
        torch.testing.assert_close(actual, expected)  # Dice's running statistics too


# --------------------------------------------------------------------------------------------
# SelfAttentionTarget


def test_self_attention_is_causal_towards_older_steps():
    """Changing step k's behaviour leaves the output of every older step (larger position)
    unchanged and reaches step k and the more recent ones."""
    module = make_module("sasrec", torch.float64)
    behaviors, target, positions, lengths = make_inputs([5, 4], dtype=torch.float64)
    encoded = module.encode(behaviors, positions, lengths)  # (B, L, D)
    for k in range(4):
        changed = behaviors.clone()
        changed[:, k] += torch.randn(2, D, dtype=torch.float64)
        after = module.encode(changed, positions, lengths)
        for b in range(2):
            n = int(lengths[b])
            older = positions[b, :n] > positions[b, k]
            torch.testing.assert_close(after[b, :n][older], encoded[b, :n][older], rtol=0,
                                       atol=1e-12)
            assert (after[b, :n][~older] - encoded[b, :n][~older]).abs().amax(-1).min() > 1e-6
    assert (encoded[1, 4] == 0).all()  # padding row


def test_self_attention_does_not_depend_on_storage_order():
    """Most recent first or oldest first (the data layer's order): the same u and weights."""
    module = make_module("sasrec", torch.float64)
    behaviors, target, positions, lengths = make_inputs([5, 3], dtype=torch.float64)
    u, w = module(behaviors, target, positions, lengths, return_attention=True)
    flipped_b, flipped_p, flipped_w = behaviors.clone(), positions.clone(), torch.zeros_like(w)
    for b in range(2):
        n = int(lengths[b])
        flipped_b[b, :n], flipped_p[b, :n] = behaviors[b, :n].flip(0), positions[b, :n].flip(0)
    u2, w2 = module(flipped_b, target, flipped_p, lengths, return_attention=True)
    for b in range(2):
        n = int(lengths[b])
        flipped_w[b, :n] = w2[b, :n].flip(0)
    torch.testing.assert_close(u2, u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flipped_w, w, rtol=1e-12, atol=1e-12)


def test_self_attention_target_attention_formula():
    module = make_module("sasrec", torch.float64)
    behaviors, target, positions, lengths = make_inputs([5, 3], dtype=torch.float64)
    positions = torch.tensor([[1, 2, 2, 5, 6], [1, 3, 4, 1, 1]])  # e.g. time buckets
    encoded = module.encode(behaviors, positions, lengths)
    u, w = module(behaviors, target, positions, lengths, return_attention=True)
    torch.testing.assert_close(module(behaviors, target, positions.int(), lengths.int()), u)
    for b in range(2):
        n = int(lengths[b])
        scores = encoded[b, :n] @ target[b] / math.sqrt(D)
        torch.testing.assert_close(w[b, :n], torch.softmax(scores, 0))
        assert (w[b, n:] == 0).all()
        torch.testing.assert_close(u[b], w[b, :n] @ encoded[b, :n])
    # the encoder embeds the positions it is given
    other = module(behaviors, target, positions.clamp(max=2), lengths)
    assert not torch.allclose(other[0], u[0])


def test_self_attention_without_layers_and_with_dropout():
    module = SelfAttentionTarget(D, P, num_layers=0)
    behaviors, target, positions, lengths = make_inputs([5, 2])
    expected = module.final_norm(behaviors + module.position_embedding(positions))
    mask = (torch.arange(5) < lengths[:, None])[..., None]
    torch.testing.assert_close(module.encode(behaviors, positions, lengths), expected * mask)
    module = SelfAttentionTarget(D, P, num_heads=4, num_layers=1, dropout=0.5).train()
    behaviors, positions = fill_padding(behaviors, positions, lengths, float("nan"))
    assert torch.isfinite(module(behaviors, target, positions, lengths)).all()


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("name", MODULES)
def test_bad_inputs_name_the_argument(name):
    module = make_module(name)
    behaviors, target, positions, lengths = make_inputs([5, 2])
    cases = [
        ((behaviors[0], target, positions, lengths), ValueError, "behaviors"),
        ((behaviors.long(), target, positions, lengths), TypeError, "behaviors"),
        ((behaviors, target[:1], positions, lengths), ValueError, "target"),
        ((behaviors, target.double(), positions, lengths), TypeError, "target"),
        ((behaviors, target, positions[:, :3], lengths), ValueError, "positions"),
        ((behaviors, target, positions.float(), lengths), TypeError, "positions"),
        ((behaviors, target, positions, lengths.float()), TypeError, "lengths"),
        ((behaviors, target, positions, lengths[:1]), ValueError, "lengths"),
        ((behaviors, target, positions, torch.tensor([6, 2])), ValueError, r"lengths\[0\] = 6"),
        ((behaviors, target, positions, torch.tensor([5, -1])), ValueError, r"lengths\[1\] = -1"),
    ]
    if name != "mean":
        wide = torch.randn(2, 5, D + 1)
        cases.append(((wide, torch.randn(2, D + 1), positions, lengths), ValueError, "D=4"))
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            module(*args)


def test_positions_are_checked_at_valid_steps_only():
    module = make_module("sasrec")
    behaviors, target, positions, lengths = make_inputs([5, 2])
    for bad in (0, P + 1, -3):
        wrong = positions.clone()
        wrong[1, 1] = bad
        with pytest.raises(IndexError, match=rf"positions\[1, 1\] = {bad}"):
            module(behaviors, target, wrong, lengths)
    ok = positions.clone()
    ok[1, 2:] = P + 100  # padding: never read
    module(behaviors, target, ok, lengths)
    with pytest.raises(TypeError, match="positions"):
        module(behaviors, target, None, lengths)
    with pytest.raises(IndexError, match="positions"):
        module.encode(behaviors, positions.clamp(max=P) * 2, lengths)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="activation"):
        DINAttention(D, activation="sigmoid")
    with pytest.raises(ValueError, match="hidden"):
        DINAttention(D, hidden=(4, 0))
    with pytest.raises(ValueError, match="num_heads"):
        SelfAttentionTarget(D, P, num_heads=3)
    with pytest.raises(ValueError, match="max_position"):
        SelfAttentionTarget(D, 0)
    with pytest.raises(ValueError, match="dropout"):
        SelfAttentionTarget(D, P, dropout=1.0)
