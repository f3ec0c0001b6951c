r"""Wrapping an HMoE model for multi-process training: TorchRec shards its tables, DDP the rest.

:func:`distribute` takes a model built the usual way (the same seed on every rank, so every
rank starts from the same weights) and returns it wrapped:

    sharding        what happens to each group's categorical tables
    table_wise |    ShardedTables (hmoe.distributed.embedding), sharded by TorchRec that way,
    row_wise |      with FBGEMM's fused optimizer in backward (``optimizer``: "sgd" or
    column_wise     "rowwise_adagrad"); gradients to the tables are averaged over ranks, like
                    DDP's, so a step on global batch B equals one process's step on B
    auto            as above, each table sharded as TorchRec's planner chooses among those three
    data_parallel   the MultiEmbedding stays (hmoe's fused kernel does the lookup), replicated;
                    its gradient is all-reduced by DDP with the dense parameters, and the
                    trainer's optimizer updates it (TorchRec's data-parallel sequence tables
                    return pooled rows on CPU in 1.8.0, so they are not used)

Everything else (experts, gates, towers, MNSE, TIM, similarity encoders: small) is data
parallel. The wrapped model's ``state_dict`` holds the tables sharded (ShardedTensor);
hmoe.distributed.checkpoint saves and loads it through torch.distributed.checkpoint
(:meth:`DistributedModel.checkpoint_state`), and :meth:`DistributedModel.gather_state` gathers
it on rank 0 in the single-process layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from hmoe.distributed import require
from hmoe.distributed.embedding import ShardedTables
from hmoe.models import HMoE
from hmoe.nn import MultiEmbedding

__all__ = ["EMBEDDING_OPTIMIZERS", "SHARDINGS", "DistributedModel", "dense_parameters", "distribute",
           "embedding_parameters", "shard_tables"]

SHARDINGS = ("auto", "table_wise", "row_wise", "column_wise", "data_parallel")
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "sgd")
_SHARDED = ("table_wise", "row_wise", "column_wise")


def shard_tables(model: HMoE) -> HMoE:
    """Puts every group's categorical MultiEmbedding into ShardedTables with the same rows, in
    place (the forward is unchanged; tests/distributed prove it); returns ``model``."""
    for group in model.groups:
        if isinstance(group.categorical, MultiEmbedding):
            group.categorical = ShardedTables.from_multi_embedding(group.categorical,
                                                                   model.schema)
    return model


def embedding_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The (name, parameter) of the tables that TorchRec shards (updated in backward)."""
    for name, module in model.named_modules():
        if isinstance(module, ShardedTables):
            for sub, param in module.collection.named_parameters():
                yield f"{name}.collection.{sub}", param


def dense_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters the trainer's optimizer updates: all but the sharded tables, which
    their fused optimizer updates in backward."""
    tables = {id(p) for _, p in embedding_parameters(model)}
    return (p for p in model.parameters() if id(p) not in tables)


def _optimizer(kind: str, lr: float, eps: float):
    from torchrec.optim import RowWiseAdagrad

    if kind == "sgd":
        return torch.optim.SGD, {"lr": lr}
    return RowWiseAdagrad, {"lr": lr, "eps": eps}


class DistributedModel(nn.Module):
    """An HMoE model wrapped for several ranks (what :func:`distribute` returns): calls go to
    the wrapped model; :meth:`gather_state` and :meth:`load_single_state` move the whole
    model's state in the single-process layout (MultiEmbedding (N, K, D) tables), which is
    what a run's checkpoints hold, so a run can be read or resumed at any world size."""

    def __init__(self, wrapped: nn.Module, model: HMoE, single_state: dict[str, torch.Tensor]):
        super().__init__()
        self.wrapped = wrapped
        self._model = [model]  # not a submodule: the wrapped model holds it already
        self.single_keys = list(single_state)
        # the MultiEmbeddings' buffers (offsets, fused-optimizer state), which tables lack
        self._buffers_of_tables = {key: value for key, value in single_state.items()
                                   if ".categorical." in key and not key.endswith(".weight")}

    @property
    def model(self) -> HMoE:
        return self._model[0]

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def _tables(self) -> dict[str, ShardedTables]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, ShardedTables)}

    def load_single_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads a single-process state dict (every rank passes the same)."""
        state = dict(state)
        for prefix, tables in self._tables().items():
            weight = state.pop(f"{prefix}.weight")
            for key in [k for k in state if k.startswith(f"{prefix}.")]:
                del state[key]  # the MultiEmbedding's offsets and fused-optimizer buffers
            state.update({f"{prefix}.collection.{key}": value
                          for key, value in tables.rows_state(weight).items()})
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            self.wrapped.module.load_state_dict(state)
        else:
            self.wrapped.load_state_dict(state)

    def _unwrapped(self) -> nn.Module:
        wrapped = self.wrapped
        return wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) \
            else wrapped

    def _checkpoint_keys(self) -> dict[str, str]:
        """The wrapped model's table keys -> their checkpoint keys."""
        return {f"{prefix}.collection.embeddings.{name}.weight": f"{prefix}.tables.{name}"
                for prefix, tables in self._tables().items() for name in tables.table_names}

    def checkpoint_state(self, *, optimizer: bool = True) -> dict[str, torch.Tensor]:
        """This rank's view of the model's state for torch.distributed.checkpoint (the layout of
        hmoe.distributed.checkpoint): the tables' shards as ShardedTensors, and with
        ``optimizer`` their fused optimizer's state (row-wise Adagrad's accumulators)."""
        names = self._checkpoint_keys()
        state = {names.get(key, key): value
                 for key, value in self._unwrapped().state_dict().items()}
        if optimizer and names:
            for key, values in self.wrapped.fused_optimizer.state_dict()["state"].items():
                for name, value in values.items():  # "<table>.momentum1"
                    state[f"{names[key]}.{name.rsplit('.', 1)[-1]}"] = value
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads what :meth:`checkpoint_state` gave, once torch.distributed.checkpoint has
        filled it (the fused optimizer's state too, when it is there)."""
        names = self._checkpoint_keys()
        back = {value: key for key, value in names.items()}
        model = {back.get(key, key): value for key, value in state.items()
                 if key in back or not any(key.startswith(f"{t}.") for t in back)}
        self._unwrapped().load_state_dict(model)
        if not names:
            return
        fused = self.wrapped.fused_optimizer
        current = fused.state_dict()
        found = False
        for key, values in current["state"].items():
            for name in values:
                saved = f"{names[key]}.{name.rsplit('.', 1)[-1]}"
                if saved in state:
                    values[name], found = state[saved], True
        if found:
            fused.load_state_dict(current)

    def gather_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict in the single-process layout on rank 0, None on the
        others. A collective: every rank must call it."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        main = dist.get_rank() == 0
        gathered = {}
        for key, value in self.wrapped.state_dict().items():
            if isinstance(value, ShardedTensor):
                full = torch.empty(value.size(), dtype=value.dtype) if main else None
                value.gather(dst=0, out=full)
                value = full
            if main:
                gathered[key.removeprefix("module.")] = value.detach().cpu().clone()
        if not main:
            return None
        for prefix, tables in self._tables().items():
            weight = ShardedTables.weight_from_state(
                {key.removeprefix(f"{prefix}.collection."): gathered.pop(key)
                 for key in [k for k in gathered if k.startswith(f"{prefix}.collection.")]},
                tables.table_names, tables.num_sets, tables.dim)
            gathered[f"{prefix}.weight"] = weight
        gathered.update({key: value.clone() for key, value in self._buffers_of_tables.items()
                         if key not in gathered})
        missing = sorted(set(self.single_keys) - set(gathered))
        if missing:
            raise RuntimeError(f"gathered state lacks {missing}")
        return {key: gathered[key] for key in self.single_keys}


def distribute(model: HMoE, *, sharding: str = "auto", optimizer: str = "sgd", lr: float,
               eps: float = 1e-8, device: torch.device | str = "cpu",
               process_group: dist.ProcessGroup | None = None) -> DistributedModel:
    """``model`` wrapped for the ranks of ``process_group`` (default: the world): its tables
    sharded as ``sharding`` says (module docstring) and updated by ``optimizer`` at learning
    rate ``lr`` in backward, the rest data parallel. Call on every rank with the same model."""
    dynamic = [f.name for f in model.schema.categorical if f.vocab == "dynamic"]
    if dynamic:
        raise ValueError(f"features {dynamic} have dynamic vocabularies, which run on one "
                         f"process for now (each rank would admit other ids)")
    require()
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {list(SHARDINGS)}, got {sharding!r}")
    if optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(EMBEDDING_OPTIMIZERS)}, got "
                         f"{optimizer!r}")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun (or "
                           "hmoe train --nproc N), or call init_process_group first")
    device = torch.device(device)
    group = process_group or dist.GroupMember.WORLD
    single = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if sharding == "data_parallel":
        return DistributedModel(nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[device.index] if device.type == "cuda" else None,
            process_group=group), model, single)

    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    shard_tables(model)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer_class, kwargs = _optimizer(optimizer, lr, eps)
    tables = [m for m in model.modules() if isinstance(m, ShardedTables)]
    for table in tables:
        apply_optimizer_in_backward(optimizer_class, table.collection.parameters(), kwargs)
    types = list(_SHARDED) if sharding == "auto" else [sharding]
    constraints = {name: ParameterConstraints(sharding_types=types, compute_kernels=["fused"])
                   for table in tables for name in table.table_names}
    sharders = [EmbeddingCollectionSharder()]
    topology = Topology(world_size=dist.get_world_size(group), compute_device=device.type)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints) \
        .collective_plan(model, sharders, group)
    wrapped = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders,
                                       env=_sharding_env(group))
    # DistributedModelParallel initialises the shards afresh: put the model's rows back
    wrapped.load_state_dict(state)
    return DistributedModel(wrapped, model, single)


def _sharding_env(group):
    from torchrec.distributed.types import ShardingEnv

    return ShardingEnv.from_process_group(group)
