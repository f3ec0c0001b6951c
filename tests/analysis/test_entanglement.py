"""Interest entanglement: pair distances (by hand), the three definitions of contradictory
pairs, per-set distances of a model, their summary and histogram; task-gradient cosines
(identical 1, opposite -1, orthogonal 0, zero gradients NaN, on a model's shared set slices)
and the recorder's history, jsonl round trip and curve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmoe.analysis import (
    GradientCosineRecorder, distance_contradictions, entanglement_distances,
    entanglement_summary, interest_conflicts, label_contradictions, pair_distances,
    plot_distance_histograms, plot_gradient_cosine, task_gradient_cosine,
)
from hmoe.analysis._common import figure_png
from hmoe.data.batches import to_tensors

PNG = b"\x89PNG\r\n\x1a\n"


def test_pair_distances_are_euclidean():
    users = np.array([[0.0, 0.0], [1.0, 1.0]])
    items = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 1.0]])
    distances = pair_distances(users, items, [[0, 0], [1, 1], [1, 2], [0, 2]])
    np.testing.assert_allclose(distances, [5.0, 0.0, 1.0, 1.0])
    assert distances.dtype == np.float64


@pytest.mark.parametrize("users, items, pairs, error, match", [
    (np.ones((2, 3)), np.ones((2, 2)), [[0, 0]], ValueError, "one width D"),
    (np.ones((2, 2)), np.ones((2, 2)), [[0, 0, 0]], ValueError, r"pairs must be \(M, 2\)"),
    (np.ones((2, 2)), np.ones((2, 2)), [[0, 2]], ValueError, r"pairs\[:, 1\]: item ids"),
    (np.ones((2, 2)), np.ones((2, 2)), [[-1, 0]], ValueError, r"pairs\[:, 0\]: user ids"),
    (np.ones((2, 2)), np.ones((2, 2)), [[0.5, 0.0]], TypeError, "pairs must hold integers"),
    (np.ones(2), np.ones((2, 2)), [[0, 0]], ValueError, "user_emb must have 2 dimension"),
])
def test_pair_distances_bad_inputs(users, items, pairs, error, match):
    with pytest.raises(error, match=match):
        pair_distances(users, items, pairs)


def test_label_contradictions_are_disagreeing_labels(world):
    columns = {"labels": np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]], np.float32)}
    mask = label_contradictions(columns, world.schema, "click", "conversion")
    assert mask.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="task_b: 'buy' is not a label"):
        label_contradictions(columns, world.schema, "click", "buy")
    with pytest.raises(ValueError, match="columns has no 'labels'"):
        label_contradictions({}, world.schema, "click", "like")


def test_interest_conflicts_match_a_loop_over_rows(world):
    columns, truth = world.splits["test"], world.ground_truth
    mask = interest_conflicts(columns, world.schema, truth)
    user_index = world.schema.categorical_index("user_id")
    category_index = world.schema.categorical_index("ad_category")
    for row in range(0, 300, 7):
        user = columns["categorical"][row, user_index]
        category = columns["categorical"][row, category_index]
        browse = category in truth.user_interests[user]
        purchase = category == truth.user_purchase_category[user]
        assert mask[row] == (browse != purchase)
    assert 0.05 < mask.mean() < 0.95
    with pytest.raises(TypeError, match="user_interests"):
        interest_conflicts(columns, world.schema, object())
    with pytest.raises(ValueError, match="user_field: 'nope' is not a categorical feature"):
        interest_conflicts(columns, world.schema, truth, user_field="nope")


def test_distance_contradictions_take_far_for_one_and_near_for_the_other():
    far = np.arange(10.0)  # > 60th percentile: 6..9
    near = np.array([0, 9, 8, 7, 6, 5, 4, 3, 0, 1.0])  # <= 40th percentile: values <= 3.4
    assert np.nonzero(distance_contradictions(far, near))[0].tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="one M"):
        distance_contradictions(far, near[:3])
    with pytest.raises(ValueError, match="percentiles"):
        distance_contradictions(far, near, high=160)


def test_entanglement_distances_per_set(world, make_model):
    model = make_model()
    columns = {k: v[:200] for k, v in world.splits["test"].items()}
    mask = label_contradictions(columns, world.schema, "click", "conversion")
    distances = entanglement_distances(model, columns, mask)
    assert list(distances) == ["shared", "task_click", "task_conversion"]
    schema = world.schema
    starts = np.cumsum([0] + [f.vocab_size for f in schema.categorical])
    u, i = schema.categorical_index("user_id"), schema.categorical_index("ad_id")
    table = model.embedding_table("task_conversion").detach().double().numpy()
    ids = columns["categorical"]
    expected = np.linalg.norm(table[starts[u] + ids[:, u]] - table[starts[i] + ids[:, i]], axis=1)
    np.testing.assert_allclose(distances["task_conversion"]["all"], expected, rtol=1e-12)
    np.testing.assert_array_equal(distances["task_conversion"]["contradictory"], expected[mask])
    summary = entanglement_summary(distances)
    part = summary["shared"]
    assert part["all"]["count"] == 200 and part["contradictory"]["count"] == mask.sum()
    assert part["mean_ratio"] == pytest.approx(part["contradictory"]["mean"] / part["all"]["mean"])
    assert 0 <= part["contradictory_percentile"] <= 100
    png = figure_png(plot_distance_histograms(distances))
    assert png.startswith(PNG) and len(png) > 5000
    with pytest.raises(ValueError, match=r"contradictory must be a \(N,\) = \(200,\) bool"):
        entanglement_distances(model, columns, mask[:10])
    with pytest.raises(ValueError, match="item_field: 'nope'"):
        entanglement_distances(model, columns, mask, item_field="nope")


def test_summary_of_an_empty_contradictory_set_is_nan():
    summary = entanglement_summary({"t": {"all": np.ones(3), "contradictory": np.ones(0)}})
    assert summary["t"]["contradictory"]["count"] == 0
    assert math.isnan(summary["t"]["mean_ratio"]) and math.isnan(
        summary["t"]["contradictory_percentile"])


# --------------------------------------------------------------------------------------------
# Task gradients


def test_identical_opposite_and_orthogonal_gradients():
    w = torch.randn(5, requires_grad=True)
    x, y = torch.randn(5), torch.randn(5)
    y = y - (y @ x) / (x @ x) * x  # orthogonal to x
    losses = {"a": w @ x, "b": 2.0 * (w @ x), "c": -(w @ x), "d": w @ y}
    cosines = task_gradient_cosine(losses, [w])
    assert cosines[("a", "b")] == pytest.approx(1.0)
    assert cosines[("a", "c")] == pytest.approx(-1.0)
    assert cosines[("a", "d")] == pytest.approx(0.0, abs=1e-7)
    assert list(cosines) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"),
                             ("c", "d")]
    (losses["a"] + losses["b"]).backward()  # the graph was retained for the caller
    assert w.grad is not None


def test_zero_gradients_give_nan_not_an_error():
    w, other = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    losses = {"a": w.sum(), "b": other.sum(), "c": torch.tensor(1.0), "d": (w * 0).sum()}
    cosines = task_gradient_cosine(losses, [w])
    assert all(math.isnan(cosines[pair]) for pair in [("a", "b"), ("a", "c"), ("a", "d")])


def _task_losses(model, world):
    batch = to_tensors({k: v[:64] for k, v in world.splits["train"].items()})
    logits = model(batch)["logits"]
    labels = batch["labels"]
    return {t: F.binary_cross_entropy_with_logits(logits[t], labels[:, world.schema.task_index(t)])
            for t in model.tasks}


def test_cosine_on_a_models_shared_set_slices_matches_the_plain_gradients(world, make_model):
    model = make_model()
    slices = list(model.set_parameters("shared").values())
    losses = _task_losses(model, world)
    cosine = task_gradient_cosine(losses, slices)[("click", "conversion")]
    flat = []
    for task in ("click", "conversion"):
        grads = torch.autograd.grad(losses[task], [s.parameter for s in slices],
                                    retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(s.of(g) if g is not None else torch.zeros_like(s.of(
            s.parameter))).reshape(-1) for s, g in zip(slices, grads)]).double())
    expected = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    assert cosine == pytest.approx(expected, rel=1e-9)
    assert -1.0 <= cosine <= 1.0


@pytest.mark.parametrize("losses, params, error, match", [
    ({"a": torch.tensor(1.0)}, None, TypeError, ">= 2 tasks"),
    ({"a": torch.ones(2), "b": torch.tensor(1.0)}, None, TypeError, r"losses\['a'\] must be a sc"),
    (None, [], ValueError, "params is empty"),
    (None, [torch.ones(2)], ValueError, r"params\[0\] does not require grad"),
    (None, ["w"], TypeError, r"params\[0\] must be a tensor"),
    (None, torch.ones(2, requires_grad=True), TypeError, "params must be a list"),
])
def test_gradient_cosine_bad_inputs(losses, params, error, match):
    w = torch.ones(2, requires_grad=True)
    losses = losses if losses is not None else {"a": w.sum(), "b": w.sum()}
    with pytest.raises(error, match=match):
        task_gradient_cosine(losses, params if params is not None else [w])


def test_recorder_history_jsonl_round_trip_and_curve(tmp_path):
    w = torch.randn(4, requires_grad=True)
    recorder = GradientCosineRecorder(every=2)
    for step in range(6):
        losses = {"click": w.sum() * (1 + step), "conversion": -w.sum(), "like": w.sum() * 0}
        recorder.record(step, losses, [w])
    assert [r["step"] for r in recorder.history] == [0, 2, 4]
    record = recorder.history[0]["cosine"]
    assert record["click|conversion"] == pytest.approx(-1.0)
    assert math.isnan(record["click|like"])
    path = recorder.to_jsonl(tmp_path / "cosines.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["kind"] == "grad_cosine" and lines[0]["cosine"]["click|like"] is None
    back = GradientCosineRecorder.from_jsonl(path)
    assert [r["step"] for r in back.history] == [0, 2, 4]
    assert back.history[1]["cosine"]["click|conversion"] == pytest.approx(-1.0)
    assert math.isnan(back.history[1]["cosine"]["click|like"])
    png = figure_png(plot_gradient_cosine(back))
    assert png.startswith(PNG) and len(png) > 5000


def test_recorder_reads_a_trainers_metrics_records():
    records = [{"kind": "train", "step": 1, "loss": 0.5},
               {"kind": "grad_cosine", "step": 10, "epoch": 0, "cosine": {"a|b": 0.25}},
               {"kind": "grad_cosine", "step": 20, "epoch": 0, "cosine": {"a|b": None}}]
    recorder = GradientCosineRecorder.from_records(records)
    steps, values = recorder.series()["a|b"]
    assert steps == [10, 20] and values[0] == 0.25 and math.isnan(values[1])
    with pytest.raises(ValueError, match=r"records\[0\] must have 'step'"):
        GradientCosineRecorder.from_records([{"kind": "grad_cosine"}])
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        GradientCosineRecorder(every=0)
    with pytest.raises(ValueError, match="no gradient-cosine record"):
        plot_gradient_cosine([])
