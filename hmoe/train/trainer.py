r"""The trainer: a run config in, a run directory out (design section 3.7).

    from hmoe.train import Trainer, load_run_config
    results = Trainer(load_run_config("configs/quickstart.yaml"), "runs/quick").fit()

The run directory::

    config.resolved.yaml   the RunConfig with every default filled (what ``--config`` takes back)
    schema.yaml            the dataset schema the model was built on (vocab sizes, quantizers)
    model.yaml             the model's full ModelConfig
    metrics.jsonl          one JSON record per line: {"kind": "train", "step", "epoch", "loss",
                           "losses", "lr", "samples_per_s"}, {"kind": "eval", "split", "step",
                           "metrics": {task: {auc, gauc, logloss, ne, ...}}},
                           {"kind": "grad_cosine", "step", "cosine": {"a|b": c}},
                           {"kind": "lr", "step", "lr": [per group]} (train.lr_decay),
                           {"kind": "final", ...}
    checkpoints/last.pt    model, optimizer, RNG and loop state after the last checkpointed step
    checkpoints/best.pt    the model at the best evaluation of ``train.monitor``
    checkpoints/step_<n>.pt  the model's weights every ``train.snapshot_every`` steps (if set)
    results.json           the best model's valid and test metrics (raw, and calibrated:
                           ``valid_calibrated``, ``test_calibrated``)
    calibration.json       each task's Platt scaling fitted on valid (hmoe.train.calibrate)

A run on several ranks (hmoe.distributed) writes ``last.dcp/`` and ``best.dcp/`` instead:
directories of torch.distributed.checkpoint, to which every rank writes its own shards
(hmoe.distributed.checkpoint), so nothing is gathered. Either kind resumes at any world size
(at another one the optimizer starts afresh and the epoch restarts), and :func:`load_run`
reads either in one process. Snapshots are gathered on rank 0 (the analysis reads them whole).

Crash safety: every file is written to a temporary name and renamed over the old one
(``os.replace`` is atomic), metrics.jsonl is appended one fsync'd line at a time, and a resumed
run first cuts metrics.jsonl back to the records of the checkpointed steps, so a run killed at
any instant (kill -9 included) loses only the steps after its last checkpoint and resumes from
it. With ``train.deterministic`` the resumed run then matches an uninterrupted one exactly on
CPU: the data order is a pure function of (seed, epoch), and the checkpoint carries the RNG
state and the partial logging window.

A non-finite loss stops the run with FloatingPointError naming the step and the task; the
checkpoints written before it stay intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmoe.data.batches import check_columns
from hmoe.data.schema import Schema, dump_schema, load_schema
from hmoe.data.stream import ColumnSource, Source, StoreSource, Subset, as_source, stream_batches
from hmoe.losses import MultiTaskLoss, ipw_weights
from hmoe.models import HMoE, ModelConfig, preset_config
from hmoe.train.calibrate import CALIBRATION_FILE, Calibration, fit_calibration, \
    load_calibration
from hmoe.train.config import DataConfig, RunConfig, load_run_config
from hmoe.train.metrics import MetricAccumulator

__all__ = ["Dataset", "Run", "Trainer", "build_model", "check_dataset", "evaluate_model",
           "iter_predictions", "load_data", "load_run", "load_snapshots", "predict_scores",
           "read_metrics"]

CHECKPOINT_FORMAT = 1
SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------------------------
# Data and model.


@dataclass
class Dataset:
    """The rows of a run: the schema, each split as a source of the stream of batches
    (:mod:`hmoe.data.stream`: a Parquet store read a row group at a time, or in-memory columns
    in the batch layout) and, for the synthetic world, its planted ground truth."""

    schema: Schema
    splits: dict[str, Source | dict[str, np.ndarray]]
    ground_truth: object | None = None
    _sources: dict[str, Source] = field(default_factory=dict, repr=False, compare=False)

    def source(self, split: str) -> Source:
        """The split as a Source (in-memory columns converted to tensors once)."""
        if split not in self._sources:
            self._sources[split] = as_source(self.splits[split], self.schema)
        return self._sources[split]


def load_data(config: DataConfig, *, fit_from: str | os.PathLike | None = None) -> Dataset:
    """The splits of ``config``, checked against their schema (clear errors before training).

    A generated world is held in memory; a saved world and preprocessed files are streamed from
    disk (each row group checked as it is read). ``fit_from``: raw files are encoded with the
    vocabularies and statistics of this earlier cache (a warm start keeps the ids)."""
    from hmoe.data.synthetic import SyntheticConfig, generate, open_world

    if config.source == "files":
        return check_dataset(_load_files(config, fit_from))
    if config.source == "synthetic":
        try:
            world = generate(SyntheticConfig(**dict(config.synthetic)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"data.synthetic: {error}") from None
        return check_dataset(Dataset(_with_vocab(world.schema, config.vocab),
                                     dict(world.splits), world.ground_truth))
    if not Path(config.world).is_dir():
        raise ValueError(f"data.world: {config.world} is not a directory")
    try:
        files = open_world(config.world)
    except (OSError, ValueError) as error:
        raise ValueError(f"data.world: {error}") from None
    splits = {name: StoreSource(store) for name, store in files.stores.items()}
    return check_dataset(Dataset(_with_vocab(files.schema, config.vocab), splits,
                                 files.ground_truth))


def _with_vocab(schema: Schema, vocab: Mapping[str, Mapping]) -> Schema:
    """``schema`` with the vocabularies of data.vocab (ids of a world are raw ids >= 0)."""
    if not vocab:
        return schema
    from hmoe.data.schema import load_schema, schema_to_dict

    data = schema_to_dict(schema)
    names = [f["name"] for f in data["features"] if f["type"] == "categorical"]
    unknown = sorted(set(vocab) - set(names))
    if unknown:
        raise ValueError(f"data.vocab: {unknown} are not categorical features; they are "
                         f"{names}")
    for entry in data["features"]:
        if entry["name"] in vocab:
            entry.pop("vocab_size", None)
            entry["vocab"] = dict(vocab[entry["name"]])
    try:
        return load_schema(data)
    except ValueError as error:
        raise ValueError(f"data.vocab: {error}") from None


def _default_cache(config: DataConfig) -> str:
    from hmoe.data.preprocess import default_cache

    return default_cache(config.dataset, config.cache)


def _load_files(config: DataConfig, fit_from: str | os.PathLike | None = None) -> Dataset:
    """Raw files through hmoe.data.preprocess (cached), streamed from the cache; splits the
    config's files lack are drawn from train by a hash of the row (data.split fractions and
    seed): stable subsets of about that fraction, never held in memory."""
    from hmoe.data.preprocess import load_dataset_config, preprocess

    dataset_config = load_dataset_config(config.dataset)
    files = dict(config.files) if isinstance(config.files, Mapping) else config.files
    paths = files.values() if isinstance(files, dict) else [files]
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"data.files: {path} does not exist")
    cache = _default_cache(config)
    if fit_from is not None and config.cache is None:  # apart from the cache it starts from
        cache = f"{Path(fit_from).resolve()}-next"
    data = preprocess(dataset_config, files, cache, on_error=config.on_error, fit_from=fit_from)
    splits: dict[str, Source] = {name: StoreSource(data.store(name)) for name in data.splits}
    missing = [name for name in ("valid", "test") if name not in splits]
    if missing:
        fractions = {name: float(config.split.get(name, 0.1)) for name in missing}
        fractions["train"] = 1.0 - sum(fractions.values())
        train = splits["train"]
        seed = int(config.split.get("seed", 0))
        for name in fractions:
            splits[name] = Subset(train, name, fractions, seed)
    return Dataset(data.schema, splits, None)


def check_dataset(dataset: Dataset) -> Dataset:
    """``dataset`` after checking that every split exists, is non-empty and matches the schema
    (column shapes and dtypes, id ranges, labels in {0, 1}): ValueError naming the split.
    In-memory splits are checked whole; streamed ones on their first row group here, and every
    row group as the stream reads it."""
    for split in SPLITS:
        if split not in dataset.splits:
            raise ValueError(f"data: the data has no {split!r} split")
        source = dataset.source(split)
        if source.num_rows == 0:
            raise ValueError(f"data: the {split!r} split is empty")
        try:
            if isinstance(source, ColumnSource):
                if "labels" not in source.tensors:
                    raise ValueError("the split has no labels column")
                check_columns(source.tensors, dataset.schema)
            else:
                window = source.window([int(np.flatnonzero(source.unit_rows)[0])])
                window.take(window.rows)  # decoded and checked
        except (TypeError, ValueError) as error:
            raise ValueError(f"data ({split} split): {error}") from None
    return dataset


def model_config(config: RunConfig, schema: Schema) -> ModelConfig:
    """The ModelConfig a run config names: its preset with options, or its full config."""
    section = config.model
    if section.config is not None:
        model = ModelConfig.from_dict(dict(section.config))
        if section.tasks is not None and tuple(section.tasks) != tuple(t.name for t in model.tasks):
            raise ValueError("model.tasks: with model.config the tasks are the config's own; "
                             "leave model.tasks unset")
        return model
    try:
        return preset_config(section.preset, schema, section.tasks, **dict(section.options))
    except (TypeError, ValueError) as error:
        raise ValueError(f"model (preset {section.preset!r}): {error}") from None


def build_model(config: RunConfig, schema: Schema) -> HMoE:
    """The model of a run config on ``schema``, initialised from ``train.seed``."""
    torch.manual_seed(config.train.seed)
    return HMoE(model_config(config, schema), schema)


# --------------------------------------------------------------------------------------------
# Evaluation and prediction.


def _label_columns(schema: Schema, tasks: Sequence[str]) -> list[int]:
    return [schema.task_index(t) for t in tasks]


def _eval_batches(data, schema: Schema, batch_size: int, num_workers: int):
    return stream_batches(as_source(data, schema), batch_size, num_workers=num_workers)


@torch.no_grad()
def iter_predictions(model: HMoE, data, batch_size: int = 8192, *, num_workers: int = 0,
                     calibration: Calibration | None = None
                     ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]]:
    """(batch, {task: (B,) probabilities (float64)}) of ``model`` over ``data`` (a source or
    columns), in row order: predictions of any size, a batch at a time; calibrated by
    ``calibration`` when given (hmoe.train.calibrate)."""
    was_training = model.training
    model.eval()
    try:
        for batch in _eval_batches(data, model.schema, batch_size, num_workers):
            logits = {t: z.double() for t, z in model(batch)["logits"].items()}
            if calibration is not None:
                logits = calibration.apply(logits)
            yield batch, {task: torch.sigmoid(z).numpy() for task, z in logits.items()}
    finally:
        model.train(was_training)


def predict_scores(model: HMoE, columns, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """{task: (N,) predicted probabilities (float64)} of ``model`` over ``columns`` (in
    memory; :func:`iter_predictions` streams)."""
    parts: dict[str, list[np.ndarray]] = {t: [] for t in model.tasks}
    for _, scores in iter_predictions(model, columns, batch_size):
        for task, values in scores.items():
            parts[task].append(values)
    return {t: np.concatenate(p) if p else np.zeros(0) for t, p in parts.items()}


@torch.no_grad()
def evaluate_model(model: HMoE, data, batch_size: int = 8192, *, num_workers: int = 0,
                   metrics: Mapping[str, Any] | None = None,
                   calibration: Calibration | None = None) -> dict[str, dict[str, float]]:
    """Every metric of every task of ``model`` on ``data`` (a source or in-memory columns),
    streamed in bounded memory (hmoe.train.metrics.MetricAccumulator, options ``metrics``);
    gAUC over ``group_id`` when the data carries it; of the calibrated scores when
    ``calibration`` is given."""
    tasks = list(model.tasks)
    label_columns = _label_columns(model.schema, tasks)
    accumulator = MetricAccumulator(tasks, from_logits=True, **dict(metrics or {}))
    was_training = model.training
    model.eval()
    try:
        for batch in _eval_batches(data, model.schema, batch_size, num_workers):
            logits = model(batch)["logits"]
            if calibration is not None:
                logits = calibration.apply({t: z.double() for t, z in logits.items()})
            accumulator.update(logits, batch["labels"][:, label_columns],
                               groups=batch.get("group_id"))
    finally:
        model.train(was_training)
    return accumulator.compute()


# --------------------------------------------------------------------------------------------
# Files: atomic writes and the metrics log.


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_save(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None  # JSON has no NaN
    if isinstance(value, np.integer):
        return int(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line, from a killed run, is dropped)."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return records
    for line in lines:
        if not line.endswith("\n"):
            break
        records.append(json.loads(line))
    return records


class _MetricsLog:
    """metrics.jsonl, appended one fsync'd line at a time."""

    def __init__(self, path: Path, keep: int | None):
        self.path = path
        kept = [] if keep is None else read_metrics(path)[:keep]  # resume: the checkpoint's
        if keep is not None and len(kept) < keep:
            raise ValueError(f"{path} has {len(kept)} records but the checkpoint expects {keep}: "
                             f"the file was changed by hand; cannot resume exactly")
        _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.count = len(kept)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.count += 1
        self._file.write(json.dumps(_jsonable(record)) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------------------------
# The trainer.


def _make_optimizer(config, parameters) -> torch.optim.Optimizer:
    train = config.train
    if train.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "adagrad":
        return torch.optim.Adagrad(parameters, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(parameters, lr=train.lr, weight_decay=train.weight_decay)


@contextlib.contextmanager
def _determinism(enabled: bool, threads: int | None) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count for the duration; restored after."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    try:
        if enabled:
            torch.use_deterministic_algorithms(True)
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def _progress(total: int | None, initial: int, mode: str, description: str):
    from tqdm import tqdm

    disable = {"on": False, "off": True}.get(mode, not sys.stderr.isatty())
    return tqdm(total=total, initial=initial, disable=disable, desc=description, unit="step",
                dynamic_ncols=True, leave=False)


def _shared_sets(model: HMoE) -> list[str]:
    return [s.name for s in model.config.sets if s.scope == "shared"]


def _changed_keys(previous: Mapping, current: Mapping) -> list[str]:
    """The dotted keys whose values differ between two nested config mappings."""
    changed = []
    for key in sorted(set(previous) | set(current), key=str):
        old, new = previous.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changed += [f"{key}.{inner}" for inner in _changed_keys(old, new)]
        elif old != new:
            changed.append(str(key))
    return changed


def _join_ranks(config: RunConfig):
    """The ranks of a multi-process run (hmoe.distributed.launch), None for one process."""
    from hmoe.distributed.launch import init_ranks, world_size_from_env

    if world_size_from_env() == 1:
        return None
    ranks = init_ranks()
    train = config.train
    if train.batch_size % ranks.world_size:
        raise ValueError(f"train.batch_size: {train.batch_size} rows do not split evenly "
                         f"between {ranks.world_size} ranks")
    if train.gradient_cosine_every:
        raise ValueError("train.gradient_cosine_every: not available with several ranks (the "
                         "tables' gradients are fused into their update)")
    return ranks


def _warm_start_cache(run_dir: Path) -> str | None:
    """The preprocessing cache of the run a warm start begins from (its vocabularies encode
    the new files), or None when that run did not read raw files."""
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file():
        raise ValueError(f"--init-from {run_dir}: not a run directory (no config.resolved.yaml)")
    data = load_run_config(str(resolved)).data
    if data.source != "files":
        return None
    cache = _default_cache(data)
    if not Path(cache, "feature_map.yaml").is_file():
        raise ValueError(f"--init-from {run_dir}: its preprocessing cache {cache} is gone; "
                         f"the new files need its vocabularies to keep the ids")
    return cache


def _check_warm_start(run_dir: Path, schema: Schema, model: HMoE) -> None:
    """A warm start needs a run of the same schema and model; says what differs."""
    for name in ("schema.yaml", "model.yaml"):
        if not (run_dir / name).is_file():
            raise ValueError(f"--init-from {run_dir}: not a run directory (no {name})")
    theirs = load_schema(str(run_dir / "schema.yaml"))
    if dump_schema(theirs) != dump_schema(schema):
        import yaml

        old, new = yaml.safe_load(dump_schema(theirs)), yaml.safe_load(dump_schema(schema))
        raise ValueError(f"--init-from {run_dir}: its schema differs from this data's in "
                         f"{_changed_keys(old, new) or ['the features']}: a warm start needs "
                         f"the same features, vocabularies and labels")
    model_config = load_yaml(run_dir / "model.yaml")
    if model_config != model.config.to_dict():
        raise ValueError(f"--init-from {run_dir}: its model differs in "
                         f"{_changed_keys(model_config, model.config.to_dict())}: a warm start "
                         f"needs the same model")


class _RankLog:
    """metrics.jsonl on rank 0 of several; the other ranks only keep its count."""

    def __init__(self, trainer: Trainer, loop: dict | None):
        keep = None if loop is None else loop["records"]
        self._log = _MetricsLog(trainer.run_dir / "metrics.jsonl", keep) if trainer.main \
            else None
        self.count = self._log.count if self._log is not None else (keep or 0)

    def write(self, record: dict) -> None:
        self.count += 1
        if self._log is not None:
            self._log.write(record)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


class Trainer:
    """Trains the model of ``config`` into the run directory ``run_dir``.

    Args:
        config: the RunConfig (hmoe.train.config).
        run_dir: the run directory; it must not hold another run unless ``resume``.
        resume: continue the run in ``run_dir`` from its last checkpoint. Its
            config.resolved.yaml must equal ``config`` (a different config is an error, so a
            resume never mixes two runs). Without a checkpoint yet, the run starts over.
        dataset: the data, when the caller has it already (else load_data(config.data)).
        init_from: a warm start: the run directory whose last checkpoint this run starts from
            (its model with MultiEmbedding's fused optimizer state and dynamic vocabularies,
            the optimizer state and the RNG), on data of the same schema.

    fit() -> the results dict also written to results.json.
    """

    def __init__(self, config: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 dataset: Dataset | None = None, init_from: str | os.PathLike | None = None):
        if not isinstance(config, RunConfig):
            raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
        self.config, self.run_dir, self.resume = config, Path(run_dir), bool(resume)
        self.init_from = None if init_from is None else Path(init_from)
        self.ranks = _join_ranks(config)
        self._on_main(self._check_run_dir)
        fit_from = None
        if self.init_from is not None and dataset is None and config.data.source == "files":
            fit_from = _warm_start_cache(self.init_from)
        self.dataset = check_dataset(dataset) if dataset is not None else \
            load_data(config.data, fit_from=fit_from)
        self.model = build_model(config, self.dataset.schema)
        if self.init_from is not None:
            _check_warm_start(self.init_from, self.dataset.schema, self.model)
        self.tasks = list(self.model.tasks)
        self.label_columns = _label_columns(self.dataset.schema, self.tasks)
        self.loss = MultiTaskLoss(config.loss.task_configs(self.tasks))
        if self.ranks is None:
            self.net, parameters = self.model, self.model.parameters()
        else:  # the tables sharded by TorchRec, the rest data parallel (hmoe.distributed)
            from hmoe.distributed.model import dense_parameters, distribute

            train = config.train
            self.net = distribute(self.model, sharding=train.sharding,
                                  optimizer=train.embedding_optimizer,
                                  lr=train.embedding_lr or train.lr, device=self.ranks.device)
            parameters = list(dense_parameters(self.net))
        self.optimizer = _make_optimizer(config, parameters)
        self.monitor = config.train.monitor or f"{self.tasks[0]}/auc"
        monitor_task = self.monitor.split("/")[0]
        if monitor_task not in self.tasks and monitor_task != "mean":
            raise ValueError(f"train.monitor: task {monitor_task!r} is not trained; tasks: "
                             f"{self.tasks}")
        self.gradient_sets = _shared_sets(self.model)

    # ---- ranks

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory (the only one, or rank 0)."""
        return self.ranks is None or self.ranks.main

    def _on_main(self, work, *args):
        """``work(*args)`` on rank 0, its result (or its ValueError) on every rank."""
        if self.ranks is None:
            return work(*args)
        from hmoe.distributed.launch import broadcast

        result = error = None
        if self.main:
            try:
                result = work(*args)
            except ValueError as failure:
                error = str(failure)
        result, error = broadcast((result, error))
        if error is not None:
            raise ValueError(error)
        return result

    def _single_state(self) -> dict | None:
        """The model's state in the single-process layout: on every rank for one process, on
        rank 0 of several (gathered from the shards: a collective every rank calls)."""
        return self.model.state_dict() if self.ranks is None else self.net.gather_state()

    # ---- the run directory

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _check_run_dir(self) -> None:
        resolved = self.run_dir / "config.resolved.yaml"
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run directory {self.run_dir} exists and is not a directory")
        if self.resume:
            if not resolved.is_file():
                raise ValueError(f"cannot resume: {self.run_dir} holds no run "
                                 f"(no config.resolved.yaml)")
            previous = load_run_config(str(resolved)).to_dict()
            if previous != self.config.to_dict():
                changed = _changed_keys(previous, self.config.to_dict())
                raise ValueError(f"cannot resume {self.run_dir}: the config differs from its "
                                 f"config.resolved.yaml in {changed}")
        elif self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            raise ValueError(f"run directory {self.run_dir} is not empty: resume it (--resume) "
                             f"or choose another --out; nothing in it was changed")

    def _remove_stale_temporaries(self) -> None:
        """Temporary files a killed run left mid-write (their targets are intact)."""
        for folder in (self.run_dir, self.checkpoint_dir):
            if folder.is_dir():
                for path in folder.glob(".*.tmp*"):
                    if path.is_file():
                        path.unlink()
        if self.checkpoint_dir.is_dir():
            from hmoe.distributed import checkpoint

            for name in ("last", "best"):
                checkpoint.recover(self.checkpoint_dir / f"{name}{checkpoint.SUFFIX}")

    def _write_run_files(self) -> None:
        import yaml

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.run_dir / "config.resolved.yaml",
                           yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        _atomic_write_text(self.run_dir / "schema.yaml", dump_schema(self.dataset.schema))
        _atomic_write_text(self.run_dir / "model.yaml",
                           yaml.safe_dump(self.model.config.to_dict(), sort_keys=False))

    # ---- checkpoints

    def _save_last(self, loop: dict, log: _MetricsLog) -> None:
        """The last checkpoint: the model, the optimizer, RNG and loop state; last.pt from one
        process, last.dcp from several (a collective), and the other kind removed."""
        loop["records"] = log.count  # a resume keeps exactly these metrics.jsonl lines
        state = {"format": CHECKPOINT_FORMAT, "optimizer": self.optimizer.state_dict(),
                 "ranks": 1 if self.ranks is None else self.ranks.world_size,
                 "rng": torch.get_rng_state(), "loop": dict(loop)}
        self._save("last", state, optimizer=True)

    def _save(self, name: str, state: dict, *, optimizer: bool = False) -> None:
        """checkpoints/<name>.pt holding ``state`` and the model (one process), or the
        distributed checkpoint <name>.dcp with ``state`` as its trainer.pt (several)."""
        from hmoe.distributed import checkpoint

        single, sharded = self.checkpoint_dir / f"{name}.pt", \
            self.checkpoint_dir / f"{name}{checkpoint.SUFFIX}"
        if self.ranks is None:
            _atomic_save(single, {**state, "model": self.model.state_dict()})
            stale = sharded
        else:
            checkpoint.save(self.net, sharded, state if self.main else None, optimizer=optimizer)
            stale = single
        if self.main:  # (a resume at another world size wrote the other kind before)
            if stale.is_dir():
                import shutil

                shutil.rmtree(stale)
            elif stale.is_file():
                stale.unlink()

    def _checkpoint(self, name: str) -> Path | None:
        from hmoe.distributed.checkpoint import find_checkpoint

        return find_checkpoint(self.run_dir, name)

    def _load_model(self, path: Path, *, optimizer: bool = False) -> dict:
        """Loads the model of checkpoint ``path`` (either kind, any world size) into this run's
        model; returns the checkpoint's other state (with the tables' fused optimizer state
        loaded when ``optimizer`` and the world size is the same)."""
        from hmoe.distributed import checkpoint

        if path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=False)
            if self.ranks is None:
                self.model.load_state_dict(state.pop("model"))
            else:
                self.net.load_single_state(state.pop("model"))
        else:
            state = checkpoint.read_extra(path) or {}
            if self.ranks is None:
                self.model.load_state_dict(checkpoint.read_model_state(path, self.model))
            else:
                same = state.get("ranks") == self.ranks.world_size
                checkpoint.load(self.net, path, optimizer=optimizer and same)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {state.get('format')} is not "
                             f"{CHECKPOINT_FORMAT}")
        return state

    def _load_last(self) -> dict | None:
        path = self._checkpoint("last")
        if path is None:
            return None
        state = self._load_model(path, optimizer=True)
        ranks = 1 if self.ranks is None else self.ranks.world_size
        loop = state["loop"]
        if state.get("ranks", 1) == ranks:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # another world size: other optimizers over other parameters, another data plan
            if self.main:
                print(f"hmoe train: resuming a run of {state.get('ranks', 1)} rank(s) on "
                      f"{ranks}: the optimizer state starts afresh and epoch "
                      f"{loop['epoch'] + 1} restarts from its first batch", file=sys.stderr,
                      flush=True)
            loop["batch"] = 0
        torch.set_rng_state(state["rng"])
        return loop

    # ---- one step

    def _sample_weight(self, batch) -> dict[str, torch.Tensor] | None:
        gamma = self.config.loss.ipw_gamma
        if gamma == 0 or "exposure_count" not in batch:
            return None
        labels = batch["labels"]
        return {t: ipw_weights(batch["exposure_count"], labels[:, c], gamma)
                for t, c in zip(self.tasks, self.label_columns)}

    def _gradient_cosines(self, losses: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Cosines between the tasks' gradients on the shared sets' parameters."""
        slices = [s for name in self.gradient_sets
                  for s in self.model.set_parameters(name).values()]
        params = list({id(s.parameter): s.parameter for s in slices}.values())
        flat = {}
        for task, loss in losses.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            by_param = {id(p): g for p, g in zip(params, grads)}
            parts = [s.of(by_param[id(s.parameter)]).reshape(-1) for s in slices
                     if by_param[id(s.parameter)] is not None]
            flat[task] = torch.cat(parts).double() if parts else None
        cosines = {}
        for i, a in enumerate(self.tasks):
            for b in self.tasks[i + 1:]:
                ga, gb = flat[a], flat[b]
                norm = 0.0 if ga is None or gb is None else float(ga.norm() * gb.norm())
                cosines[f"{a}|{b}"] = float(ga @ gb) / norm if norm > 0 else float("nan")
        return cosines

    def _step(self, batch, step: int, epoch: int, log: _MetricsLog) -> dict[str, torch.Tensor]:
        l2 = self.config.train.embedding_l2
        out = self.net(batch, embedding_l2=True) if l2 else self.net(batch)
        where = (f"at step {step + 1} (epoch {epoch + 1})", f"The checkpoints written before "
                 f"this step are intact in {self.checkpoint_dir}; try a lower train.lr or "
                 f"train.grad_clip")
        try:
            total, losses = self.loss(out["logits"], batch["labels"][:, self.label_columns],
                                      self.tasks, self._sample_weight(batch))
        except ValueError as error:  # the loss checks its inputs: non-finite logits land here
            bad = [t for t, z in out["logits"].items() if not bool(torch.isfinite(z).all())]
            if not bad:
                raise
            raise FloatingPointError(f"non-finite loss {where[0]}: the logits of task(s) {bad} "
                                     f"are not finite ({error}). {where[1]}") from None
        if l2:  # an L2 penalty on the embedding rows this batch read (not the whole table)
            penalty = out["aux_losses"]["embedding_l2"]
            losses = {**losses, "embedding_l2": penalty.detach()}
            total = total + l2 * penalty
        if not bool(torch.isfinite(total)):
            values = {t: float(v) for t, v in losses.items()}
            raise FloatingPointError(f"non-finite loss {where[0]}: total {float(total)}, per "
                                     f"task {values}. {where[1]}")
        every = self.config.train.gradient_cosine_every
        if every and (step + 1) % every == 0 and len(self.tasks) > 1 and self.gradient_sets:
            log.write({"kind": "grad_cosine", "step": step + 1, "epoch": epoch,
                       "cosine": self._gradient_cosines(losses)})
        self._reset_reclaimed()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.config.train.grad_clip is not None:  # the tables the ranks shard have no .grad
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups
                                            for p in group["params"]], self.config.train.grad_clip)
        self.optimizer.step()
        return {"loss": total.detach(), **{t: v.detach() for t, v in losses.items()}}

    def _reset_reclaimed(self) -> None:
        """The dense optimizer's state of embedding rows that a dynamic vocabulary gave to new
        ids in this step's forward (their moments belonged to the ids before)."""
        for param, rows in self.model.take_reclaimed():
            for value in self.optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.dim() and \
                        value.shape[0] == param.shape[0]:
                    value[rows] = 0

    # ---- evaluation and early stopping

    def _evaluate(self, split: str) -> dict[str, dict[str, float]]:
        """The metrics of the model on ``split``; with several ranks, evaluated by all of them
        together (hmoe.distributed.evaluate: each scores its share of the rows), the same on
        every rank."""
        if self.ranks is None:
            return self._metrics(self.model, split)
        from hmoe.distributed.evaluate import evaluate_ranks

        train = self.config.train
        return evaluate_ranks(self.net, self.dataset.source(split), self.dataset.schema,
                              self.tasks, train.eval_batch_size,
                              num_workers=self.num_workers(split),
                              metrics=train.metric_options())

    def _metrics(self, model: HMoE, split: str, calibration: Calibration | None = None
                 ) -> dict[str, dict[str, float]]:
        return evaluate_model(model, self.dataset.source(split),
                              self.config.train.eval_batch_size,
                              num_workers=self.num_workers(split),
                              metrics=self.config.train.metric_options(),
                              calibration=calibration)

    def _calibrate(self) -> Calibration | None:
        """Each task's Platt scaling on the valid split (train.calibrate), saved in the run
        (hmoe.train.calibrate); None when off or with several ranks (not yet there)."""
        train = self.config.train
        if not train.calibrate or self.ranks is not None:
            return None
        calibration = fit_calibration(self.model, self.dataset.source("valid"), self.tasks,
                                      train.eval_batch_size, max_rows=train.calibration_rows)
        calibration.save(self.run_dir / CALIBRATION_FILE)
        return calibration

    def num_workers(self, split: str) -> int:
        """train.num_workers; "auto": one worker for a split streamed from disk (reading and
        decoding then overlap the model's step), none for in-memory columns."""
        workers = self.config.train.num_workers
        if workers == "auto":
            return 0 if isinstance(self.dataset.source(split), ColumnSource) else 1
        return workers

    def _monitored(self, metrics) -> float:
        task, name = self.monitor.split("/")
        tasks = self.tasks if task == "mean" else [task]
        for t in tasks:
            if name not in metrics[t]:
                raise ValueError(f"train.monitor: metric {name!r} does not exist; metrics: "
                                 f"{sorted(metrics[t])}")
        return float(np.mean([metrics[t][name] for t in tasks]))

    def _improved(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value > best if self.config.train.monitor_mode == "max" else value < best

    def _eval_and_track(self, loop: dict, log: _MetricsLog, tensorboard) -> None:
        metrics = self._evaluate("valid")
        log.write({"kind": "eval", "split": "valid", "step": loop["step"],
                   "epoch": loop["epoch"], "metrics": metrics})
        value = self._monitored(metrics)
        if tensorboard is not None:
            for task, values in metrics.items():
                for name, v in values.items():
                    tensorboard.add_scalar(f"valid/{task}/{name}", v, loop["step"])
        if self._improved(value, loop["best"]):
            loop.update(best=value, best_step=loop["step"], bad_evals=0)
            self._save("best", {"format": CHECKPOINT_FORMAT, "step": loop["step"],
                                "monitor": self.monitor, "value": value})
        else:
            loop["bad_evals"] += 1
            decay = self.config.train.lr_decay
            if decay is not None:  # lr x decay after an evaluation that did not improve
                for group in self.optimizer.param_groups:
                    group["lr"] *= decay
                log.write({"kind": "lr", "step": loop["step"], "epoch": loop["epoch"],
                           "lr": [group["lr"] for group in self.optimizer.param_groups]})
        patience = self.config.train.patience
        if patience and loop["bad_evals"] >= patience:
            loop["stopped_early"] = True

    # ---- the loop

    def fit(self) -> dict:
        train = self.config.train
        with _determinism(train.deterministic, train.threads):
            if self.resume and self.main:
                self._remove_stale_temporaries()
            loop = self._load_last() if self.resume else None
            if loop is None and self.init_from is not None:
                self._warm_start()
            done = loop is not None and loop.get("done")
            if done and (self.run_dir / "results.json").is_file():
                return json.loads((self.run_dir / "results.json").read_text())
            self._on_main(self._write_run_files)
            log = self._on_main(_MetricsLog, self.run_dir / "metrics.jsonl",
                                None if loop is None else loop["records"]) \
                if self.ranks is None else _RankLog(self, loop)
            if loop is None:
                loop = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None,
                        "bad_evals": 0, "stopped_early": False, "window": None,
                        "window_steps": 0, "done": False}
            tensorboard = self._tensorboard()
            try:
                if not done:  # (a run killed after its last checkpoint only lacks its results)
                    if self.config.train.mode == "online":
                        self._train_online(loop, log, tensorboard)
                    else:
                        self._train(loop, log, tensorboard)
                    loop["done"] = True
                    self._save_last(loop, log)
                results = self._results(loop, log)
            finally:
                log.close()
                if tensorboard is not None:
                    tensorboard.close()
        return results

    def _tensorboard(self):
        if not self.config.train.tensorboard or not self.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError(f"train.tensorboard needs the tensorboard package "
                             f"(pip install tensorboard): {error}") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _epoch_batches(self, epoch: int, start: int):
        """The train stream of ``epoch`` from its batch ``start``: a pure function of
        (train.seed, epoch), so a resumed run sees the batches an uninterrupted one would."""
        train, data = self.config.train, self.config.data
        ranks = 1 if self.ranks is None else self.ranks.world_size
        return stream_batches(self.dataset.source("train"), train.batch_size // ranks,
                              shuffle=True, seed=train.seed, epoch=epoch,
                              shuffle_buffer=data.shuffle_buffer,
                              num_workers=self.num_workers("train"), start=start,
                              pin_memory=torch.cuda.is_available(),
                              rank=0 if self.ranks is None else self.ranks.rank, num_ranks=ranks)

    def _train(self, loop: dict, log: _MetricsLog, tensorboard) -> None:
        """Epochs of steps; an evaluation and a checkpoint at each epoch's end (and every
        train.eval_every steps), a checkpoint every train.checkpoint_every steps."""
        train = self.config.train
        per_epoch = len(self._epoch_batches(0, 0))
        total = per_epoch * train.epochs  # for the progress bar; the loop counts epochs
        if train.max_steps is not None:
            total = min(total, train.max_steps)

        def more() -> bool:  # (a resume at another world size made steps of other epochs)
            return loop["epoch"] < train.epochs and (train.max_steps is None or
                                                     loop["step"] < train.max_steps)

        bar = _progress(total, loop["step"], train.progress if self.main else "off", "train")
        tick, tick_step = time.perf_counter(), loop["step"]
        try:
            while more() and not loop["stopped_early"]:
                epoch = loop["epoch"]
                batches = self._epoch_batches(epoch, loop["batch"])
                for batch in batches:
                    values = self._step(batch, loop["step"], epoch, log)
                    loop["step"] += 1
                    loop["batch"] += 1
                    bar.update(1)
                    self._accumulate(loop, values)
                    step = loop["step"]
                    if train.snapshot_every and step % train.snapshot_every == 0:
                        self._snapshot(step)
                    if step % train.log_every == 0:
                        elapsed = time.perf_counter() - tick
                        rate = (step - tick_step) * train.batch_size / elapsed if elapsed else 0.0
                        self._log_train(loop, log, tensorboard, rate)
                        bar.set_postfix(loss=f"{loop['last_loss']:.4f}")
                        tick, tick_step = time.perf_counter(), step
                    if not more() or loop["batch"] == per_epoch:
                        break  # the evaluation below closes the epoch (or the run)
                    if train.eval_every and step % train.eval_every == 0:
                        self._eval_and_track(loop, log, tensorboard)
                        self._save_last(loop, log)
                        if loop["stopped_early"]:
                            break
                    elif step % train.checkpoint_every == 0:
                        self._save_last(loop, log)
                if loop["stopped_early"]:
                    break
                if loop["batch"] == per_epoch:
                    loop["epoch"], loop["batch"] = epoch + 1, 0
                self._eval_and_track(loop, log, tensorboard)
                self._save_last(loop, log)
        finally:
            bar.close()

    def _snapshot(self, step: int) -> None:
        """checkpoints/step_<step>.pt: the model's weights (gathered from the ranks)."""
        state = self._single_state()
        if self.main:
            _atomic_save(self.checkpoint_dir / f"step_{step}.pt",
                         {"format": CHECKPOINT_FORMAT, "step": step, "model": state})

    def _warm_start(self) -> None:
        """Starts from the last checkpoint of the run ``init_from`` (checked in __init__)."""
        from hmoe.distributed.checkpoint import checkpoint_path

        path = checkpoint_path(self.init_from, "last")
        state = self._load_model(path, optimizer=True)
        ranks = 1 if self.ranks is None else self.ranks.world_size
        if state.get("ranks", 1) == ranks:
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
        elif self.main:
            print(f"hmoe train: a warm start from a run of {state.get('ranks', 1)} rank(s) on "
                  f"{ranks}: the model is kept, its optimizer state starts afresh",
                  file=sys.stderr, flush=True)

    def _train_online(self, loop: dict, log: _MetricsLog, tensorboard) -> None:
        """One pass over the train split in time order, window by window: each window is
        evaluated by the model as it is (progressive validation), then trained on, then
        checkpointed (hmoe.train.online)."""
        from hmoe.train.online import parse_window, window_batches

        train, data = self.config.train, self.config.data
        if self.ranks is not None:
            raise ValueError("train.mode: online runs on one process for now (not with "
                             "--nproc or torchrun)")
        window = parse_window(train.window)
        state = loop.setdefault("online", {"position": 0, "windows": 0})
        if state["position"] is None:  # the pass is over (a resume after the last window)
            return
        common = {"time_column": data.time_column, "start": state["position"],
                  "time_range": data.time_range, "num_workers": self.num_workers("train")}
        source = self.dataset.source("train")
        tests = window_batches(source, train.eval_batch_size, window, **common)
        trains = window_batches(source, train.batch_size, window, **common)
        if train.snapshot_every and state["windows"] == 0:
            self._snapshot(0)  # the model that tests the first window
        bar = _progress(None, loop["step"], train.progress, "online")
        tick, tick_step = time.perf_counter(), loop["step"]
        try:
            while True:
                current, boundary, rows = self._test_window(tests, window)
                if current is None:
                    state["position"] = None
                    break
                log.write({"kind": "window", "window": current,
                           "start": current * window.size if window.kind == "time" else None,
                           "rows": rows["count"], "step": loop["step"],
                           "metrics": rows["metrics"]})
                for _, batch, _ in trains:
                    if batch is None:
                        break
                    values = self._step(batch, loop["step"], 0, log)
                    loop["step"] += 1
                    bar.update(1)
                    self._accumulate(loop, values)
                    if loop["step"] % train.log_every == 0:
                        elapsed = time.perf_counter() - tick
                        rate = (loop["step"] - tick_step) * train.batch_size / elapsed \
                            if elapsed else 0.0
                        self._log_train(loop, log, tensorboard, rate)
                        tick, tick_step = time.perf_counter(), loop["step"]
                state["windows"] += 1
                state["position"] = boundary  # the next window's first row (None: the end)
                if train.snapshot_every and state["windows"] % train.snapshot_every == 0:
                    self._snapshot(loop["step"])
                self._save_last(loop, log)
                if boundary is None:
                    break
        finally:
            bar.close()
        loop["epoch"] = 1

    @torch.no_grad()
    def _test_window(self, tests, window) -> tuple[int | None, object, dict]:
        """Scores the next window with the model as it is: (window, position of the next
        window's first row, {"count": rows, "metrics": its metrics})."""
        accumulator = MetricAccumulator(self.tasks, from_logits=True,
                                        **self.config.train.metric_options())
        current, boundary = None, None
        self.model.eval()
        try:
            for w, batch, position in tests:
                if batch is None:
                    boundary = position
                    break
                current = w
                accumulator.update(self.model(batch)["logits"],
                                   batch["labels"][:, self.label_columns],
                                   groups=batch.get("group_id"))
        finally:
            self.model.train()
        if current is None:
            return None, None, {}
        return current, boundary, {"count": len(accumulator), "metrics": accumulator.compute()}

    @staticmethod
    def _accumulate(loop: dict, values: Mapping[str, torch.Tensor]) -> None:
        window = loop["window"]
        loop["window"] = {k: float(v) for k, v in values.items()} if window is None \
            else {k: window[k] + float(v) for k, v in values.items()}
        loop["window_steps"] += 1

    def _log_train(self, loop: dict, log: _MetricsLog, tensorboard, rate: float) -> None:
        n = loop["window_steps"]
        means = {k: v / n for k, v in loop["window"].items()}
        if self.ranks is not None:  # the mean over the ranks' halves of the batches
            import torch.distributed as dist

            values = torch.tensor(list(means.values()), dtype=torch.float64)
            dist.all_reduce(values)
            means = dict(zip(means, (values / self.ranks.world_size).tolist()))
        loop["last_loss"] = means["loss"]
        record = {"kind": "train", "step": loop["step"], "epoch": loop["epoch"],
                  "loss": means.pop("loss"), "losses": means,
                  "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": rate}
        log.write(record)
        if tensorboard is not None:
            tensorboard.add_scalar("train/loss", record["loss"], loop["step"])
        loop["window"], loop["window_steps"] = None, 0

    def _results(self, loop: dict, log: _MetricsLog) -> dict:
        """The best model's (else the last's) valid and test metrics: the final record of
        metrics.jsonl and results.json."""
        best = self._checkpoint("best")
        if best is not None:
            self._load_model(best)
        found = {"monitor": self.monitor, "best": loop["best"], "best_step": loop["best_step"],
                 "steps": loop["step"], "epochs": loop["epoch"],
                 "stopped_early": loop["stopped_early"], "tasks": self.tasks,
                 "mode": self.config.train.mode,
                 "windows": loop.get("online", {}).get("windows"),
                 "valid": self._evaluate("valid"), "test": self._evaluate("test")}
        calibration = self._calibrate()
        if calibration is not None:
            found["calibration"] = calibration.to_dict()["tasks"]
            for split in ("valid", "test"):
                found[f"{split}_calibrated"] = self._metrics(self.model, split, calibration)
        log.write({"kind": "final", "step": loop["step"], **found})
        if self.main:
            _atomic_write_text(self.run_dir / "results.json",
                               json.dumps(_jsonable(found), indent=2) + "\n")
        return _jsonable(found)


# --------------------------------------------------------------------------------------------
# Reading a run back.


@dataclass
class Run:
    """A finished (or checkpointed) run read back: its config, data and model."""

    run_dir: Path
    config: RunConfig
    dataset: Dataset
    model: HMoE
    checkpoint: str
    calibration: Calibration | None = None  # the run's calibration.json, if it has one


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best", *,
             dataset: Dataset | None = None) -> Run:
    """The model of a run directory at checkpoint "best" or "last" (or a .pt file, or a .dcp
    directory of a run on several ranks, read here in one process), with the run's data
    (regenerated from its config when not given) and the schema it was trained on."""
    from hmoe.distributed.checkpoint import read_trained_model

    run_dir = Path(run_dir)
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.resolved.yaml)")
    config = load_run_config(str(resolved))
    model, path, _ = read_trained_model(run_dir, str(checkpoint))
    if dataset is None:
        dataset = load_data(config.data)
    return Run(run_dir, config, Dataset(model.schema, dataset.splits, dataset.ground_truth),
               model, str(path), load_calibration(run_dir))


def load_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, dict]]:
    """[(step, model state_dict)] of a run's checkpoints/step_<n>.pt, in step order."""
    found = []
    for path in Path(run_dir, "checkpoints").glob("step_*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        found.append((int(state["step"]), state["model"]))
    return sorted(found, key=lambda pair: pair[0])


def load_yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))
