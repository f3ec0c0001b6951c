"""hmoe.nn.gates: SoftmaxGate, MeanGate, LearnedWeightGate, mix and stack_experts."""

import pytest
import torch

from hmoe.nn.gates import LearnedWeightGate, MeanGate, SoftmaxGate, mix, stack_experts

B, E, H, I = 5, 3, 4, 7  # batch, experts, expert width, gate input width
BACKEND = "aot_eager"  # traces the full graph in seconds on CPU (as tests/nn/test_experts.py)


def make_experts(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, E, H, generator=generator, dtype=dtype)


def make_gate(name):
    torch.manual_seed(0)
    if name == "softmax":
        return SoftmaxGate(I, E)
    if name == "softmax_hidden":
        return SoftmaxGate(I, E, hidden=(6, 5))
    if name == "mean":
        return MeanGate(E)
    return LearnedWeightGate(E)


GATES = ["softmax", "softmax_hidden", "mean", "weights"]


def test_mix_is_the_weighted_sum_of_experts():
    experts = make_experts()
    weights = torch.rand(B, E, dtype=torch.float64)
    expected = sum(weights[:, e, None] * experts[:, e] for e in range(E))
    torch.testing.assert_close(mix(weights, experts), expected)


@pytest.mark.parametrize("name", ["softmax", "softmax_hidden"])
def test_softmax_gate_weights_are_a_distribution_and_mix_the_experts(name):
    gate = make_gate(name).double()
    experts, x = make_experts(), torch.randn(B, I, dtype=torch.float64)
    mixed, weights = gate(experts, x)
    assert weights.shape == (B, E) and mixed.shape == (B, H)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(B, dtype=torch.float64))
    torch.testing.assert_close(weights, torch.softmax(gate.output(gate.mlp(x)), -1))
    torch.testing.assert_close(mixed, mix(weights, experts))
    # the weights depend on the sample
    assert not torch.allclose(weights[0], weights[1])


def test_mean_gate_is_the_plain_mean():
    experts = make_experts()
    mixed, weights = MeanGate(E)(experts)
    torch.testing.assert_close(weights, torch.full((B, E), 1 / E, dtype=torch.float64))
    torch.testing.assert_close(mixed, experts.mean(1))


def test_learned_weights_start_at_the_mean_and_train():
    gate = LearnedWeightGate(E).double()
    experts = make_experts()
    mixed, weights = gate(experts)
    torch.testing.assert_close(mixed, experts.mean(1))
    assert weights.shape == (B, E)
    mixed.sum().backward()
    torch.testing.assert_close(gate.weight.grad, experts.sum((0, 2)))  # ∂Σ o / ∂w_e = Σ h_e


def test_stack_experts_stop_gradient_is_exact_and_forward_unchanged():
    outputs = [torch.randn(B, H, dtype=torch.float64, requires_grad=True) for _ in range(E)]
    detach = [False, True, False]
    stacked = stack_experts(outputs, detach)
    assert stacked.shape == (B, E, H)
    torch.testing.assert_close(stacked, torch.stack(outputs, 1))  # forward: SG(h) = h
    (stacked * torch.randn(B, E, H, dtype=torch.float64)).sum().backward()
    assert outputs[1].grad is None  # no gradient reaches a detached expert at all
    assert outputs[0].grad.abs().sum() > 0 and outputs[2].grad.abs().sum() > 0


def test_stack_experts_checks_its_inputs():
    h = torch.randn(B, H)
    with pytest.raises(ValueError, match="one non-zero length"):
        stack_experts([h, h], [False])
    with pytest.raises(ValueError, match="one non-zero length"):
        stack_experts([], [])
    with pytest.raises(ValueError, match=r"\(B, H\) of one shape"):
        stack_experts([h, torch.randn(B, H + 1)], [False, False])


@pytest.mark.parametrize("name", GATES)
def test_gates_check_expert_shapes(name):
    gate = make_gate(name)
    x = torch.randn(B, I)
    with pytest.raises(ValueError, match=r"experts must be \(B, E=3, H\)"):
        gate(torch.randn(B, E + 1, H), x)
    with pytest.raises(ValueError, match=r"experts must be \(B, E=3, H\)"):
        gate(torch.randn(B, H), x)


def test_softmax_gate_checks_its_input_and_sizes():
    with pytest.raises(ValueError, match=r"x must be \(B, I=7\)"):
        SoftmaxGate(I, E)(make_experts(torch.float32), torch.randn(B, I + 1))
    with pytest.raises(ValueError, match="num_experts"):
        SoftmaxGate(I, 0)
    with pytest.raises(ValueError, match="in_dim"):
        SoftmaxGate(0, E)
    with pytest.raises(ValueError, match="num_experts"):
        MeanGate(0)
    with pytest.raises(ValueError, match="num_experts"):
        LearnedWeightGate(0)


@pytest.mark.parametrize("name", GATES)
def test_compile_matches_eager(name):
    gate = make_gate(name)
    experts, x = make_experts(torch.float32), torch.randn(B, I)
    compiled = torch.compile(gate, backend=BACKEND, fullgraph=True)
    for got, want in zip(compiled(experts, x), gate(experts, x)):
        torch.testing.assert_close(got, want)


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(SoftmaxGate(I, E)) == I * E + E
    assert count(SoftmaxGate(I, E, hidden=(6, 5))) == (I * 6 + 6) + (6 * 5 + 5) + (5 * E + E)
    assert count(MeanGate(E)) == 0
    assert count(LearnedWeightGate(E)) == E
