"""Behaviour-target correlation: the count-based MI (independent -> 0, a perfect predictor ->
the label entropy, equal to a per-row loop, the synthetic world's planted same-category row);
the learned maps of TIM (equal to a float64 hand computation, proportional to the model's own
attention), DIN, SASRec-style and mean pooling; the similarity score; the figure; errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hmoe.analysis import (
    ground_truth_mi, learned_correlation, min_max, plot_correlation_maps, sequence_encoder,
    similarity,
)
from hmoe.analysis._common import figure_png
from hmoe.data.batches import to_tensors
from hmoe.data.synthetic import SyntheticConfig, generate

from .conftest import TINY_WORLD

SEQUENCE = "hist_categories"  # item ad_category: category ids 1..16


def _ranked(rng, n: int, steps: int, num_categories: int):
    """Random category sequences with rank positions 1..length (most recent first)."""
    lengths = rng.integers(0, steps + 1, size=n)
    valid = np.arange(steps)[None, :] < lengths[:, None]
    categories = np.where(valid, rng.integers(1, num_categories + 1, size=(n, steps)), 0)
    positions = np.where(valid, np.arange(1, steps + 1)[None, :], 0)
    return categories, positions, lengths


def _entropy(p: float) -> float:
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def test_mi_of_an_independent_category_and_label_is_zero():
    rng = np.random.default_rng(0)
    categories, positions, lengths = _ranked(rng, 40_000, 5, 4)
    labels = (rng.random(40_000) < 0.3).astype(np.float32)
    mi = ground_truth_mi(categories, positions, lengths, labels, np.ones(40_000, int), 1, 4, 5)
    assert mi.shape == (4, 5) and mi.dtype == np.float64
    assert np.all(mi > -1e-9) and mi.max() < 5e-4  # vs H(Y) = 0.88 bits


def test_mi_of_a_perfect_predictor_is_the_label_entropy():
    rng = np.random.default_rng(1)
    n = 5000
    categories, positions, lengths = _ranked(rng, n, 6, 5)
    lengths = np.maximum(lengths, 1)  # every row has a most recent behaviour
    positions = np.where(np.arange(6)[None, :] < lengths[:, None], np.arange(1, 7), 0)
    labels = (rng.random(n) < 0.3).astype(np.float64)
    categories[:, 0] = np.where(labels == 1, 3, 5)  # position 1: category 3 iff positive
    categories[:, 1:] = np.where(categories[:, 1:] == 3, 2, categories[:, 1:])
    targets = np.full(n, 2)
    targets[:100] = 4  # rows of another target are not counted: their labels flip
    labels[:100] = 1 - labels[:100]
    mi = ground_truth_mi(categories, positions, lengths, labels, targets, 2, 5, 6)
    entropy = _entropy(labels[100:].mean())
    assert mi[2, 0] == pytest.approx(entropy, abs=1e-4)  # category 3 at position 1
    assert mi[4, 0] == pytest.approx(entropy, abs=1e-4)  # its complement (category 5) too
    assert np.delete(mi.ravel(), [2 * 6, 4 * 6]).max() < 0.05


def _mi_loop(categories, positions, lengths, labels, targets, target, C, P):
    """The definition of notes 6.1, one row at a time."""
    x_p, x_n = np.zeros((C, P)), np.zeros((C, P))
    t_p = t_n = 0
    for row in range(len(targets)):
        if targets[row] != target:
            continue
        t_p, t_n = t_p + labels[row], t_n + (1 - labels[row])
        cells = {(c, p) for c, p in zip(categories[row, :lengths[row]],
                                        positions[row, :lengths[row]])
                 if 1 <= c <= C and p <= P}
        for c, p in cells:
            (x_p if labels[row] else x_n)[c - 1, p - 1] += 1
    s = t_p + t_n

    def term(n, row_total, column_total):
        n, row_total, column_total = (np.where(v == 0, 1e-5, v).astype(float)
                                      for v in np.broadcast_arrays(n, row_total, column_total))
        return n / s * np.log2(n * s / (row_total * column_total))

    shown = x_p + x_n
    return (term(x_p, shown, t_p) + term(x_n, shown, t_n)
            + term(t_p - x_p, s - shown, t_p) + term(t_n - x_n, s - shown, t_n))


def test_mi_counts_equal_a_per_row_loop_with_tied_positions_and_cells_off_the_grid():
    rng = np.random.default_rng(2)
    n, steps = 600, 7
    lengths = rng.integers(0, steps + 1, size=n)
    valid = np.arange(steps)[None, :] < lengths[:, None]
    categories = np.where(valid, rng.integers(0, 7, size=(n, steps)), 0)  # 0 and 6 off grid
    positions = np.where(valid, np.sort(rng.integers(1, 6, size=(n, steps)), axis=1), 0)  # ties
    labels = (rng.random(n) < 0.4).astype(int)
    targets = rng.integers(1, 3, size=n)
    mi = ground_truth_mi(categories, positions, lengths, labels, targets, 1, 5, 4)
    expected = _mi_loop(categories, positions, lengths, labels, targets, 1, 5, 4)
    np.testing.assert_allclose(mi, expected, rtol=1e-12, atol=1e-15)


def test_mi_on_the_world_finds_the_planted_same_category_row():
    world = generate(SyntheticConfig(**{**TINY_WORLD, "sequence_weight": 3.0}))
    columns, schema = world.splits["train"], world.schema
    targets = columns["categorical"][:, schema.categorical_index("ad_category")]
    target = int(np.bincount(targets).argmax())
    key = f"seq/{SEQUENCE}"
    mi = ground_truth_mi(columns[key], columns[f"{key}/positions"], columns[f"{key}/lengths"],
                         columns["labels"][:, 0], targets, target, 16, 10)
    assert int(mi.sum(axis=1).argmax()) + 1 == target
    planted = world.ground_truth.correlation_map(target)[:, :10]
    assert similarity(mi, np.abs(planted)) > 0.15


@pytest.mark.parametrize("change, error, match", [
    ({"positions": np.ones((4, 2), int)}, ValueError, "positions must have the shape"),
    ({"categories": np.ones((4, 3))}, TypeError, "categories must hold integers"),
    ({"labels": np.full(4, 2.0)}, ValueError, "labels must be 0 or 1"),
    ({"lengths": np.full(4, 9)}, ValueError, "lengths must lie in"),
    ({"targets": np.ones(3, int)}, ValueError, "targets must have shape"),
    ({"target_category": 7}, ValueError, "target_category: no row has target 7"),
    ({"num_categories": 0}, ValueError, "num_categories must be an int >= 1"),
    ({"positions": np.zeros((4, 3), int)}, ValueError, "positions must be >= 1"),
])
def test_mi_bad_inputs_raise(change, error, match):
    arguments = dict(categories=np.ones((4, 3), int), positions=np.tile([1, 2, 3], (4, 1)),
                     lengths=np.full(4, 3), labels=np.array([0, 1, 0, 1.0]),
                     targets=np.ones(4, int), target_category=1, num_categories=3,
                     max_position=3)
    with pytest.raises(error, match=match):
        ground_truth_mi(**{**arguments, **change})


# --------------------------------------------------------------------------------------------
# Learned correlation


def _item_rows(model, set_name: str, field: str = "ad_category") -> np.ndarray:
    """Set ``set_name``'s rows of ``field`` straight from the fused weight, float64."""
    schema = model.schema
    starts = np.cumsum([0] + [f.vocab_size for f in schema.categorical])
    index = schema.categorical_index(field)
    group, plane = model.set_location[set_name]
    weight = model.groups[group].categorical.weight.detach().double()[:, plane]
    return weight[starts[index]:starts[index + 1]].numpy()


def _spread(model, seed: int = 0) -> None:
    """Larger random weights than the init, so the maps vary visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "categorical.weight" in name or "position_embedding" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("set_name, plane", [("shared", 0), ("task_click", 1)])
def test_tim_map_equals_a_float64_hand_computation(make_model, set_name, plane):
    model = make_model()
    _spread(model)
    learned = learned_correlation(model, SEQUENCE, set_name, 5)
    assert learned.shape == (16, 10) and np.isfinite(learned).all()
    E = _item_rows(model, set_name)  # (17, 8), row = category id
    P = model.groups[0].sequences[1][plane].position_embedding.detach().double().numpy()
    expected = np.empty((16, 10))
    for c in range(1, 17):
        for p in range(1, 11):
            e, v = E[c] + P[p], E[5] + P[0]
            expected[c - 1, p - 1] = math.exp(float(e @ v) / math.sqrt(8)) * \
                float(np.linalg.norm(e * v))
    np.testing.assert_allclose(learned, expected, rtol=1e-12)


def test_tim_map_with_heads_averages_the_heads(make_model):
    model = make_model(num_heads=2)
    _spread(model, seed=1)
    learned = learned_correlation(model, SEQUENCE, "shared", 2, num_categories=4,
                                  max_position=3)
    E = _item_rows(model, "shared")
    P = sequence_encoder(model, SEQUENCE, "shared").position_embedding.detach().double().numpy()
    for c, p in [(1, 1), (4, 3), (2, 2)]:
        e, v = E[c] + P[p], E[2] + P[0]
        heads = [math.exp(float(e[h * 4:(h + 1) * 4] @ v[h * 4:(h + 1) * 4]) / 2.0)
                 for h in range(2)]
        assert learned[c - 1, p - 1] == pytest.approx(np.mean(heads) * np.linalg.norm(e * v),
                                                      rel=1e-12)


def test_tim_map_is_proportional_to_the_models_own_attention(world, make_model):
    model = make_model()
    _spread(model, seed=2)
    columns = world.splits["test"]
    row = int(np.argmax(columns[f"seq/{SEQUENCE}/lengths"]))  # a full sequence
    batch = to_tensors({k: v[row:row + 1] for k, v in columns.items()})
    alpha = model(batch, return_attention=True)["attention"][f"{SEQUENCE}/shared"][0, 0]  # (L,)
    target = int(batch["categorical"][0, world.schema.categorical_index("ad_category")])
    learned = learned_correlation(model, SEQUENCE, "shared", target)
    E = _item_rows(model, "shared")
    P = sequence_encoder(model, SEQUENCE, "shared").position_embedding.detach().double().numpy()
    length = int(batch[f"seq/{SEQUENCE}/lengths"][0])
    categories = batch[f"seq/{SEQUENCE}"][0, :length].numpy()
    positions = batch[f"seq/{SEQUENCE}/positions"][0, :length].numpy()
    norms = np.linalg.norm((E[categories] + P[positions]) * (E[target] + P[0]), axis=1)
    weight = learned[categories - 1, positions - 1] / norms  # exp(logit) of each step
    np.testing.assert_allclose(alpha[:length].double().numpy(), weight / weight.sum(),
                               rtol=1e-4, atol=1e-6)


def test_tim_gauss_softmax_sums_to_one_over_the_grid(make_model):
    model = make_model()
    _spread(model)
    learned = learned_correlation(model, SEQUENCE, "shared", 3, gauss_softmax=True)
    E = _item_rows(model, "shared")
    P = sequence_encoder(model, SEQUENCE, "shared").position_embedding.detach().double().numpy()
    norms = np.linalg.norm((E[1:, None] + P[None, 1:]) * (E[3] + P[0]), axis=-1)  # (16, 10)
    assert (learned / norms).sum() == pytest.approx(1.0, rel=1e-12)


def test_tim_without_temporal_encoding_is_constant_over_positions(make_model):
    learned = learned_correlation(make_model(encoder="tim_no_temporal"), SEQUENCE, "shared", 3)
    np.testing.assert_allclose(learned, learned[:, :1].repeat(10, axis=1), rtol=1e-12)


def test_din_map_is_the_activation_weight_times_the_behaviour_norm(make_model):
    model = make_model(encoder="din")
    _spread(model)
    din = sequence_encoder(model, SEQUENCE, "task_click")
    din.train()
    learned = learned_correlation(model, SEQUENCE, "task_click", 4, max_position=5)
    assert din.training and next(din.parameters()).dtype == torch.float32  # left untouched
    assert learned.shape == (16, 5)
    E = torch.from_numpy(_item_rows(model, "task_click")).float()
    din.eval()
    with torch.no_grad():
        score = din.scores(E[None, 1:], E[None, 4], torch.ones(1, 16, dtype=torch.bool))[0]
    expected = (score.abs() * E[1:].norm(dim=1)).double().numpy()
    np.testing.assert_allclose(learned, expected[:, None].repeat(5, axis=1), rtol=1e-5)


def test_sasrec_map_reads_a_one_step_sequence(make_model):
    model = make_model(encoder="sasrec")
    _spread(model)
    learned = learned_correlation(model, SEQUENCE, "shared", 6)
    assert learned.shape == (16, 10) and np.isfinite(learned).all() and (learned > 0).all()
    assert np.ptp(learned, axis=1).max() > 0  # positions matter
    encoder = sequence_encoder(model, SEQUENCE, "shared").eval()
    E = torch.from_numpy(_item_rows(model, "shared")).float()
    with torch.no_grad():
        h = encoder.encode(E[None, None, 2], torch.tensor([[4]]), torch.tensor([1]))[0, 0]
    expected = math.exp(float(h @ E[6]) / math.sqrt(8)) * float(h.norm())
    assert learned[1, 3] == pytest.approx(expected, rel=1e-5)


def test_mean_pooling_map_is_the_behaviour_norm(make_model):
    model = make_model(encoder="mean")
    learned = learned_correlation(model, SEQUENCE, "shared", 6, max_position=2)
    norms = np.linalg.norm(_item_rows(model, "shared")[1:], axis=1)
    np.testing.assert_allclose(learned, np.stack([norms, norms], axis=1), rtol=1e-12)


def test_learned_correlation_bad_inputs_raise(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="sequence_name: unknown sequence feature 'nope'"):
        learned_correlation(model, "nope", "shared", 1)
    with pytest.raises(ValueError, match="set_name: unknown embedding set"):
        learned_correlation(model, SEQUENCE, "nope", 1)
    with pytest.raises(ValueError, match="target_category must be an item id in"):
        learned_correlation(model, SEQUENCE, "shared", 17)
    with pytest.raises(ValueError, match="max_position must be <= 10"):
        learned_correlation(model, SEQUENCE, "shared", 1, max_position=11)
    with pytest.raises(ValueError, match="num_categories must be <= 16"):
        learned_correlation(model, SEQUENCE, "shared", 1, num_categories=17)
    with pytest.raises(ValueError, match="gauss_softmax applies to TIM"):
        learned_correlation(make_model(encoder="din"), SEQUENCE, "shared", 1,
                            gauss_softmax=True)
    with pytest.raises(TypeError, match="model must be an hmoe.models.HMoE"):
        learned_correlation("model", SEQUENCE, "shared", 1)


# --------------------------------------------------------------------------------------------
# Similarity and the figure


def test_similarity_scores_order_and_values():
    rng = np.random.default_rng(3)
    truth = rng.random((4, 5))
    assert similarity(truth, truth) == pytest.approx(1.0)
    assert similarity(-truth, truth) == pytest.approx(-1.0)
    assert similarity(np.exp(5 * truth), truth) == pytest.approx(1.0)  # monotone: ranks only
    assert similarity(np.exp(5 * truth), truth, "pearson") < 0.99
    assert similarity(3 * truth + 1, truth, "pearson") == pytest.approx(1.0)
    assert similarity([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share their rank
    assert math.isnan(similarity(np.ones((2, 2)), truth[:2, :2]))
    with pytest.raises(ValueError, match="one shape"):
        similarity(truth, truth.T)
    with pytest.raises(ValueError, match="method must be"):
        similarity(truth, truth, "kendall")
    with pytest.raises(ValueError, match="learned holds NaN"):
        similarity(np.full((2, 2), np.nan), truth[:2, :2])


def test_min_max_and_the_figure():
    maps = {"truth": np.arange(12.0).reshape(3, 4), "learned": np.ones((3, 4))}
    assert min_max(maps["truth"]).min() == 0 and min_max(maps["truth"]).max() == 1
    assert np.all(min_max(maps["learned"]) == 0)
    png = figure_png(plot_correlation_maps(maps, target_category=2))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    with pytest.raises(TypeError, match="maps must be a non-empty dict"):
        plot_correlation_maps({})
    with pytest.raises(ValueError, match=r"maps\['x'\] must have 2 dimension"):
        plot_correlation_maps({"x": np.ones(3)})
