r"""Experiments 1 and 4 at scale: ME vs SE and STEM vs MMoE on a 5M-row world, streamed.

At 150k rows (sections 1, 4 and 9) no model learns the planted user × category interaction:
the truth's AUC rises when it is planted, the models' do not. This runs the two comparisons
whose mechanism is that interaction on a world 33 times larger, generated to disk chunk by
chunk (hmoe.data.synthetic.write_world) and streamed from its Parquet files by the trainer
(bounded memory, as a user would train on a log that does not fit in memory):

    world      SCALE_ROWS rows (88/2/10 train/valid/test), 10,000 users (~500 rows each),
               interaction_rank 16, task_conflict 1 (conversion's user factors independent
               of click's); the rest SyntheticConfig's defaults
    ME vs SE   DCN V2, 2x budget: 2 sets of dim 16, one expert each, averaged, against one set
               of dim 32 (experiments/multi_embedding.py's configs); click AUC
    STEM/MMoE  the presets on click and conversion; the mean of their test AUCs

Budget (``BUDGET``): up to ``EPOCHS`` passes over the 4.4M training rows in batches of 2,048
(lr 2e-3, the rest of experiments/common.py's BASE); valid AUC every ``EVAL_ROWS`` training rows
and at the end of each pass, the best weights kept, lr x 0.1 after an evaluation that does not
improve, stop after 2 such evaluations. Each seed's runs come before the next seed's; a run
takes ~8 min on 2 cores, so the page holds the seeds that fitted a session (its text says
which); the cache keeps every finished run for the next session's --update. The
valid AUC at each evaluation is kept (``curve``), so the page shows whether a run was still
improving when it ended (with one pass, the first three runs still rose at its end). The
world is written once under .cache/experiments/worlds/ (its directory named by a hash of its
config) and reused; the run cache keys runs by that hash and the files' sizes. The truth's
AUC (the planted probabilities scored against the observed labels on test) is the ceiling
beside each table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from common import ROOT, Section, claim, fmt, run_variants, table, values, verdict
from dose_response import _gain, _me_config

SCALE_ROWS = 5_000_000
WORLD = {"num_users": 10_000, "interaction_rank": 16, "task_conflict": 1.0,
         "valid_fraction": 0.02, "test_fraction": 0.1}
BATCH = 2_048
EPOCHS = 2
EVAL_ROWS = 1_000_000
QUICK_ROWS = 6_000
WORLDS = ROOT / ".cache" / "experiments" / "worlds"
BUDGET = (f"up to {EPOCHS} passes in batches of {BATCH:,}, valid AUC every {EVAL_ROWS:,} rows "
          "and at each pass's end, trained to early stopping (patience 2 evaluations), lr x 0.1 "
          "on a plateau, best weights by valid AUC; streamed from disk")


VARIANTS = {
    "dcnv2 SE 2x": ["model.preset=null", _me_config(1, 32)],
    "dcnv2 ME 2x": ["model.preset=null", _me_config(2, 16)],
    "mmoe": ["model.preset=mmoe", "model.tasks=[click, conversion]"],
    "stem": ["model.preset=stem", "model.tasks=[click, conversion]"],
}


def world(rows: int, log=print):
    """The streamed Dataset of the world of ``rows`` rows (written first if not on disk yet),
    with a ``fingerprint`` for the run cache."""
    from hmoe.data.synthetic import SyntheticConfig, write_world
    from hmoe.train.config import DataConfig
    from hmoe.train.trainer import load_data

    config = SyntheticConfig(num_rows=rows, **WORLD)
    settings = json.dumps(dataclasses.asdict(config), sort_keys=True)
    directory = WORLDS / hashlib.sha256(settings.encode()).hexdigest()[:16]
    if not (directory / "config.yaml").is_file():  # written last: the world is complete
        log(f"  writing the {rows:,}-row world to {directory}")
        write_world(config, directory)
    dataset = load_data(DataConfig(source="world", world=str(directory)))
    sizes = sorted((p.name, p.stat().st_size) for p in directory.glob("*.parquet"))
    dataset.fingerprint = hashlib.sha256(f"{settings}{sizes}".encode()).hexdigest()
    dataset.directory = directory
    return dataset


def curve(trainer) -> dict:
    """The valid AUC (mean over the tasks) at each evaluation of a finished run, and the
    training rows seen by then: {"curve": [[rows, auc], ...]}."""
    from hmoe.train.trainer import read_metrics

    points = []
    for record in read_metrics(trainer.run_dir / "metrics.jsonl"):
        if record.get("kind") == "eval" and record.get("split") == "valid":
            aucs = [m["auc"] for m in record["metrics"].values()]
            points.append([record["step"] * trainer.config.train.batch_size,
                           sum(aucs) / len(aucs)])
    return {"curve": points}


def truth_auc(dataset, task: str) -> float:
    """The planted probability's test AUC against the observed labels (the ceiling)."""
    import pyarrow.parquet as pq

    from hmoe.train.metrics import auc

    label = dataset.schema.labels[dataset.schema.task_index(task)]
    test = pq.read_table(dataset.directory / "test.parquet",
                         columns=[f"true/{task}", label.column or label.name])
    return float(auc(test.column(0).to_numpy(), test.column(1).to_numpy()))


def run(dataset, seeds, log=print, rows: int = 150_000, quick: bool = False) -> Section:
    """``dataset`` (the page's in-memory world) is not used: this builds its own, streamed."""
    rows = QUICK_ROWS if quick else SCALE_ROWS
    data = world(rows, log)
    train_rows = data.source("train").num_rows
    budget = [f"train.epochs={EPOCHS}", "train.patience=2", f"train.batch_size={BATCH}",
              f"train.eval_every={max(1, EVAL_ROWS // BATCH)}", "train.lr_decay=0.1"]
    runs: dict[str, list] = {}
    for seed in seeds:  # every variant of a seed before the next seed
        for name, rs in run_variants(data, {k: [*budget, *v] for k, v in VARIANTS.items()},
                                     [seed], log, measure=curve).items():
            runs.setdefault(name, []).extend(rs)
    ceilings = {t: truth_auc(data, t) for t in ("click", "conversion")}

    def mean_auc(name):
        per_task = [values(runs[name], t, "auc") for t in ("click", "conversion")]
        return [sum(xs) / 2 for xs in zip(*per_task)]

    me, se = values(runs["dcnv2 ME 2x"], "click", "auc"), values(runs["dcnv2 SE 2x"], "click",
                                                                   "auc")
    stem, mmoe = mean_auc("stem"), mean_auc("mmoe")
    rows_me = [[name, fmt(values(runs[name], "click", "auc")),
                fmt(values(runs[name], "click", "logloss")), _curve(runs[name]),
                "" if name == "dcnv2 SE 2x" else verdict(me, se)]
               for name in ("dcnv2 SE 2x", "dcnv2 ME 2x")]
    rows_me.append(["planted probability (the ceiling)", f"{ceilings['click']:.4f}", "", "",
                    ""])
    rows_mt = [[name, fmt(values(runs[name], "click", "auc")),
                fmt(values(runs[name], "conversion", "auc")), fmt(mean_auc(name)),
                _curve(runs[name]), "" if name == "mmoe" else verdict(stem, mmoe)]
               for name in ("mmoe", "stem")]
    rows_mt.append(["planted probability (the ceiling)", f"{ceilings['click']:.4f}",
                    f"{ceilings['conversion']:.4f}", "", "", ""])
    text = (
        f"A world of {rows:,} rows ({train_rows:,} train), streamed from disk: "
        f"{', '.join(f'{k} {v}' for k, v in WORLD.items())}; seeds "
        f"{', '.join(map(str, seeds))}. The valid-AUC column is the mean over seeds at each "
        f"evaluation (every {EVAL_ROWS:,} training rows and at each pass's end; the best one's "
        "weights are tested): "
        "a run still rising at its last evaluation has not converged.\n\n"
        "### Multi-embedding vs single-embedding, DCN V2 at 2x\n\n"
        + table(["model", "click AUC", "click logloss", "valid AUC by evaluation",
                 "ME's AUC vs SE"], rows_me)
        + claim("notes 3.2", "at the same embedding budget multi-embedding beats "
                "single-embedding.",
                f"ME against SE, click AUC: {verdict(me, se)} ({_gap(me, se)}).")
        .replace("**Here**:", "**Verdict**:")
        + "\n\n### STEM vs MMoE under task conflict\n\n"
        + table(["model", "click AUC", "conversion AUC", "mean AUC",
                 "valid mean AUC by evaluation", "STEM's mean vs MMoE"], rows_mt)
        + claim("notes 4.1", "with conflicting tasks, task-specific embeddings (STEM) beat "
                "one shared embedding (MMoE).",
                f"STEM against MMoE, mean AUC: {verdict(stem, mmoe)} ({_gap(stem, mmoe)}).")
        .replace("**Here**:", "**Verdict**:"))
    numbers = {"rows": rows, "train_rows": train_rows, "world": WORLD, "truth_auc": ceilings,
               "runs": {name: [{"seed": r.seed, "test": r.test, "valid": r.valid, **r.extra}
                               for r in rs] for name, rs in runs.items()}}
    return Section("10. At scale: ME vs SE and STEM vs MMoE on a 5M-row streamed world",
                   text, numbers)


def _curve(runs) -> str:
    """The valid AUC at each evaluation, averaged over the seeds that reached it."""
    curves = [r.extra.get("curve", []) for r in runs]
    points = []
    for i in range(max(map(len, curves))):
        reached = [c[i][1] for c in curves if len(c) > i]
        points.append(f"{sum(reached) / len(reached):.4f}")
    return " → ".join(points)


def _gap(a, b) -> str:
    gain, se = _gain(a, b)
    return f"{gain:+.4f}, 2 SE {2 * se:.4f}"
