"""Shared machinery of the op benchmarks (benchmarks/bench_<op>.py): timing, the copy roofline,
result rows, the printed table and the JSON/CSV files.

Conventions (DESIGN.md section 4, PERF_NOTES.md section 5.1):
- A timed run is one call of a step function (CPU: several back-to-back calls when one call is
  shorter than ``min_run_ms``; the per-call time is reported). Runs follow ``warmup`` untimed
  calls; the median and the 10th / 90th percentiles of ``repeats`` runs are reported (fewer,
  but at least 5, when a measurement has run ``max_seconds``: slow dense-gradient baselines).
- CUDA: every run is preceded by a write of a 256 MiB buffer (flushes L2) and is timed with CUDA
  events around the call; the device is synchronised before and after. CPU: wall clock
  (``time.perf_counter``) with ``torch.set_num_threads(threads)``; no cache flush, so a table that
  fits the last-level cache is measured as cache-resident (choose workloads for both regimes).
- Roofline: a large float32 copy ``dst.copy_(src)`` on the same device in the same process,
  GB/s = 2 · bytes / t (read + write, 1 GB = 1e9 bytes). Every row reports its GB/s as a
  fraction of that copy.
- Peak memory: the growth of memory above its level just before the timed runs, at its highest
  during them (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, reset
  through /proc/self/clear_refs; None where that file is not writable).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"
L2_FLUSH_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# Command line and machine


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options every bench_<op>.py shares."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before the runs")
    parser.add_argument("--min-run-ms", type=float, default=1.0,
                        help="CPU: batch calls into runs of at least this long (default 1 ms)")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="stop a measurement after this long once it has 5 runs (default 20)")
    parser.add_argument("--copy-mib", type=int, default=512,
                        help="size of the copy-roofline tensor in MiB (default 512)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the JSON and CSV")


def parse_bench_args(doc: str, workloads: Sequence[str], default_workload: str,
                     providers: Sequence[str], argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line every bench_<op>.py shares: --workload, --phase, --providers (checked
    against ``providers``, returned as a list), --lr and the common options."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=tuple(workloads), default=default_workload)
    parser.add_argument("--phase", choices=("forward", "backward", "train", "all"), default="all")
    parser.add_argument("--providers", default=",".join(providers),
                        help=f"comma-separated subset of: {', '.join(providers)}")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in args.providers if p not in providers]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {list(providers)}")
    return args


def setup_device(args: argparse.Namespace) -> torch.device:
    """Applies --threads and checks --device; returns the device to run on."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    return torch.device(args.device)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device, packages: Sequence[str] = ()) -> dict[str, object]:
    """CPU model, threads, versions and the device name, for the header and the JSON."""
    info: dict[str, object] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
    }
    info.update({name: _version(name) for name in packages})
    info["device"] = "cpu"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    sms=props.multi_processor_count,
                    device_memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=getattr(props, "L2_cache_size", 0) / 2**20,
                    memory_clock_khz=getattr(props, "memory_clock_rate", None),
                    memory_bus_bits=getattr(props, "memory_bus_width", None))
    return info


def print_machine_info(info: dict[str, object]) -> None:
    print("machine: " + ", ".join(f"{key}={value}" for key, value in info.items()), flush=True)


# --------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds over ``runs`` timed runs of ``calls_per_run`` calls."""

    ms: float  # median
    p10_ms: float
    p90_ms: float
    runs: int
    calls_per_run: int


def _percentile(sorted_values: list[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _summarise(per_call_ms: list[float], calls_per_run: int) -> Timing:
    values = sorted(per_call_ms)
    return Timing(statistics.median(values), _percentile(values, 0.1), _percentile(values, 0.9),
                  len(values), calls_per_run)


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Writes a 256 MiB buffer so the next run starts with a cold L2. The buffer is allocated
    once (by the copy roofline, first), so it never shows in a provider's peak memory."""
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES // 4, device=device)
    _flush_buffers[device].zero_()


def measure(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int,
            min_run_ms: float = 1.0, max_seconds: float = math.inf) -> Timing:
    """Times fn() (see the module docstring): median and p10/p90 of ``repeats`` runs, or of
    fewer (at least 5) when the runs have taken ``max_seconds`` already (slow baselines)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return _measure_cuda(fn, device, repeats, max_seconds)
    start = time.perf_counter()
    fn()
    single_ms = (time.perf_counter() - start) * 1e3
    calls = max(1, min(1000, math.ceil(min_run_ms / max(single_ms, 1e-6))))
    per_call_ms: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(per_call_ms) < repeats and not _out_of_time(per_call_ms, deadline):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call_ms.append((time.perf_counter() - start) * 1e3 / calls)
    return _summarise(per_call_ms, calls)


def _out_of_time(runs: list[float], deadline: float) -> bool:
    return len(runs) >= 5 and time.perf_counter() > deadline


def _measure_cuda(fn: Callable[[], object], device: torch.device, repeats: int,
                  max_seconds: float) -> Timing:
    per_call_ms: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(per_call_ms) < repeats and not _out_of_time(per_call_ms, deadline):
        _flush_l2(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        per_call_ms.append(begin.elapsed_time(end))
    return _summarise(per_call_ms, 1)


@dataclasses.dataclass(frozen=True)
class CopyRoofline:
    """The memory-copy roofline of this device, measured in this process."""

    bytes: int  # of one tensor; a copy moves 2x this
    timing: Timing

    @property
    def gb_per_s(self) -> float:
        return 2 * self.bytes / (self.timing.ms * 1e-3) / 1e9


def copy_roofline(device: torch.device, mib: int = 512, repeats: int = 10) -> CopyRoofline:
    """Times ``dst.copy_(src)`` of two float32 tensors of ``mib`` MiB each."""
    src = torch.rand(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, repeats=repeats, warmup=2, min_run_ms=0.0)
    return CopyRoofline(src.numel() * src.element_size(), timing)


# --------------------------------------------------------------------------------------------
# Peak memory


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Context manager: ``peak_mib`` is the highest growth of memory inside the block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            self._base = _read_status_kib("VmRSS") * 1024
        except (OSError, KeyError):
            self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self.peak_mib = max(0, _read_status_kib("VmHWM") * 1024 - self._base) / 2**20


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Row:
    """One (provider, workload, phase) result. ``speedup[b]`` = time of baseline b / this time,
    from the same run; p10/p90 are None for derived rows (a difference of two medians)."""

    provider: str
    workload: str
    phase: str
    ms: float
    p10_ms: float | None
    p90_ms: float | None
    gb_per_s: float
    frac_of_copy: float
    speedup: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_mib: float | None = None


def make_row(provider: str, workload: str, phase: str, timing: Timing | float, nbytes: float,
             roofline: CopyRoofline, peak_mib: float | None = None) -> Row:
    """A row from a Timing (or a derived median in ms) and the bytes its byte model counts."""
    ms, p10, p90 = ((timing.ms, timing.p10_ms, timing.p90_ms) if isinstance(timing, Timing)
                    else (timing, None, None))
    gb_per_s = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else math.nan
    return Row(provider, workload, phase, ms, p10, p90, gb_per_s, gb_per_s / roofline.gb_per_s,
               peak_mib=peak_mib)


PHASES_OF = {"forward": ["forward"], "backward": ["forward", "fwd+bwd"], "train": ["train"],
             "all": ["forward", "fwd+bwd", "train"]}  # --phase -> the steps measured


def time_phases(provider: str, workload: str, steps: dict[str, Callable[[], object]],
                nbytes: dict[str, float], device: torch.device, args: argparse.Namespace,
                roofline: CopyRoofline) -> list[Row] | str:
    """Times the steps ("forward", "fwd+bwd", "train") that --phase asks for, each under
    PeakMemory, and derives the "backward" row (fwd+bwd median minus forward median); returns
    the rows, or why a measurement failed (e.g. out of memory)."""
    wanted = PHASES_OF[args.phase]
    rows = []
    for phase in wanted:
        try:
            with PeakMemory(device) as peak:
                timing = measure(steps[phase], device, repeats=args.repeats, warmup=args.warmup,
                                 min_run_ms=args.min_run_ms, max_seconds=args.max_seconds)
        except Exception as error:  # e.g. out of memory: the provider is skipped, saying why
            return f"failed in {phase}: {type(error).__name__}: {error}"
        rows.append(make_row(provider, workload, phase, timing, nbytes[phase], roofline,
                             peak.peak_mib))
    if "fwd+bwd" in wanted:
        backward_ms = rows[wanted.index("fwd+bwd")].ms - rows[wanted.index("forward")].ms
        rows.append(make_row(provider, workload, "backward", backward_ms, nbytes["backward"],
                             roofline))
    return rows


def add_speedups(rows: list[Row], baselines: Sequence[str]) -> None:
    """Fills ``speedup`` of every row against each baseline measured for the same phase."""
    for row in rows:
        for baseline in baselines:
            ref = next((r for r in rows if r.provider == baseline and r.phase == row.phase
                        and r.workload == row.workload), None)
            if ref is not None and row.ms > 0:
                row.speedup[baseline] = ref.ms / row.ms


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def print_table(rows: Sequence[Row], baselines: Sequence[str]) -> None:
    """An aligned plain-text table, one line per row."""
    header = ["provider", "phase", "ms", "p10-p90 ms", "GB/s", "of copy"]
    header += [f"x {b}" for b in baselines] + ["peak MiB"]
    lines = [header]
    for r in rows:
        spread = "-" if r.p10_ms is None else f"{r.p10_ms:.3f}-{r.p90_ms:.3f}"
        lines.append([r.provider, r.phase, _fmt(r.ms, ".3f"), spread, _fmt(r.gb_per_s, ".2f"),
                      _fmt(100 * r.frac_of_copy, ".1f") + "%"]
                     + [_fmt(r.speedup.get(b), ".2f") for b in baselines]
                     + [_fmt(r.peak_mib, ".0f")])
    print_aligned(lines)


def print_aligned(lines: Sequence[Sequence[str]], names: int = 2) -> None:
    """``lines`` (a header, then rows of cells) as aligned columns: the first ``names``
    columns left-aligned, the numbers right-aligned, a rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        cells = [cell.ljust(width) if j < names else cell.rjust(width)
                 for j, (cell, width) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_results(out_dir: Path, name: str, info: dict[str, object], meta: dict[str, object],
                  rows: Sequence[Row]) -> tuple[Path, Path]:
    """Writes <name>_<time>.json (machine, meta, rows) and .csv (rows, speedups as columns)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    records = [dataclasses.asdict(r) for r in rows]
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    document = {"machine": info, **meta, "rows": records}
    json_path.write_text(json.dumps(document, indent=1, default=str))
    baselines = sorted({b for r in rows for b in r.speedup})
    fields = [f.name for f in dataclasses.fields(Row) if f.name != "speedup"]
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields + [f"speedup_vs_{b}" for b in baselines])
        for record, row in zip(records, rows):
            speedups = [row.speedup.get(b, "") for b in baselines]
            writer.writerow([record[f] for f in fields] + speedups)
    return json_path, csv_path

