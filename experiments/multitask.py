r"""Experiment 4: STEM vs MMoE vs PLE vs Shared-Bottom vs Single-Task vs ME-MMoE / ME-PLE, and
AME and STEM-AL (the synthetic world has an auxiliary task, "like").

Every model trains the two main tasks, click and the sparse conversion (STEM-AL also the
auxiliary like task, which it owns a set and an expert for); per-task test AUC and gAUC. The
synthetic world's conversion prefers the user's purchase category, often not a browse interest
that drives clicks: the conflict a shared embedding must entangle and STEM's task sets need not.
"""

from __future__ import annotations

from common import Section, claim, fmt, run_variants, table, values, verdict, verdicts

PRESETS = ("stem", "mmoe", "ple", "shared_bottom", "single_task", "me_mmoe", "me_ple", "ame",
           "stem_al")
# The census tasks of the MMoE paper; Adult has no auxiliary label, so no STEM-AL there.
REAL = [("adult", {"tasks": ("income_50k", "never_married"), "auxiliary": None})]


def variants(tasks, auxiliary) -> dict[str, list[str]]:
    result = {}
    for name in PRESETS:
        if name == "stem_al" and auxiliary is None:
            continue
        names = [*tasks, auxiliary] if name == "stem_al" else list(tasks)
        result[name] = [f"model.preset={name}", f"model.tasks=[{', '.join(names)}]"]
    return result


def run(dataset, seeds, log=print, label: str = "synthetic", tasks=("click", "conversion"),
        auxiliary: str | None = "like", figures=None) -> Section:
    planted = figures is not None and dataset.ground_truth is not None
    runs = run_variants(dataset, variants(tasks, auxiliary), seeds, log, keep_model=planted)
    metrics = ("auc", "gauc") if "group_id" in dataset.splits["test"] else ("auc",)
    last = tasks[-1]
    rows = []
    for name, rs in runs.items():
        row = [name]
        for task in tasks:
            row += [fmt(values(rs, task, m)) for m in metrics]
        row.append(verdict(values(rs, last, "auc"), values(runs["mmoe"], last, "auc"))
                   if name != "mmoe" else "—")
        rows.append(row)
    header = ["model", *[f"{t} {m.upper() if m == 'auc' else 'gAUC'}" for t in tasks
                         for m in metrics], f"{last} AUC vs MMoE"]
    numbers = {n: {t: {m: values(rs, t, m) for m in metrics} for t in tasks}
               for n, rs in runs.items()}
    baselines = [n for n in ("mmoe", "ple", "shared_bottom", "single_task", "me_mmoe", "me_ple")
                 if n in runs]
    findings = [verdicts(f"STEM on {t}", values(runs["stem"], t, "auc"),
                         {n: values(runs[n], t, "auc") for n in baselines}) for t in tasks]
    text = table(header, rows) + claim(
        "notes 4.1", "STEM (task-specific plus shared embeddings, stop-gradient routing) beats "
        "MMoE, PLE, Shared-Bottom and Single-Task, most on the task whose interests conflict "
        "with the others'.", "; ".join(findings) + ".")
    section = Section(f"4. Multi-task embedding schemes ({label})", text, numbers)
    if planted:
        _entanglement(section, runs, dataset, figures)
    return section


def _entanglement(section, runs, dataset, figures) -> None:
    """User-ad distances on the world's planted conflicts (the target category is a browse
    interest XOR the purchase category) against all test pairs, per table, seed 0: the shared
    table of MMoE and Shared-Bottom, STEM's shared and task tables, Single-Task's tables."""
    from hmoe.analysis import (entanglement_distances, entanglement_summary, interest_conflicts,
                               plot_distance_histograms)
    from hmoe.analysis._common import figure_png

    test = dataset.splits["test"]
    conflicts = interest_conflicts(test, dataset.schema, dataset.ground_truth)
    distances = {}
    for name in ("shared_bottom", "mmoe", "stem", "single_task"):
        model = runs[name][0].model
        for set_name, parts in entanglement_distances(model, test, conflicts).items():
            distances[f"{name}/{set_name}"] = parts
    summary = entanglement_summary(distances)
    rows = [[name, f"{s['mean_ratio']:.3f}",
             f"{s.get('contradictory_percentile', float('nan')):.1f}"]
            for name, s in summary.items()]
    section.markdown += (
        "\n\nInterest entanglement (seed 0, test rows; conflicting = the target category is a "
        f"browse interest XOR the purchase category, {int(conflicts.sum())} of {len(conflicts)} "
        "rows): mean user-ad distance of the conflicting pairs over that of all pairs, and "
        "their mean percentile among all pairs (50 = placed like any pair):\n\n"
        + table(["model/table", "distance ratio", "percentile"], rows))
    section.numbers["entanglement"] = summary
    path = figures / "entanglement_synthetic.png"
    path.write_bytes(figure_png(plot_distance_histograms(distances)))
    section.figures.append(str(path))
