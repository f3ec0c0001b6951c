r"""Dose-response on the synthetic world: each claim's gain against the strength of the
mechanism the method is supposed to exploit.

A claim that holds shows a gain that grows with its mechanism and vanishes without it. For each
sweep the world is regenerated at every level of one knob of hmoe.data.synthetic (everything
else fixed), the method and its baseline are trained with the same budget and seeds, and the
gain (method − baseline, test AUC) is plotted against the level with ±2 standard errors:

    sweep         method vs baseline        knob (0 / weakest first)        metric
    stem_vs_mmoe  STEM vs MMoE              task_conflict κ in {0, 0.5, 1}   mean AUC of click
                                            (interaction_rank 16)            and conversion
    me_vs_se      DCN V2 ME vs SE, 2x dim   interaction_rank r in            click AUC
                                            {0, 4, 16, 32}
    tim_vs_din    DNN + TIM vs DNN + DIN    sequence_weight w_seq in         click AUC
                                            {0, 0.5, 1, 2}
    rank_vs_bce   combined-pair loss vs     click_rate in                    click AUC
                  BCE (DNN)                 {0.3, 0.1, 0.03, 0.01}

The knobs (hmoe.data.synthetic's module docstring): κ is the share of conversion's planted user
× category interaction that is independent of click's (a shared embedding must then hold both
tasks' user factors, 2r dimensions, where each task needs r: the conflict STEM's task-specific
embeddings avoid); r is the rank of the planted user × category interaction at a fixed
strength (what a field's embedding must represent: the collapse pressure); w_seq scales the
planted behaviour-category × recency term; click_rate is the positive rate (sparsity: the
ranking loss's argument). The interaction sweeps use 1,000 users (~120 rows each at 150k rows)
so that a user's factors can be learnt at all.

Budget: up to ``EPOCHS`` epochs, early stopping on valid AUC with patience 1, lr x 0.1 on a
plateau (the rest of experiments/common.py's BASE). Verdicts, computed from the numbers: the
gain "vanishes without the mechanism" when at the weakest level |gain| <= 2 SE; it "grows with
it" when the gain at the strongest level exceeds the weakest level's by more than 2 SE of their
difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common import Section, fmt, mean_std, run_variants, table, values

from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.train import Dataset
from hmoe.train.metrics import auc

EPOCHS = 6
BUDGET = [f"train.epochs={EPOCHS}", "train.patience=1", "train.eval_every=0",
          "train.lr_decay=0.1"]
INTERACTION_USERS = 1_000


def _me_config(sets: int, dim: int) -> str:
    import multi_embedding

    return f"model.config={multi_embedding.config('dcnv2', sets, dim, 'click')}"


@dataclass(frozen=True)
class Sweep:
    title: str
    claim: str
    knob: str
    label: str  # the knob on the figure's axis
    levels: tuple
    method: tuple[str, list[str]]  # (name, overrides)
    baseline: tuple[str, list[str]]
    tasks: tuple[str, ...] = ("click",)
    world: dict = field(default_factory=dict)  # fixed SyntheticConfig settings
    level_world: object = None  # level -> extra SyntheticConfig settings

    def world_at(self, level) -> dict:
        extra = self.level_world(level) if self.level_world is not None else {}
        return {**self.world, self.knob: level, **extra}


def sweeps() -> dict[str, Sweep]:
    two = ["model.tasks=[click, conversion]"]
    return {
        "stem_vs_mmoe": Sweep(
            "STEM over MMoE against task conflict", "notes 4.1", "task_conflict",
            "task conflict κ (share of conversion's user factors independent of click's)",
            (0.0, 0.5, 1.0), ("stem", ["model.preset=stem", *two]),
            ("mmoe", ["model.preset=mmoe", *two]), ("click", "conversion"),
            {"interaction_rank": 16, "num_users": INTERACTION_USERS}),
        "me_vs_se": Sweep(
            "Multi-embedding over single-embedding against interaction rank", "notes 3.2",
            "interaction_rank", "rank r of the planted user × category interaction",
            (0, 4, 16, 32), ("dcnv2 ME 2x", ["model.preset=null", _me_config(2, 16)]),
            ("dcnv2 SE 2x", ["model.preset=null", _me_config(1, 32)]),
            world={"num_users": INTERACTION_USERS}),
        "tim_vs_din": Sweep(
            "TIM over DIN against the semantic-temporal signal", "notes 2.1",
            "sequence_weight", "w_seq, scale of the planted category × recency term",
            (0.0, 0.5, 1.0, 2.0),
            ("tim", ["model.preset=dnn", "model.tasks=[click]",
                     "model.options={sequence_encoder: tim}"]),
            ("din", ["model.preset=dnn", "model.tasks=[click]",
                     "model.options={sequence_encoder: din}"])),
        "rank_vs_bce": Sweep(
            "Combined-pair ranking loss over BCE against positive sparsity", "notes 5.1",
            "click_rate", "click rate (positives per impression; sparser to the right)",
            (0.3, 0.1, 0.03, 0.01),
            ("combined_pair", ["model.preset=dnn", "model.tasks=[click]",
                               "loss.kind=combined_pair"]),
            ("bce", ["model.preset=dnn", "model.tasks=[click]", "loss.kind=bce"]),
            level_world=lambda rate: {"conversion_rate": rate / 4}),
    }


def _metric(runs, tasks) -> list[float]:
    """Per seed, the mean test AUC over ``tasks``."""
    per_task = [values(runs, t, "auc") for t in tasks]
    return [sum(xs) / len(xs) for xs in zip(*per_task)]


def _gain(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean a − mean b, its standard error)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return ma - mb, math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))


def judge(gains: list[tuple[float, float]]) -> dict[str, object]:
    """The computed verdict of a sweep from its (gain, SE) per level, weakest first."""
    (g0, s0), (g1, s1) = gains[0], gains[-1]
    vanishes = abs(g0) <= 2 * s0
    grows = g1 - g0 > 2 * math.sqrt(s0 ** 2 + s1 ** 2)
    significant = [g > 2 * s for g, s in gains]
    if grows and vanishes:
        text = "holds: the gain grows with the mechanism and vanishes without it"
    elif grows:
        text = "partly: the gain grows with the mechanism but is there without it too"
    elif any(g < -2 * s for g, s in gains):
        text = "not shown: the method loses beyond 2 SE at some level, and its gain does not grow"
    elif not any(significant):
        text = "not shown: no level gives a gain beyond 2 SE"
    else:
        text = "not shown: a gain at some level, but it does not grow with the mechanism"
    return {"grows": grows, "vanishes_without": vanishes, "verdict": text}


def run(dataset, seeds, log=print, figures=None, rows: int = 150_000,
        only: tuple[str, ...] | None = None, quick: bool = False) -> Section:
    """Every sweep (``dataset``, the default world, is not used: each level has its own)."""
    chosen = {k: v for k, v in sweeps().items() if only is None or k in only}
    budget = ["train.epochs=1"] if quick else BUDGET
    parts, numbers, paths = [], {}, []
    for key, sweep in chosen.items():
        levels = sweep.levels[:2] if quick else sweep.levels
        log(f"  sweep {key}: {sweep.knob} in {list(levels)}")
        per_level = []
        for level in levels:
            world = generate(SyntheticConfig(num_rows=rows, **sweep.world_at(level)))
            data = Dataset(world.schema, dict(world.splits), world.ground_truth)
            test = world.splits["test"]
            truth = sum(auc(test[f"true/{t}"], test["labels"][:, world.schema.task_index(t)])
                        for t in sweep.tasks) / len(sweep.tasks)
            variants = {name: [*budget, *overrides]
                        for name, overrides in (sweep.method, sweep.baseline)}
            runs = run_variants(data, variants, seeds, log)
            method = _metric(runs[sweep.method[0]], sweep.tasks)
            base = _metric(runs[sweep.baseline[0]], sweep.tasks)
            per_level.append({"level": level, "method": method, "baseline": base,
                              "gain": _gain(method, base), "truth_auc": truth})
        verdict = judge([p["gain"] for p in per_level])
        numbers[key] = {"knob": sweep.knob, "world": sweep.world, "tasks": list(sweep.tasks),
                        "method": sweep.method[0], "baseline": sweep.baseline[0],
                        "levels": [{**p, "gain": list(p["gain"])} for p in per_level],
                        **verdict}
        header = [sweep.knob, f"{sweep.method[0]} AUC", f"{sweep.baseline[0]} AUC",
                  "gain ± 2 SE", "truth's AUC"]
        rows_ = [[f"{p['level']:g}", fmt(p["method"]), fmt(p["baseline"]),
                  f"{p['gain'][0]:+.4f} ± {2 * p['gain'][1]:.4f}", f"{p['truth_auc']:.4f}"]
                 for p in per_level]
        world = ", ".join(f"{k}={v}" for k, v in sweep.world.items()) or "the default world"
        parts.append(f"### {sweep.title} ({sweep.claim})\n\nWorld: {world}, {rows:,} rows, "
                     f"{sweep.knob} varied; AUC = mean test AUC over "
                     f"{', '.join(sweep.tasks)}.\n\n{table(header, rows_)}\n\n"
                     f"**Verdict**: {verdict['verdict']}.")
        if figures is not None:
            paths.append(_figure(figures, key, sweep, per_level))
    markdown = ("Gain of each method over its baseline as the planted mechanism it is meant "
                "to exploit gets stronger (experiments/dose_response.py says how each knob "
                f"plants it). \"Truth's AUC\": the world's own per-exposure probabilities "
                "scored as predictions on the test rows, the ceiling a model can approach; "
                "the gap to it is what the models leave unlearnt. Seeds "
                f"{', '.join(map(str, seeds))}; budget: "
                + ("1 epoch (--quick)" if quick else
                   f"up to {EPOCHS} epochs, early stopping on valid AUC (patience 1)")
                + ".\n\n" + "\n\n".join(parts))
    return Section("9. Dose-response on the synthetic world", markdown, numbers, paths)


def _figure(figures, key: str, sweep: Sweep, per_level: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hmoe.analysis._common import figure_png

    x = list(range(len(per_level)))
    labels = [f"{p['level']:g}" for p in per_level]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, color in ((sweep.method[0], "tab:red"), (sweep.baseline[0], "tab:blue")):
        side = "method" if name == sweep.method[0] else "baseline"
        stats = [mean_std(p[side]) for p in per_level]
        left.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                      capsize=3, color=color, label=name)
    left.set_ylabel("test AUC (mean ± std over seeds)")
    left.legend()
    gains = [p["gain"] for p in per_level]
    right.errorbar(x, [g for g, _ in gains], yerr=[2 * s for _, s in gains], marker="o",
                   capsize=3, color="black")
    right.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    right.set_ylabel(f"gain: {sweep.method[0]} − {sweep.baseline[0]} (± 2 SE)")
    for axis in (left, right):
        axis.set_xticks(x, labels)
        axis.set_xlabel(sweep.label, fontsize=8)
    fig.suptitle(sweep.title, fontsize=10)
    fig.tight_layout()
    path = figures / f"dose_{key}.png"
    path.write_bytes(figure_png(fig))
    plt.close(fig)
    return str(path)
