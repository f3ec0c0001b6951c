r"""What every experiment shares: the datasets, one training run, statistics and tables.

A run is hmoe's own Trainer (hmoe.train) on in-memory splits, in a temporary run directory,
deterministic, on ``THREADS`` torch threads, with the base settings below and an experiment's
overrides (dotted keys, as on the command line). Each (variant, seed) pair is one run; the seed
sets ``train.seed`` (initialisation and batch order) and, for the synthetic world, nothing else:
the data is the same for every seed, so the spread is the training noise.

Cache. A finished run's metrics are kept under ``CACHE_DIR``, keyed by what determines them:
the dataset's rows (:func:`fingerprint`), the run's resolved config (``BASE``, the dataset's
and the variant's overrides, the seed), the measure and ``CACHE_VERSION``; a rerun of the page
trains only the runs whose key is new. Bump ``CACHE_VERSION`` when a change to hmoe changes
what a run computes (``experiments/run.py --fresh`` retrains everything once). Runs that keep
their model are not cached.

Statistics. For a metric, mean ± sample standard deviation over the seeds. A difference
between two variants "exceeds the noise" when |mean_a − mean_b| > 2·sqrt(s_a²/n_a + s_b²/n_b)
(two standard errors of the difference, roughly a 95 % two-sided test for normal errors); with
3 seeds this is a screen, not a proof, and the tables say so.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.train import Dataset, Trainer, load_run_config

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
CACHE_DIR = ROOT / ".cache" / "experiments" / "runs"
CACHE_VERSION = 1
USE_CACHE = True  # experiments/run.py --fresh: False (retrain, then overwrite the entries)
# What the runs so far cost: runs, of which read from the cache, and their training seconds
# (a cached run counts the seconds it took when it ran); experiments/run.py reports it.
LEDGER = {"runs": 0, "cached": 0, "seconds": 0.0}

# A run: Adam, lr 2e-3, B = 512, trained to early stopping: valid AUC after each epoch (of
# several tasks, their mean), the best weights kept, lr x 0.1 after an epoch that does not
# improve, stop after 2 such epochs, at most 20 epochs; test scored once with the best weights.
# A dataset may add its own settings (``Dataset.overrides``, e.g. a batch size).
BASE = ["train.epochs=20", "train.patience=2", "train.lr_decay=0.1", "train.eval_every=0",
        "train.batch_size=512", "train.lr=2e-3", f"train.threads={THREADS}",
        "train.progress=off", "train.checkpoint_every=100000", "train.log_every=100000",
        "loss.kind=bce"]
BUDGET_TEXT = ("trained to early stopping: up to 20 epochs, patience 2, lr x 0.1 on a "
               "plateau, best weights by valid AUC")
# experiments/run.py --quick (the smoke test): one epoch, no early stopping.
QUICK = False
QUICK_SETTINGS = ["train.epochs=1", "train.patience=0"]


# --------------------------------------------------------------------------------------------
# Data


_SYNTHETIC: dict[tuple, Dataset] = {}


def synthetic(num_rows: int = 150_000, **overrides) -> Dataset:
    """The synthetic ads world (hmoe.data.synthetic) of ``num_rows`` rows, cached per process."""
    key = (num_rows, tuple(sorted(overrides.items())))
    if key not in _SYNTHETIC:
        world = generate(SyntheticConfig(num_rows=num_rows, **overrides))
        _SYNTHETIC[key] = Dataset(world.schema, dict(world.splits), world.ground_truth)
    return _SYNTHETIC[key]


def with_train_rows(dataset: Dataset, keep: np.ndarray) -> Dataset:
    """``dataset`` with only the training rows where ``keep`` (N_train,) is True."""
    splits = dict(dataset.splits)
    splits["train"] = {k: v[keep] for k, v in splits["train"].items()}
    result = Dataset(dataset.schema, splits, dataset.ground_truth)
    result.overrides = getattr(dataset, "overrides", [])
    return result


# --------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    """The metrics of one (variant, seed) run and, when kept, its trained model."""

    variant: str
    seed: int
    test: dict[str, dict[str, float]]
    valid: dict[str, dict[str, float]]
    extra: dict[str, float] = field(default_factory=dict)
    model: torch.nn.Module | None = None


def fingerprint(dataset: Dataset) -> str | None:
    """What identifies a dataset's rows for the run cache: its ``fingerprint`` attribute when
    whoever built it set one (from the files it was read from), else a hash of its in-memory
    columns (None, not cached, when a split is streamed without a fingerprint)."""
    known = getattr(dataset, "fingerprint", None)
    if known is not None:
        return known
    digest = hashlib.sha256(repr(dataset.schema).encode())
    for split in sorted(dataset.splits):
        columns = dataset.splits[split]
        if not isinstance(columns, Mapping):
            return None
        for key in sorted(columns):
            array = np.ascontiguousarray(columns[key])
            digest.update(f"{split}/{key}/{array.dtype}/{array.shape}".encode())
            digest.update(array.data)
    dataset.fingerprint = digest.hexdigest()
    return dataset.fingerprint


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def train_run(dataset: Dataset, variant: str, seed: int, overrides: Sequence[str], *,
              keep_model: bool = False,
              measure: Callable[[Trainer], dict[str, float]] | None = None) -> RunResult:
    """Trains one variant with one seed, or reads its metrics from the run cache (module
    docstring); ``measure(trainer)`` adds numbers of the trained model (the best checkpoint is
    loaded). ``RunResult.extra["seconds"]``: the training's wall time (when it ran)."""
    own = getattr(dataset, "overrides", [])
    settings = [*BASE, *own, *overrides, *(QUICK_SETTINGS if QUICK else []),
                f"train.seed={seed}"]
    config = load_run_config(None, settings)
    entry = None
    data = fingerprint(dataset) if not keep_model else None
    if data is not None:  # keyed by the resolved config: the same run however it was spelt
        key = hashlib.sha256(json.dumps(
            {"version": CACHE_VERSION, "data": data, "config": config.to_dict(),
             "measure": None if measure is None else measure.__qualname__},
            sort_keys=True, default=str).encode()).hexdigest()
        entry = CACHE_DIR / f"{key[:32]}.json"
        if USE_CACHE and entry.is_file():
            cached = json.loads(entry.read_text())
            LEDGER["runs"] += 1
            LEDGER["cached"] += 1
            LEDGER["seconds"] += cached["extra"].get("seconds", 0.0)
            return RunResult(variant, seed, cached["test"], cached["valid"], cached["extra"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hmoe-exp-") as run_dir:
        trainer = Trainer(config, Path(run_dir) / "run", dataset=dataset)
        results = trainer.fit()
        extra = measure(trainer) if measure is not None else {}
    extra["seconds"] = time.perf_counter() - started
    LEDGER["runs"] += 1
    LEDGER["seconds"] += extra["seconds"]
    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = entry.with_suffix(".tmp")
        temporary.write_text(json.dumps(
            {"test": results["test"], "valid": results["valid"], "extra": extra,
             "settings": settings, "data": data,
             "measure": None if measure is None else measure.__qualname__, "commit": _commit(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))
        temporary.replace(entry)
    return RunResult(variant, seed, results["test"], results["valid"], extra,
                     trainer.model if keep_model else None)


def run_variants(dataset: Dataset, variants: Mapping[str, Sequence[str]], seeds: Sequence[int],
                 log: Callable[[str], None] = print, **kwargs) -> dict[str, list[RunResult]]:
    """Every variant with every seed: {variant: [RunResult per seed]}."""
    results: dict[str, list[RunResult]] = {}
    for name, overrides in variants.items():
        for seed in seeds:
            result = train_run(dataset, name, seed, overrides, **kwargs)
            results.setdefault(name, []).append(result)
            metrics = ", ".join(f"{t} auc {m['auc']:.4f}" for t, m in result.test.items())
            log(f"  {name} seed {seed}: {metrics}")
    return results


# --------------------------------------------------------------------------------------------
# Statistics and tables


def values(runs: Sequence[RunResult], task: str, metric: str, split: str = "test") -> list[float]:
    result = []
    for r in runs:
        value = getattr(r, split)[task][metric]  # None: not defined (NaN in results.json)
        result.append(float("nan") if value is None else float(value))
    return result


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def fmt(xs: Sequence[float], digits: int = 4) -> str:
    mean, std = mean_std(xs)
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def exceeds_noise(a: Sequence[float], b: Sequence[float]) -> bool:
    """|mean_a − mean_b| > 2 standard errors of the difference (module docstring)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if math.isnan(ma) or math.isnan(mb):
        return False
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    return abs(ma - mb) > 2 * se


def verdict(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> str:
    """"better" / "worse" (beyond the noise) or "within noise", for a against b."""
    if not exceeds_noise(a, b):
        return "within noise"
    better = (mean_std(a)[0] > mean_std(b)[0]) == higher_is_better
    return "better" if better else "worse"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """An experiment's part of docs/RESULTS.md: markdown, figures written, numbers for JSON."""

    title: str
    markdown: str
    numbers: dict = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)


def claim(reference: str, statement: str, finding: str) -> str:
    """The markdown line that sets what the paper claims against what this run found."""
    return f"\n\n**Claim** ({reference}): {statement}\n\n**Here**: {finding}"


def verdicts(a_name: str, a: Sequence[float], others: Mapping[str, Sequence[float]],
             higher_is_better: bool = True) -> str:
    """"A is better than X, Y; within noise of Z; worse than W" over ``others``."""
    groups: dict[str, list[str]] = {"better": [], "within noise": [], "worse": []}
    for name, b in others.items():
        groups[verdict(a, b, higher_is_better)].append(name)
    parts = []
    if groups["better"]:
        parts.append(f"better than {', '.join(groups['better'])}")
    if groups["within noise"]:
        parts.append(f"within noise of {', '.join(groups['within noise'])}")
    if groups["worse"]:
        parts.append(f"worse than {', '.join(groups['worse'])}")
    return f"{a_name} is " + "; ".join(parts)
