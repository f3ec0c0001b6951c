r"""Checkpoints of a multi-process run, through torch.distributed.checkpoint (DCP).

Every rank writes its own shards; nothing is gathered. A checkpoint is a directory
``<name>.dcp/``:

    .metadata, __*.distcp     DCP's files: the model's state, keyed like the single-process
                              model's, except each embedding group's table ``<g>.weight``
                              (N, K, D), which is held as its TorchRec tables
                              ``<g>.tables.<table>`` (vocab_f, K·D), sharded as the run shards
                              them, with row-wise Adagrad's accumulators
                              ``<g>.tables.<table>.momentum1`` (vocab_f,) when saved with the
                              optimizer; a data-parallel run holds ``<g>.weight`` itself
    trainer.pt                rank 0's small state, when given: the dense optimizer, RNG and
                              loop position (hmoe.train.trainer)

DCP reshards on load, so a checkpoint written by R ranks loads on any other number of ranks,
and :func:`read_model_state` reads it in one process without TorchRec, in the single-process
layout (what ``hmoe eval``, ``predict`` and ``analyze`` load).

Writing is atomic: the ranks write ``.<name>.dcp.tmp``, then rank 0 moves the previous
checkpoint aside, moves the new one in and deletes the old one; :func:`recover` undoes a move
that a killed run left half done.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from hmoe.models import HMoE
from hmoe.nn import MultiEmbedding

__all__ = ["SUFFIX", "checkpoint_path", "exists", "find_checkpoint", "load", "read_extra",
           "read_model_state", "read_trained_model", "recover", "save"]

SUFFIX = ".dcp"
_EXTRA = "trainer.pt"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a written DCP checkpoint directory."""
    return (Path(path) / ".metadata").is_file()


def recover(path: str | os.PathLike) -> None:
    """Leaves ``path`` as the last complete checkpoint after a kill at any point of
    :func:`save`: an unfinished write is removed, a checkpoint moved aside is moved back."""
    path = Path(path)
    shutil.rmtree(_temporary(path), ignore_errors=True)
    aside = _aside(path)
    if aside.is_dir():
        if path.is_dir():
            shutil.rmtree(aside)
        else:
            os.replace(aside, path)


def save(net, path: str | os.PathLike, extra: dict | None = None, *,
         optimizer: bool = True) -> None:
    """Writes ``net``'s state (a hmoe.distributed.model.DistributedModel; with the tables'
    fused optimizer state when ``optimizer``) to the checkpoint directory ``path``, and rank
    0's ``extra`` into it. A collective: every rank calls it."""
    from torch.distributed.checkpoint import save as dcp_save

    path = Path(path)
    temporary = _temporary(path)
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        shutil.rmtree(temporary, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp_save(net.checkpoint_state(optimizer=optimizer), checkpoint_id=str(temporary))
    if main:
        if extra is not None:
            torch.save(extra, temporary / _EXTRA)
        _sync_directory(temporary)
        aside = _aside(path)
        shutil.rmtree(aside, ignore_errors=True)
        if path.exists():
            os.replace(path, aside)
        os.replace(temporary, path)
        shutil.rmtree(aside, ignore_errors=True)
    _barrier()  # no rank reads the checkpoint before it is in place


def _sync_directory(path: Path) -> None:
    """Flushes every file of ``path`` to disk before the checkpoint is moved in."""
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def read_extra(path: str | os.PathLike) -> dict | None:
    """Rank 0's ``extra`` of :func:`save`, or None."""
    file = Path(path) / _EXTRA
    return torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None


def load(net, path: str | os.PathLike, *, optimizer: bool = True) -> None:
    """Loads the checkpoint ``path`` into ``net`` (a DistributedModel on any number of ranks:
    DCP reshards), with the tables' fused optimizer state when ``optimizer``. A collective."""
    from torch.distributed.checkpoint import load as dcp_load

    path = Path(path)
    if not exists(path):
        raise ValueError(f"{path} is not a distributed checkpoint (no .metadata)")
    state = net.checkpoint_state(optimizer=optimizer)
    saved = _saved_keys(path)
    missing = sorted(set(state) - saved)
    if missing:
        raise ValueError(f"{path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}: it "
                         f"was written by a run of another model or another train.sharding "
                         f"(data_parallel holds whole tables, the other shardings TorchRec "
                         f"tables){'; or without the optimizer state' if optimizer else ''}")
    dcp_load(state, checkpoint_id=str(path))
    net.load_checkpoint_state(state)


def _saved_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _groups_tables(model: HMoE):
    """(prefix, MultiEmbedding) of every embedding group's categorical table."""
    for i, group in enumerate(model.groups):
        if isinstance(group.categorical, MultiEmbedding):
            yield f"groups.{i}.categorical", group.categorical


def read_model_state(path: str | os.PathLike, model: HMoE) -> dict[str, torch.Tensor]:
    """The model state of the checkpoint ``path``, in the single-process layout of ``model``
    (which gives the shapes and the keys): read in this process, with or without a process
    group, without TorchRec."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    from hmoe.distributed.embedding import table_name

    path = Path(path)
    if not exists(path):
        raise ValueError(f"{path} is not a distributed checkpoint (no .metadata)")
    saved = _saved_keys(path)
    state = model.state_dict()
    wanted = {key: torch.empty_like(value) for key, value in state.items() if key in saved}
    parts = {}
    fields = model.schema.categorical
    for prefix, table in _groups_tables(model):
        if f"{prefix}.weight" in saved:
            continue
        names = [f"{prefix}.tables.{table_name(f, field.name)}" for f, field in enumerate(fields)]
        parts[prefix] = names
        for name, field in zip(names, fields):
            wanted[name] = torch.empty(int(field.vocab_size), table.num_sets * table.dim,
                                       dtype=table.weight.dtype)
    missing = sorted(set(wanted) - saved)
    if missing:
        raise ValueError(f"{path} lacks {missing[:5]}: it was not written by a run of this "
                         f"model")
    with warnings.catch_warnings():  # "... assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp_load(wanted, storage_reader=FileSystemReader(str(path)), no_dist=True)
    for prefix, names in parts.items():
        table = dict(_groups_tables(model))[prefix]
        wanted[f"{prefix}.weight"] = torch.cat(
            [wanted.pop(name).view(-1, table.num_sets, table.dim) for name in names])
    unread = sorted(key for key in state if key not in wanted
                    and not any(key.startswith(f"{prefix}.") for prefix in parts))
    if unread:
        raise ValueError(f"{path} lacks {unread[:5]}: it was not written by a run of this model")
    # what a sharded run does not hold: the tables' offsets and the single-process optimizer
    # buffers of MultiEmbedding, as the model has them
    return {key: wanted.get(key, state[key]) for key in state}


# --------------------------------------------------------------------------------------------
# A run directory's checkpoints, either kind (what eval, predict, analyze and export read).


def find_checkpoint(run_dir: str | os.PathLike, name: str) -> Path | None:
    """checkpoints/<name>.pt or <name>.dcp of ``run_dir``, whichever exists (the newer if both
    do: a kill between writing one kind and removing the other), or None."""
    run_dir = Path(run_dir)
    found = [path for path in (run_dir / "checkpoints" / f"{name}.pt",
                               run_dir / "checkpoints" / f"{name}{SUFFIX}")
             if path.is_file() or exists(path)]
    return max(found, key=lambda path: path.stat().st_mtime_ns) if found else None


def checkpoint_path(run_dir: str | os.PathLike, checkpoint: str) -> Path:
    """The checkpoint "best" / "last" of ``run_dir`` (:func:`find_checkpoint`), or
    ``checkpoint`` itself when it names a .pt file or a .dcp directory."""
    if checkpoint.endswith((".pt", SUFFIX)):
        path = Path(checkpoint)
        if not (path.is_file() or exists(path)):
            raise ValueError(f"checkpoint {path} does not exist")
        return path
    path = find_checkpoint(run_dir, checkpoint)
    if path is None:
        raise ValueError(f"run {run_dir} has no checkpoint {checkpoint!r} (neither "
                         f"checkpoints/{checkpoint}.pt nor {checkpoint}{SUFFIX}; choose best, "
                         f"last, a .pt file or a {SUFFIX} directory)")
    return path


def read_trained_model(run_dir: str | os.PathLike, checkpoint: str = "best"
                       ) -> tuple[HMoE, Path, dict]:
    """(model in eval mode, checkpoint path, the checkpoint's other state) of a run directory:
    the model rebuilt from its schema.yaml and model.yaml, with the weights of ``checkpoint``
    (:func:`checkpoint_path`; a .dcp directory is read in this process, without TorchRec).
    Needs neither the run's data nor the trainer."""
    import yaml

    from hmoe.data.schema import load_schema
    from hmoe.models import ModelConfig

    run_dir = Path(run_dir)
    for name in ("schema.yaml", "model.yaml"):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir} is not a run directory (no {name})")
    path = checkpoint_path(run_dir, str(checkpoint))
    schema = load_schema(str(run_dir / "schema.yaml"))
    config = yaml.safe_load((run_dir / "model.yaml").read_text(encoding="utf-8"))
    model = HMoE(ModelConfig.from_dict(config), schema)
    if path.suffix == ".pt":
        extra = torch.load(path, map_location="cpu", weights_only=False)
        state = extra.pop("model")
    else:
        extra, state = read_extra(path) or {}, read_model_state(path, model)
    model.load_state_dict(state)
    model.eval()
    return model, path, extra
