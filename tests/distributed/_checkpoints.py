"""Run by tests/distributed/test_checkpoints.py under torchrun (2 gloo ranks): for each
sharding type, a torch.distributed.checkpoint round trip and evaluation across the ranks.
Writes <out>/rank<r>.json: {sharding: {
    "reload": max |diff| of the gathered state after loading the checkpoint into a fresh model,
    "resumed": the same after 3 more steps of the original and of the reloaded model,
    "afresh": the same when the tables' optimizer state is not loaded (> 0 shows that the
              checkpoint's row-wise Adagrad state matters),
    "single": max |diff| between the checkpoint read in one process and the gathered state,
    "metrics": max |diff| between the metrics evaluated across the ranks and those of one
               process on the whole model and the same rows,
    "counts": [rows counted across the ranks, by one process],
    "rows": the rows this rank scored}}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hmoe.data.stream import ColumnSource, stream_batches
from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.distributed import checkpoint
from hmoe.distributed.evaluate import evaluate_ranks
from hmoe.distributed.model import SHARDINGS, dense_parameters, distribute
from hmoe.models.presets import preset
from hmoe.train.trainer import evaluate_model

BATCH, LR = 64, 0.05


def loss_of(model, batch):
    logits = model(batch)["logits"]
    labels = batch["labels"]
    return sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[task], labels[:, t])
               for t, task in enumerate(logits))


def difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    data = generate(SyntheticConfig(num_rows=3000, num_users=50, num_ads=60, num_advertisers=10,
                                    max_len=10, seed=5))
    rows = {key: torch.as_tensor(value) for key, value in data.splits["train"].items()}
    share = BATCH // world
    mine = slice(rank * share, (rank + 1) * share)
    # 1,000 rows in units of 256: the ranks score 512 and 488 rows, in batches of 100
    valid = ColumnSource({key: value[1000:2000] for key, value in data.splits["train"].items()},
                         data.schema, unit_rows=256)  # rows the steps below do not train on
    results = {}

    def build(seed, sharding):
        torch.manual_seed(seed)
        model = preset("hmoe_me", data.schema, sequence_encoder="tim", dim=8,
                       expert_hidden=(16,), tower=())
        net = distribute(model, sharding=sharding, optimizer="rowwise_adagrad", lr=LR)
        return net, torch.optim.Adam(list(dense_parameters(net)), lr=1e-2)

    def steps(net, optimizer, first, count):
        for step in range(first, first + count):
            batch = {key: value[step * BATCH:(step + 1) * BATCH][mine]
                     for key, value in rows.items()}
            optimizer.zero_grad()
            loss_of(net, batch).backward()
            optimizer.step()

    for s, sharding in enumerate(SHARDINGS):
        path = out / f"{sharding}.dcp"
        net, optimizer = build(s, sharding)
        steps(net, optimizer, 0, 5)
        checkpoint.save(net, path, {"optimizer": optimizer.state_dict()} if rank == 0 else None)
        saved = net.gather_state()
        steps(net, optimizer, 5, 3)
        continued = net.gather_state()

        found = {}
        for name, with_optimizer in (("resumed", True), ("afresh", False)):
            other, other_optimizer = build(100 + s, sharding)  # another start, overwritten
            checkpoint.load(other, path, optimizer=with_optimizer)
            loaded = other.gather_state()
            extra = checkpoint.read_extra(path) if rank == 0 else None
            box = [None if extra is None else extra["optimizer"]]
            dist.broadcast_object_list(box, src=0)
            other_optimizer.load_state_dict(box[0])  # the dense optimizer in both cases
            if rank == 0 and with_optimizer:
                found["reload"] = difference(loaded, saved)
            steps(other, other_optimizer, 5, 3)
            after = other.gather_state()
            if rank == 0:
                found[name] = difference(after, continued)

        # the checkpoint read in one process, without a process group's help
        if rank == 0:
            torch.manual_seed(999)
            whole = preset("hmoe_me", data.schema, sequence_encoder="tim", dim=8,
                           expert_hidden=(16,), tower=())
            found["single"] = difference(checkpoint.read_model_state(path, whole), saved)
        # evaluation across the ranks against one process on the same model and rows
        across = evaluate_ranks(net, valid, data.schema, ["click"], 100)
        state = net.gather_state()
        if rank == 0:
            whole.load_state_dict(state)
            one = evaluate_model(whole, valid, 100)
            found["metrics"] = max(abs(across[t][m] - one[t][m]) for t in one for m in one[t]
                                   if np.isfinite(one[t][m]))
            found["counts"] = [across["click"]["count"], one["click"]["count"]]
        mine_only = stream_batches(valid, 100, schema=data.schema, rank=rank, num_ranks=world,
                                   lockstep=False)
        found["rows"] = sum(len(batch["labels"]) for batch in mine_only)
        results[sharding] = found
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
