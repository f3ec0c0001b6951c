r"""The inference artifact: a trained model exported for serving, and the predictor that loads it.

``hmoe export RUN_DIR --out DIR`` (:func:`export`) writes::

    DIR/
      artifact.json         format, versions, source run and checkpoint, model_version (a hash
                            of the weights), tasks, the program inputs, raw_ids ("hashed": the
                            raw ids of dynamic and hash vocabularies are a hash of the value's
                            text, as in raw files; "integers": the values themselves, as a
                            generated world holds them), the files below and the agreement
                            check made when it was written
      dataset.yaml          the preprocessing: the fitted schema the model was trained on (vocab
                            sizes, quantizers, sequence lengths and separators) plus the source
                            section's reader options (null_values, strip_whitespace): what raw
                            request rows are parsed with (hmoe.serving.rows)
      vocabularies.parquet  feature (string), id (int64), value (string): each indexed
                            categorical feature's values, id i for the value at i (1-based; 0 is
                            out of vocabulary). Absent when no feature has a vocabulary
                            (pre-indexed ids, or raw ids of dynamic and hash vocabularies)
      model.yaml            the full model config
      weights.pt            the model's state_dict (torch.save; the eager predictor's weights,
                            and the id maps of dynamic vocabularies under vocabs.<feature>.*)
      calibration.json      each task's Platt map (hmoe.models.calibration), if the run has one
      program.pt2           torch.export program (torch.export.save): batch -> logits (B, T)
      aoti_cpu.pt2          AOTInductor package of the program for CPU (aoti_cuda.pt2 for CUDA
                            when exported with device "cuda")

The program takes the model's batch (the keys of :func:`hmoe.serving.rows.model_inputs`, the
batch dimension dynamic up to ``MAX_BATCH`` rows) and returns the tasks' logits (B, T), task
order as ``artifact.json``'s ``tasks``. hmoe's custom ops export through their fake kernels and
are called by the program (so ``import hmoe`` must precede loading it, which
:func:`load` does). The ids of dynamic and hash vocabularies are remapped to table rows before
the program (their lookup is a data-dependent probe, not a graph): the predictor does it with
the id maps from weights.pt.

``hmoe.serving.load(DIR)`` (:class:`Predictor`) needs neither the run directory, its data nor
the trainer: it parses raw rows, remaps ids, runs the AOTInductor package (or the exported
program, or the eager model) and applies the calibration.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hmoe
from hmoe.models import HMoE, ModelConfig
from hmoe.models.calibration import CALIBRATION_FILE, load_calibration
from hmoe.models.hmoe import remap_ids
from hmoe.serving.rows import model_inputs

__all__ = ["ARTIFACT_FORMAT", "MAX_BATCH", "MODES", "Predictor", "concat", "export", "load"]

ARTIFACT_FORMAT = 1
MAX_BATCH = 65_536  # the largest batch the exported program takes
MODES = ("aoti", "exported", "eager")
_FILES = {"manifest": "artifact.json", "dataset": "dataset.yaml",
          "vocabularies": "vocabularies.parquet", "model": "model.yaml",
          "weights": "weights.pt", "calibration": CALIBRATION_FILE, "program": "program.pt2"}
CHECK_TOLERANCE = 1e-5  # eager, exported and compiled logits must agree this closely


class _Scorer(nn.Module):
    """What is exported: batch (ids of dynamic vocabularies already rows) -> logits (B, T)."""

    def __init__(self, model: HMoE):
        super().__init__()
        self.model = model
        self.tasks = model.tasks

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(batch, rows=True)["logits"]
        return torch.stack([logits[t] for t in self.tasks], dim=1)  # (B, T)


# --------------------------------------------------------------------------------------------
# Export


def _run_data(run_dir: Path) -> dict:
    """The data section of the run's config.resolved.yaml (read as YAML: no trainer)."""
    import yaml

    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.resolved.yaml)")
    config = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
    return dict(config.get("data") or {})


def _preprocessing(run_dir: Path, data: Mapping, schema, cache: str | os.PathLike | None):
    """(reader options, {feature: values in id order}) of the run's raw data: the dataset
    config's reader and the vocabularies of its preprocessing cache, which must be the one the
    run was trained on. Generated worlds have neither (their ids are pre-indexed)."""
    from hmoe.data.preprocess import default_cache, load_dataset_config, load_preprocessed
    from hmoe.data.readers import ReaderOptions
    from hmoe.data.schema import dump_schema

    if data.get("source", "synthetic") != "files":
        if cache is not None:
            raise ValueError(f"--cache: the run read no raw files (data.source is "
                             f"{data.get('source')!r}), so it has no preprocessing cache")
        return ReaderOptions(), {}
    try:
        dataset = load_dataset_config(data["dataset"])
    except (KeyError, OSError, ValueError) as error:
        raise ValueError(f"{run_dir}: cannot read the run's dataset config "
                         f"({data.get('dataset')!r}): {error}") from None
    directory = Path(cache) if cache is not None else Path(default_cache(data["dataset"],
                                                                         data.get("cache")))
    try:
        cached = load_preprocessed(directory)
    except (OSError, ValueError) as error:
        raise ValueError(f"the run's preprocessing cache {directory} cannot be read ({error}); "
                         f"its vocabularies are needed to encode raw rows: give --cache DIR "
                         f"(the data.cache of the run)") from None
    if dump_schema(cached.schema) != dump_schema(schema):
        raise ValueError(f"the preprocessing cache {directory} does not hold the schema the run "
                         f"was trained on (it was rebuilt since?): give --cache DIR of the "
                         f"run's own cache")
    indexed = [name for name in cached.feature_map.get("vocabularies", {})
               if not schema.categorical[schema.categorical_index(name)].raw_ids]
    return dataset.source.reader, {name: cached.vocabulary(name) for name in indexed}


def _random_batch(schema, rows: int, generator: torch.Generator,
                  aligned: bool = False) -> dict[str, torch.Tensor]:
    """A batch of ``rows`` random valid inputs (ids as table rows): the example the program is
    traced with and the rows the agreement check scores. ``aligned``: every sequence takes the
    first one's lengths and positions (a joint model's input)."""
    batch: dict[str, torch.Tensor] = {}
    if schema.categorical:
        batch["categorical"] = torch.stack(
            [torch.randint(0, f.vocab_size, (rows,), generator=generator)
             for f in schema.categorical], dim=1)
    if schema.numeric:
        numeric = torch.randn(rows, len(schema.numeric), generator=generator) * 10
        numeric[torch.rand(rows, len(schema.numeric), generator=generator) < 0.1] = float("nan")
        batch["numeric"] = numeric
    for s in schema.sequence:
        vocab = schema.categorical[schema.categorical_index(s.item)].vocab_size
        lengths = torch.randint(0, s.max_len + 1, (rows,), generator=generator)
        valid = torch.arange(s.max_len)[None, :] < lengths[:, None]
        ids = torch.randint(1, max(vocab, 2), (rows, s.max_len), generator=generator) % vocab
        positions = torch.randint(1, s.num_positions + 1, (rows, s.max_len), generator=generator)
        first = schema.sequence[0].name
        if aligned and s.name != first:
            lengths = batch[f"seq/{first}/lengths"]
            valid = torch.arange(s.max_len)[None, :] < lengths[:, None]
            positions = batch[f"seq/{first}/positions"]
        batch[f"seq/{s.name}"] = torch.where(valid, ids, 0)
        batch[f"seq/{s.name}/lengths"] = lengths
        batch[f"seq/{s.name}/positions"] = torch.where(valid, positions, 0)
    for p in schema.pretrained:
        for side in ("user", "item"):
            batch[f"pretrained/{p.name}/{side}"] = torch.randn(rows, p.dim, generator=generator)
    return batch


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, checkpoint: str = "best",
           cache: str | os.PathLike | None = None, devices: Sequence[str] = ("cpu",),
           calibrate: bool = True, check_rows: int = 512, overwrite: bool = False) -> dict:
    """Writes the inference artifact of ``run_dir``'s ``checkpoint`` into ``out`` (module
    docstring) and returns its manifest.

    Args:
        cache: the preprocessing cache of a run on raw files, when it is not where the run's
            config says (data.cache, or .cache/hmoe/<dataset> relative to the directory the
            run was started in).
        devices: AOTInductor packages to compile: "cpu" and/or "cuda" (needs a GPU and the
            CUDA build of hmoe); () for none (the exported program is still written).
        calibrate: include the run's calibration.json (the predictor applies it).
        check_rows: random valid rows on which the eager model, the exported program and each
            package must agree within 1e-5 (the logits); the export fails otherwise.
        overwrite: replace an existing ``out``.
    """
    from hmoe.distributed.checkpoint import read_trained_model

    run_dir, out = Path(run_dir), Path(out)
    for device in devices:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"devices: {device!r} is not 'cpu' or 'cuda'")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("devices: 'cuda' needs a CUDA device (torch.cuda.is_available() is "
                             "False here)")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; choose another directory or overwrite it")
    data = _run_data(run_dir)
    model, path, extra = read_trained_model(run_dir, checkpoint)
    reader, vocabularies = _preprocessing(run_dir, data, model.schema, cache)
    hashed = data.get("source", "synthetic") == "files"  # a world's raw ids are integers
    staging = out.with_name(f".{out.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        manifest = _write(staging, run_dir, path, extra, model, reader, vocabularies, hashed,
                          devices, calibrate, check_rows)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def _write(out: Path, run_dir: Path, path: Path, extra: Mapping, model: HMoE, reader,
           vocabularies: Mapping, hashed: bool, devices: Sequence[str], calibrate: bool,
           check_rows: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from hmoe.data.dataset_config import DatasetConfig, SourceConfig, dataset_config_to_dict

    schema = model.schema
    document = dataset_config_to_dict(DatasetConfig(schema, SourceConfig(reader=reader)))
    (out / _FILES["dataset"]).write_text(yaml.safe_dump(document, sort_keys=False),
                                         encoding="utf-8")
    if vocabularies:
        features, ids, values = [], [], []
        for name, entries in vocabularies.items():
            features += [name] * len(entries)
            ids += range(1, len(entries) + 1)
            values += list(entries)
        pq.write_table(pa.table({"feature": pa.array(features, pa.string()),
                                 "id": pa.array(ids, pa.int64()),
                                 "value": pa.array(values, pa.string())}),
                       out / _FILES["vocabularies"])
    (out / _FILES["model"]).write_text(yaml.safe_dump(model.config.to_dict(), sort_keys=False),
                                       encoding="utf-8")
    torch.save(model.state_dict(), out / _FILES["weights"])
    calibration = load_calibration(run_dir) if calibrate else None
    if calibration is not None:
        calibration.save(out / _FILES["calibration"])

    scorer = _Scorer(model).eval()
    inputs = model_inputs(schema)
    generator = torch.Generator().manual_seed(0)
    aligned = model.config.joint_sequences
    example = _random_batch(schema, 8, generator, aligned)
    check = _random_batch(schema, max(check_rows, 2), generator, aligned)
    rows = torch.export.Dim("rows", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(scorer, (example,),
                                      dynamic_shapes=({key: {0: rows} for key in inputs},),
                                      strict=False)
        torch.export.save(program, out / _FILES["program"])
        reference = scorer(check).double()
        differences = {"exported": _difference(program.module()(check), reference)}
    packages = {}
    for device in devices:
        name = f"aoti_{device}.pt2"
        differences[f"aoti_{device}"] = _compile(model, inputs, example, check, reference,
                                                 device, out / name)
        packages[device] = name
    worst = max(differences.values())
    if not worst <= CHECK_TOLERANCE:
        raise RuntimeError(f"the exported model disagrees with the eager one: largest logit "
                           f"differences {differences} exceed {CHECK_TOLERANCE}")
    manifest = {
        "format": ARTIFACT_FORMAT,
        "hmoe": hmoe.__version__,
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run_dir.resolve()),
        "checkpoint": str(path),
        "step": extra.get("step") if isinstance(extra, Mapping) else None,
        "model_version": _digest(out / _FILES["weights"]),
        "tasks": list(model.tasks),
        "inputs": inputs,
        "max_batch": MAX_BATCH,
        "calibrated": calibration is not None,
        "raw_ids": "hashed" if hashed else "integers",
        "files": {**{k: v for k, v in _FILES.items() if (out / v).is_file() or k == "manifest"},
                  "aoti": packages},
        "check": {"rows": int(len(reference)), "tolerance": CHECK_TOLERANCE,
                  "max_abs_logit_difference": differences},
    }
    (out / _FILES["manifest"]).write_text(json.dumps(manifest, indent=2) + "\n",
                                          encoding="utf-8")
    return manifest


def _compile(model: HMoE, inputs: list[str], example, check, reference, device: str,
             path: Path) -> float:
    """Compiles the program for ``device`` into the AOTInductor package ``path``; returns its
    largest logit difference from the eager model on the check rows."""
    import copy

    from torch._inductor import aoti_compile_and_package, aoti_load_package

    scorer = _Scorer(copy.deepcopy(model).to(device)).eval()
    on = {key: value.to(device) for key, value in example.items()}
    rows = torch.export.Dim("rows", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(scorer, (on,),
                                      dynamic_shapes=({key: {0: rows} for key in inputs},),
                                      strict=False)
        aoti_compile_and_package(program, package_path=str(path))
        compiled = aoti_load_package(str(path))
        scores = compiled({key: value.to(device) for key, value in check.items()})
    return _difference(scores, reference)


def _difference(scores: torch.Tensor, reference: torch.Tensor) -> float:
    return float((scores.detach().cpu().double() - reference).abs().max())


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading and scoring


class Predictor:
    """An inference artifact loaded for scoring (:func:`load`).

    ``encode(rows)`` checks and encodes raw rows (:class:`hmoe.serving.rows.RowEncoder`;
    :class:`~hmoe.serving.rows.RowError` names each bad row and field), ``score(batch)``
    returns each row's probability per task, (B, T) float64 numpy, calibrated when the artifact
    has a calibration and ``calibrated``; ``predict(rows)`` does both and returns
    ``[{task: score}]``. Encoding and scoring are separate so that a server can encode each
    request on its own (its errors are its own) and score many requests as one batch
    (:func:`concat`), or ``score_many(requests)`` encodes and scores many requests at once.
    ``score`` is not thread-safe: call it from one thread.

    Attributes: ``tasks``, ``mode`` ("aoti", "exported" or "eager"), ``device``,
    ``manifest`` (artifact.json), ``metadata`` (what a service reports), ``encoder``.
    """

    def __init__(self, path: str | os.PathLike, *, mode: str = "auto", device: str = "cpu",
                 calibrated: bool = True):
        import yaml

        from hmoe.data.dataset_config import load_dataset_config
        from hmoe.serving.rows import RowEncoder

        path = Path(path)
        manifest_path = path / _FILES["manifest"]
        if not manifest_path.is_file():
            raise ValueError(f"{path} is not an hmoe inference artifact (no artifact.json; "
                             f"write one with hmoe export)")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{manifest_path}: artifact format {manifest.get('format')} is not "
                             f"{ARTIFACT_FORMAT} (re-export it with this hmoe)")
        packages = manifest["files"].get("aoti", {})
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: must be 'cpu' or 'cuda', got {device!r}")
        if mode == "auto":
            mode = "aoti" if device in packages else "exported"
        if mode not in MODES:
            raise ValueError(f"mode: must be 'auto' or one of {MODES}, got {mode!r}")
        if mode == "aoti" and device not in packages:
            raise ValueError(f"mode 'aoti': the artifact has no AOTInductor package for "
                             f"{device!r} (it has {sorted(packages) or 'none'}); export with "
                             f"that device, or use mode 'exported' or 'eager'")
        self.path, self.manifest, self.mode, self.device = path, manifest, mode, device
        dataset = load_dataset_config(str(path / _FILES["dataset"]))
        self.schema = dataset.schema
        model_config = yaml.safe_load((path / _FILES["model"]).read_text(encoding="utf-8"))
        self._joint = bool(model_config.get("joint_sequences")) and len(self.schema.sequence) > 1
        self.encoder = RowEncoder(self.schema, dataset.source.reader, _read_vocabularies(path),
                                  hash_raw_ids=manifest.get("raw_ids", "hashed") == "hashed",
                                  aligned_sequences=self._joint)
        self.tasks = tuple(manifest["tasks"])
        state = torch.load(path / _FILES["weights"], map_location="cpu", weights_only=True)
        self._vocabs = _vocabularies(self.schema, state)
        self.calibration = load_calibration(path) if calibrated else None
        self._maps = torch.tensor([[self.calibration[t].a, self.calibration[t].b]
                                   if self.calibration is not None and t in self.calibration
                                   else [1.0, 0.0] for t in self.tasks], dtype=torch.float64)
        if mode == "eager":
            model = HMoE(ModelConfig.from_dict(model_config), self.schema)
            model.load_state_dict(state)
            self._run = _Scorer(model.to(device).eval())
        elif mode == "exported":
            program = torch.export.load(path / _FILES["program"])
            if device != "cpu":
                raise ValueError("mode 'exported' runs on the CPU it was exported on; use "
                                 "mode 'aoti' or 'eager' for cuda")
            self._run = program.module()
        else:
            from torch._inductor import aoti_load_package

            self._run = aoti_load_package(str(path / packages[device]))
        self.metadata = {
            "model_version": manifest["model_version"], "tasks": list(self.tasks),
            "mode": mode, "device": device, "calibrated": self.calibration is not None,
            "run": manifest.get("run"), "checkpoint": manifest.get("checkpoint"),
            "step": manifest.get("step"), "created": manifest.get("created"),
            "hmoe": manifest.get("hmoe"), "max_batch": manifest.get("max_batch", MAX_BATCH),
            "columns": self.encoder.columns, "ignored_columns": self.encoder.ignored,
        }

    def encode(self, rows) -> dict[str, torch.Tensor]:
        """The batch of raw ``rows`` (RowError when any cannot be read)."""
        return self.encoder.encode(rows)

    @torch.inference_mode()
    def score(self, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(B, T) float64 probabilities of an encoded batch (calibrated unless disabled)."""
        _check_ranges(self.schema, self._vocabs, batch)
        if self._joint:  # the program does not check it (hmoe.models: eager only)
            _check_aligned(self.schema, batch)
        batch = remap_ids(self.schema, self._vocabs, batch)
        limit = int(self.metadata["max_batch"])
        outputs = []
        for start in range(0, _rows(batch), limit):
            part = {key: batch[key][start:start + limit].to(self.device)
                    for key in self.encoder.inputs}
            outputs.append(self._run(part).double().cpu())
        logits = torch.cat(outputs)
        return torch.sigmoid(logits * self._maps[:, 0] + self._maps[:, 1]).numpy()

    def score_many(self, requests: Sequence) -> list:
        """Per request (a list of raw rows) its (rows, T) scores or its RowError: the
        readable requests are encoded together and scored as one batch (what the service does
        with the requests it joins)."""
        batch, errors = self.encoder.encode_many(requests)
        scores = self.score(batch) if batch is not None else None
        out, start = [], 0
        for rows, error in zip(requests, errors):
            if error is not None:
                out.append(error)
                continue
            out.append(scores[start:start + len(rows)])
            start += len(rows)
        return out

    def predict(self, rows) -> list[dict[str, float]]:
        """[{task: score}] of raw ``rows``, in order."""
        scores = self.score(self.encode(rows))
        return [dict(zip(self.tasks, map(float, row))) for row in scores]


def load(path: str | os.PathLike, *, mode: str = "auto", device: str = "cpu",
         calibrated: bool = True) -> Predictor:
    """The inference artifact at ``path`` (written by :func:`export`), ready to score raw rows.

    mode: "aoti" (the AOTInductor package for ``device``), "exported" (the torch.export
    program, CPU), "eager" (the model rebuilt from model.yaml and weights.pt) or "auto" (aoti
    when the artifact has a package for ``device``, else exported). calibrated: apply the
    artifact's calibration (False: the model's raw probabilities)."""
    return Predictor(path, mode=mode, device=device, calibrated=calibrated)


def concat(batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Encoded batches joined row-wise (each request's rows stay consecutive, in order)."""
    if len(batches) == 1:
        return dict(batches[0])
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _read_vocabularies(path: Path) -> dict[str, list[str]]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    file = path / _FILES["vocabularies"]
    if not file.is_file():
        return {}
    table = pq.read_table(file)
    out = {}
    for name in pc.unique(table.column("feature")).to_pylist():
        rows = table.filter(pc.equal(table.column("feature"), name))
        order = np.argsort(rows.column("id").to_numpy())
        ids = rows.column("id").to_numpy()[order]
        if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise ValueError(f"{file}: the ids of {name!r} are not 1..{len(ids)}")
        out[name] = rows.column("value").take(order).to_pylist()
    return out


def _vocabularies(schema, state: Mapping[str, torch.Tensor]) -> nn.ModuleDict:
    """The id maps of dynamic and hash vocabularies, loaded from the model's state."""
    from hmoe.models.hmoe import _make_vocab

    vocabs = nn.ModuleDict({f.name: _make_vocab(f) for f in schema.categorical if f.raw_ids})
    if len(vocabs):
        prefix = "vocabs."
        vocabs.load_state_dict({key[len(prefix):]: value for key, value in state.items()
                                if key.startswith(prefix)})
    return vocabs


def _check_aligned(schema, batch: Mapping[str, torch.Tensor]) -> None:
    """The sequences of a joint model's batch share the first one's lengths and positions."""
    first, *others = schema.sequence
    for s in others:
        for part in ("lengths", "positions"):
            if not torch.equal(batch[f"seq/{s.name}/{part}"], batch[f"seq/{first.name}/{part}"]):
                raise ValueError(f"batch['seq/{s.name}/{part}']: must equal "
                                 f"batch['seq/{first.name}/{part}'] (the model attends the "
                                 f"sequences jointly)")


def _check_ranges(schema, vocabs, batch: Mapping[str, torch.Tensor]) -> None:
    """Ids a kernel would read out of bounds are refused here (RowEncoder never makes them;
    this guards batches built by hand)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    missing = [key for key in model_inputs(schema) if key not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}")
    sizes = {int(batch[key].shape[0]) for key in model_inputs(schema)}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors must have one batch size, got {sorted(sizes)}")
    if schema.categorical:
        ids = batch["categorical"]
        for f, feature in enumerate(schema.categorical):
            if feature.name in vocabs:
                continue
            column = ids[:, f]
            if column.numel() and (int(column.min()) < 0 or
                                   int(column.max()) >= feature.vocab_size):
                raise ValueError(f"batch['categorical'][:, {f}] ({feature.name}): ids must lie "
                                 f"in [0, {feature.vocab_size})")
    for s in schema.sequence:
        feature = schema.categorical[schema.categorical_index(s.item)]
        if feature.name in vocabs:
            continue
        ids = batch[f"seq/{s.name}"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= feature.vocab_size):
            raise ValueError(f"batch['seq/{s.name}']: ids must lie in [0, "
                             f"{feature.vocab_size})")
        lengths, positions = batch[f"seq/{s.name}/lengths"], batch[f"seq/{s.name}/positions"]
        if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > s.max_len):
            raise ValueError(f"batch['seq/{s.name}/lengths']: must lie in [0, {s.max_len}]")
        if positions.numel() and (int(positions.min()) < 0 or
                                  int(positions.max()) > s.num_positions):
            raise ValueError(f"batch['seq/{s.name}/positions']: must lie in [0, "
                             f"{s.num_positions}]")
