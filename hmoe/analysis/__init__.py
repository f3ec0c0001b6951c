r"""hmoe.analysis: the paper's analyses of a trained model (design section 3.8).

    collapse       dimensional collapse: per-field singular spectra, information abundance
                   IA = Σσ / max σ (paper notes 3.1)
    correlation    behaviour-target correlation: ground-truth mutual information from counts
                   (notes 6.1) against the map a sequence encoder learned (notes 6.2)
    entanglement   user-item distances on contradictory pairs per table (notes 6.4), and the
                   cosine between task gradients on shared embeddings
    report         PNG figures, a self-contained report.html and report.json; ``analyze``, the
                   entry point of ``hmoe analyze RUN_DIR``

    from hmoe.analysis import analyze
    results = analyze(model, schema, world.splits["test"], ground_truth=world.ground_truth,
                      out_dir="runs/quick/report")

Figures need matplotlib (the ``analysis`` extra); everything else needs numpy and torch only.
"""

from hmoe.analysis.collapse import (
    collapse_summary, compare_collapse, field_spectra, ia_over_training, information_abundance,
    plot_ia_comparison, plot_ia_over_training, plot_spectra_heatmap, singular_spectrum,
)
from hmoe.analysis.correlation import (
    ground_truth_mi, learned_correlation, min_max, plot_correlation_maps, sequence_encoder,
    similarity,
)
from hmoe.analysis.entanglement import (
    GradientCosineRecorder, distance_contradictions, entanglement_distances,
    entanglement_summary, interest_conflicts, label_contradictions, pair_distances,
    plot_distance_histograms, plot_gradient_cosine, task_gradient_cosine,
)
from hmoe.analysis.report import Section, analyze, to_jsonable, write_report

__all__ = [
    "GradientCosineRecorder", "Section", "analyze", "collapse_summary", "compare_collapse",
    "distance_contradictions", "entanglement_distances", "entanglement_summary",
    "field_spectra", "ground_truth_mi", "ia_over_training", "information_abundance",
    "interest_conflicts", "label_contradictions", "learned_correlation", "min_max",
    "pair_distances", "plot_correlation_maps", "plot_distance_histograms",
    "plot_gradient_cosine", "plot_ia_comparison", "plot_ia_over_training",
    "plot_spectra_heatmap", "sequence_encoder", "similarity", "singular_spectrum",
    "task_gradient_cosine", "to_jsonable", "write_report",
]
