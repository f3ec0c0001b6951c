r"""Microbenchmark of TIM target attention (hmoe.nn.TemporalInterest, hmoe.ops.tim_attention)
against the ways people write it in PyTorch.

Every provider computes, for B samples with L behaviour ids (lengths[b] of them valid) gathered
from one item table (N, D) and a target id per sample gathered from the same table, with a
position table P (L + 1, D) and rank positions p_i = i + 1 (1 = most recent):

    ẽ_i = e_i + P[p_i],  ṽ = v + P[0],  α = softmax_{i < length}(⟨ẽ_i, ṽ⟩ / sqrt(D)),
    u = Σ_i α_i (ẽ_i ⊙ ṽ)                                                         (B, D)

(one head). A training step applies torch SGD (lr) to the item table, through a sparse
gradient of the rows read (nn.Embedding(sparse=True), as production embedding tables are
trained; a dense (N, D) gradient would cost every provider the same 256 MB pass), and to the
position table (dense).

Providers (``--providers``):
    eager_torch      the formula as written, in eager PyTorch: nn.Embedding gathers, masked
                     softmax, then Σ α (ẽ ⊙ ṽ) by einsum. It materialises (B, L, D) tensors.
    compiled_torch   eager_torch with its formula (everything after the two gathers) under
                     torch.compile(dynamic=False); the gathers stay eager, as inductor does
                     not produce sparse gradients. Compile time (the first forward + backward)
                     is printed separately, never timed.
    din_eager        hmoe.nn.DINAttention (Dice MLP on [e, v, e−v, e⊙v], hidden 80-40), eager:
                     what the usual alternative to TIM costs.
    hmoe_cpu, hmoe_triton, hmoe_cuda, hmoe_reference
                     hmoe.nn.TemporalInterest.forward_ids with the backend forced by
                     ``with hmoe.ops.backend(name):``; behaviour rows are read straight from the
                     table by id, padded steps are never read.
    hmoe_cpu_fused   hmoe_cpu with the item table's SGD step fused into backward
                     (``forward_ids(..., fused_optimizer=hmoe.optim.FusedSGD(lr))``): no row
                     gradient is formed; the target's row still goes through torch SGD. Its
                     backward phase therefore includes the table update that the other providers
                     do in their optimizer step; compare train steps.

Phases (``--phase``): forward (with autograd recording), backward (the fwd+bwd median minus
the forward median), train (zero_grad, forward, ``u.backward(G)``, SGD step), all. The peak MiB
column is the growth of the process's memory during the measurement (CPU: peak RSS; CUDA:
max_memory_allocated). On CPU it is only indicative: providers run one after another in one
process, and memory an earlier one freed may stay mapped and be reused without growth. The
activation memory is therefore also measured exactly: the bytes of the tensors one forward saves
for backward (saved_tensors_hooks; parameters and the batch's tensors left out), printed after
the table.

Byte model (useful bytes; e = 4 bytes per float32 value; S = Σ lengths valid steps):

    forward   S·(D·e + 16)   rows, ids and positions of the valid steps read
              + B·D·e·3      target read, out and pooled written  + B·L·e  (α written)
    backward  S·(2·D·e + 16) rows re-read, row gradients written, ids and positions
              + B·L·e + B·D·e·4
    train     fwd+bwd + 2·S·D·e  (SGD reads and writes the rows read)

Each row also reports its GB/s as a fraction of a large copy measured in the same run.

Workloads (``--workload``):
    l200   B=1024, L=200, lengths uniform in [1, 200], D=64, a 1,000,000 x 64 table (256 MB)
    l1000  B=1024, L=1000, lengths uniform in [1, 1000], the same table
    tiny   B=13, L=9, D=8, a 100-row table: for smoke tests

Before timing, each provider is checked on the tiny workload: its forward must equal
hmoe.ops.tim_attention_ref, and one train step must equal plain SGD on the reference's
gradients; a provider that fails is skipped with the reason.

    python benchmarks/bench_tim.py --workload l200 --phase all --threads 2
    python benchmarks/bench_tim.py --device cuda --workload l1000 \
        --providers eager_torch,compiled_torch,hmoe_cuda,hmoe_triton
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

import hmoe.ops
from hmoe.nn import DINAttention, TemporalInterest
from hmoe.ops.tim_attention import tim_attention_ref
from hmoe.optim import FusedSGD

from _harness import (
    Row, add_speedups, copy_roofline, machine_info,
    parse_bench_args, print_machine_info, print_table, setup_device, time_phases, write_results,
)

BASELINES = ("eager_torch", "compiled_torch")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int  # B
    length: int  # L
    dim: int  # D
    num_items: int  # N
    seed: int = 0

    def inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """ids (B, L), target_ids (B,), positions (B, L) = i + 1, lengths (B,) in [1, L]."""
        g = torch.Generator().manual_seed(self.seed)
        B, L = self.batch, self.length
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        lengths[0] = L
        ids = torch.randint(0, self.num_items, (B, L), generator=g)
        positions = torch.arange(1, L + 1).expand(B, L).contiguous()
        target_ids = torch.randint(0, self.num_items, (B,), generator=g)
        return {name: t.to(device) for name, t in (("ids", ids), ("target_ids", target_ids),
                                                  ("positions", positions), ("lengths", lengths))}

    def describe(self) -> str:
        return (f"workload {self.name}: B={self.batch} L={self.length} (lengths uniform in "
                f"[1, {self.length}]) D={self.dim}, item table {self.num_items} x {self.dim} "
                f"({self.num_items * self.dim * 4 / 1e6:.0f} MB fp32), positions 1..L")


WORKLOADS = {
    "l200": Workload("l200", batch=1024, length=200, dim=64, num_items=1_000_000),
    "l1000": Workload("l1000", batch=1024, length=1000, dim=64, num_items=1_000_000),
    "tiny": Workload("tiny", batch=13, length=9, dim=8, num_items=100),
}


# --------------------------------------------------------------------------------------------
# The PyTorch ways to write it


def tim_formula(e, v, position_weight, positions, lengths):
    """The TIM formula as written, in plain PyTorch, on gathered rows e (B, L, D), v (B, D)."""
    B, L, D = e.shape
    valid = torch.arange(L, device=e.device) < lengths[:, None]  # (B, L)
    e = e + nn.functional.embedding(positions, position_weight)  # (B, L, D)
    v = v + position_weight[0]  # (B, D)
    scores = torch.einsum("bld,bd->bl", e, v) / math.sqrt(D)  # (B, L)
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    alpha = torch.softmax(scores, dim=-1) * valid  # (B, L)
    return torch.einsum("bl,bld->bd", alpha, e * v[:, None])  # (B, D)


def tim_eager(items: nn.Embedding, positions_table: nn.Embedding, ids, target_ids, positions,
              lengths, formula=tim_formula):
    """Gathers from the sparse item table (eager: inductor does not take sparse gradients),
    then the formula."""
    return formula(items(ids), items(target_ids), positions_table.weight, positions, lengths)


class Provider:
    name: ClassVar[str]

    def __init__(self, workload: Workload, device: torch.device, lr: float):
        self.workload, self.device = workload, device
        self.items = nn.Embedding(workload.num_items, workload.dim, sparse=True).to(device)
        self.positions_table = nn.Embedding(workload.length + 1, workload.dim).to(device)
        self.extra: list[nn.Parameter] = []
        self.optimizer_lr = lr
        self.build()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=lr)

    def build(self) -> None:
        pass

    def parameters(self) -> list[nn.Parameter]:
        return [self.items.weight, self.positions_table.weight, *self.extra]

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        return None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # (B, D)
        raise NotImplementedError


class EagerTorch(Provider):
    name = "eager_torch"

    def forward(self, batch):
        return tim_eager(self.items, self.positions_table, batch["ids"], batch["target_ids"],
                         batch["positions"], batch["lengths"])


class CompiledTorch(EagerTorch):
    name = "compiled_torch"

    def build(self):
        torch._dynamo.reset()
        self.compiled = torch.compile(tim_formula, dynamic=False)

    def forward(self, batch):
        return tim_eager(self.items, self.positions_table, batch["ids"], batch["target_ids"],
                         batch["positions"], batch["lengths"], formula=self.compiled)


class DinEager(Provider):
    """DIN attention on the gathered rows (no position table in its formula: the position
    table still gets its SGD step, with no gradient, like every provider)."""

    name = "din_eager"

    def build(self):
        self.din = DINAttention(self.workload.dim).to(self.device)
        self.extra = list(self.din.parameters())

    def forward(self, batch):
        e = self.items(batch["ids"])  # (B, L, D)
        v = self.items(batch["target_ids"])  # (B, D)
        return self.din(e, v, batch["positions"], batch["lengths"])


class Hmoe(Provider):
    backend: ClassVar[str]

    @classmethod
    def unavailable(cls, device):
        if cls.backend == "triton" and device.type == "cpu":
            return "Triton on CPU tensors runs only in the TRITON_INTERPRET simulator: not a timing"
        reason = hmoe.ops.reasons("tim_attention", device.type)[cls.backend]
        if reason is None and cls.backend == "triton" and \
                importlib.util.find_spec("hmoe.kernels.tim_attention_triton") is None:
            reason = "hmoe.kernels.tim_attention_triton does not exist"
        return reason

    def build(self):
        self.tim = TemporalInterest(self.workload.dim, self.workload.length).to(self.device)
        self.tim.position_embedding = self.positions_table.weight  # one table for every provider

    def forward(self, batch):
        with hmoe.ops.backend(self.backend):
            return self.tim.forward_ids(batch["ids"], self.items, self.items(batch["target_ids"]),
                                        batch["positions"], batch["lengths"])


class HmoeCpuFused(Hmoe):
    name, backend = "hmoe_cpu_fused", "cpu"

    def build(self):
        super().build()
        self.fused = FusedSGD(lr=self.optimizer_lr)

    def forward(self, batch):
        with hmoe.ops.backend(self.backend):
            return self.tim.forward_ids(batch["ids"], self.items, self.items(batch["target_ids"]),
                                        batch["positions"], batch["lengths"],
                                        fused_optimizer=self.fused)


def _hmoe_providers() -> list[type[Provider]]:
    return [type(f"hmoe_{b}", (Hmoe,), {"name": f"hmoe_{b}", "backend": b,
                                        "__doc__": f"TemporalInterest, backend {b}."})
            for b in ("cpu", "triton", "cuda", "reference")]


PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls for cls in (EagerTorch, CompiledTorch, DinEager, *_hmoe_providers(),
                              HmoeCpuFused)
}


# --------------------------------------------------------------------------------------------
# Phases and checks


def fwd_bwd_step(provider: Provider, batch, grad_out) -> None:
    provider.optimizer.zero_grad(set_to_none=True)
    provider.forward(batch).backward(grad_out)


def train_step(provider: Provider, batch, grad_out) -> None:
    fwd_bwd_step(provider, batch, grad_out)
    provider.optimizer.step()


def reference_step(items, table, batch, grad_out, lr):
    """Forward and the weights after one SGD step, by hmoe.ops.tim_attention_ref (dense)."""
    items = items.detach().clone().requires_grad_(True)
    table = table.detach().clone().requires_grad_(True)
    B, L = batch["ids"].shape
    out = tim_attention_ref(items, batch["ids"], items[batch["target_ids"]], table,
                            batch["positions"], batch["lengths"], 1)[0]
    out.backward(grad_out)
    with torch.no_grad():
        return out.detach(), items - lr * items.grad, table - lr * table.grad


def check_provider(cls: type[Provider], device: torch.device, lr: float) -> None:
    """Raises AssertionError unless forward and one train step match the reference (DIN is a
    different model: only its step must run and keep the weights finite)."""
    workload = WORKLOADS["tiny"]
    torch.manual_seed(1)
    provider = cls(workload, device, lr)
    batch = workload.inputs(device)
    grad_out = torch.randn(workload.batch, workload.dim,
                           generator=torch.Generator().manual_seed(2)).to(device)
    items, table = provider.items.weight, provider.positions_table.weight
    expected = reference_step(items, table, batch, grad_out, lr)
    out = provider.forward(batch)
    if cls is not DinEager:
        torch.testing.assert_close(out.detach(), expected[0], msg=lambda m: f"forward: {m}")
    train_step(provider, batch, grad_out)
    if cls is DinEager:
        assert all(torch.isfinite(p).all() for p in provider.parameters())
        return
    torch.testing.assert_close(items.detach(), expected[1], atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"SGD step, item table: {m}")
    torch.testing.assert_close(table.detach(), expected[2], atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"SGD step, position table: {m}")


def bytes_moved(workload: Workload, lengths: torch.Tensor) -> dict[str, float]:
    """The byte model of the module docstring, per phase."""
    B, L, D, e = workload.batch, workload.length, workload.dim, 4
    S = int(lengths.sum())
    forward = S * (D * e + 16) + B * D * e * 3 + B * L * e
    backward = S * (2 * D * e + 16) + B * L * e + B * D * e * 4
    return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward,
            "train": forward + backward + 2 * S * D * e}


def saved_activation_mib(provider: Provider, batch: dict[str, torch.Tensor]) -> float:
    """MiB of the tensors one forward saves for backward, parameters and the batch's own
    tensors left out: the activation memory a training step holds (each storage counted once)."""
    excluded = {t.untyped_storage().data_ptr() for t in (*provider.parameters(), *batch.values())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided:
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = provider.forward(batch)
    del out
    return sum(saved.values()) / 2**20


def run_provider(cls, workload, device, args, roofline):
    reason = cls.unavailable(device)
    if reason is not None:
        return reason
    try:
        check_provider(cls, device, args.lr)
    except Exception as error:
        return f"correctness check failed: {type(error).__name__}: {error}"
    torch.manual_seed(0)
    provider = cls(workload, device, args.lr)
    batch = workload.inputs(device)
    grad_out = torch.randn(workload.batch, workload.dim,
                           generator=torch.Generator().manual_seed(2)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fwd_bwd_step(provider, batch, grad_out)  # compiles compiled_torch's graphs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_call_s = time.perf_counter() - start
    saved_mib = saved_activation_mib(provider, batch)
    steps: dict[str, Callable[[], object]] = {
        "forward": lambda: provider.forward(batch),
        "fwd+bwd": lambda: fwd_bwd_step(provider, batch, grad_out),
        "train": lambda: train_step(provider, batch, grad_out),
    }
    rows = time_phases(cls.name, workload.name, steps, bytes_moved(workload, batch["lengths"]), device, args,
                       roofline)
    return rows if isinstance(rows, str) else (rows, first_call_s, saved_mib)


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_bench_args(__doc__, WORKLOADS, "l200", list(PROVIDERS), argv)


@dataclasses.dataclass
class Report:
    rows: list[Row]
    skipped: dict[str, str]
    first_call_s: dict[str, float]
    saved_mib: dict[str, float]  # provider -> activations saved for backward by one forward


PHASE_ORDER = ("forward", "fwd+bwd", "backward", "train")


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    device = setup_device(args)
    info = machine_info(device)
    info["hmoe_backends"] = {b: reason or "available"
                             for b, reason in hmoe.ops.reasons("tim_attention", device.type).items()}
    print_machine_info(info)
    workload = WORKLOADS[args.workload]
    print(workload.describe())
    roofline = copy_roofline(device, args.copy_mib)
    print(f"copy roofline: {args.copy_mib} MiB float32 copy_ in {roofline.timing.ms:.3f} ms "
          f"= {roofline.gb_per_s:.1f} GB/s (read + write)", flush=True)
    rows, skipped, first_call_s, saved_mib = [], {}, {}, {}
    for name in args.providers:
        result = run_provider(PROVIDERS[name], workload, device, args, roofline)
        if isinstance(result, str):
            skipped[name] = result
            print(f"skip {name}: {result}", flush=True)
        else:
            rows += result[0]
            first_call_s[name], saved_mib[name] = result[1], result[2]
            times = ", ".join(f"{r.phase} {r.ms:.3f} ms" for r in result[0])
            print(f"done {name}: {times}; first forward + backward {result[1]:.2f} s; "
                  f"saved for backward {result[2]:.1f} MiB", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.sort(key=lambda r: (PHASE_ORDER.index(r.phase), args.providers.index(r.provider)))
    add_speedups(rows, BASELINES)
    print(f"\n{workload.name}, {args.device}, {args.threads} threads; copy roofline "
          f"{roofline.gb_per_s:.1f} GB/s; 'x P' = speedup over provider P (its median / this median)")
    print_table(rows, BASELINES)
    print("activations saved for backward by one forward (MiB): " +
          ", ".join(f"{name} {mib:.1f}" for name, mib in saved_mib.items()))
    if "compiled_torch" in first_call_s:
        print(f"compiled_torch: compile (first forward + backward call) took "
              f"{first_call_s['compiled_torch']:.1f} s, not in the timings")
    meta = {"args": vars(args), "workload": dataclasses.asdict(workload),
            "copy_roofline_gb_per_s": roofline.gb_per_s, "skipped": skipped,
            "first_call_seconds": first_call_s, "saved_activation_mib": saved_mib,
            "bytes_per_phase": bytes_moved(workload, workload.inputs(device)["lengths"])}
    paths = write_results(args.out, f"tim_{workload.name}_{args.device}", info, meta, rows)
    print("wrote " + ", ".join(str(p) for p in paths))
    return Report(rows, skipped, first_call_s, saved_mib)


if __name__ == "__main__":
    main(sys.argv[1:])
