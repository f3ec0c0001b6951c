r"""Microbenchmark of Multiple Numeral Systems Encoding (hmoe.nn.MNSE, hmoe.ops.mnse) against the
ways people write it in PyTorch.

Every provider computes the same thing from integer codes (B, F) and one float32 weight holding F
tables of R digit rows (the canonical layout (F, R, E), R = sum_b b·K_b, see hmoe/ops/mnse.py):
digit k of code v in base b selects row start_b + k·b + (v // b^k) mod b of its field's table;
the rows selected in one base are summed, and the bases' sums are concatenated (mode "concat",
output (B, F, len(bases)·E)) or summed (mode "sum", output (B, F, E)). A training step applies
plain SGD (lr) to the weight with a dense gradient (the tables are tiny). Codes are never missing
here (hmoe's missing vector is a ``where`` over the output, taken only for float codes).

Providers (``--providers``):
    eager_torch      what a competent PyTorch user writes: one nn.Embedding over every field's
                     digit rows; per base, digits by // and %, a lookup, a sum over the digits;
                     then cat (or sum) over the bases.
    compiled_torch   torch.compile(eager_torch, dynamic=False). Its compile time (the first
                     forward + backward call) is printed and saved separately and never timed.
                     On a busy machine its 2-thread timings suffer most: every OpenMP region of
                     inductor's kernels waits for both threads to be scheduled.
    one_hot_matmul   one_hot(digits) flattened per base is the indicator of the base's selected
                     rows (row k·b + d), multiplied by the field's table: a batched matmul per
                     base (concat) or one over all R rows (sum).
    embedding_bag    nn.EmbeddingBag(mode="sum"), a bag of the code's digit rows per (sample,
                     field, base) (concat) or per (sample, field) (sum).
    hmoe_cpu, hmoe_triton, hmoe_cuda, hmoe_reference
                     hmoe.nn.MNSE with the backend forced by ``with hmoe.ops.backend(name):``.
                     A backend that cannot run here is skipped with hmoe.ops.reasons' words.

Phases (``--phase``):
    forward   the lookup with autograd recording, as in training.
    backward  ``out.backward(G)`` with a fixed random G (B, F, dim) cannot run without its forward,
              so the timed call is forward + backward ("fwd+bwd"), and the "backward" row is the
              difference of the fwd+bwd and forward medians from the same run (no p10/p90).
              ``.grad`` is reset to None first, as ``zero_grad`` does in a training loop.
    train     one full step: zero_grad, forward, ``out.backward(G)``, SGD step on the weight.
    all       all three (forward is always measured when backward is asked for).

Byte model (useful DRAM bytes; e = 4 bytes per float32 value, codes int64). The tables are tiny
(numeric: F·R·E·e = 121 KiB) and stay in cache, so the rows each lookup reads are not counted:
per DESIGN.md 3.2 the forward is bound by its output write, the backward by its gradient read.
With O = B·F·dim output values, C = B·F codes and W = F·R·E weight values:

    forward   bytes = O·e (output written) + C·8 (codes read)
    backward  bytes = O·e (output gradient read) + W·e (weight gradient written)
              (the codes read again by the backward are counted once per step, in forward)
    fwd+bwd   bytes = forward + backward
    train     bytes = fwd+bwd + 3·W·e (SGD reads weight and gradient, writes weight)

Every row also reports its GB/s as a fraction of a large copy measured in the same run
(benchmarks/_harness.py) and its speedup over eager_torch and compiled_torch (ratios of medians
from the same run).

Workloads (``--workload``):
    numeric      B=4096, F=13 numeric fields (Criteo's count), codes uniform in [0, 10^6]
                 (fixed seed), bases (2, 3, 10) with (20, 13, 7) digits (R = 149), mode "concat",
                 E = 16 per base: dim 48.
    numeric_sum  the same in mode "sum", dim 16.
    tiny         B=37, F=5, codes in [0, 999], E=4, concat: for smoke tests.

Before timing, each provider is checked once on the tiny workload in the timed workload's mode:
its forward must equal hmoe.ops.mnse_ref on the same weights, and one train step must equal plain
SGD on hmoe.ops.mnse.mnse_backward_ref's gradient; a provider that fails is skipped with the
reason.

    python benchmarks/bench_mnse.py --workload numeric --phase all --threads 2
    python benchmarks/bench_mnse.py --workload numeric_sum --providers eager_torch,hmoe_cpu
    python benchmarks/bench_mnse.py --device cuda --workload numeric \
        --providers eager_torch,compiled_torch,one_hot_matmul,hmoe_cuda,hmoe_triton
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

import hmoe.ops
from hmoe.nn import MNSE
from hmoe.ops.mnse import MODES, block_starts, digits_needed, mnse_backward_ref, mnse_ref

from _harness import (
    CopyRoofline, Row, add_speedups, copy_roofline, machine_info,
    parse_bench_args, print_machine_info, print_table, setup_device, time_phases, write_results,
)

BASELINES = ("eager_torch", "compiled_torch")


# --------------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int  # B
    num_fields: int  # F
    max_code: int  # codes are uniform in [0, max_code]
    bases: tuple[int, ...]
    embedding_dim: int  # E: per base in mode "concat", the whole output in mode "sum"
    mode: str  # "concat" or "sum"
    seed: int = 0

    @property
    def num_digits(self) -> tuple[int, ...]:  # K_b
        return tuple(digits_needed(self.max_code, b) for b in self.bases)

    @property
    def starts(self) -> list[int]:  # first row of each base's block, then R
        return block_starts(self.bases, self.num_digits)

    @property
    def num_rows(self) -> int:  # R
        return self.starts[-1]

    @property
    def dim(self) -> int:  # output width per field
        return len(self.bases) * self.embedding_dim if self.mode == "concat" else self.embedding_dim

    @property
    def weight_shape(self) -> tuple[int, int, int]:  # canonical (F, R, E)
        return (self.num_fields, self.num_rows, self.embedding_dim)

    def codes(self, device: torch.device) -> torch.Tensor:
        """(B, F) int64 codes, the same for every run with this seed; both ends always occur."""
        generator = torch.Generator().manual_seed(self.seed)
        codes = torch.randint(0, self.max_code + 1, (self.batch, self.num_fields),
                              generator=generator)
        codes[0, 0], codes[-1, -1] = 0, self.max_code
        return codes.to(device)  # (B, F)

    def describe(self) -> str:
        table_kib = self.num_fields * self.num_rows * self.embedding_dim * 4 / 2**10
        output_mb = self.batch * self.num_fields * self.dim * 4 / 1e6
        return (f"workload {self.name}: B={self.batch} F={self.num_fields} codes uniform in "
                f"[0, {self.max_code}], bases {self.bases} with {self.num_digits} digits, "
                f"R={self.num_rows} rows per field ({table_kib:.0f} KiB fp32 in all), "
                f"mode {self.mode}, E={self.embedding_dim}, dim {self.dim}; "
                f"output {output_mb:.1f} MB per step")


WORKLOADS = {
    "numeric": Workload("numeric", batch=4096, num_fields=13, max_code=10**6, bases=(2, 3, 10),
                        embedding_dim=16, mode="concat"),
    "numeric_sum": Workload("numeric_sum", batch=4096, num_fields=13, max_code=10**6,
                            bases=(2, 3, 10), embedding_dim=16, mode="sum"),
    "tiny": Workload("tiny", batch=37, num_fields=5, max_code=999, bases=(2, 3, 10),
                     embedding_dim=4, mode="concat"),
}


def check_workload(mode: str) -> Workload:
    """The correctness-check workload: tiny, in the given mode."""
    return dataclasses.replace(WORKLOADS["tiny"], name=f"tiny_{mode}", mode=mode)


# --------------------------------------------------------------------------------------------
# The PyTorch ways to write MNSE


class _Digits(nn.Module):
    """Per base j: ``powers_j`` (K_b,) = b^k and ``first_rows_j`` (F, K_b), the flat row of
    digit 0 in digit k's slot of field f's block (f·R + start_j + k·b), as buffers."""

    def __init__(self, workload: Workload):
        super().__init__()
        self.bases, self.mode = workload.bases, workload.mode
        R, starts = workload.num_rows, workload.starts
        field_rows = torch.arange(workload.num_fields)[:, None] * R  # (F, 1)
        for j, (b, kb) in enumerate(zip(workload.bases, workload.num_digits)):
            slots = torch.arange(kb)
            self.register_buffer(f"powers_{j}", b ** slots)  # (K_b,)
            self.register_buffer(f"first_rows_{j}", field_rows + starts[j] + slots * b)  # (F, K_b)

    def digits(self, codes: torch.Tensor, j: int) -> torch.Tensor:
        """(B, F, K_b) base-b digits of codes (B, F), least significant first."""
        return codes.unsqueeze(-1) // getattr(self, f"powers_{j}") % self.bases[j]

    def rows(self, codes: torch.Tensor, j: int) -> torch.Tensor:
        """(B, F, K_b) flat rows (into the F·R stacked tables) selected by base j's digits."""
        return getattr(self, f"first_rows_{j}") + self.digits(codes, j)


class TorchMNSE(_Digits):
    """MNSE as a PyTorch user writes it: one nn.Embedding (F·R, E) over every field's digit
    rows; per base, digits by // and %, one lookup, a sum over the digits; cat or sum."""

    def __init__(self, workload: Workload):
        super().__init__(workload)
        self.embedding = nn.Embedding(workload.num_fields * workload.num_rows,
                                      workload.embedding_dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        parts = [self.embedding(self.rows(codes, j)).sum(dim=2)  # (B, F, E)
                 for j in range(len(self.bases))]
        return torch.cat(parts, dim=-1) if self.mode == "concat" else sum(parts)  # (B, F, dim)


# --------------------------------------------------------------------------------------------
# Providers: one small class each; the phases below are shared.


class Provider:
    """Builds the weight of a workload and runs the encoding; subclasses set ``name``."""

    name: ClassVar[str]

    def __init__(self, workload: Workload, device: torch.device, lr: float):
        self.workload, self.device, self.lr = workload, device, lr

    def _sgd(self) -> None:
        self.optimizer = torch.optim.SGD([self.parameter()], lr=self.lr)

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this provider cannot run on device, or None."""
        return None

    def prepare(self, codes: torch.Tensor) -> object:
        """The provider's native input, built outside the timer (codes (B, F) by default)."""
        return codes

    def forward(self, inputs: object) -> torch.Tensor:  # (B, F, dim)
        raise NotImplementedError

    def parameter(self) -> nn.Parameter:
        """The one parameter, holding the canonical (F, R, E) weight in row-major order."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()


class EagerTorch(Provider):
    """TorchMNSE (above) in eager mode."""

    name = "eager_torch"

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        self.module = TorchMNSE(workload).to(device)
        self._sgd()

    def forward(self, codes):
        return self.module(codes)

    def parameter(self):
        return self.module.embedding.weight


class CompiledTorch(EagerTorch):
    """torch.compile(TorchMNSE, dynamic=False). Dynamo's caches are reset first, so the first
    call traces and compiles (the correctness check's graph of the same shapes is not reused);
    inductor's on-disk caches stay as they are, so a cold first run compiles slower."""

    name = "compiled_torch"

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        torch._dynamo.reset()
        self.compiled = torch.compile(self.module, dynamic=False)

    def forward(self, codes):
        return self.compiled(codes)


class OneHotMatmul(Provider):
    """Per base, one_hot(digits (B, F, K_b), b) flattened to (B, F, b·K_b) is the indicator of
    the base's selected rows; a batched matmul per field with the base's block of the table."""

    name = "one_hot_matmul"

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        self.digits = _Digits(workload).to(device)
        self.weight = nn.Parameter(torch.empty(workload.weight_shape, device=device).normal_(
            std=0.01))  # (F, R, E)
        self._sgd()

    def _indicator(self, codes, j):
        hot = nn.functional.one_hot(self.digits.digits(codes, j), self.workload.bases[j])
        return hot.flatten(2).transpose(0, 1).to(self.weight.dtype)  # (F, B, b·K_b)

    def forward(self, codes):
        starts = self.workload.starts
        bases = range(len(self.workload.bases))
        if self.workload.mode == "sum":  # one indicator over all R rows, one matmul
            hot = torch.cat([self._indicator(codes, j) for j in bases], dim=-1)  # (F, B, R)
            return torch.bmm(hot, self.weight).transpose(0, 1).contiguous()  # (B, F, E)
        parts = [torch.bmm(self._indicator(codes, j), self.weight[:, starts[j]:starts[j + 1]])
                 for j in bases]  # each (F, B, E)
        return torch.cat(parts, dim=-1).transpose(0, 1).contiguous()  # (B, F, dim)

    def parameter(self):
        return self.weight


class EmbeddingBagSum(Provider):
    """nn.EmbeddingBag(F·R, E, mode="sum") over the code's digit rows: one bag per (sample,
    field, base) in mode "concat", so the pooled rows are already the concatenation, one bag per
    (sample, field) in mode "sum". The bag offsets depend only on B, F and K_b: built outside
    the timer; the rows (the digits) are computed inside."""

    name = "embedding_bag"

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        self.digits = _Digits(workload).to(device)
        self.bag = nn.EmbeddingBag(workload.num_fields * workload.num_rows,
                                   workload.embedding_dim, mode="sum").to(device)
        self._sgd()

    def prepare(self, codes):
        B, F = codes.shape
        digits_per_code = sum(self.workload.num_digits)  # S
        if self.workload.mode == "sum":
            starts = torch.zeros(1, dtype=torch.int64)
        else:  # the bags of base j start K_0 + ... + K_{j-1} digits into each code's S digits
            starts = torch.tensor((0,) + self.workload.num_digits[:-1]).cumsum(0)
        offsets = (torch.arange(B * F)[:, None] * digits_per_code + starts).reshape(-1)
        return codes, offsets.to(codes.device)

    def forward(self, inputs):
        codes, offsets = inputs
        B, F = codes.shape
        rows = torch.cat([self.digits.rows(codes, j) for j in range(len(self.workload.bases))],
                         dim=-1)  # (B, F, S)
        return self.bag(rows.reshape(-1), offsets).view(B, F, self.workload.dim)

    def parameter(self):
        return self.bag.weight


class Hmoe(Provider):
    """hmoe.nn.MNSE on one backend, dense gradient, torch SGD on its weight."""

    backend: ClassVar[str]

    @classmethod
    def unavailable(cls, device):
        if cls.backend == "triton" and device.type == "cpu":
            return "Triton on CPU tensors runs only in the TRITON_INTERPRET simulator: not a timing"
        reason = hmoe.ops.reasons("mnse", device.type)[cls.backend]
        if reason is None and cls.backend == "triton" and \
                importlib.util.find_spec("hmoe.kernels.mnse_triton") is None:
            reason = "hmoe.kernels.mnse_triton does not exist (the Triton kernel is not written)"
        return reason

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        self.module = MNSE(workload.num_fields, workload.dim, workload.max_code,
                           bases=workload.bases, mode=workload.mode, device=device)
        if self.module.num_digits != workload.num_digits:  # both follow digits_needed(max_code)
            raise AssertionError(f"MNSE chose {self.module.num_digits} digits, the workload "
                                 f"{workload.num_digits}")
        self._sgd()

    def forward(self, codes):
        with hmoe.ops.backend(self.backend):
            return self.module(codes)

    def parameter(self):
        return self.module.weight


def _hmoe_providers() -> list[type[Provider]]:
    return [type(f"hmoe_{b}", (Hmoe,), {"name": f"hmoe_{b}", "backend": b,
                                        "__doc__": f"hmoe.nn.MNSE, backend {b}."})
            for b in ("cpu", "triton", "cuda", "reference")]


PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls
    for cls in (EagerTorch, CompiledTorch, OneHotMatmul, EmbeddingBagSum, *_hmoe_providers())
}


# --------------------------------------------------------------------------------------------
# Phases, shared by every provider


def fwd_bwd_step(provider: Provider, inputs: object, grad_out: torch.Tensor) -> None:
    provider.zero_grad()
    provider.forward(inputs).backward(grad_out)


def train_step(provider: Provider, inputs: object, grad_out: torch.Tensor) -> None:
    provider.zero_grad()
    provider.forward(inputs).backward(grad_out)
    provider.step()


def load_weight(provider: Provider, weight: torch.Tensor) -> None:
    parameter = provider.parameter()
    with torch.no_grad():
        parameter.copy_(weight.reshape(parameter.shape))


def export_weight(provider: Provider) -> torch.Tensor:
    return provider.parameter().detach().reshape(provider.workload.weight_shape)  # (F, R, E)


def check_provider(cls: type[Provider], device: torch.device, lr: float, mode: str) -> None:
    """Raises AssertionError unless forward and one SGD train step match the reference."""
    workload = check_workload(mode)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(workload.weight_shape, generator=generator).to(device)  # (F, R, E)
    provider = cls(workload, device, lr)
    load_weight(provider, weight)
    codes = workload.codes(device)
    inputs = provider.prepare(codes)
    args = (codes, workload.bases, workload.num_digits, MODES[mode])
    expected = mnse_ref(weight.unsqueeze(2), *args)[0]  # (B, F, dim)
    torch.testing.assert_close(provider.forward(inputs).detach(), expected,
                               msg=lambda m: f"forward: {m}")
    grad_out = torch.randn(expected.shape, generator=generator).to(device)
    train_step(provider, inputs, grad_out)
    grad_weight = mnse_backward_ref(grad_out.unsqueeze(0), *args)[:, :, 0]  # (F, R, E)
    torch.testing.assert_close(export_weight(provider), weight - lr * grad_weight, rtol=1e-5,
                               atol=1e-5, msg=lambda m: f"SGD step: {m}")


def bytes_moved(workload: Workload) -> dict[str, float]:
    """The byte model of the module docstring, per phase."""
    B, F = workload.batch, workload.num_fields
    output = B * F * workload.dim * 4
    weight = F * workload.num_rows * workload.embedding_dim * 4
    forward = output + B * F * 8
    backward = output + weight
    return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward,
            "train": forward + backward + 3 * weight}


def run_provider(cls: type[Provider], workload: Workload, device: torch.device,
                 args: argparse.Namespace, roofline: CopyRoofline) -> tuple[list[Row], float] | str:
    """Checks, builds and times one provider; returns its rows and the seconds of its first
    forward + backward call (compilation, for compiled_torch), or why it was skipped."""
    reason = cls.unavailable(device)
    if reason is not None:
        return reason
    try:
        check_provider(cls, device, args.lr, workload.mode)
    except Exception as error:  # a failed check or a provider that cannot run: skip it, say why
        return f"correctness check failed: {type(error).__name__}: {error}"
    torch.manual_seed(0)
    provider = cls(workload, device, args.lr)
    codes = workload.codes(device)
    inputs = provider.prepare(codes)
    grad_out = torch.randn(*codes.shape, workload.dim,
                           generator=torch.Generator().manual_seed(2)).to(device)  # (B, F, dim)
    first_call_s = _first_call_seconds(provider, inputs, grad_out, device)
    steps: dict[str, Callable[[], object]] = {
        "forward": lambda: provider.forward(inputs),
        "fwd+bwd": lambda: fwd_bwd_step(provider, inputs, grad_out),
        "train": lambda: train_step(provider, inputs, grad_out),
    }
    rows = time_phases(cls.name, workload.name, steps, bytes_moved(workload), device, args,
                       roofline)
    return rows if isinstance(rows, str) else (rows, first_call_s)


def _first_call_seconds(provider: Provider, inputs: object, grad_out: torch.Tensor,
                        device: torch.device) -> float:
    """One untimed forward + backward (torch.compile compiles both graphs here)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fwd_bwd_step(provider, inputs, grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_bench_args(__doc__, WORKLOADS, "numeric", list(PROVIDERS), argv)


@dataclasses.dataclass
class Report:
    rows: list[Row]
    skipped: dict[str, str]  # provider -> reason
    first_call_s: dict[str, float]  # provider -> seconds of its first forward + backward


PHASE_ORDER = ("forward", "fwd+bwd", "backward", "train")


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    device = setup_device(args)
    info = machine_info(device, packages=("numpy",))
    reasons = hmoe.ops.reasons("mnse", device.type)
    info["hmoe_backends"] = {b: reason or "available" for b, reason in reasons.items()}
    print_machine_info(info)
    workload = WORKLOADS[args.workload]
    print(workload.describe())
    roofline = copy_roofline(device, args.copy_mib)
    print(f"copy roofline: {args.copy_mib} MiB float32 copy_ in {roofline.timing.ms:.3f} ms "
          f"= {roofline.gb_per_s:.1f} GB/s (read + write)", flush=True)

    rows, skipped, first_call_s = [], {}, {}
    for name in args.providers:
        result = run_provider(PROVIDERS[name], workload, device, args, roofline)
        if isinstance(result, str):
            skipped[name] = result
            print(f"skip {name}: {result}", flush=True)
        else:
            rows += result[0]
            first_call_s[name] = result[1]
            times = ", ".join(f"{r.phase} {r.ms:.3f} ms" for r in result[0])
            print(f"done {name}: {times}; first forward + backward {result[1]:.2f} s", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows.sort(key=lambda r: (PHASE_ORDER.index(r.phase), args.providers.index(r.provider)))
    add_speedups(rows, BASELINES)
    print(f"\n{workload.name}, {args.device}, {args.threads} threads; copy roofline "
          f"{roofline.gb_per_s:.1f} GB/s; 'x P' = speedup over provider P "
          "(its median / this median)")
    print_table(rows, BASELINES)
    if "compiled_torch" in first_call_s:
        print(f"compiled_torch: compile (first forward + backward call) took "
              f"{first_call_s['compiled_torch']:.1f} s, not in the timings")
    meta = {"args": vars(args), "workload": {**dataclasses.asdict(workload),
                                             "num_digits": workload.num_digits,
                                             "num_rows": workload.num_rows, "dim": workload.dim},
            "copy_roofline_gb_per_s": roofline.gb_per_s, "skipped": skipped,
            "first_call_seconds": first_call_s, "bytes_per_phase": bytes_moved(workload)}
    stem = f"mnse_{workload.name}_{args.device}"
    paths = write_results(args.out, stem, info, meta, rows)
    print("wrote " + ", ".join(str(p) for p in paths))
    return Report(rows, skipped, first_call_s)


if __name__ == "__main__":
    main(sys.argv[1:])
