r"""The data path at scale: bounded memory, no stall, loader headroom (hmoe.data.stream).

Three phases (``--phase``, default all):

memory   Peak resident memory of ``hmoe train --config quickstart --train.max_steps=300``
         streaming a synthetic world written to disk first (``hmoe generate``), for each size of
         ``--rows`` (default 2M and 20M rows); with ``--csv`` also from raw CSV files of the
         same world going through preprocessing (``--data.source=files``, its cache removed and
         built again in the measured run). Peaks are sampled every 50 ms from /proc over the
         whole process tree (the trainer and its DataLoader workers): the summed RSS, which
         counts the pages a forked worker shares with its parent twice, and the summed PSS,
         which splits them (the real footprint). Targets: the peaks of the two sizes differ by < 256 MB; the largest stays
         < 3 GB.
stall    Samples/s of the same training step fed from in-memory tensors (a ColumnSource, no
         worker) and streamed from the world on disk with one worker, in alternating blocks of
         steps in one process (drift hits both alike). Target: streamed >= 0.95x in-memory.
loader   Rows/s the loader alone delivers (one worker, streamed from disk, shuffle buffer as in
         training), against the rows/s the model consumes (the stall phase's in-memory rate),
         and its output bandwidth against a memory copy in the same process. Target: >= 3x.

    python benchmarks/bench_data.py --phase stall,loader --threads 2
    python benchmarks/bench_data.py --phase memory --rows 2000000,20000000 --csv \
        --workdir /tmp/hmoe-bench-data
Worlds, CSV files and caches are kept in ``--workdir`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

QUICKSTART_MODEL = ["--model.preset=stem", "--model.tasks=[click, conversion]",
                    "--model.options.dim=16", "--model.options.sequence_encoder=tim"]


# --------------------------------------------------------------------------------------------
# Peak memory of a process tree.


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def _memory_bytes(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process. A forked DataLoader worker shares its parent's pages (the torch
    libraries, the interpreter): RSS counts them in both, PSS splits them, so the sum of PSS
    over a process tree is its real footprint and the sum of RSS overstates it."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) * 1024 for line in f
                        if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:")), 0)
    except OSError:
        pass
    return rss, pss


def _tree_memory(root: int) -> tuple[int, int]:
    tree, rss, pss, stack = _children(), 0, 0, [root]
    while stack:
        pid = stack.pop()
        r, p = _memory_bytes(pid)
        rss, pss = rss + r, pss + p
        stack.extend(tree.get(pid, []))
    return rss, pss


def run_measured(command: list[str], log: Path) -> dict:
    """Runs ``command``; its wall time and the peaks of the summed RSS and PSS of its process
    tree (the trainer and its DataLoader workers)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        peak, done = [0, 0], threading.Event()

        def sample():
            while not done.is_set():
                rss, pss = _tree_memory(process.pid)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        done.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log}")
    return {"peak_rss_mb": peak[0] / 2**20, "peak_pss_mb": peak[1] / 2**20,
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------
# Data on disk.


def ensure_world(workdir: Path, rows: int) -> Path:
    world = workdir / f"world_{rows}"
    if not (world / "ground_truth.npz").is_file():
        subprocess.run([sys.executable, "-m", "hmoe", "generate", "--rows", str(rows),
                        "--out", str(world)], check=True)
    return world


def ensure_csv(workdir: Path, world: Path) -> tuple[Path, dict[str, str]]:
    """The world's splits as raw CSV (sequences and vectors "|"-joined) plus a dataset config:
    what a user's click log looks like before preprocessing."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv
    import pyarrow.parquet as pq
    import yaml

    out = workdir / f"csv_{world.name.removeprefix('world_')}"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "valid", "test"):
        target = out / f"{split}.csv"
        files[split] = str(target)
        if target.is_file():
            continue
        parquet = pq.ParquetFile(world / f"{split}.parquet")
        temporary = target.with_suffix(".tmp")
        writer = None
        for group in range(parquet.metadata.num_row_groups):
            table = parquet.read_row_group(group)
            columns = {}
            for name in table.column_names:
                column = table.column(name)
                if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
                    column = pc.binary_join(pc.cast(column, pa.list_(pa.string())), "|")
                columns[name] = column
            table = pa.table(columns)
            if writer is None:
                writer = pyarrow.csv.CSVWriter(temporary, table.schema)
            writer.write_table(table)
        writer.close()
        temporary.replace(target)
    config = yaml.safe_load((world / "schema.yaml").read_text())
    config["name"] = f"synthetic_csv_{out.name}"
    config["source"] = {"format": "csv", "header": True}
    (out / "dataset.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out / "dataset.yaml", files


def phase_memory(args) -> list[dict]:
    results = []
    workdir = Path(args.workdir)
    for rows in args.rows:
        world = ensure_world(workdir, rows)
        kinds = [("world", ["--data.source=world", f"--data.world={world}"])] \
            if not args.csv_only else []
        if args.csv or args.csv_only:
            dataset, files = ensure_csv(workdir, world)
            cache = workdir / f"cache_{rows}"
            kinds.append(("csv", ["--data.source=files", f"--data.dataset={dataset}",
                                  f"--data.files={json.dumps(files)}",
                                  f"--data.cache={cache}"]))
        for kind, data in kinds:
            if kind == "csv":  # preprocessing is part of the measured run, never a cache hit
                shutil.rmtree(workdir / f"cache_{rows}", ignore_errors=True)
            run = workdir / f"run_{kind}_{rows}_{int(time.time())}"
            command = [sys.executable, "-m", "hmoe", "train", "--config", "quickstart",
                       "--out", str(run), f"--train.max_steps={args.steps}",
                       "--train.progress=off", f"--train.threads={args.threads}", *data,
                       *args.train_args.split()]
            measured = run_measured(command, workdir / f"{run.name}.log")
            results.append({"phase": "memory", "source": kind, "rows": rows, **measured})
            print(f"memory  {kind:<5} {rows:>11,d} rows: peak RSS {measured['peak_rss_mb']:6.0f}"
                  f" MB, peak PSS {measured['peak_pss_mb']:6.0f} MB (summed over the process "
                  f"tree; {measured['seconds']:.0f} s)", flush=True)
    for kind in ("world", "csv"):
        for measure in ("rss", "pss"):
            peaks = [r[f"peak_{measure}_mb"] for r in results if r["source"] == kind]
            if len(peaks) >= 2:
                print(f"memory  {kind} {measure.upper()}: largest - smallest peak = "
                      f"{max(peaks) - min(peaks):.0f} MB (target < 256), largest "
                      f"{max(peaks):.0f} MB (target < 3072)")
    return results


# --------------------------------------------------------------------------------------------
# Throughput: the training step fed in memory and streamed, and the loader alone.


def _trainer(world: Path, threads: int):
    from hmoe.train import Trainer, load_run_config

    config = load_run_config("quickstart", ["data.source=world", f"data.world={world}",
                                            f"train.threads={threads}", "train.progress=off"])
    run = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-data-{os.getpid()}"
    return Trainer(config, run)


def _take(iterator, steps: int, step) -> float:
    """Seconds for ``steps`` steps of ``step`` over ``iterator``, batch fetch included."""
    start = time.perf_counter()
    for _ in range(steps):
        step(next(iterator))
    return time.perf_counter() - start


def phase_stall(args) -> dict:
    from hmoe.data.stream import ColumnSource, stream_batches

    world = ensure_world(Path(args.workdir), args.stall_rows)
    torch.set_num_threads(args.threads)
    trainer = _trainer(world, args.threads)
    streamed_source = trainer.dataset.source("train")
    memory_source = ColumnSource(streamed_source.columns(max_rows=args.memory_rows),
                                 trainer.dataset.schema)
    batch = trainer.config.train.batch_size
    buffer = trainer.config.data.shuffle_buffer

    def step(b):
        trainer._step(b, 0, 0, _NoLog())

    streams = {
        "in_memory": iter(_cycle(lambda epoch: stream_batches(
            memory_source, batch, shuffle=True, seed=0, epoch=epoch, shuffle_buffer=buffer))),
        "streamed_1_worker": iter(_cycle(lambda epoch: stream_batches(
            streamed_source, batch, shuffle=True, seed=0, epoch=epoch, shuffle_buffer=buffer,
            num_workers=1))),
    }
    for it in streams.values():  # warm-up: workers started, first window read, caches warm
        _take(it, args.warmup, step)
    seconds = {name: 0.0 for name in streams}
    for _ in range(args.blocks):
        for name, it in streams.items():
            seconds[name] += _take(it, args.block_steps, step)
    steps = args.blocks * args.block_steps
    rates = {name: steps * batch / s for name, s in seconds.items()}
    ratio = rates["streamed_1_worker"] / rates["in_memory"]
    for name, rate in rates.items():
        print(f"stall   {name:<18} {rate:10,.0f} samples/s")
    print(f"stall   streamed / in-memory = {ratio:.3f} (target >= 0.95)")
    return {"phase": "stall", "samples_per_s": rates, "ratio": ratio, "steps": steps,
            "batch_size": batch, "world_rows": args.stall_rows}


class _NoLog:
    def write(self, record):
        pass


def _cycle(make):
    epoch = 0
    while True:
        yield from make(epoch)
        epoch += 1


def phase_loader(args, consumed: float | None) -> dict:
    from hmoe.data.stream import StoreSource, stream_batches
    from hmoe.data.synthetic import open_world

    world = ensure_world(Path(args.workdir), args.stall_rows)
    source = StoreSource(open_world(world).stores["train"])
    stream = iter(_cycle(lambda epoch: stream_batches(
        source, 1024, shuffle=True, seed=0, epoch=epoch, shuffle_buffer=262_144,
        num_workers=1)))
    for _ in range(args.warmup):
        next(stream)
    rows = nbytes = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.loader_seconds:
        batch = next(stream)
        rows += len(batch["labels"])
        nbytes += sum(t.numel() * t.element_size() for t in batch.values())
    seconds = time.perf_counter() - start
    copy = _harness.copy_roofline(torch.device("cpu"))
    rate = rows / seconds
    result = {"phase": "loader", "rows_per_s": rate, "gb_per_s": nbytes / seconds / 1e9,
              "copy_gb_per_s": copy.gb_per_s}
    print(f"loader  {rate:10,.0f} rows/s, {result['gb_per_s']:.2f} GB/s of batches "
          f"({result['gb_per_s'] / copy.gb_per_s:.1%} of a {copy.gb_per_s:.1f} GB/s copy)")
    if consumed:
        result["headroom"] = rate / consumed
        print(f"loader  headroom = loader / model = {rate / consumed:.2f}x (target >= 3)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", default="stall,loader,memory")
    parser.add_argument("--rows", default="2000000,20000000",
                        type=lambda s: [int(float(x)) for x in s.split(",")])
    parser.add_argument("--csv", action="store_true", help="also raw CSV through preprocessing")
    parser.add_argument("--csv-only", action="store_true", help="only raw CSV (memory)")
    parser.add_argument("--train-args", default="",
                        help="more hmoe train overrides (memory), e.g. "
                             "'--train.eval_exact_rows=250000'")
    parser.add_argument("--steps", type=int, default=300, help="training steps (memory)")
    parser.add_argument("--stall-rows", type=int, default=600_000)
    parser.add_argument("--memory-rows", type=int, default=480_000,
                        help="train rows held in memory for the in-memory side (stall)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--block-steps", type=int, default=20)
    parser.add_argument("--loader-seconds", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/hmoe-bench-data")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    phases = args.phase.split(",")
    info = _harness.machine_info(torch.device("cpu"), ["torch", "pyarrow", "numpy"])
    _harness.print_machine_info(info)
    results = []
    consumed = None
    if "stall" in phases:
        stall = phase_stall(args)
        consumed = stall["samples_per_s"]["in_memory"]
        results.append(stall)
    if "loader" in phases:
        results.append(phase_loader(args, consumed))
    if "memory" in phases:
        results += phase_memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2,
                                              default=str))


if __name__ == "__main__":
    main()
