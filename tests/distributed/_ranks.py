"""Run by tests/distributed/test_ranks.py under torchrun (2 gloo ranks): for each sharding
type, the sharded model against one process holding the whole model, from the same start and on
the same rows. Writes <out>/rank<r>.json: {sharding: {"forward": max |diff| of the logits, "sgd": the same
after STEPS SGD steps, "moved": how far those steps moved the single process's logits}}."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.distributed.model import SHARDINGS, dense_parameters, distribute
from hmoe.models.presets import preset

STEPS, BATCH, LR = 20, 64, 0.05


def loss_of(model, batch):
    logits = model(batch)["logits"]
    labels = batch["labels"]
    return sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[task], labels[:, t])
               for t, task in enumerate(logits))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    data = generate(SyntheticConfig(num_rows=3000, num_users=50, num_ads=60, num_advertisers=10,
                                    max_len=10, seed=3))
    rows = {key: torch.as_tensor(value) for key, value in data.splits["train"].items()}
    share = BATCH // world
    mine = slice(rank * share, (rank + 1) * share)  # this rank's rows of a global batch
    results = {}
    for s, sharding in enumerate(SHARDINGS):
        torch.manual_seed(s)
        # no DIN here: its Dice takes batch statistics, which are per rank (half the batch),
        # as BatchNorm's are under DDP; the one-process equality holds for the others
        encoder = ("tim", "mean")[s % 2]
        whole = preset("hmoe_me", data.schema, sequence_encoder=encoder, dim=8,
                       expert_hidden=(16,), tower=())
        model = copy.deepcopy(whole)
        probe = {key: value[2000:2000 + BATCH] for key, value in rows.items()}
        with torch.no_grad():
            expected = whole(probe)["logits"]
        wrapped = distribute(model, sharding=sharding, optimizer="sgd", lr=LR)
        with torch.no_grad():
            got = wrapped({key: value[mine] for key, value in probe.items()})["logits"]
        forward = max((got[t] - expected[t][mine]).abs().max().item() for t in got)
        start = expected
        single = torch.optim.SGD(whole.parameters(), lr=LR)
        dense = torch.optim.SGD(list(dense_parameters(wrapped)), lr=LR)
        for step in range(STEPS):
            batch = {key: value[step * BATCH:(step + 1) * BATCH] for key, value in rows.items()}
            single.zero_grad()
            loss_of(whole, batch).backward()
            single.step()
            dense.zero_grad()
            loss_of(wrapped, {key: value[mine] for key, value in batch.items()}).backward()
            dense.step()
        with torch.no_grad():
            expected = whole(probe)["logits"]
            got = wrapped({key: value[mine] for key, value in probe.items()})["logits"]
        sgd = max((got[t] - expected[t][mine]).abs().max().item() for t in got)
        moved = max((expected[t] - start[t]).abs().max().item() for t in got)
        gathered = wrapped.gather_state()  # the whole model, single-process layout, on rank 0
        if rank == 0:
            state = whole.state_dict()
            assert list(gathered) == list(state)
            gather = max((gathered[k].double() - state[k].double()).abs().max().item()
                         for k in state if state[k].numel())
        else:
            assert gathered is None
            gather = 0.0
        # back at another start: load a single-process state into the sharded model
        torch.manual_seed(100 + s)
        other = preset("hmoe_me", data.schema, sequence_encoder=encoder, dim=8,
                       expert_hidden=(16,), tower=())
        wrapped.load_single_state(other.state_dict())
        with torch.no_grad():
            expected = other(probe)["logits"]
            got = wrapped({key: value[mine] for key, value in probe.items()})["logits"]
        reload = max((got[t] - expected[t][mine]).abs().max().item() for t in got)
        results[sharding] = {"forward": forward, "sgd": sgd, "moved": moved, "gather": gather,
                             "reload": reload, "encoder": encoder}
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
