r"""Quality check of MNSE on real data: UCI Adult (census income), income > 50K, test AUC.

The same model is trained with four encodings of the six numeric fields (age, fnlwgt,
education_num, capital_gain, capital_loss, hours_per_week):

    mnse       hmoe.nn.MNSE over the raw integer values, clipped per field (age <= 99,
               fnlwgt <= 1,499,999, education_num <= 16, capital_gain <= 99,999,
               capital_loss <= 4,999, hours_per_week <= 99), bases (2, 3, 10), mode "concat";
    mnse_sum   the same in mode "sum";
    buckets    each value cut into --buckets quantile buckets fitted on the train split (equal
               edges merged, so a mostly-zero field such as capital_gain gets few buckets), one
               learned embedding per bucket;
    buckets_nz the same, but in a field with zeros, 0 is a bucket of its own and the quantiles
               are fitted on the nonzero values (what one does for capital_gain by hand).

Everything else is shared: the eight categorical fields through one hmoe.nn.MultiEmbedding
(ids from the train split, 0 for a value unseen there, "?" is a value of its own), every field a
``--dim`` vector, the 14 vectors concatenated into an MLP (two ReLU layers, then the logit),
binary cross-entropy, Adam, the same epochs, batch size and seeds. With a seed, the categorical
embeddings, the MLP and the batch order are the same for every variant (they are drawn before
the numeric encoder). The splits are the ones the dataset ships: adult.data (32,561 rows) for
training, adult.test (16,281) for the test; the AUC is the one after the last epoch.

    python examples/mnse_adult.py                       # ../shared/data/adult, seeds 0,1,2
    python examples/mnse_adult.py --data /path/to/adult --epochs 10 --seeds 0,1,2,3,4

The data is read where it lies (--data, else $HMOE_DATA_DIR/adult, else ../shared/data/adult
beside the repository); its licence forbids copying it into the repository.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from hmoe.nn import MNSE, MultiEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import auc, default_data_dir, print_table  # noqa: E402

COLUMNS = ("age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
           "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
           "hours_per_week", "native_country", "income")
CATEGORICAL = ("workclass", "education", "marital_status", "occupation", "relationship", "race",
               "sex", "native_country")
# The numeric fields and the largest code MNSE keeps for each (larger values are clipped).
NUMERIC_MAX = {"age": 99, "fnlwgt": 1_499_999, "education_num": 16, "capital_gain": 99_999,
               "capital_loss": 4_999, "hours_per_week": 99}
VARIANTS = {
    "mnse": "hmoe.nn.MNSE, raw integers, bases (2, 3, 10), concat",
    "mnse_sum": "hmoe.nn.MNSE, raw integers, bases (2, 3, 10), sum",
    "buckets": "quantile buckets (train split), one embedding each",
    "buckets_nz": "the same, 0 its own bucket, quantiles of nonzeros",
}


# --------------------------------------------------------------------------------------------
# Data


def read_split(path: Path) -> list[list[str]]:
    """Records of one file: 15 fields each; a blank line or the UCI '|...' header is skipped."""
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("|"):
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != len(COLUMNS):
            raise SystemExit(f"{path}: expected {len(COLUMNS)} comma-separated fields, got "
                             f"{len(fields)} in line {line[:80]!r}")
        records.append(fields)
    return records


class Split:
    """One split as tensors: categorical ids (B, 8), numeric values (B, 6), labels (B,)."""

    def __init__(self, records: list[list[str]], vocabularies: dict[str, dict[str, int]]):
        column = {name: i for i, name in enumerate(COLUMNS)}
        self.categorical = torch.tensor(
            [[vocabularies[name].get(r[column[name]], 0) for name in CATEGORICAL] for r in records])
        self.numeric = torch.tensor([[int(r[column[name]]) for name in NUMERIC_MAX]
                                     for r in records])  # (B, 6) int64
        self.labels = torch.tensor([r[column["income"]].rstrip(".") == ">50K" for r in records],
                                   dtype=torch.float32)  # (B,)

    def __len__(self) -> int:
        return len(self.labels)


def load(data_dir: Path) -> tuple[Split, Split, list[int]]:
    """Train and test splits and the categorical vocabulary sizes (with id 0 for unseen)."""
    paths = [data_dir / "adult.data", data_dir / "adult.test"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"UCI Adult not found: {', '.join(missing)} missing. Pass --data DIR "
                         "(the folder holding adult.data and adult.test) or set HMOE_DATA_DIR; "
                         "see ../shared/data/README.md.")
    train_records, test_records = read_split(paths[0]), read_split(paths[1])
    vocabularies = {}
    for name in CATEGORICAL:
        i = COLUMNS.index(name)
        values = sorted({r[i] for r in train_records})
        vocabularies[name] = {value: k + 1 for k, value in enumerate(values)}  # 0: unseen
    sizes = [len(vocabularies[name]) + 1 for name in CATEGORICAL]
    return Split(train_records, vocabularies), Split(test_records, vocabularies), sizes


def quantile_edges(values: torch.Tensor, buckets: int, zero_bucket: bool) -> list[torch.Tensor]:
    """Per field of values (B, 6) >= 0, the bucket edges: the distinct inner quantiles; with
    zero_bucket, in a field with zeros, those of the nonzero values plus an edge that puts 0
    alone in bucket 0."""
    levels = torch.linspace(0, 1, buckets + 1, dtype=torch.float64)[1:-1]
    edges = []
    for column in values.double().unbind(dim=1):
        nonzero = column[column != 0]
        if zero_bucket and 0 < len(nonzero) < len(column):
            edges.append(torch.cat([nonzero.min()[None], torch.quantile(nonzero, levels)]).unique())
        else:
            edges.append(torch.quantile(column, levels).unique())
    return edges


def bucketize(values: torch.Tensor, edges: list[torch.Tensor]) -> torch.Tensor:
    """(B, 6) bucket ids in [0, len(edges[f])]: bucket i holds edges[i-1] <= x < edges[i]."""
    return torch.stack([torch.bucketize(values[:, f].double(), e, right=True)
                        for f, e in enumerate(edges)], dim=1)


# --------------------------------------------------------------------------------------------
# Model


class AdultModel(nn.Module):
    """Categorical ids (B, 8) and numeric inputs (B, 6) -> logit (B,)."""

    def __init__(self, vocab_sizes: list[int], make_numeric: Callable[[], nn.Module], dim: int,
                 hidden: int):
        super().__init__()
        self.categorical = MultiEmbedding(vocab_sizes, dim)
        fields = len(vocab_sizes) + len(NUMERIC_MAX)
        self.mlp = nn.Sequential(nn.Linear(fields * dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden // 2), nn.ReLU(),
                                 nn.Linear(hidden // 2, 1))
        self.numeric = make_numeric()  # drawn last: the rest starts alike in every variant

    def forward(self, ids: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        categorical = self.categorical(ids).squeeze(0)  # (B, 8, D); a view, unlike [0]
        vectors = torch.cat([categorical, self.numeric(numeric)], dim=1)  # (B, 14, D)
        return self.mlp(vectors.flatten(1)).squeeze(1)  # (B,)


class BucketEmbedding(nn.Module):
    """Bucket ids (B, 6) -> (B, 6, D) through one MultiEmbedding."""

    def __init__(self, bucket_counts: list[int], dim: int):
        super().__init__()
        self.embedding = MultiEmbedding(bucket_counts, dim)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).squeeze(0)  # (B, 6, D)


def numeric_encoder(variant: str, dim: int, edges: dict[str, list[torch.Tensor]]) -> nn.Module:
    if variant in edges:
        return BucketEmbedding([len(e) + 1 for e in edges[variant]], dim)
    mode = "sum" if variant == "mnse_sum" else "concat"
    return MNSE(len(NUMERIC_MAX), dim, list(NUMERIC_MAX.values()), bases=(2, 3, 10), mode=mode)


# --------------------------------------------------------------------------------------------
# Training and evaluation


def train_and_test(variant: str, seed: int, train: Split, test: Split, numeric_inputs,
                   vocab_sizes: list[int], edges: dict[str, list[torch.Tensor]],
                   args: argparse.Namespace) -> tuple[float, int]:
    """Test AUC after the last epoch, and the parameter count."""
    torch.manual_seed(seed)
    model = AdultModel(vocab_sizes, lambda: numeric_encoder(variant, args.dim, edges), args.dim,
                       args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_numeric, test_numeric = numeric_inputs
    order_generator = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(train), generator=order_generator).split(args.batch_size):
            logits = model(train.categorical[batch], train_numeric[batch])
            loss = nn.functional.binary_cross_entropy_with_logits(logits, train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):
            raise SystemExit(f"{variant}, seed {seed}: the loss is {float(loss)}")
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(test.categorical[b], test_numeric[b])
                            for b in torch.arange(len(test)).split(4096)])
    return auc(scores, test.labels), sum(p.numel() for p in model.parameters())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_dir("adult"),
                        help="folder with adult.data and adult.test (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--dim", type=int, default=12,
                        help="vector width of every field (a multiple of 3 for mnse)")
    parser.add_argument("--hidden", type=int, default=64, help="first MLP layer (second: half)")
    parser.add_argument("--buckets", type=int, default=16, help="quantile buckets per field")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: batches of 512 through a small MLP "
                             "gain nothing from 2, and lose much on a busy machine)")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test, vocab_sizes = load(args.data)
    edges = {"buckets": quantile_edges(train.numeric, args.buckets, zero_bucket=False),
             "buckets_nz": quantile_edges(train.numeric, args.buckets, zero_bucket=True)}
    limits = torch.tensor(list(NUMERIC_MAX.values()))
    print(f"UCI Adult from {args.data}: {len(train)} train rows ({train.labels.mean():.1%} "
          f">50K), {len(test)} test rows ({test.labels.mean():.1%}); categorical vocabularies "
          f"{vocab_sizes}; buckets per numeric field {[len(e) + 1 for e in edges['buckets']]} "
          f"(buckets_nz {[len(e) + 1 for e in edges['buckets_nz']]}); values above "
          f"the MNSE clip: {int((train.numeric > limits).sum())} train, "
          f"{int((test.numeric > limits).sum())} test")
    inputs = {name: (bucketize(train.numeric, e), bucketize(test.numeric, e))
              for name, e in edges.items()}
    inputs["mnse"] = inputs["mnse_sum"] = (train.numeric, test.numeric)

    results: dict[str, list[float]] = {}
    rows = []
    for variant in args.variants:
        start = time.perf_counter()
        aucs = []
        for seed in args.seeds:
            value, params = train_and_test(variant, seed, train, test, inputs[variant],
                                           vocab_sizes, edges, args)
            aucs.append(value)
            print(f"{variant} seed {seed}: test AUC {value:.4f}", flush=True)
        results[variant] = aucs
        seconds = (time.perf_counter() - start) / len(args.seeds)
        spread = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        rows.append([variant, VARIANTS[variant], f"{statistics.mean(aucs):.4f} ± {spread:.4f}",
                     " ".join(f"{a:.4f}" for a in aucs), f"{params:,}", f"{seconds:.1f}"])

    print(f"\nUCI Adult, income > 50K; {args.epochs} epochs, batch {args.batch_size}, Adam lr "
          f"{args.lr}, field dim {args.dim}, MLP {args.hidden}-{args.hidden // 2}-1; seeds "
          f"{','.join(map(str, args.seeds))}; test AUC after the last epoch (mean ± sample std)")
    header = ["variant", "numeric fields as", "test AUC", "per seed", "params", "s/seed"]
    print_table(header, rows)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
