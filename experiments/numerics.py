r"""Experiment 3: MNSE vs bucketised one-hot vs raw scaled numerics.

One single-task (click) flat DNN; only ``model.options.numeric_encoder`` changes: "mnse"
(multiple numeral systems over the quantised value, notes 2.2), "bucket" (one embedding per
quantile bucket) or "scaled" (the standardised value times a learned vector). The synthetic
world's click is monotone in price and activity, an inverted U in age and periodic in hour.
"""

from __future__ import annotations

from common import Section, claim, fmt, run_variants, table, values, verdict, verdicts

ENCODERS = ("mnse", "bucket", "scaled")
REAL = [("adult", {"task": "income_50k"})]


def run(dataset, seeds, log=print, label: str = "synthetic", task: str = "click") -> Section:
    variants = {e: ["model.preset=dnn", f"model.tasks=[{task}]",
                    f"model.options={{numeric_encoder: {e}}}"] for e in ENCODERS}
    runs = run_variants(dataset, variants, seeds, log)
    rows = [[e, fmt(values(rs, task, "auc")), fmt(values(rs, task, "logloss")),
             "—" if e == "mnse" else verdict(values(runs["mnse"], task, "auc"),
                                             values(rs, task, "auc"))]
            for e, rs in runs.items()]
    header = ["numeric encoder", f"{task} AUC", f"{task} logloss", "MNSE's AUC against it"]
    numbers = {e: {"auc": values(rs, task, "auc"), "logloss": values(rs, task, "logloss")}
               for e, rs in runs.items()}
    text = table(header, rows) + claim(
        "notes 2.2", "MNSE beats bucketised one-hot and raw scaled numerics.",
        verdicts("MNSE", values(runs["mnse"], task, "auc"),
                 {e: values(rs, task, "auc") for e, rs in runs.items() if e != "mnse"}) + ".")
    return Section(f"3. Numeric features ({label})", text, numbers)
