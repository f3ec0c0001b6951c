r"""Multi-process training (hmoe.distributed): throughput at 1 and N ranks, all-to-all bytes
against the plan's estimate, and the local lookup each design would run.

Phases (``--phase``, default all):

ranks   Samples/s of the training step (the quickstart model: STEM, 2 tasks, dim 16, TIM over
        behaviour sequences) on a synthetic world in memory, at 1 rank (one process, the
        MultiEmbedding) and at ``--nproc`` ranks (default 2; torchrun, gloo, tables sharded by
        TorchRec, ``--sharding``), global batch ``--batch`` either way. Each rank also counts the
        bytes its batches put through the all-to-all (ids to the rows' owners, rows back, their
        gradients out again: the formula of hmoe.distributed.plan with the sequences' real
        lengths) and the plan's estimate (which counts max_len ids a sequence) is printed
        beside it. On a 2-core machine two ranks share the cores: this shows the overhead, not
        scaling.
local   The local part of a step of each design, one process: hmoe's MultiEmbedding with its
        fused SGD (what a sharder of our own would run on each rank) against the tables of K·D
        columns sharded by TorchRec on a world of one rank, whose lookup and fused SGD are
        FBGEMM's table-batched kernels (what each rank runs now), on the same ids, with a
        memory copy measured in the same run as the roofline. (An unsharded
        EmbeddingCollection would not do: it is one torch nn.Embedding a table.)

``--device cuda`` runs both on GPUs: each rank on cuda:LOCAL_RANK, nccl instead of gloo (the
'ranks' phase needs ``--nproc`` GPUs and the CUDA build of fbgemm-gpu).

    python benchmarks/bench_distributed.py --phase ranks,local --threads 2
    python benchmarks/bench_distributed.py --device cuda --nproc 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

MODEL = {"dim": 16, "sequence_encoder": "tim"}
WORLD = {"num_rows": 40_000, "num_users": 4000, "num_ads": 10_000, "max_len": 50, "seed": 1}


def _loss(model, batch):
    logits = model(batch)["logits"]
    return sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[t], batch["labels"][:, i])
               for i, t in enumerate(logits))


def _alltoall_bytes(batch, schema, cols: int, world: int) -> float:
    """The bytes this rank's batch puts through the all-to-all in one step (module docstring)."""
    ids = batch["categorical"].numel() + sum(
        int(batch[f"seq/{s.name}/lengths"].sum()) for s in schema.sequence)
    return (world - 1) / world * (ids * 8 + 2 * ids * cols * 4)


def rank_main(args) -> None:
    """One rank of the 'ranks' phase (under torchrun), or the single process."""
    import torch.distributed as dist

    from hmoe.data.synthetic import SyntheticConfig, generate
    from hmoe.models.presets import preset

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, args.threads // world))
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    data = generate(SyntheticConfig(**WORLD))
    torch.manual_seed(0)
    model = preset("stem", data.schema, tasks=["click", "conversion"], **MODEL)
    rows = {k: torch.as_tensor(v).to(device) for k, v in data.splits["train"].items()}
    share = args.batch // world
    if world > 1:
        from hmoe.distributed.model import dense_parameters, distribute

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        net = distribute(model, sharding=args.sharding, optimizer="sgd", lr=0.05, device=device)
        dense = torch.optim.Adam(list(dense_parameters(net)), lr=1e-3)
    else:
        rank, net = 0, model.to(device)
        dense = torch.optim.Adam(model.parameters(), lr=1e-3)
    cols = len([s for s in model.config.sets if s.dim == MODEL["dim"]]) * MODEL["dim"]
    n = len(rows["labels"]) // args.batch
    moved, seconds = 0.0, 0.0
    for step in range(args.warmup + args.steps):
        start = (step % n) * args.batch + rank * share
        batch = {k: v[start:start + share] for k, v in rows.items()}
        began = time.perf_counter()
        dense.zero_grad()
        _loss(net, batch).backward()
        dense.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            seconds += time.perf_counter() - began
            if world > 1:
                moved += _alltoall_bytes(batch, data.schema, cols, world)
    result = {"world": world, "rank": rank, "samples_per_s": args.steps * args.batch / seconds,
              "alltoall_bytes_per_step": moved / args.steps, "cols": cols}
    if world > 1:
        totals = torch.tensor([moved / args.steps, seconds], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        result["alltoall_bytes_per_step_all_ranks"] = float(totals[0])
        result["samples_per_s"] = args.steps * args.batch / float(totals[1] / world)
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    if world > 1:
        from hmoe.distributed.launch import close_ranks

        close_ranks()


def phase_ranks(args) -> dict:
    from hmoe.data.synthetic import SyntheticConfig, generate
    from hmoe.distributed.plan import parse_bytes, plan_tables

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, args.nproc):
            out = Path(tmp) / f"ranks{world}.json"
            common = [str(Path(__file__).resolve()), "--rank-worker", "--result", str(out),
                      "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                      str(args.warmup), "--threads", str(args.threads), "--sharding",
                      args.sharding, "--device", args.device]
            command = [sys.executable, *common] if world == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(world), *common]
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  env={**os.environ, "OMP_NUM_THREADS": str(
                                      max(1, args.threads // world))})
            if done.returncode:
                raise RuntimeError(f"{world} rank(s) failed:\n{done.stderr[-3000:]}")
            results[world] = json.loads(out.read_text())
    n = args.nproc
    one, two = results[1], results[n]
    shared = "one GPU a rank, nccl" if args.device == "cuda" else \
        f"{n} ranks share {args.threads} CPU thread(s)"
    print(f"ranks   1 process        {one['samples_per_s']:10,.0f} samples/s")
    print(f"ranks   {n} ranks ({args.sharding:<9}) {two['samples_per_s']:10,.0f} samples/s "
          f"({two['samples_per_s'] / one['samples_per_s']:.2f}x; {shared})")
    schema = generate(SyntheticConfig(**{**WORLD, "num_rows": 100})).schema
    estimate = plan_tables(schema, two["cols"] // MODEL["dim"], MODEL["dim"], world_size=n,
                           device_memory=parse_bytes("20GB"), batch_size=args.batch,
                           compute_device=args.device, sharding=args.sharding, optimizer="sgd")
    measured = two["alltoall_bytes_per_step_all_ranks"]
    print(f"ranks   all-to-all per step: {measured / 2**20:8.2f} MiB from the batches' real "
          f"lengths, {estimate.alltoall_bytes / 2**20:8.2f} MiB planned (max_len a sequence): "
          f"{measured / estimate.alltoall_bytes:.2f} of the plan")
    return {"phase": "ranks", "one": one, "two": two,
            "planned_alltoall_bytes": estimate.alltoall_bytes}


def _fbgemm_tables(tables, device: torch.device):
    """``tables`` sharded by TorchRec on a process group of one rank (table-wise, the "fused"
    compute kernel: FBGEMM's table-batched lookup with exact SGD in backward), as a rank of
    a multi-process run holds them; returns the module that holds them (kept alive)."""
    import torch.distributed as dist
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="bench_distributed_"), 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=0, world_size=1)
    holder = torch.nn.Module()
    holder.tables = tables
    apply_optimizer_in_backward(torch.optim.SGD, tables.collection.parameters(), {"lr": 0.05})
    constraints = {name: ParameterConstraints(sharding_types=["table_wise"],
                                              compute_kernels=["fused"])
                   for name in tables.table_names}
    sharders = [EmbeddingCollectionSharder()]
    plan = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device=device.type),
        constraints=constraints).collective_plan(holder, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(holder, device=device, plan=plan, sharders=sharders)
    return model.module.tables


def phase_local(args) -> dict:
    from hmoe.data.synthetic import SyntheticConfig, generate
    from hmoe.distributed.embedding import ShardedTables
    from hmoe.nn import MultiEmbedding
    from hmoe.optim import FusedSGD

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = generate(SyntheticConfig(**WORLD))
    schema = data.schema
    K, D = 4, MODEL["dim"]
    batch = {k: torch.as_tensor(v[:args.batch]).to(device) for k, v in data.splits["train"].items()}
    table = MultiEmbedding([f.vocab_size for f in schema.categorical], D, K,
                           fused_optimizer=FusedSGD(lr=0.05), device=device)
    tables = _fbgemm_tables(ShardedTables.from_multi_embedding(table, schema), device)

    ids = batch["categorical"]
    pieces = [table.global_rows(ids)] + [
        batch[f"seq/{s.name}"].to(torch.int64) + int(table.offsets[schema.categorical_index(s.item)])
        for s in schema.sequence]
    rows = torch.cat(pieces, dim=1)

    def hmoe_step():
        table.forward_rows(rows).sum().backward()

    def fbgemm_step():
        categorical, behaviours = tables.lookup(batch)
        (categorical.sum() + sum(b.sum() for b in behaviours)).backward()

    copy = _harness.copy_roofline(device, 256)
    timings = {}
    for name, step in (("hmoe_multi_embedding_fused", hmoe_step),
                       ("torchrec_fbgemm_fused", fbgemm_step)):
        timings[name] = _harness.measure(step, device, repeats=args.repeats,
                                         warmup=5, min_run_ms=1.0, max_seconds=30.0)
    valid = int(rows.numel())
    useful = valid * K * D * 4 * 3  # rows read, gradients written, rows updated
    for name, timing in timings.items():
        gbps = useful / (timing.ms * 1e-3) / 1e9
        print(f"local   {name:<28} {timing.ms:8.3f} ms  {gbps:6.2f} GB/s "
              f"({100 * gbps / copy.gb_per_s:.1f}% of a {copy.gb_per_s:.1f} GB/s copy)")
    ratio = timings["torchrec_fbgemm_fused"].ms / \
        timings["hmoe_multi_embedding_fused"].ms
    print(f"local   hmoe's kernel is {ratio:.2f}x the speed of FBGEMM's tables on this step "
          f"(B = {args.batch}, K = {K}, D = {D}, {rows.shape[1]} ids a row)")
    return {"phase": "local", "ms": {k: t.ms for k, t in timings.items()},
            "ratio": ratio, "copy_gb_per_s": copy.gb_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", default="ranks,local")
    parser.add_argument("--batch", type=int, default=1024, help="the global batch")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sharding", default="auto")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: each rank on cuda:LOCAL_RANK, nccl")
    parser.add_argument("--nproc", type=int, default=2,
                        help="the ranks of the 'ranks' phase (against 1 process)")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_main(args)
        return
    if args.nproc < 2:
        parser.error(f"--nproc must be >= 2, got {args.nproc}")
    gpus = args.nproc if "ranks" in args.phase.split(",") else 1
    if args.device == "cuda" and torch.cuda.device_count() < gpus:
        parser.error(f"--device cuda --phase {args.phase} --nproc {args.nproc} needs {gpus} "
                     f"GPU(s), {torch.cuda.device_count()} here")
    from hmoe.distributed import require

    require()
    _harness.print_machine_info(_harness.machine_info(
        torch.device(args.device), ["torchrec", "fbgemm-gpu" if args.device == "cuda"
                                    else "fbgemm-gpu-cpu"]))
    phases = args.phase.split(",")
    if "ranks" in phases:
        phase_ranks(args)
    if "local" in phases:
        phase_local(args)


if __name__ == "__main__":
    main()
