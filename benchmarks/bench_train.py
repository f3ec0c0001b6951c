r"""End-to-end training throughput of HMoE models: hmoe's kernels versus the reference backend.

The number users feel (DESIGN.md section 4): training samples per second of a whole model,
with every hmoe op (multi_embedding, mnse, tim_attention) running one backend, forced by
``with hmoe.ops.backend(name):``, against the same model, weights, batches and optimizer with
every op on the pure-PyTorch reference. Everything outside the ops (experts, gates, towers,
autograd, the optimizer) is the same code in both.

Models (``--models``): presets of hmoe.models at their default sizes,
    hmoe_me  one task; GwPFM, IPNN, DCN V2 and flat-DNN experts on 4 sets of dim 24
    stem     two tasks; a shared set and one per task (dim 16), one DNN expert each
Backends (``--backends``): any of hmoe.ops.BACKENDS but "auto"; default "cpu,reference" (on
--device cuda: "cuda,reference"). A backend that cannot run here is skipped with the reason.

A training step: zero_grad, forward, the sum over tasks of BCE with logits, backward, one
optimizer step (``--optimizer`` sgd (default) or adagrad, both torch's, dense gradients: the model
looks up the categorical ids and the behaviour sequences in one MultiEmbedding.forward_rows call,
so the fused table gets one dense gradient per step).
Batches are drawn once (hmoe.data.random.random_batch, 4 of them, cycled), never timed.

Timing. The (model, backend) pairs run in alternating rounds in one process: each round times
one step of every pair in turn, so drift of a shared machine hits all of them alike; after
``--warmup`` untimed steps per pair, ``--repeats`` rounds (fewer, at least 5, once
``--max-seconds`` have passed). Reported: median ms per step with p10-p90, samples/s = B / median,
and "x ref" = the reference's median / this median for the same model (> 1: faster). CPU runs
use ``--threads`` (default 2) torch threads; the copy roofline of benchmarks/_harness.py is
printed for context only (no byte model: a training step is not one memory-bound pass).

Before timing, every backend's forward logits on the first batch must match the reference's
(rtol 1e-4) on the same weights; a mismatch skips the pair with the reason.

Workloads (``--workload``):
    synthetic  B=1024; 20 categorical fields, vocabularies from 100k down to 2 (≈ 290k rows,
               field 0 "item"); 4 numeric fields (log1p quantizer, MNSE); one behaviour
               sequence of the item field, max_len 50; labels click and buy.
    tiny       B=32; 4 categorical fields (≤ 100 rows), 2 numeric, a sequence of max_len 8.

    python benchmarks/bench_train.py --workload synthetic --threads 2
    python benchmarks/bench_train.py --models stem --backends cpu,reference --optimizer adagrad
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import hmoe.ops
from hmoe.data.random import random_batch
from hmoe.data.schema import CategoricalFeature, Label, NumericFeature, Schema, SequenceFeature
from hmoe.models import HMoE, preset

from _harness import (
    Row, _summarise, add_common_args, copy_roofline, machine_info, print_aligned,
    print_machine_info,
    setup_device, write_results,
)

MODELS = ("hmoe_me", "stem")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}
NUM_BATCHES = 4
SYNTHETIC_VOCABS = (100_000, 100_000, 50_000, 20_000, 10_000, 5_000, 2_000, 1_000, 1_000, 500,
                    200, 100, 100, 50, 20, 10, 10, 5, 3, 2)


# --------------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int  # B
    vocab_sizes: tuple[int, ...]  # categorical fields; field 0 is the sequence's item field
    num_numeric: int
    max_len: int  # of the one behaviour sequence

    def schema(self) -> Schema:
        categorical = tuple(CategoricalFeature("item" if f == 0 else f"c{f}", vocab_size=v)
                            for f, v in enumerate(self.vocab_sizes))
        numeric = tuple(NumericFeature(f"n{f}", quantizer="log") for f in range(self.num_numeric))
        sequence = (SequenceFeature("history", item="item", max_len=self.max_len),)
        return Schema(name=f"bench_{self.name}", categorical=categorical, numeric=numeric,
                      sequence=sequence, labels=(Label("click"), Label("buy")))

    def describe(self) -> str:
        return (f"workload {self.name}: B={self.batch}, {len(self.vocab_sizes)} categorical "
                f"fields ({sum(self.vocab_sizes)} rows, largest {max(self.vocab_sizes)}), "
                f"{self.num_numeric} numeric, one sequence of max_len {self.max_len}")


WORKLOADS = {
    "synthetic": Workload("synthetic", 1024, SYNTHETIC_VOCABS, 4, 50),
    "tiny": Workload("tiny", 32, (100, 50, 10, 3), 2, 8),
}


# --------------------------------------------------------------------------------------------
# One (model, backend) pair


@dataclasses.dataclass
class Trainer:
    """A model, its optimizer and its batches; ``step()`` is one training step."""

    model: HMoE
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, torch.Tensor]]
    schema: Schema

    def __post_init__(self):
        self._next = itertools.cycle(self.batches)

    def loss(self, batch) -> torch.Tensor:
        logits = self.model(batch)["logits"]  # {task: (B,)}
        labels = batch["labels"]  # (B, T)
        return sum(F.binary_cross_entropy_with_logits(z, labels[:, self.schema.tasks.index(t)])
                   for t, z in logits.items())

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(next(self._next)).backward()
        self.optimizer.step()


def make_trainer(model_name: str, workload: Workload, device: torch.device,
                 args: argparse.Namespace) -> Trainer:
    schema = workload.schema()
    torch.manual_seed(0)
    model = preset(model_name, schema).to(device)
    generator = torch.Generator().manual_seed(1)
    batches = [{k: v.to(device) for k, v in random_batch(schema, workload.batch,
                                                         generator=generator).items()}
               for _ in range(NUM_BATCHES)]
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr)
    return Trainer(model, optimizer, batches, schema)


def check_backend(trainer: Trainer, backend: str) -> None:
    """The backend's logits on the first batch equal the reference's on the same weights."""
    batch = trainer.batches[0]
    with torch.no_grad():
        with hmoe.ops.backend("reference"):
            expected = trainer.model(batch)["logits"]
        with hmoe.ops.backend(backend):
            got = trainer.model(batch)["logits"]
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"logits of {task}: {m}")


def backend_step(trainer: Trainer, backend: str, device: torch.device) -> Callable[[], None]:
    def step():
        with hmoe.ops.backend(backend):
            trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


# --------------------------------------------------------------------------------------------
# Alternating timing


def time_alternating(steps: dict[str, Callable[[], None]], args: argparse.Namespace,
                     device: torch.device) -> dict[str, object]:
    """Per pair: the Timing of one step over alternating rounds (see the module docstring)."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_step_ms: dict[str, list[float]] = {key: [] for key in steps}
    deadline = time.perf_counter() + args.max_seconds
    for round_ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            per_step_ms[key].append((time.perf_counter() - start) * 1e3)
        if round_ + 1 >= 5 and time.perf_counter() > deadline:
            break
    return {key: _summarise(ms, 1) for key, ms in per_step_ms.items()}


# --------------------------------------------------------------------------------------------
# Command line and report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=tuple(WORKLOADS), default="synthetic")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--backends", default=None,
                        help="comma-separated hmoe backends (default: cpu,reference on CPU, "
                             "cuda,reference on CUDA)")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="sgd")
    parser.add_argument("--lr", type=float, default=0.01)
    add_common_args(parser)
    parser.set_defaults(repeats=20, warmup=2, copy_mib=256)
    args = parser.parse_args(argv)
    args.models = _choices(parser, "models", args.models, MODELS)
    default_backends = f"{args.device},reference"
    args.backends = _choices(parser, "backends", args.backends or default_backends,
                             hmoe.ops.BACKENDS[1:])
    if "reference" not in args.backends:
        args.backends.append("reference")  # the ratio's baseline
    return args


def _choices(parser, name: str, text: str, allowed: Sequence[str]) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        parser.error(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
    return list(dict.fromkeys(chosen))


@dataclasses.dataclass
class Report:
    rows: list[Row]
    skipped: dict[str, str]  # "model/backend" -> reason
    samples_per_s: dict[str, float]  # "model/backend" -> samples/s


def print_report(rows: Sequence[Row], batch: int) -> None:
    header = ["model", "backend", "ms/step", "p10-p90 ms", "samples/s", "x ref"]
    lines = [header]
    for r in rows:
        model, backend = r.provider.split("/")
        lines.append([model, backend, f"{r.ms:.2f}", f"{r.p10_ms:.2f}-{r.p90_ms:.2f}",
                      f"{batch / (r.ms * 1e-3):.0f}",
                      f"{r.speedup.get(f'{model}/reference', math.nan):.2f}"])
    print_aligned(lines)


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    device = setup_device(args)
    info = machine_info(device)
    info["hmoe_backends"] = {op: {b: reason or "available"
                                  for b, reason in hmoe.ops.reasons(op, device.type).items()}
                             for op in ("multi_embedding", "mnse", "tim_attention")}
    print_machine_info(info)
    workload = WORKLOADS[args.workload]
    print(workload.describe())
    roofline = copy_roofline(device, args.copy_mib)
    print(f"copy roofline: {args.copy_mib} MiB float32 copy_ = {roofline.gb_per_s:.1f} GB/s "
          f"(context only)", flush=True)

    steps, skipped = {}, {}
    for model_name in args.models:
        trainer = make_trainer(model_name, workload, device, args)
        params = sum(p.numel() for p in trainer.model.parameters())
        print(f"{model_name}: {params / 1e6:.2f} M parameters, optimizer {args.optimizer}")
        for backend in args.backends:
            key = f"{model_name}/{backend}"
            try:
                check_backend(trainer, backend)
            except Exception as error:  # a backend that cannot run or disagrees: skip it
                skipped[key] = f"{type(error).__name__}: {error}"
                print(f"skip {key}: {skipped[key]}", flush=True)
                continue
            steps[key] = backend_step(trainer, backend, device)

    timings = time_alternating(steps, args, device)
    rows = [Row(key, workload.name, "train", t.ms, t.p10_ms, t.p90_ms, math.nan, math.nan)
            for key, t in timings.items()]
    for row in rows:
        reference = timings.get(f"{row.provider.split('/')[0]}/reference")
        if reference is not None:
            row.speedup[f"{row.provider.split('/')[0]}/reference"] = reference.ms / row.ms
    print(f"\n{workload.name}, {args.device}, {args.threads} threads, B={workload.batch}, "
          f"{args.optimizer}; 'x ref' = reference median / this median (same model)")
    print_report(rows, workload.batch)
    samples = {row.provider: workload.batch / (row.ms * 1e-3) for row in rows}
    meta = {"args": vars(args), "workload": dataclasses.asdict(workload), "skipped": skipped,
            "samples_per_s": samples, "copy_roofline_gb_per_s": roofline.gb_per_s}
    paths = write_results(args.out, f"train_{workload.name}_{args.device}", info, meta, rows)
    print("wrote " + ", ".join(str(p) for p in paths))
    gc.collect()
    return Report(rows, skipped, samples)


if __name__ == "__main__":
    main(sys.argv[1:])
