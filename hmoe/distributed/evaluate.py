r"""Evaluation across ranks: each rank scores its share of the rows with the sharded model, and
rank 0 accumulates every rank's scores into one MetricAccumulator.

Each rank streams the units of the split that the stream's rank split gives it (every row once
over all ranks, hmoe.data.stream with ``lockstep=False``) and sends each batch's logits, labels
and groups to rank 0, which feeds them to the accumulator that one process would use. The
metrics are therefore those of one process on the same model and rows: the exact ones (AUC,
gAUC) do not depend on the order of the rows, the streamed sums only to rounding.

A sharded model's forward is a collective (the all-to-all of its ids), so every rank runs as
many forwards as the rank with the most batches: a rank that has run out scores a one-row
filler batch and sends nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hmoe.data.schema import Schema
from hmoe.data.stream import Source, stream_batches
from hmoe.train.metrics import MetricAccumulator

__all__ = ["evaluate_ranks"]


def _filler(source: Source, schema: Schema) -> dict[str, torch.Tensor]:
    """A one-row batch of ``source`` (its first row), scored and thrown away."""
    return next(iter(stream_batches(source, 1, schema=schema)))


@torch.no_grad()
def evaluate_ranks(net: nn.Module, source: Source, schema: Schema, tasks: Sequence[str],
                   batch_size: int, *, num_workers: int = 0,
                   metrics: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Every metric of every task of ``net`` (a DistributedModel, or any model whose forward
    gives {"logits": {task: (B,)}}) on ``source``, evaluated by all ranks of the default
    process group together; every rank returns the same dict. A collective: every rank calls
    it with the same arguments."""
    rank, world = dist.get_rank(), dist.get_world_size()
    label_columns = [schema.task_index(t) for t in tasks]
    batches = stream_batches(source, batch_size, num_workers=num_workers, schema=schema,
                             rank=rank, num_ranks=world, lockstep=False)
    steps = max(batches.plan.rank_batches(r) for r in range(world))
    accumulator = MetricAccumulator(tasks, from_logits=True, **dict(metrics or {})) \
        if rank == 0 else None
    was_training = net.training
    net.eval()
    try:
        mine, filler = iter(batches), None
        for _ in range(steps):
            batch = next(mine, None)
            if batch is None:  # this rank is done; the others still need its collectives
                filler = filler if filler is not None else _filler(source, schema)
                net(filler)
                sent = None
            else:
                logits = net(batch)["logits"]
                groups = batch.get("group_id")
                sent = ({t: logits[t].double().cpu().numpy() for t in tasks},
                        batch["labels"][:, label_columns].cpu().numpy(),
                        None if groups is None else groups.cpu().numpy())
            received = [None] * world if rank == 0 else None
            dist.gather_object(sent, received, dst=0)
            if accumulator is not None:
                for part in received:
                    if part is not None:
                        scores, labels, groups = part
                        accumulator.update(scores, labels, groups=groups)
    finally:
        net.train(was_training)
    box = [accumulator.compute() if accumulator is not None else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
