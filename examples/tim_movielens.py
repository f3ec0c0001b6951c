r"""Quality check of TIM on real data: MovieLens 100K, "will the user rate the next movie >= 4?"

Construction. Each user's ratings are ordered by time (ties by movie id). Every rating with at
least one earlier rating is a sample: the target is its movie, the label is rating >= 4, and the
behaviours are the user's previous ``--max-len`` rated movies, most recent first, each with its
rating (a behaviour embedding is movie embedding + rating embedding). Positions are ranks
(1 = the most recent; ``--positions rank``) or log time buckets of the interval to the target
(``--positions time``: hmoe.nn.time_buckets, unit one hour, base 2). Split: the last
``--test-per-user`` samples of every user are the test set, the rest train (a per-user
chronological split, so no test rating precedes its user's training ratings).

Model, the same for every sequence module: user embedding, target movie embedding v, the
sequence summary u (B, D) of the module, an MLP over [user, v, u, u ⊙ v] (ReLU 64-32-1), BCE,
Adam. Modules compared (``--variants``):

    tim              hmoe.nn.TemporalInterest (the paper's TIM)
    tim_no_temporal  TIM without temporal encoding (no position table)
    tim_no_target    TIM without the target-aware representation (u = Σ α ẽ)
    din              hmoe.nn.DINAttention (Dice MLP attention, no softmax)
    sasrec           hmoe.nn.SelfAttentionTarget (one causal pre-LN block, then target attention)
    mean             hmoe.nn.MeanPooling

Metrics on the test set after the last epoch: AUC, and gAUC (impression-weighted mean of per-user
AUCs over users with both classes in their test samples), mean ± sample std over the seeds. With
a seed, the user/movie embeddings, the MLP and the batch order are the same for every variant
(drawn before the sequence module).

    python examples/tim_movielens.py                        # ../shared/data/ml-100k, seeds 0,1,2
    python examples/tim_movielens.py --positions time --variants tim,din --seeds 0,1,2,3,4

The data is read where it lies (--data, else $HMOE_DATA_DIR/ml-100k, else ../shared/data/ml-100k
beside the repository); its licence forbids copying it into the repository.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from hmoe.nn import DINAttention, MeanPooling, SelfAttentionTarget, TemporalInterest, time_buckets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import auc, default_data_dir, gauc, print_table  # noqa: E402

VARIANTS = {
    "tim": "TIM (hmoe.nn.TemporalInterest)",
    "tim_no_temporal": "TIM without temporal encoding",
    "tim_no_target": "TIM without target-aware representation",
    "din": "DIN attention (Dice MLP, no softmax)",
    "sasrec": "SASRec-style encoder + target attention",
    "mean": "mean pooling",
}


# --------------------------------------------------------------------------------------------
# Data


class Samples:
    """Tensors of a split: user (B,), target (B,), label (B,), history ids / ratings / positions
    (B, L) with lengths (B,) (padding: id 0, rating 0, position 1)."""

    def __init__(self, rows: list[tuple], max_len: int):
        B = len(rows)
        self.user = torch.tensor([r[0] for r in rows])
        self.target = torch.tensor([r[1] for r in rows])
        self.label = torch.tensor([r[2] for r in rows], dtype=torch.float32)
        self.history = torch.zeros(B, max_len, dtype=torch.int64)
        self.ratings = torch.zeros(B, max_len, dtype=torch.int64)
        self.positions = torch.ones(B, max_len, dtype=torch.int64)
        self.lengths = torch.tensor([len(r[3]) for r in rows])
        for b, (_, _, _, ids, ratings, positions) in enumerate(rows):
            n = len(ids)
            self.history[b, :n] = torch.tensor(ids)
            self.ratings[b, :n] = torch.tensor(ratings)
            self.positions[b, :n] = torch.tensor(positions)

    def __len__(self) -> int:
        return len(self.label)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[index] for name in
                ("user", "target", "label", "history", "ratings", "positions", "lengths")}


def load(data_dir: Path, max_len: int, test_per_user: int, positions: str,
         time_buckets_count: int):
    path = data_dir / "u.data"
    if not path.is_file():
        raise SystemExit(f"MovieLens 100K not found: {path} missing. Pass --data DIR (the folder "
                         "holding u.data) or set HMOE_DATA_DIR; see ../shared/data/README.md.")
    events: dict[int, list[tuple[int, int, int]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) != 4:
            raise SystemExit(f"{path}:{number}: expected 4 tab-separated fields, got {line!r}")
        user, item, rating, stamp = map(int, fields)
        events.setdefault(user, []).append((stamp, item, rating))
    train, test = [], []
    for user, history in events.items():
        history.sort()
        samples = []
        for t in range(1, len(history)):
            stamp, item, rating = history[t]
            past = history[max(0, t - max_len):t][::-1]  # most recent first
            if positions == "rank":
                pos = list(range(1, len(past) + 1))
            else:
                delta = torch.tensor([(stamp - s) / 3600.0 for s, _, _ in past])
                pos = time_buckets(delta, time_buckets_count).tolist()
            samples.append((user, item, float(rating >= 4), [i for _, i, _ in past],
                            [r for _, _, r in past], pos))
        train += samples[:-test_per_user]
        test += samples[-test_per_user:]
    num_users = max(events) + 1
    num_items = max(i for h in events.values() for _, i, _ in h) + 1
    return Samples(train, max_len), Samples(test, max_len), num_users, num_items


# --------------------------------------------------------------------------------------------
# Model


def sequence_module(variant: str, dim: int, max_position: int) -> nn.Module:
    if variant == "tim":
        return TemporalInterest(dim, max_position)
    if variant == "tim_no_temporal":
        return TemporalInterest(dim, max_position, temporal_encoding=False)
    if variant == "tim_no_target":
        return TemporalInterest(dim, max_position, target_aware=False)
    if variant == "din":
        return DINAttention(dim)
    if variant == "sasrec":
        return SelfAttentionTarget(dim, max_position)
    return MeanPooling()


class NextRatingModel(nn.Module):
    def __init__(self, num_users: int, num_items: int, variant: str, dim: int, hidden: int,
                 max_position: int):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items, dim)
        self.ratings = nn.Embedding(6, dim)  # 1..5, 0 for padding (never read)
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden // 2), nn.ReLU(),
                                 nn.Linear(hidden // 2, 1))
        self.sequence = sequence_module(variant, dim, max_position)  # drawn last

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        v = self.items(batch["target"])  # (B, D)
        behaviors = self.items(batch["history"]) + self.ratings(batch["ratings"])  # (B, L, D)
        u = self.sequence(behaviors, v, batch["positions"], batch["lengths"])  # (B, D)
        features = torch.cat([self.users(batch["user"]), v, u, u * v], dim=1)  # (B, 4D)
        return self.mlp(features).squeeze(1)  # (B,)


def train_and_test(variant, seed, train, test, num_users, num_items, max_position, args):
    torch.manual_seed(seed)
    model = NextRatingModel(num_users, num_items, variant, args.dim, args.hidden, max_position)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        model.train()
        for index in torch.randperm(len(train), generator=order).split(args.batch_size):
            batch = train.batch(index)
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):
            raise SystemExit(f"{variant}, seed {seed}: the loss is {float(loss)}")
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(test.batch(i)) for i in torch.arange(len(test)).split(4096)])
    return auc(scores, test.label), gauc(scores, test.label, test.user)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_dir("ml-100k"),
                        help="folder with u.data (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--positions", choices=("rank", "time"), default="rank")
    parser.add_argument("--time-buckets", type=int, default=24,
                        help="buckets of --positions time (default 24: up to ~2^22 hours)")
    parser.add_argument("--max-len", type=int, default=50, help="behaviours per sample, at most")
    parser.add_argument("--test-per-user", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main(argv: list[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test, num_users, num_items = load(args.data, args.max_len, args.test_per_user,
                                             args.positions, args.time_buckets)
    max_position = args.max_len if args.positions == "rank" else args.time_buckets
    print(f"MovieLens 100K from {args.data}: {len(train)} train samples "
          f"({train.label.mean():.1%} rated >= 4), {len(test)} test samples "
          f"({test.label.mean():.1%}); {num_users - 1} users, {num_items - 1} movies; histories "
          f"of up to {args.max_len} (mean {train.lengths.float().mean():.1f}); positions "
          f"{args.positions}", flush=True)
    results: dict[str, list[tuple[float, float]]] = {}
    table = []
    for variant in args.variants:
        start = time.perf_counter()
        results[variant] = []
        for seed in args.seeds:
            value = train_and_test(variant, seed, train, test, num_users, num_items,
                                   max_position, args)
            results[variant].append(value)
            print(f"{variant} seed {seed}: test AUC {value[0]:.4f}, gAUC {value[1]:.4f}",
                  flush=True)
        seconds = (time.perf_counter() - start) / len(args.seeds)
        aucs, gaucs = zip(*results[variant])
        table.append([variant, VARIANTS[variant], _mean_std(list(aucs)), _mean_std(list(gaucs)),
                      f"{seconds:.1f}"])
    print(f"\nMovieLens 100K, next rating >= 4; {args.epochs} epochs, batch {args.batch_size}, Adam "
          f"lr {args.lr}, dim {args.dim}, MLP {args.hidden}-{args.hidden // 2}-1, positions "
          f"{args.positions}; seeds {','.join(map(str, args.seeds))}; mean ± sample std")
    header = ["variant", "sequence module", "test AUC", "test gAUC", "s/seed"]
    print_table(header, table)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
