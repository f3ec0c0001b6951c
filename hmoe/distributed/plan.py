r"""What a cluster run costs, before renting it: ``hmoe plan``.

TorchRec's planner (EmbeddingShardingPlanner) chooses how to shard the tables of
:class:`hmoe.distributed.embedding.ShardedTables` for a topology of ``world_size`` devices with
``device_memory`` bytes each. The tables are made on the meta device, so a plan for 10^9 rows
takes no memory. :func:`plan_tables` returns, per table, the planner's choice, and per rank the
bytes of the shards it holds (weights in fp32 plus the fused optimizer's state), and an estimate
of the all-to-all bytes of one training step:

    ids      every id of a table goes to the rank(s) holding its row (8 bytes; one per field,
             up to max_len per sequence; column-wise: to every column shard)
    rows     forward, the looked-up rows come back (K·D fp32 values an id); backward, their
             gradients go out again: 2 x rows bytes
    total    (ids + 2 x rows) x (W - 1) / W: the share that leaves a rank (a uniform spread)

Data-parallel tables send nothing through the all-to-all (their gradients are all-reduced:
another collective, counted apart as ``allreduce``: 2 x (W - 1) / W x the table's bytes).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from hmoe.data.schema import CategoricalFeature, Schema
from hmoe.distributed import require
from hmoe.distributed.embedding import ShardedTables

__all__ = ["CRITEO_1TB_VOCAB_SIZES", "Plan", "categorical_schema", "parse_bytes", "plan_tables"]

# The 26 categorical cardinalities of Criteo's 1TB click logs as the MLPerf DLRM benchmark
# indexes them (ids capped at 4·10^7 per field).
CRITEO_1TB_VOCAB_SIZES = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36)


def parse_bytes(text: str) -> int:
    """'80GB', '80 GiB', '512MB', '1e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    value = str(text).strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"device memory: expected a size such as 80GB, got {text!r}") from None
    if unit not in units or amount <= 0:
        raise ValueError(f"device memory: expected a size such as 80GB, got {text!r}")
    return int(amount * units[unit])


def categorical_schema(vocab_sizes: Sequence[int], name: str = "plan") -> Schema:
    """A schema of categorical fields C1.. with these vocabulary sizes (and one label)."""
    from hmoe.data.schema import Label

    if not vocab_sizes or any(int(v) < 1 for v in vocab_sizes):
        raise ValueError(f"vocab sizes must be integers >= 1, got {list(vocab_sizes)}")
    schema = Schema(name, categorical=tuple(
        CategoricalFeature(f"C{i + 1}", vocab_size=int(v)) for i, v in enumerate(vocab_sizes)),
        labels=(Label("click"),))
    schema.validate()
    return schema


@dataclass
class Plan:
    """The planner's choice and what it costs (module docstring)."""

    world_size: int
    device_memory: int
    tables: list[dict] = field(default_factory=list)  # name, rows, cols, sharding, kernel, ranks
    rank_bytes: list[int] = field(default_factory=list)
    alltoall_bytes: float = 0.0
    allreduce_bytes: float = 0.0

    def fits(self) -> bool:
        return max(self.rank_bytes, default=0) <= self.device_memory

    def report(self) -> str:
        gib = 2**30
        lines = [f"{'table':<24} {'rows':>12} {'cols':>5}  {'sharding':<12} {'kernel':<7} ranks"]
        for t in self.tables:
            ranks = t["ranks"]
            where = (f"{ranks[0]}..{ranks[-1]}" if ranks == list(range(ranks[0], ranks[-1] + 1))
                     and len(ranks) > 2 else ",".join(map(str, ranks)))
            lines.append(f"{t['name']:<24} {t['rows']:>12,d} {t['cols']:>5}  "
                         f"{t['sharding']:<12} {t['kernel']:<7} {where}")
        used = self.rank_bytes
        lines += [
            "",
            (f"per rank: tables and optimizer state {min(used) / gib:.2f} - {max(used) / gib:.2f} "
            f"GiB (mean {sum(used) / len(used) / gib:.2f}) of {self.device_memory / gib:.1f} "
            f"GiB: {'fits' if self.fits() else 'DOES NOT FIT'}"),
            (f"per step: all-to-all ~ {self.alltoall_bytes / 2**20:,.1f} MiB leaving the ranks "
            f"in all (ids, rows forward, gradients back), all-reduce of data-parallel tables "
            f"~ {self.allreduce_bytes / 2**20:,.1f} MiB"),
        ]
        return "\n".join(lines)


def plan_tables(schema: Schema, num_sets: int, dim: int, *, world_size: int,
                device_memory: int, batch_size: int, compute_device: str = "cuda",
                sharding: str = "auto", optimizer: str = "rowwise_adagrad") -> Plan:
    """TorchRec's plan for the tables of one embedding group (K = ``num_sets`` sets of dim
    ``dim``) over ``world_size`` devices, a global batch of ``batch_size`` rows."""
    require()
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    from hmoe.distributed.model import SHARDINGS

    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {list(SHARDINGS)}, got {sharding!r}")
    for key, value in (("world_size", world_size), ("batch_size", batch_size),
                       ("num_sets", num_sets), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not split evenly between "
                         f"{world_size} ranks")
    tables = ShardedTables(schema, num_sets, dim, device="meta")
    kernel = "dense" if sharding == "data_parallel" else "fused"
    types = ["table_wise", "row_wise", "column_wise"] if sharding == "auto" else [sharding]
    constraints = {name: ParameterConstraints(sharding_types=types, compute_kernels=[kernel])
                   for name in tables.table_names}
    holder = nn.ModuleDict({"tables": tables.collection})
    quiet = logging.getLogger("torchrec.distributed.planner")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on how the topology was made are not for users
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            topology = Topology(world_size=world_size, compute_device=compute_device,
                                hbm_cap=device_memory if compute_device == "cuda" else None,
                                ddr_cap=device_memory if compute_device == "cpu" else None)
            planner = EmbeddingShardingPlanner(topology=topology,
                                               batch_size=batch_size // world_size,
                                               constraints=constraints)
            sharded = planner.plan(holder, [EmbeddingCollectionSharder()])
    except Exception as error:  # torchrec's PlannerError: no plan fits the topology
        if type(error).__name__ != "PlannerError":
            raise
        raise ValueError(f"no sharding of these tables fits {world_size} x "
                         f"{device_memory / 2**30:.2f} GiB: {str(error).splitlines()[0]}") \
            from None
    finally:
        quiet.setLevel(level)
    chosen = next(iter(sharded.plan.values()))
    plan = Plan(world_size, device_memory, rank_bytes=[0] * world_size)
    ids_per_row = [1] * len(tables.vocab_sizes)  # a field's id, and at most max_len a sequence
    for seq, item in zip(schema.sequence, tables.item_fields):
        ids_per_row[item] += seq.max_len
    cols = num_sets * dim
    state = 4 if optimizer == "rowwise_adagrad" else 0  # one fp32 accumulator a row
    share = (world_size - 1) / world_size
    for f, (name, rows) in enumerate(zip(tables.table_names, tables.vocab_sizes)):
        spec = chosen[name]
        ids = batch_size * ids_per_row[f]
        if spec.sharding_type == "data_parallel":
            for rank in range(world_size):
                plan.rank_bytes[rank] += rows * (cols * 4 + state)
            plan.allreduce_bytes += 2 * share * rows * cols * 4
        else:
            shards = spec.sharding_spec.shards
            for shard in shards:
                r, c = shard.shard_sizes
                plan.rank_bytes[shard.placement.rank()] += r * (c * 4 + state)
            copies = len(shards) if spec.sharding_type == "column_wise" else 1
            plan.alltoall_bytes += share * (ids * 8 * copies + 2 * ids * cols * 4)
        plan.tables.append({"name": name, "rows": rows, "cols": cols,
                            "sharding": spec.sharding_type, "kernel": spec.compute_kernel,
                            "ranks": sorted(spec.ranks or [])})
    return plan
