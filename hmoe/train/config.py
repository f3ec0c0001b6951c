r"""The run configuration: what ``hmoe train --config FILE`` reads (design section 3.7).

A run config is a YAML mapping of four sections; every key has a default, so an empty file
(or no file) trains the synthetic default::

    data:                       # where the rows come from
      source: synthetic         # "synthetic" (generated from data.synthetic), "world" or "files"
      synthetic: {num_rows: 200000, seed: 0}   # any hmoe.data.SyntheticConfig field
      world: null               # a directory written by SyntheticWorld.save (source: world)
      dataset: null             # source files: a dataset config, a shipped name (criteo, avazu,
                                # ...; `hmoe configs` lists them) or the path of a YAML file
      files: null               # its raw files: {train: a.csv, valid: b.csv, test: c.csv}, or
                                # one path (the train split, or a behaviour log)
      cache: null               # the preprocessing cache (default .cache/hmoe/<dataset name>)
      on_error: raise           # a malformed row: raise (naming file, line, column) or skip
                                # (skipped rows are counted in the cache's feature_map.yaml)
      split: {valid: 0.1, test: 0.1, seed: 0}  # fractions drawn from train for missing splits
      shuffle_buffer: 262144    # rows shuffled together (per worker): memory against randomness
    model:
      preset: stem              # a name of hmoe.models.PRESETS, or null with model.config
      tasks: null               # the tasks to train; null: the preset's default
      options: {}               # the preset's keyword overrides (dim, sequence_encoder, ...)
      config: null              # a full ModelConfig mapping instead of a preset
    loss:
      kind: combined_pair       # default of every task: bce | combined_pair | listwise
      alpha: 0.7                # its BCE share
      tasks: {}                 # per-task overrides: {click: {kind: bce, weight: 2.0}}
      ipw_gamma: 0.0            # > 0: positives weighted exposure_count^-gamma (normalised)
    train:
      epochs: 2                 # ... see TrainConfig

Unknown keys are errors naming the dotted key. :func:`apply_overrides` applies command-line
``section.key=value`` overrides (values parsed as YAML: ``train.lr=1e-3``,
``model.options.dim=32``) to the plain mapping before it is parsed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hmoe.distributed.model import EMBEDDING_OPTIMIZERS, SHARDINGS
from hmoe.losses import DEFAULT_ALPHA, LOSS_KINDS

__all__ = ["DataConfig", "LossConfig", "ModelSection", "RunConfig", "TrainConfig",
           "apply_overrides", "load_run_config"]

DATA_SOURCES = ("synthetic", "world", "files")
OPTIMIZERS = ("adam", "adagrad", "sgd")
MONITOR_MODES = ("max", "min")


def _fail(where: str, message: str):
    raise ValueError(f"{where}: {message}")


def _number(where: str, value, *, minimum: float | None = None, positive: bool = False,
            integer: bool = False, optional: bool = False):
    if value is None and optional:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        _fail(where, f"must be a finite {'integer' if integer else 'number'}, got {value!r}")
    if positive and value <= 0:
        _fail(where, f"must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(where, f"must be >= {minimum}, got {value!r}")
    return value


def _choice(where: str, value, choices: Sequence[str]):
    if value not in choices:
        _fail(where, f"must be one of {list(choices)}, got {value!r}")
    return value


def _section(cls, data, where: str):
    """cls(**data) with unknown keys rejected, naming the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        _fail(where, f"expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        _fail(where, f"unknown key(s) {[f'{where}.{k}' for k in unknown]}; known keys: "
                     f"{sorted(known)}")
    return cls(**dict(data))


@dataclass(frozen=True)
class DataConfig:
    """Where the rows come from: a generated synthetic world, or one saved to a directory.
    time_column names the column of row times (seconds) that online training reads in order;
    time_range [start, end) keeps only the rows of those times (online training). vocab
    {feature: {kind: dynamic | hash, capacity (buckets), min_count, ...}} gives categorical
    features of a synthetic or saved world a dynamic or hashed vocabulary
    (hmoe.data.schema.CategoricalFeature); a dataset config declares it on the feature."""

    source: str = "synthetic"
    synthetic: Mapping[str, Any] = field(default_factory=dict)
    world: str | None = None
    dataset: str | None = None
    files: str | Mapping[str, str] | None = None
    cache: str | None = None
    on_error: str = "raise"
    split: Mapping[str, Any] = field(default_factory=lambda: {"valid": 0.1, "test": 0.1,
                                                               "seed": 0})
    shuffle_buffer: int = 262_144
    time_column: str | None = None
    time_range: Sequence[int] | None = None
    vocab: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        _choice("data.source", self.source, DATA_SOURCES)
        if self.time_column is not None and (not isinstance(self.time_column, str)
                                             or not self.time_column):
            _fail("data.time_column", f"expected a column name, got {self.time_column!r}")
        if self.time_range is not None:
            bounds = self.time_range
            if isinstance(bounds, str) or not isinstance(bounds, Sequence) or len(bounds) != 2 \
                    or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) \
                    or bounds[0] >= bounds[1]:
                _fail("data.time_range", f"expected [start, end) as two integers of the time "
                                         f"column with start < end, got {bounds!r}")
            if self.time_column is None:
                _fail("data.time_range", "needs data.time_column")
            object.__setattr__(self, "time_range", [int(b) for b in bounds])
        if not isinstance(self.synthetic, Mapping):
            _fail("data.synthetic", f"expected a mapping, got {type(self.synthetic).__name__}")
        if self.source == "world" and not self.world:
            _fail("data.world", "source 'world' needs the directory of a saved world")
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        if not isinstance(self.vocab, Mapping) or not all(
                isinstance(v, Mapping) for v in self.vocab.values()):
            _fail("data.vocab", f"expected {{feature: {{kind: dynamic | hash, capacity: N, "
                                f"...}}}}, got {self.vocab!r}")
        if self.vocab and self.source == "files":
            _fail("data.vocab", "applies to synthetic and saved worlds; a dataset config "
                                "declares vocab on its features")
        _number("data.shuffle_buffer", self.shuffle_buffer, integer=True, positive=True)
        if self.source == "files":
            if not self.dataset:
                _fail("data.dataset", "source 'files' needs a dataset config: a shipped name "
                                      "(e.g. avazu; `hmoe configs` lists them) or a YAML file")
            from hmoe.configs import resolve
            try:
                resolve(self.dataset, "dataset")
            except ValueError as error:
                _fail("data.dataset", str(error))
            if not self.files:
                _fail("data.files", "source 'files' needs the raw files: a path or "
                                    "{train: ..., valid: ..., test: ...}")
            if isinstance(self.files, Mapping):
                unknown = sorted(set(self.files) - {"train", "valid", "test"})
                if unknown or "train" not in self.files:
                    _fail("data.files", f"keys must be train (required), valid and test; got "
                                        f"{sorted(self.files)}")
        if not isinstance(self.split, Mapping) or set(self.split) - {"valid", "test", "seed"}:
            _fail("data.split", f"expected {{valid: fraction, test: fraction, seed: int}}, got "
                                f"{self.split!r}")
        for key in ("valid", "test"):
            value = self.split.get(key, 0.1)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value < 0.5:
                _fail(f"data.split.{key}", f"must be a fraction in (0, 0.5), got {value!r}")
        from hmoe.data.synthetic import SyntheticConfig
        known = {f.name for f in dataclasses.fields(SyntheticConfig)}
        unknown = sorted(str(k) for k in self.synthetic if k not in known)
        if unknown:
            _fail("data.synthetic", f"unknown key(s) {unknown}; known: {sorted(known)}")


@dataclass(frozen=True)
class ModelSection:
    """A preset with overrides, or a full ModelConfig mapping (``config``)."""

    preset: str | None = "stem"
    tasks: Sequence[str] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None

    def __post_init__(self):
        from hmoe.models import PRESETS
        if self.config is None:
            if self.preset is None:
                _fail("model", "set model.preset (a name of hmoe.models.PRESETS) or model.config")
            _choice("model.preset", self.preset, sorted(PRESETS))
        elif not isinstance(self.config, Mapping):
            _fail("model.config", f"expected a mapping, got {type(self.config).__name__}")
        if not isinstance(self.options, Mapping):
            _fail("model.options", f"expected a mapping, got {type(self.options).__name__}")
        if self.config is not None and self.options:
            _fail("model.options", "applies to a preset; with model.config put every setting "
                                   "in the config")
        if self.tasks is not None and (isinstance(self.tasks, str) or not all(
                isinstance(t, str) for t in self.tasks) or not self.tasks):
            _fail("model.tasks", f"must be a non-empty list of label names, got {self.tasks!r}")


@dataclass(frozen=True)
class LossConfig:
    """The loss of every task (kind, alpha) with per-task overrides, and IPW's gamma."""

    kind: str = "combined_pair"
    alpha: float = DEFAULT_ALPHA
    tasks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ipw_gamma: float = 0.0

    def __post_init__(self):
        _choice("loss.kind", self.kind, LOSS_KINDS)
        _number("loss.alpha", self.alpha, minimum=0.0)
        if self.alpha > 1:
            _fail("loss.alpha", f"must lie in [0, 1], got {self.alpha}")
        _number("loss.ipw_gamma", self.ipw_gamma, minimum=0.0)
        if not isinstance(self.tasks, Mapping):
            _fail("loss.tasks", f"expected a mapping task -> settings, got "
                                f"{type(self.tasks).__name__}")

    def task_configs(self, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{task: TaskLossConfig fields} for the model's tasks; unknown task names are errors."""
        unknown = sorted(set(self.tasks) - set(tasks))
        if unknown:
            _fail("loss.tasks", f"names task(s) {unknown} the model does not train; its tasks: "
                                f"{list(tasks)}")
        return {t: {"kind": self.kind, "alpha": self.alpha, **dict(self.tasks.get(t, {}))}
                for t in tasks}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, checkpointing and logging.

    epochs / max_steps: stop after this many epochs, or earlier at max_steps optimizer steps.
    optimizer: adam | adagrad | sgd over every parameter (lr, weight_decay).
    grad_clip: clip the global gradient norm to this value (null: no clipping).
    eval_every: also evaluate on valid every this many steps (0: at each epoch's end only).
    monitor: the metric early stopping and the best checkpoint follow, "<task>/<metric>" on
        the valid split (null: the first task's AUC; "mean/<metric>": its mean over the
        tasks); monitor_mode: max or min.
    patience: stop after this many evaluations without improvement (0: never stop early).
    checkpoint_every: write checkpoints/last.pt every this many steps (and at each
        evaluation); a killed run resumes from it exactly.
    snapshot_every: also keep the model's weights every this many steps as
        checkpoints/step_<step>.pt (0: off), for the analysis of IA over training; online,
        every this many windows (at their boundaries, and the start).
    deterministic: torch.use_deterministic_algorithms and a fixed thread count, so a resumed
        run matches an uninterrupted one bit for bit on CPU.
    threads: torch threads (null: torch's default).
    gradient_cosine_every: every this many steps record the cosine between the tasks'
        gradients on the shared embedding set (0: off; needs several tasks).
    tensorboard: also write TensorBoard events under RUN_DIR/tensorboard (needs tensorboard).
    progress: "auto" (a bar when stderr is a terminal), "on" or "off".
    num_workers: DataLoader worker processes that read, decode and assemble batches while the
        model steps ("auto": 1 for data streamed from disk, 0 for in-memory columns). The batch
        order depends on (seed, epoch, max(1, num_workers)); a resume needs the same value.
    eval_exact_rows, eval_auc_bins, eval_gauc_rows: evaluation in bounded memory
        (hmoe.train.metrics.MetricAccumulator): AUC is exact up to eval_exact_rows rows, then
        from eval_auc_bins logit bins (its error bound is reported as auc_error_bound); gAUC is
        exact up to eval_gauc_rows rows, then over a hash sample of users with that many rows.
    sharding, embedding_optimizer, embedding_lr: with several ranks (torchrun, or hmoe train
        --nproc N; hmoe.distributed), how TorchRec shards the embedding tables (auto: its
        planner; table_wise | row_wise | column_wise | data_parallel), the optimizer fused into
        their backward (rowwise_adagrad | sgd; data_parallel: the dense optimizer's) and its
        learning rate (default train.lr). batch_size is then the global batch: each rank steps
        on batch_size / ranks rows. One process ignores these.
    mode, window: "offline" (epochs over the train split) or "online": one pass over the train
        split in time order (data.time_column), window by window, each window first evaluated
        (progressive validation) and then trained on (hmoe.train.online); window: a period of
        the time column ("1d", "6h", "30m", "90s", "1w") or a number of rows.
    embedding_l2: the weight of an L2 penalty on the embedding-table rows each batch reads
        (the batch mean of Σ ||row||², sequence steps included; weight_decay instead decays
        every row of every table at every step, read or not). 0: off.
    lr_decay: multiply the dense optimizer's lr by this factor after each evaluation that does
        not improve the monitored metric ("reduce on plateau"; null: off).
    calibrate, calibration_rows: at the end, fit each task's Platt scaling on the first
        calibration_rows rows of the valid split (hmoe.train.calibrate), save it as
        calibration.json, and report calibrated metrics beside the raw ones; predict, eval
        and export apply it. One process only for now.
    """

    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 1024
    eval_batch_size: int = 8192
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    eval_every: int = 0
    monitor: str | None = None
    monitor_mode: str = "max"
    patience: int = 2
    checkpoint_every: int = 200
    snapshot_every: int = 0
    log_every: int = 50
    deterministic: bool = True
    threads: int | None = None
    gradient_cosine_every: int = 0
    tensorboard: bool = False
    progress: str = "auto"
    num_workers: int | str = "auto"
    eval_exact_rows: int = 2_000_000
    eval_auc_bins: int = 65_536
    eval_gauc_rows: int = 2_000_000
    sharding: str = "auto"
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float | None = None
    mode: str = "offline"
    window: str | int | None = None
    calibrate: bool = True
    calibration_rows: int = 1_000_000
    embedding_l2: float = 0.0
    lr_decay: float | None = None

    def __post_init__(self):
        _number("train.epochs", self.epochs, integer=True, positive=True)
        _number("train.max_steps", self.max_steps, integer=True, positive=True, optional=True)
        _number("train.batch_size", self.batch_size, integer=True, positive=True)
        _number("train.eval_batch_size", self.eval_batch_size, integer=True, positive=True)
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _number("train.lr", self.lr, positive=True)
        _number("train.weight_decay", self.weight_decay, minimum=0.0)
        _number("train.embedding_l2", self.embedding_l2, minimum=0.0)
        _number("train.lr_decay", self.lr_decay, positive=True, optional=True)
        if self.lr_decay is not None and self.lr_decay >= 1:
            _fail("train.lr_decay", f"must be in (0, 1) (the factor lr is multiplied by), got "
                                    f"{self.lr_decay!r}")
        _number("train.grad_clip", self.grad_clip, positive=True, optional=True)
        _number("train.seed", self.seed, integer=True, minimum=0)
        for key in ("eval_every", "patience", "gradient_cosine_every", "snapshot_every"):
            _number(f"train.{key}", getattr(self, key), integer=True, minimum=0)
        for key in ("checkpoint_every", "log_every"):
            _number(f"train.{key}", getattr(self, key), integer=True, positive=True)
        _number("train.threads", self.threads, integer=True, positive=True, optional=True)
        _choice("train.monitor_mode", self.monitor_mode, MONITOR_MODES)
        if isinstance(self.progress, bool):  # YAML reads a bare on / off as true / false
            object.__setattr__(self, "progress", "on" if self.progress else "off")
        _choice("train.progress", self.progress, ("auto", "on", "off"))
        if self.num_workers != "auto":
            _number("train.num_workers", self.num_workers, integer=True, minimum=0)
        for key in ("eval_exact_rows", "eval_auc_bins", "eval_gauc_rows"):
            _number(f"train.{key}", getattr(self, key), integer=True, positive=True)

        if self.monitor is not None and (not isinstance(self.monitor, str)
                                         or self.monitor.count("/") != 1):
            _fail("train.monitor", f"must be '<task>/<metric>', e.g. 'click/auc', got "
                                   f"{self.monitor!r}")
        _number("train.calibration_rows", self.calibration_rows, integer=True, positive=True)
        for key in ("deterministic", "tensorboard", "calibrate"):
            if not isinstance(getattr(self, key), bool):
                _fail(f"train.{key}", f"must be true or false, got {getattr(self, key)!r}")
        _choice("train.sharding", self.sharding, SHARDINGS)
        _choice("train.embedding_optimizer", self.embedding_optimizer, EMBEDDING_OPTIMIZERS)
        _number("train.embedding_lr", self.embedding_lr, positive=True, optional=True)
        _choice("train.mode", self.mode, ("offline", "online"))
        if self.mode == "online":
            if self.window is None:
                _fail("train.window", "online training needs a window: a period of "
                                      "data.time_column ('1d', '6h', '30m') or a number of rows")
            from hmoe.train.online import parse_window
            parse_window(self.window)
        elif self.window is not None:
            _fail("train.window", "applies to train.mode: online")

    def metric_options(self) -> dict[str, int]:
        """The keyword options of hmoe.train.metrics.MetricAccumulator."""
        return {"exact_max_rows": self.eval_exact_rows, "auc_bins": self.eval_auc_bins,
                "gauc_max_rows": self.eval_gauc_rows}


@dataclass(frozen=True)
class RunConfig:
    """The four sections of a run config (module docstring)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str | None = None  # one line for people (``hmoe configs`` lists it)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> RunConfig:
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            _fail("config", f"expected a mapping of sections, got {type(data).__name__}")
        sections = {"data": DataConfig, "model": ModelSection, "loss": LossConfig,
                    "train": TrainConfig}
        unknown = sorted(str(k) for k in data if k not in sections and k != "description")
        if unknown:
            _fail("config", f"unknown section(s) {unknown}; sections: {sorted(sections)} "
                            f"(and description)")
        description = data.get("description")
        if description is not None and not isinstance(description, str):
            _fail("description", f"must be a string, got {type(description).__name__}")
        return cls(**{name: _section(section, data.get(name), name)
                      for name, section in sections.items()}, description=description)

    def to_dict(self) -> dict:
        """Plain dicts and lists: what from_dict takes back and config.resolved.yaml holds."""
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _loader():
    """yaml.SafeLoader that also reads 1e-3 and 5e4 as floats (YAML 1.1 wants a dot)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
                   r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
                   r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return Loader


def apply_overrides(data: Mapping | None, overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with each ``dotted.key=value`` set (value parsed as YAML).

    ``train.lr=1e-3`` sets data["train"]["lr"] = 0.001, creating the mappings on the way.
    Raises ValueError for an override without "=" or through a non-mapping value.
    """
    import copy

    import yaml

    result = copy.deepcopy(dict(data or {}))
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {override!r}: expected section.key=value, e.g. "
                             f"train.lr=1e-3")
        try:
            value = yaml.load(text, Loader=_loader()) if text.strip() else None
        except yaml.YAMLError as error:
            raise ValueError(f"override {override!r}: the value is not valid YAML: {error}") \
                from None
        node, parts = result, key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {override!r}: {'.'.join(parts[:i + 1])} is "
                                 f"{child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return result


def load_run_config(path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig of a YAML file or a shipped run config's name (``quickstart``; None: the
    defaults) with dotted overrides applied."""
    import yaml

    from hmoe.configs import resolve

    data: Any = {}
    if path is not None:
        path = resolve(path, "run")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_loader())
        except OSError as error:
            raise ValueError(f"config {path}: cannot read it: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"config {path}: not valid YAML: {error}") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"config {path}: expected a mapping of sections, got "
                             f"{type(data).__name__}")
    return RunConfig.from_dict(apply_overrides(data, overrides))
