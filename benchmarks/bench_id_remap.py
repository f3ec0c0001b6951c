r"""Microbenchmark of the id remap of dynamic vocabularies (hmoe.nn.DynamicVocab,
hmoe.ops.id_remap) against the ways people remap raw ids in Python and PyTorch.

The stream: ``--ids`` raw 64-bit ids (default 10^7) whose popularity follows a Zipf law (numpy's
``zipf(--zipf)``: rank r is drawn with probability ~ r^-a, so a few ids are hot and the tail is
long; the ranks are scrambled into 64-bit ids by splitmix64, hmoe.data.hashing.mix64), cut into
batches of ``--batch`` ids (default 65,536). Every provider remaps the same batches in order.

Phases:
    stream   every provider over the whole stream, capacity ``--capacity`` (default 10^6),
             ``--min-count`` (default 2):
             hmoe_cpu / hmoe_cuda   DynamicVocab with the backend forced (the op's full rule:
                                    admission, LRU touches, eviction);
             python_dict            the same rule in Python on collections.OrderedDict
                                    (hmoe.ops.id_remap.id_remap_ref called batch by batch: the
                                    spec, as a Python implementation would write it);
             static_map             no dynamics: a vocabulary built offline over the whole stream
                                    with torch.unique (its time is printed apart, not counted),
                                    then torch.searchsorted per batch. The speed of a lookup that
                                    never admits or evicts.
             Reported: ids/s over the whole stream (wall clock, includes the host-side call
             overhead), the median ms per batch, the rows assigned, and the memory per id
             (bytes of state / capacity; for the dict, sys.getsizeof of the dicts and their int
             objects, an estimate; for the static map, its sorted ids / distinct ids).
    evict    the cost of eviction, on one table of capacity C = ``--evict-capacity`` (default
             10^5), min_count 1: C distinct new ids fill it (every admission takes a free row),
             then C more distinct new ids arrive, each admission evicting the least recently
             seen id. Same table, same memory, same number of admissions: the difference of
             the two halves' times over C is the extra cost of an eviction. Each half is timed
             ``--evict-repeats`` times (default 5) on a fresh table; medians are reported.
             Batches must hold fewer ids than C (a row seen in the current call is never
             reclaimed).

The reference backend of id_remap re-encodes the whole state in Python on every call (it is the
spec, not a fast path) and is not measured here beyond the tiny workload.

    python benchmarks/bench_id_remap.py                       # default: the numbers above
    python benchmarks/bench_id_remap.py --workload tiny       # smoke test sizes
    python benchmarks/bench_id_remap.py --device cuda --providers hmoe_cuda,static_map
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import hmoe.ops
from hmoe.data.hashing import mix64
from hmoe.nn import DynamicVocab
from hmoe.ops.id_remap import VocabState, id_remap_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OUT_DIR, machine_info, print_aligned, print_machine_info

PROVIDERS = ("hmoe_cpu", "hmoe_cuda", "hmoe_reference", "python_dict", "static_map")
WORKLOADS = {
    "default": {"ids": 10_000_000, "capacity": 1_000_000, "batch": 65_536,
                "evict_capacity": 100_000},
    "tiny": {"ids": 20_000, "capacity": 3_000, "batch": 1_000, "evict_capacity": 2_000},
}


@dataclasses.dataclass
class Result:
    provider: str
    phase: str
    ids: int
    seconds: float
    batch_ms_median: float
    assigned: int  # rows assigned (admissions) over the run
    capacity: int | None
    bytes_per_id: float | None

    @property
    def ids_per_s(self) -> float:
        return self.ids / self.seconds if self.seconds > 0 else float("nan")


@dataclasses.dataclass
class Report:
    results: list[Result]
    skipped: dict[str, str]
    extra: dict[str, float]


# --------------------------------------------------------------------------------------------
# The stream


def zipf_stream(num_ids: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """(num_ids,) int64 raw ids: Zipf ranks scrambled over int64 by mix64 (a bijection)."""
    ranks = np.random.default_rng(seed).zipf(exponent, size=num_ids).astype(np.uint64)
    return torch.from_numpy(mix64(ranks).view(np.int64))


def batches_of(stream: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return list(torch.split(stream, batch))


# --------------------------------------------------------------------------------------------
# Providers: each returns a function remapping one batch -> number of rows assigned, plus a
# function giving the bytes of its state.


def unavailable(provider: str, device: torch.device) -> str | None:
    backend = {"hmoe_cpu": "cpu", "hmoe_cuda": "cuda", "hmoe_reference": "reference"}.get(provider)
    if backend is not None:
        reason = hmoe.ops.reasons("id_remap", device.type)[backend]
        return None if reason is None else reason
    if provider == "python_dict" and device.type != "cpu":
        return "a Python implementation runs on the host only"
    return None


def make_hmoe(backend: str, capacity: int, min_count: int, device: torch.device):
    vocab = DynamicVocab(capacity, min_count=min_count, device=device)

    def step(ids: torch.Tensor) -> int:
        with hmoe.ops.backend(backend):
            _, assigned = vocab(ids)
        return assigned.numel()

    return step, vocab.state_bytes


def make_python_dict(capacity: int, min_count: int, device: torch.device):
    state = VocabState(capacity, capacity)

    def step(ids: torch.Tensor) -> int:
        return id_remap_ref(state, ids, min_count)[1].numel()

    def state_bytes() -> int:  # an estimate: the dicts plus one key and one value int object each
        entries = len(state.admitted) + len(state.pending)
        return sys.getsizeof(state.admitted) + sys.getsizeof(state.pending) + entries * 2 * 32

    return step, state_bytes


def make_static_map(stream: torch.Tensor, device: torch.device):
    start = time.perf_counter()
    vocabulary = torch.unique(stream.to(device))  # sorted distinct ids
    build_s = time.perf_counter() - start

    last = vocabulary.numel() - 1

    def step(ids: torch.Tensor) -> int:
        position = torch.searchsorted(vocabulary, ids).clamp_(max=last)
        rows = torch.where(vocabulary[position] == ids, position + 1, 0)  # unknown ids: row 0
        del rows
        return 0  # nothing is ever assigned

    return step, lambda: vocabulary.numel() * vocabulary.element_size(), build_s, vocabulary.numel()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stream(step: Callable[[torch.Tensor], int], batches: Sequence[torch.Tensor],
               device: torch.device) -> tuple[float, float, int]:
    """(total seconds, median ms per batch, rows assigned) of one pass, batch by batch."""
    batches = [b.to(device) for b in batches]
    _sync(device)
    per_batch, assigned = [], 0
    start = time.perf_counter()
    for ids in batches:
        t0 = time.perf_counter()
        assigned += step(ids)
        _sync(device)
        per_batch.append((time.perf_counter() - t0) * 1e3)
    total = time.perf_counter() - start
    return total, statistics.median(per_batch) if per_batch else 0.0, assigned


# --------------------------------------------------------------------------------------------
# Phases


def stream_phase(args, device, stream, providers, report: Report) -> None:
    batches = batches_of(stream, args.batch)
    for provider in providers:
        if provider == "static_map":
            step, state_bytes, build_s, distinct = make_static_map(stream, device)
            report.extra["static_map_build_s"] = build_s
            report.extra["distinct_ids"] = distinct
            per_id = state_bytes() / distinct
            capacity = None
        elif provider == "python_dict":
            step, state_bytes = make_python_dict(args.capacity, args.min_count, device)
            capacity = args.capacity
        else:
            backend = provider.removeprefix("hmoe_")
            step, state_bytes = make_hmoe(backend, args.capacity, args.min_count, device)
            capacity = args.capacity
        seconds, batch_ms, assigned = run_stream(step, batches, device)
        if capacity is not None:
            per_id = state_bytes() / capacity
        report.results.append(Result(provider, "stream", stream.numel(), seconds, batch_ms,
                                     assigned, capacity, per_id))
        print(f"  {provider}: {stream.numel() / seconds:,.0f} ids/s", flush=True)


def evict_phase(args, device, stream, providers, report: Report) -> None:
    del stream  # fresh distinct ids instead: every one is a new admission
    capacity = args.evict_capacity
    if args.batch >= capacity:
        raise SystemExit(f"--evict-capacity {capacity} must exceed --batch {args.batch}")
    ids = torch.from_numpy(mix64(np.arange(1, 2 * capacity + 1, dtype=np.uint64))
                           .view(np.int64).copy())
    fill, evict = batches_of(ids[:capacity], args.batch), batches_of(ids[capacity:], args.batch)
    for provider in providers:
        if provider in ("static_map", "hmoe_reference"):
            continue  # no eviction / not a fast path
        halves: dict[str, list[float]] = {"fill": [], "evict": []}
        counts = {}
        for _ in range(args.evict_repeats):
            if provider == "python_dict":
                step, state_bytes = make_python_dict(capacity, 1, device)
            else:
                step, state_bytes = make_hmoe(provider.removeprefix("hmoe_"), capacity, 1, device)
            for half, batches in (("fill", fill), ("evict", evict)):
                seconds, batch_ms, assigned = run_stream(step, batches, device)
                halves[half].append(seconds)
                counts[half] = (batch_ms, assigned)
        for half in ("fill", "evict"):
            seconds = statistics.median(halves[half])
            batch_ms, assigned = counts[half]
            report.results.append(Result(provider, f"{half} C={capacity}", capacity, seconds,
                                         batch_ms, assigned, capacity,
                                         state_bytes() / capacity))
        extra = statistics.median(halves["evict"]) - statistics.median(halves["fill"])
        report.extra[f"{provider}_ns_per_eviction"] = extra / capacity * 1e9
        print(f"  {provider}: evict phase done", flush=True)


# --------------------------------------------------------------------------------------------
# Output


def print_results(report: Report) -> None:
    header = ["provider", "phase", "ids", "s", "ids/s", "ms/batch", "assigned", "bytes/id"]
    lines = [header]
    for r in report.results:
        lines.append([r.provider, r.phase, f"{r.ids:,}", f"{r.seconds:.2f}", f"{r.ids_per_s:,.0f}",
                      f"{r.batch_ms_median:.2f}", f"{r.assigned:,}",
                      "-" if r.bytes_per_id is None else f"{r.bytes_per_id:.1f}"])
    print_aligned(lines)
    by_key = {(r.provider, r.phase): r for r in report.results}
    for r in report.results:
        if r.phase == "stream" and r.provider != "python_dict" and ("python_dict", "stream") in by_key:
            print(f"{r.provider} / python_dict: {r.ids_per_s / by_key['python_dict', 'stream'].ids_per_s:.1f}x")
        if r.phase == "stream" and r.provider.startswith("hmoe") and ("static_map", "stream") in by_key:
            print(f"{r.provider} / static_map: {r.ids_per_s / by_key['static_map', 'stream'].ids_per_s:.2f}x")
    for key, value in report.extra.items():
        print(f"{key}: {value:,.1f}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=tuple(WORKLOADS), default="default")
    parser.add_argument("--phase", choices=("stream", "evict", "all"), default="all")
    parser.add_argument("--providers", default="hmoe_cpu,hmoe_cuda,python_dict,static_map",
                        help=f"comma-separated subset of: {', '.join(PROVIDERS)}")
    parser.add_argument("--ids", type=int, help="stream length (default: the workload's)")
    parser.add_argument("--capacity", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--evict-capacity", type=int)
    parser.add_argument("--evict-repeats", type=int, default=5)
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent (> 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the JSON")
    args = parser.parse_args(argv)
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in args.providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")
    return args


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    device = torch.device(args.device)
    info = machine_info(device, packages=("numpy",))
    print_machine_info(info)
    start = time.perf_counter()
    stream = zipf_stream(args.ids, args.zipf)
    print(f"stream: {args.ids:,} ids, Zipf a={args.zipf}, {torch.unique(stream).numel():,} "
          f"distinct, batches of {args.batch:,}; capacity {args.capacity:,}, min_count "
          f"{args.min_count} ({time.perf_counter() - start:.1f} s to draw)", flush=True)
    report = Report([], {}, {})
    providers = []
    for provider in args.providers:
        why = unavailable(provider, device)
        if why is None:
            providers.append(provider)
        else:
            report.skipped[provider] = why
            print(f"  skipped {provider}: {why}")
    if args.phase in ("stream", "all"):
        stream_phase(args, device, stream, providers, report)
    if args.phase in ("evict", "all"):
        evict_phase(args, device, stream, providers, report)
    print_results(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_id_remap_{time.strftime('%Y%m%d-%H%M%S')}.json"
    document = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                "results": [dict(dataclasses.asdict(r), ids_per_s=r.ids_per_s)
                            for r in report.results],
                "skipped": report.skipped, "extra": report.extra}
    path.write_text(json.dumps(document, indent=1, default=str))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
