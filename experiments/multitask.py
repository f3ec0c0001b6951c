r"""Experiment 4: STEM vs MMoE vs PLE vs Shared-Bottom vs Single-Task vs ME-MMoE / ME-PLE, and
AME and STEM-AL (the synthetic world has an auxiliary task, "like").

Every model trains the two main tasks, click and the sparse conversion (STEM-AL also the
auxiliary like task, which it owns a set and an expert for); per-task test AUC and gAUC. The
synthetic world's conversion prefers the user's purchase category, often not a browse interest
that drives clicks: the conflict a shared embedding must entangle and STEM's task sets need not.
"""

from __future__ import annotations

from common import Section, fmt, run_variants, table, values, verdict

PRESETS = ("stem", "mmoe", "ple", "shared_bottom", "single_task", "me_mmoe", "me_ple", "ame",
           "stem_al")
MAIN = ("click", "conversion")


def variants(dataset) -> dict[str, list[str]]:
    result = {}
    for name in PRESETS:
        tasks = "[click, conversion, like]" if name == "stem_al" else "[click, conversion]"
        result[name] = [f"model.preset={name}", f"model.tasks={tasks}"]
    return result


def run(dataset, seeds, log=print, label: str = "synthetic") -> Section:
    runs = run_variants(dataset, variants(dataset), seeds, log)
    rows = []
    for name, rs in runs.items():
        row = [name]
        for task in MAIN:
            row += [fmt(values(rs, task, "auc")), fmt(values(rs, task, "gauc"))]
        row.append(verdict(values(rs, "conversion", "auc"),
                           values(runs["mmoe"], "conversion", "auc")) if name != "mmoe" else "—")
        rows.append(row)
    header = ["model", "click AUC", "click gAUC", "conversion AUC", "conversion gAUC",
              "conversion AUC vs MMoE"]
    numbers = {n: {t: {"auc": values(rs, t, "auc"), "gauc": values(rs, t, "gauc")}
                   for t in MAIN} for n, rs in runs.items()}
    return Section(f"4. Multi-task embedding schemes ({label})", table(header, rows), numbers)
