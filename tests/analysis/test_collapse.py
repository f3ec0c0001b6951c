"""Dimensional collapse: planted spectra (r equal singular values give IA = r, a rank-r table
has at most r non-zero values, a Gaussian table N >> D has IA near D), the per-field split of a
model's table, summaries over sets, models and training snapshots, figures, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe.analysis import (
    collapse_summary, compare_collapse, field_spectra, ia_over_training, information_abundance,
    plot_ia_comparison, plot_ia_over_training, plot_spectra_heatmap, singular_spectrum,
)
from hmoe.analysis._common import figure_png
from hmoe.data.schema import CategoricalFeature, Label, Schema
from hmoe.models.presets import preset

PNG = b"\x89PNG\r\n\x1a\n"


def _orthogonal(dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


@pytest.mark.parametrize("normalize_rows", [True, False])
def test_r_equal_singular_values_give_ia_r(normalize_rows):
    r, dim = 3, 8
    basis = np.eye(dim)[np.arange(60) % r]  # (60, 8) unit rows: σ = sqrt(20) three times
    table = basis @ _orthogonal(dim, 0)  # a rotation keeps the spectrum and the row norms
    spectrum = singular_spectrum(table, normalize_rows)
    np.testing.assert_allclose(spectrum, [1, 1, 1, 0, 0, 0, 0, 0], atol=1e-12)
    assert information_abundance(table, normalize_rows) == pytest.approx(r, abs=1e-10)


def test_a_rank_r_table_has_ia_at_most_r():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(500, 2)) @ rng.normal(size=(2, 10))  # rank 2 in D = 10
    spectrum = singular_spectrum(table)
    assert spectrum.dtype == np.float64 and spectrum.shape == (10,)
    assert spectrum[0] == 1.0 and np.all(np.diff(spectrum) <= 0)
    assert np.all(spectrum[2:] < 1e-12)
    assert 1.0 <= information_abundance(table) <= 2.0 + 1e-12


def test_a_gaussian_table_has_ia_near_its_dim():
    dim = 16
    table = np.random.default_rng(2).normal(size=(5000, dim))
    # N >> D: every σ_k ≈ sqrt(N) (1 ± sqrt(D / N)), so IA ≈ D (1 - 2 sqrt(D / N)) ≈ 0.9 D
    assert 0.85 * dim < information_abundance(table) <= dim
    assert 0.85 * dim < information_abundance(table, normalize_rows=False) <= dim


def test_row_normalisation_ignores_row_norms():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(200, 6))
    scaled = table * rng.lognormal(0.0, 2.0, size=(200, 1))  # heavy-tailed norms per row
    np.testing.assert_allclose(singular_spectrum(scaled), singular_spectrum(table), atol=1e-6)
    assert not np.allclose(singular_spectrum(scaled, False), singular_spectrum(table, False))


def test_few_rows_pad_the_spectrum_and_bound_ia():
    table = torch.randn(3, 8)  # a tensor works too; N < D: rank <= 3
    spectrum = singular_spectrum(table)
    assert spectrum.shape == (8,) and np.all(spectrum[3:] == 0)
    assert information_abundance(table) <= 3.0 + 1e-12


def test_an_all_zero_table_has_no_direction():
    assert np.all(singular_spectrum(np.zeros((5, 4))) == 0)
    assert np.isnan(information_abundance(np.zeros((5, 4))))


@pytest.mark.parametrize("table, error, match", [
    (np.ones(4), ValueError, "table must have 2 dimension"),
    (np.ones((0, 4)), ValueError, "non-empty"),
    (np.full((3, 2), np.nan), ValueError, "NaN"),
    ("table", TypeError, "table must be an array"),
    (np.array([["a", "b"]]), TypeError, "table must hold real numbers"),
])
def test_bad_tables_raise(table, error, match):
    with pytest.raises(error, match=match):
        singular_spectrum(table)


def test_field_spectra_split_the_table_by_field_and_sort_by_cardinality(world, make_model):
    model = make_model()
    spectra = field_spectra(model, "task_click")
    vocab = {f.name: f.vocab_size for f in world.schema.categorical}
    assert list(spectra) == sorted(vocab, key=lambda name: vocab[name])
    starts = np.cumsum([0] + [f.vocab_size for f in world.schema.categorical])
    index = world.schema.categorical_index("slot")
    weight = model.groups[0].categorical.weight.detach()[:, 1]  # task_click is plane 1
    rows = weight[starts[index]:starts[index + 1]]
    np.testing.assert_allclose(spectra["slot"], singular_spectrum(rows), atol=1e-12)
    assert all(s.shape == (8,) for s in spectra.values())


def test_fields_of_one_row_are_skipped():
    schema = Schema("tiny", categorical=(CategoricalFeature("constant", vocab_size=1),
                                         CategoricalFeature("item", vocab_size=30),
                                         CategoricalFeature("small", vocab_size=4)),
                    labels=(Label("click"),))
    model = preset("dnn", schema, dim=8, expert_hidden=(8,), tower=())
    assert list(field_spectra(model, "embedding")) == ["small", "item"]


def test_collapse_summary_gives_ia_per_set_and_field(make_model):
    model = make_model()
    summary = collapse_summary(model)
    assert list(summary) == ["shared", "task_click", "task_conversion"]
    spectra = field_spectra(model, "shared")
    assert summary["shared"] == pytest.approx({f: s.sum() for f, s in spectra.items()})
    # device has 4 rows: at most 4 directions
    assert all(1.0 <= v <= 8.0 for ia in summary.values() for v in ia.values())
    assert summary["shared"]["device"] <= 4.0


def test_compare_collapse_labels_model_and_set(make_model):
    both = compare_collapse({"single": make_model("dnn"), "multi": make_model("me_mmoe")})
    assert list(both) == ["single/embedding", "multi/expert_0", "multi/expert_1",
                          "multi/expert_2", "multi/expert_3"]
    with pytest.raises(TypeError, match="models"):
        compare_collapse({})
    with pytest.raises(TypeError, match=r"models\['x'\]"):
        compare_collapse({"x": object()})


def test_ia_over_training_reads_states_and_models(make_model):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    later = make_model()
    with torch.no_grad():  # the user field collapses onto one direction
        weight = later.groups[0].categorical.weight
        weight[:201] = torch.randn(201, 1, 1) * torch.ones(1, 3, 8)
    history = ia_over_training(model, [(0, before), (10, later)], ["shared"])
    assert history["steps"] == [0, 10]
    user = history["sets"]["shared"]["user_id"]
    assert user[0] > 5.0 and user[1] == pytest.approx(1.0)
    png = figure_png(plot_ia_over_training(history))
    assert png.startswith(PNG)
    with pytest.raises(TypeError, match="snapshots"):
        ia_over_training(model, [])
    with pytest.raises(TypeError, match=r"snapshots\[0\]"):
        ia_over_training(model, [(0, "state")])
    with pytest.raises(ValueError, match="set_name"):
        ia_over_training(model, [(0, model)], ["nope"])


def test_figures_are_pngs(make_model):
    model = make_model()
    spectra = {name: field_spectra(model, name) for name in model.set_location}
    for figure in (plot_spectra_heatmap(spectra), plot_ia_comparison(collapse_summary(model))):
        png = figure_png(figure)
        assert png.startswith(PNG) and len(png) > 5000
    with pytest.raises(TypeError, match="spectra"):
        plot_spectra_heatmap({})
    with pytest.raises(TypeError, match="summaries"):
        plot_ia_comparison([])


def test_model_errors_name_the_argument(make_model):
    with pytest.raises(TypeError, match="model must be an hmoe.models.HMoE"):
        field_spectra(torch.nn.Linear(2, 2), "shared")
    with pytest.raises(ValueError, match="set_name: unknown embedding set 'nope'"):
        field_spectra(make_model(), "nope")
