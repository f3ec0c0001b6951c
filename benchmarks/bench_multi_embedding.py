r"""Microbenchmark of the fused multi-embedding lookup (hmoe.nn.MultiEmbedding) against the ways
people write it in PyTorch and against FBGEMM's table-batched embedding (TBE).

Every provider computes the same thing: F single-hot fields, K embedding sets of dimension D;
``forward(ids (B, F))`` returns a contiguous (K, B, F, D) tensor (expert k reads plane k), and a
training step applies plain SGD (lr) to every table. Weights are float32.

Phases (``--phase``):
    forward   the lookup with autograd recording, as in training.
    backward  ``out.backward(G)`` with a fixed random G (K, B, F, D) cannot run without its forward,
              so the timed call is forward + backward ("fwd+bwd"), and the "backward" row is the
              difference of the fwd+bwd and forward medians from the same run (no p10/p90).
              Dense-gradient providers reset ``.grad`` to None first, as ``zero_grad`` does in a
              training loop; providers with a fused optimizer update the weights here.
    train     one full step: zero_grad, forward, ``out.backward(G)``, optimizer step. G stands for
              the gradient the rest of the model sends back; computing it (a loss over the
              (K, B, F, D) output) is the model's work, not the embedding's, so it is not timed
              (a ``sum(out * G)`` costs about 10 ms per step on 2 cores for every provider alike).
    all       all three (forward is always measured when backward is asked for).

Bandwidth convention (FBGEMM's, PERF_NOTES.md section 2.4; index bytes are not counted):
with M = B·F·K·D looked-up values of e = 4 bytes,

    forward   bytes = M·e (rows read) + M·e (output written)                    = 2·M·e
    backward  bytes = M·e (output gradient read) + M·e (row gradients written)
                    + 2·M·e (rows read and written by the update)                 = 4·M·e
                      (FBGEMM reports backward as 2x its forward bytes)
    fwd+bwd and train bytes = 6·M·e

These count the useful bytes only: a dense-gradient provider also zeroes an (N, K, D) gradient
and its optimizer reads and writes the whole table, so its GB/s is an effective figure, and this
is exactly why such baselines are slow. Every row also reports its GB/s as a fraction of a large
copy measured in the same run (benchmarks/_harness.py) and its speedup over per_field_embedding,
single_table_torch and fbgemm_tbe (ratios of medians from the same run).

Inputs reach each provider in its native format, prepared outside the timer: (B, F) local ids
for the PyTorch providers and hmoe, field-major indices plus bag offsets (the KeyedJaggedTensor
order) for FBGEMM. Adding each field's row offset is the provider's own work, inside the timer.

Workloads (``--workload``):
    criteo  B=4096, the 26 categorical fields C1..C26 of the Criteo Kaggle display-advertising
            (DAC) train set with their distinct-value counts capped at 100,000 (840,543 rows,
            215 MB at K=4, D=16), ids Zipf-distributed per field (exponent 1.05, hot ids spread by
            a random permutation), fixed seed.
    dram    B=4096, F=4 fields of 4 Mi rows, K=4, D=16: a 4 GiB table, uniform ids (DRAM-bound).
    tiny    a few rows, for smoke tests; it is also the correctness-check workload.

Before timing, each provider is checked once on the tiny workload: its forward must equal
hmoe.ops.multi_embedding_ref on the same weights, and one train step must equal plain SGD on the
reference gradient; a provider that fails is skipped with the reason.

    python benchmarks/bench_multi_embedding.py --workload criteo --phase all --threads 2
    python benchmarks/bench_multi_embedding.py --workload dram --repeats 10
    python benchmarks/bench_multi_embedding.py --device cuda \
        --providers single_table_torch,fbgemm_tbe,hmoe_cuda,hmoe_triton
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

import hmoe.ops
from hmoe.nn import MultiEmbedding
from hmoe.ops.multi_embedding import multi_embedding_backward_ref, multi_embedding_ref
from hmoe.optim import FusedSGD

from _harness import (
    CopyRoofline, Row, add_speedups, copy_roofline, machine_info,
    parse_bench_args, print_machine_info, print_table, setup_device, time_phases, write_results,
)

# Distinct values of C1..C26 in the Criteo Kaggle DAC train set (45,840,617 rows), as counted by
# the DLRM Kaggle preprocessing (facebookresearch/dlrm, the counts stored in its dataset .npz).
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
BASELINES = ("per_field_embedding", "single_table_torch", "fbgemm_tbe")


# --------------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    vocab_sizes: tuple[int, ...]
    batch: int  # B
    num_sets: int  # K
    dim: int  # D
    zipf: float | None  # exponent of the per-field power law; None: uniform ids
    seed: int = 0

    @property
    def num_rows(self) -> int:  # N
        return sum(self.vocab_sizes)

    @property
    def lookup_values(self) -> int:  # M = B·F·K·D
        return self.batch * len(self.vocab_sizes) * self.num_sets * self.dim

    def table_offsets(self, device: torch.device) -> torch.Tensor:
        return torch.tensor((0,) + self.vocab_sizes, device=device).cumsum(0)  # (F + 1,)

    def ids(self, device: torch.device) -> torch.Tensor:
        """(B, F) int64 per-field local ids, the same for every run with this seed."""
        generator = torch.Generator().manual_seed(self.seed)
        columns = []
        for vocab in self.vocab_sizes:
            if self.zipf is None:
                columns.append(torch.randint(vocab, (self.batch,), generator=generator))
                continue
            rank_weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-self.zipf)
            ranks = torch.multinomial(rank_weights, self.batch, replacement=True,
                                      generator=generator)
            columns.append(torch.randperm(vocab, generator=generator)[ranks])
        return torch.stack(columns, dim=1).to(device)  # (B, F)

    def describe(self, ids: torch.Tensor) -> str:
        rows = ids + self.table_offsets(ids.device)[:-1]
        unique = rows.unique().numel()
        table_mib = self.num_rows * self.num_sets * self.dim * 4 / 2**20
        ids_kind = "uniform" if self.zipf is None else f"zipf {self.zipf}"
        return (f"workload {self.name}: B={self.batch} F={len(self.vocab_sizes)} K={self.num_sets} "
                f"D={self.dim} N={self.num_rows} rows ({table_mib:.0f} MiB fp32), ids {ids_kind}, "
                f"{unique}/{rows.numel()} distinct rows per batch")


WORKLOADS = {
    "criteo": Workload("criteo", tuple(min(c, 100_000) for c in CRITEO_KAGGLE_CARDINALITIES),
                       batch=4096, num_sets=4, dim=16, zipf=1.05),
    "dram": Workload("dram", (4 * 2**20,) * 4, batch=4096, num_sets=4, dim=16, zipf=None),
    "tiny": Workload("tiny", (13, 7, 29, 5, 64), batch=32, num_sets=2, dim=8, zipf=1.05),
}
CHECK_WORKLOAD = WORKLOADS["tiny"]


# --------------------------------------------------------------------------------------------
# Providers: one small class each; the phases below are shared.

# (a parameter, the index of the slice of the canonical weight (N, K, D) that it holds)
TableViews = list[tuple[torch.Tensor, tuple]]


class Provider:
    """Builds the tables of a workload and runs the lookup; subclasses set ``name``."""

    name: ClassVar[str]

    def __init__(self, workload: Workload, device: torch.device, lr: float):
        self.workload, self.device, self.lr = workload, device, lr
        self.field_offsets = workload.table_offsets(device)[:-1]  # (F,)
        self.optimizer: torch.optim.Optimizer | None = None  # None: the update is fused

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this provider cannot run on device, or None."""
        return None

    def prepare(self, ids: torch.Tensor) -> object:
        """The provider's native input, built outside the timer."""
        return ids

    def forward(self, inputs: object) -> torch.Tensor:  # (K, B, F, D)
        raise NotImplementedError

    def tables(self) -> TableViews:
        """Every parameter with the slice of the canonical weight (N, K, D) it holds."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()


def _field_slices(workload: Workload) -> list[slice]:
    bounds = workload.table_offsets(torch.device("cpu")).tolist()
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


class PerFieldEmbedding(Provider):
    """K·F nn.Embedding modules in a Python loop, dense torch SGD (FuxiCTR / DeepCTR style)."""

    name = "per_field_embedding"
    sparse = False

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        D = workload.dim
        self.embeddings = nn.ModuleList(
            nn.ModuleList(nn.Embedding(v, D, sparse=self.sparse) for v in workload.vocab_sizes)
            for _ in range(workload.num_sets)
        ).to(device)
        self.optimizer = torch.optim.SGD(self.embeddings.parameters(), lr=lr)

    def forward(self, ids):
        return torch.stack([
            torch.stack([emb(ids[:, f]) for f, emb in enumerate(per_set)], dim=1)  # (B, F, D)
            for per_set in self.embeddings
        ])  # (K, B, F, D)

    def tables(self):
        fields = _field_slices(self.workload)
        return [(emb.weight, (fields[f], k)) for k, per_set in enumerate(self.embeddings)
                for f, emb in enumerate(per_set)]


class PerFieldEmbeddingSparse(PerFieldEmbedding):
    """The same with nn.Embedding(sparse=True): sparse gradients, torch SGD."""

    name = "per_field_embedding_sparse"
    sparse = True


class EmbeddingBagPerSet(Provider):
    """One nn.EmbeddingBag (sum, one id per bag) per set over the concatenated tables."""

    name = "embedding_bag_per_set"

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        N, D = workload.num_rows, workload.dim
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(N, D, mode="sum") for _ in range(workload.num_sets)
        ).to(device)
        self.optimizer = torch.optim.SGD(self.bags.parameters(), lr=lr)

    def forward(self, ids):
        B, F = ids.shape
        rows = (ids + self.field_offsets).reshape(-1, 1)  # (B·F, 1): bags of one id
        return torch.stack([bag(rows) for bag in self.bags]).view(-1, B, F, self.workload.dim)

    def tables(self):
        return [(bag.weight, (slice(None), k)) for k, bag in enumerate(self.bags)]


class SingleTableTorch(Provider):
    """One (N, K, D) parameter, ``weight[ids + offsets]``, permuted to (K, B, F, D); dense SGD."""

    name = "single_table_torch"

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        shape = (workload.num_rows, workload.num_sets, workload.dim)
        self.weight = nn.Parameter(torch.empty(shape, device=device).normal_(std=0.01))
        self.optimizer = torch.optim.SGD([self.weight], lr=lr)

    def forward(self, ids):
        return self.weight[ids + self.field_offsets].permute(2, 0, 1, 3).contiguous()

    def tables(self):
        return [(self.weight, (slice(None),))]


_compiled_reference: Callable | None = None


class ReferenceCompiled(SingleTableTorch):
    """torch.compile of hmoe's reference (multi_embedding_ref), dense SGD."""

    name = "reference_compiled"

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        global _compiled_reference
        if _compiled_reference is None:  # one compiled function, so shapes seen before are reused
            _compiled_reference = torch.compile(multi_embedding_ref, dynamic=False)
        self.table_offsets = workload.table_offsets(device)

    def forward(self, ids):
        return _compiled_reference(self.weight, ids, None, self.table_offsets, 0)


class Hmoe(Provider):
    """hmoe.nn.MultiEmbedding on one backend; ``grad`` = "fused" (FusedSGD in backward),
    "dense" (weight.grad + torch SGD) or "sparse" (sparse COO weight.grad + torch SGD)."""

    backend: ClassVar[str]
    grad: ClassVar[str]

    @classmethod
    def unavailable(cls, device):
        if cls.backend == "triton" and device.type == "cpu":
            return "Triton on CPU tensors runs only in the TRITON_INTERPRET simulator: not a timing"
        return hmoe.ops.reasons("multi_embedding", device.type)[cls.backend]

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        fused = FusedSGD(lr=lr) if self.grad == "fused" else None
        self.module = MultiEmbedding(
            workload.vocab_sizes, workload.dim, num_sets=workload.num_sets,
            sparse=self.grad == "sparse", fused_optimizer=fused, device=device,
        )
        if fused is None:
            self.optimizer = torch.optim.SGD([self.module.weight], lr=lr)

    def forward(self, ids):
        with hmoe.ops.backend(self.backend):
            return self.module(ids)

    def tables(self):
        return [(self.module.weight, (slice(None),))]


class FbgemmTBE(Provider):
    """FBGEMM SplitTableBatchedEmbeddingBagsCodegen, EXACT_SGD fused into backward, pooling SUM
    over bags of one id. ``fbgemm_tbe``: F tables of dim K·D, one K·D row per lookup, the same
    memory layout, bytes and update as hmoe (SGD is elementwise, so a K·D-wide row is K sets).
    ``fbgemm_tbe_per_set``: F·K tables of dim D, how a TBE user lists K copies of a feature
    (indices read K times, K narrow rows per lookup)."""

    name = "fbgemm_tbe"
    per_set = False

    @classmethod
    def unavailable(cls, device):
        try:
            import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
        except Exception as error:  # ImportError, or an ABI mismatch with this torch
            return (f"fbgemm_gpu does not import ({type(error).__name__}: {error}); "
                    "pip install fbgemm-gpu-cpu==1.8.0")
        return None

    def __init__(self, workload, device, lr):
        super().__init__(workload, device, lr)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation, PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen,
        )

        K, D = workload.num_sets, workload.dim
        if device.type == "cuda":
            placement = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA)
        else:
            placement = (EmbeddingLocation.HOST, ComputeDevice.CPU)
        if self.per_set:
            specs = [(v, D, *placement) for _ in range(K) for v in workload.vocab_sizes]
        else:
            specs = [(v, K * D, *placement) for v in workload.vocab_sizes]
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            specs, optimizer=EmbOptimType.EXACT_SGD, learning_rate=lr,
            pooling_mode=PoolingMode.SUM, device=device,
        )

    def prepare(self, ids):
        features = ids.t()  # (F, B): field-major, the KeyedJaggedTensor order
        if self.per_set:
            features = features.repeat(self.workload.num_sets, 1)  # (K·F, B), feature k·F + f
        indices = features.reshape(-1).contiguous()
        return indices, torch.arange(indices.numel() + 1, device=ids.device)  # one id per bag

    def forward(self, inputs):
        pooled = self.tbe(*inputs)  # (B, F·K·D) or (B, K·F·D)
        B, F = pooled.shape[0], len(self.workload.vocab_sizes)
        K, D = self.workload.num_sets, self.workload.dim
        if self.per_set:
            return pooled.view(B, K, F, D).permute(1, 0, 2, 3).contiguous()
        return pooled.view(B, F, K, D).permute(2, 0, 1, 3).contiguous()

    def tables(self):
        weights = self.tbe.split_embedding_weights()  # views of the TBE's flat weight buffer
        fields = _field_slices(self.workload)
        if self.per_set:
            F = len(fields)
            return [(w, (fields[i % F], i // F)) for i, w in enumerate(weights)]
        return [(w, (fields[f],)) for f, w in enumerate(weights)]


class FbgemmTBEPerSet(FbgemmTBE):
    name = "fbgemm_tbe_per_set"
    per_set = True


def _hmoe_providers() -> list[type[Provider]]:
    variants = []
    for backend in ("cpu", "triton", "cuda"):
        for grad, suffix in (("fused", ""), ("dense", "_dense"), ("sparse", "_sparse")):
            name = f"hmoe_{backend}{suffix}"
            doc = f"hmoe.nn.MultiEmbedding, backend {backend}, {grad} gradient."
            attributes = {"name": name, "backend": backend, "grad": grad, "__doc__": doc}
            variants.append(type(name, (Hmoe,), attributes))
    return variants


PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls
    for cls in (PerFieldEmbedding, PerFieldEmbeddingSparse, EmbeddingBagPerSet, SingleTableTorch,
                ReferenceCompiled, FbgemmTBE, FbgemmTBEPerSet, *_hmoe_providers())
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
    with torch.no_grad():
        for table, index in provider.tables():
            table.copy_(weight[index].reshape(table.shape))


def export_weight(provider: Provider, workload: Workload) -> torch.Tensor:
    weight = torch.empty(workload.num_rows, workload.num_sets, workload.dim, device=provider.device)
    for table, index in provider.tables():
        weight[index] = table.detach().reshape(weight[index].shape)
    return weight  # (N, K, D)


def check_provider(cls: type[Provider], device: torch.device, lr: float) -> None:
    """Raises AssertionError unless forward and one SGD train step match the reference."""
    workload = CHECK_WORKLOAD
    generator = torch.Generator().manual_seed(1)
    shape = (workload.num_rows, workload.num_sets, workload.dim)
    weight = torch.randn(shape, generator=generator).to(device)  # (N, K, D)
    provider = cls(workload, device, lr)
    load_weight(provider, weight)
    ids, offsets = workload.ids(device), workload.table_offsets(device)
    inputs = provider.prepare(ids)
    expected = multi_embedding_ref(weight, ids, None, offsets, 0)  # (K, B, F, D)
    torch.testing.assert_close(provider.forward(inputs).detach(), expected,
                               msg=lambda m: f"forward: {m}")
    grad_out = torch.randn(expected.shape, generator=generator).to(device)
    train_step(provider, inputs, grad_out)
    sgd = weight - lr * multi_embedding_backward_ref(grad_out, ids, None, offsets, 0, shape[0])
    torch.testing.assert_close(export_weight(provider, workload), sgd, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"SGD step: {m}")


def bytes_moved(workload: Workload) -> dict[str, float]:
    """The byte model of the module docstring, per phase."""
    forward = 2 * workload.lookup_values * 4
    return {"forward": forward, "backward": 2 * forward, "fwd+bwd": 3 * forward,
            "train": 3 * forward}


def run_provider(cls: type[Provider], workload: Workload, device: torch.device,
                 args: argparse.Namespace, roofline: CopyRoofline) -> list[Row] | str:
    """Checks, builds and times one provider; returns its rows, or why it was skipped."""
    reason = cls.unavailable(device)
    if reason is not None:
        return reason
    try:
        check_provider(cls, device, args.lr)
    except Exception as error:  # a failed check or a provider that cannot run: skip it, say why
        return f"correctness check failed: {type(error).__name__}: {error}"
    torch.manual_seed(0)
    provider = cls(workload, device, args.lr)
    ids = workload.ids(device)
    inputs = provider.prepare(ids)
    grad_out = torch.randn(workload.num_sets, *ids.shape, workload.dim,
                           generator=torch.Generator().manual_seed(2)).to(device)  # (K, B, F, D)
    steps: dict[str, Callable[[], object]] = {
        "forward": lambda: provider.forward(inputs),
        "fwd+bwd": lambda: fwd_bwd_step(provider, inputs, grad_out),
        "train": lambda: train_step(provider, inputs, grad_out),
    }
    rows = time_phases(cls.name, workload.name, steps, bytes_moved(workload), device, args,
                       roofline)
    return rows


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_bench_args(__doc__, WORKLOADS, "criteo", list(PROVIDERS), argv)


@dataclasses.dataclass
class Report:
    rows: list[Row]
    skipped: dict[str, str]  # provider -> reason


PHASE_ORDER = ("forward", "fwd+bwd", "backward", "train")


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    device = setup_device(args)
    info = machine_info(device, packages=("numpy", "fbgemm-gpu", "fbgemm-gpu-cpu"))
    reasons = hmoe.ops.reasons("multi_embedding", device.type)
    info["hmoe_backends"] = {b: reason or "available" for b, reason in reasons.items()}
    print_machine_info(info)
    workload = WORKLOADS[args.workload]
    print(workload.describe(workload.ids(device)))
    roofline = copy_roofline(device, args.copy_mib)
    print(f"copy roofline: {args.copy_mib} MiB float32 copy_ in {roofline.timing.ms:.3f} ms "
          f"= {roofline.gb_per_s:.1f} GB/s (read + write)", flush=True)

    rows, skipped = [], {}
    for name in args.providers:
        result = run_provider(PROVIDERS[name], workload, device, args, roofline)
        if isinstance(result, str):
            skipped[name] = result
            print(f"skip {name}: {result}", flush=True)
        else:
            rows += result
            times = ", ".join(f"{r.phase} {r.ms:.3f} ms" for r in result)
            print(f"done {name}: {times}", flush=True)
        gc.collect()  # free this provider's tables before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows.sort(key=lambda r: (PHASE_ORDER.index(r.phase), args.providers.index(r.provider)))
    add_speedups(rows, BASELINES)
    print(f"\n{workload.name}, {args.device}, {args.threads} threads; copy roofline "
          f"{roofline.gb_per_s:.1f} GB/s; 'x P' = speedup over provider P "
          "(its median / this median)")
    print_table(rows, BASELINES)
    meta = {"args": vars(args), "workload": dataclasses.asdict(workload),
            "copy_roofline_gb_per_s": roofline.gb_per_s, "skipped": skipped,
            "bytes_per_phase": bytes_moved(workload)}
    stem = f"multi_embedding_{workload.name}_{args.device}"
    paths = write_results(args.out, stem, info, meta, rows)
    print("wrote " + ", ".join(str(p) for p in paths))
    return Report(rows, skipped)


if __name__ == "__main__":
    main(sys.argv[1:])
