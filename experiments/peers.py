r"""hmoe beside FuxiCTR on the same splits and budget (../shared/reference/PEERS.md).

The splits are rebuilt here exactly as PEERS.md states them, from the files in
$HMOE_DATA_DIR or ../shared/data (absent: skipped), into sample files under
.cache/experiments/peers/ (git-ignored; the data's licences forbid committing them):

    avazu_10k  avazu_train_9000.csv: numpy RandomState(2024).permutation(n); its first
               int(0.1 n) indices, sorted, are valid, the rest train (8,100 / 899);
               avazu_test_1000.csv (no header) is test. ``hour`` becomes the hour of day
               (characters 6-8), ``id`` is dropped; configs/datasets/avazu.yaml reads them
               (22 categorical fields, tokens seen < 2 times in train are out of vocabulary).
    adult      adult.data split as above (29,305 / 3,256); adult.test without its first line
               is test (16,280); configs/datasets/adult.yaml reads them (income > 50K and
               never married; marital status is no feature).
    ml-100k    u.data ordered by (user, timestamp, file row); per user the last floor(20 %)
               ratings are test, the floor(10 %) before them valid, the rest train
               (70,771 / 9,596 / 19,633, PEERS.md's counts); user features
               from u.user, the movie's first genre flag as its category from u.item;
               experiments/configs/movielens_peers.yaml reads them.

Budget (PEERS.md): Adam, lr 1e-3, gradient norm clipped at 10, embedding dim 16, valid AUC
after each epoch (two tasks: their mean), the best weights kept, lr x 0.1 after an epoch that
does not improve, stop after 2 such epochs, at most 20 epochs, test scored once with the best
weights. Each dataset runs hmoe's model comparable to the peer's (its architecture and
regularisation as PEERS.md gives them, its dense layers initialised as FuxiCTR's are:
``dense_init: xavier_normal``), the same model with PyTorch's default init, and hmoe's own
candidates, 3 seeds each, and a logistic regression on one-hot features (scikit-learn) as
the floor.
"""

from __future__ import annotations

import csv
import hashlib
import time
from pathlib import Path

import numpy as np

import common
from common import ROOT, Section, fmt, mean_std, table, values

CACHE = ROOT / ".cache" / "experiments" / "peers"
SPLIT_SEED = 2024

# FuxiCTR 2.3.10's test AUC, mean and sample std over 3 seeds (PEERS.md, "Results").
PEERS = {
    ("avazu_10k", "click"): ("DCNv2", 0.7272, 0.0024),
    ("adult", "income_50k"): ("MMoE", 0.9099, 0.0005),
    ("adult", "never_married"): ("MMoE", 0.9645, 0.0001),
    ("movielens", "like"): ("DIN", 0.7755, 0.0021),
}

BUDGET = ["train.epochs=20", "train.patience=2", "train.lr=1e-3", "train.grad_clip=10",
          "train.lr_decay=0.1", "train.eval_every=0", "train.optimizer=adam", "loss.kind=bce",
          "loss.ipw_gamma=0", "train.calibrate=false"]

VARIANTS = {
    "avazu_10k": {
        "dcnv2 (the peer's)": [
            "model.preset=dcnv2", "model.tasks=[click]", "train.batch_size=256",
            "model.options={dim: 16, structure: parallel, num_cross: 3, "
            "expert_hidden: [400, 400, 400], tower: [], dropout: 0.2, "
            "dense_init: xavier_normal}",
            "train.embedding_l2=1e-5"],
        "dcnv2, PyTorch init": [
            "model.preset=dcnv2", "model.tasks=[click]", "train.batch_size=256",
            "model.options={dim: 16, structure: parallel, num_cross: 3, "
            "expert_hidden: [400, 400, 400], tower: [], dropout: 0.2}",
            "train.embedding_l2=1e-5"],
        "hmoe_me": [
            "model.preset=hmoe_me", "model.tasks=[click]", "train.batch_size=256",
            "model.options={dim: 16, dropout: 0.2}", "train.embedding_l2=1e-5"],
        "hmoe_me, xavier": [
            "model.preset=hmoe_me", "model.tasks=[click]", "train.batch_size=256",
            "model.options={dim: 16, dropout: 0.2, dense_init: xavier_normal}",
            "train.embedding_l2=1e-5"],
    },
    "adult": {
        "mmoe (the peer's)": [
            "model.preset=mmoe", "model.tasks=[income_50k, never_married]",
            "train.batch_size=512", "train.monitor=mean/auc",
            "model.options={dim: 16, num_experts: 8, expert_hidden: [256, 128], "
            "gate_hidden: [64], tower: [64], dropout: 0.1, numeric_encoder: scaled, "
            "dense_init: xavier_normal}",
            "train.embedding_l2=1e-6"],
        "mmoe, PyTorch init": [
            "model.preset=mmoe", "model.tasks=[income_50k, never_married]",
            "train.batch_size=512", "train.monitor=mean/auc",
            "model.options={dim: 16, num_experts: 8, expert_hidden: [256, 128], "
            "gate_hidden: [64], tower: [64], dropout: 0.1, numeric_encoder: scaled}",
            "train.embedding_l2=1e-6"],
        "stem + MNSE": [
            "model.preset=stem", "model.tasks=[income_50k, never_married]",
            "train.batch_size=512", "train.monitor=mean/auc",
            "model.options={dim: 16, expert_hidden: [256, 128], tower: [64], dropout: 0.1}",
            "train.embedding_l2=1e-6"],
        "stem + MNSE, xavier": [
            "model.preset=stem", "model.tasks=[income_50k, never_married]",
            "train.batch_size=512", "train.monitor=mean/auc",
            "model.options={dim: 16, expert_hidden: [256, 128], tower: [64], dropout: 0.1, "
            "dense_init: xavier_normal}",
            "train.embedding_l2=1e-6"],
    },
    "movielens": {
        "din (the peer's)": [
            "model.preset=dnn", "model.tasks=[like]", "train.batch_size=256",
            "model.options={dim: 16, sequence_encoder: din, joint_sequences: true, "
            "din_hidden: [64], expert_hidden: [200, 80], tower: [], dropout: 0.1, "
            "dense_init: xavier_normal}"],
        "din, PyTorch init": [
            "model.preset=dnn", "model.tasks=[like]", "train.batch_size=256",
            "model.options={dim: 16, sequence_encoder: din, joint_sequences: true, "
            "din_hidden: [64], expert_hidden: [200, 80], tower: [], dropout: 0.1}"],
        "din, separate attention": [
            "model.preset=dnn", "model.tasks=[like]", "train.batch_size=256",
            "model.options={dim: 16, sequence_encoder: din, expert_hidden: [200, 80], "
            "tower: [], dropout: 0.1}"],
        "dnn + tim": [
            "model.preset=dnn", "model.tasks=[like]", "train.batch_size=256",
            "model.options={dim: 16, sequence_encoder: tim, expert_hidden: [200, 80], "
            "tower: [], dropout: 0.1}"],
        "hmoe_me + tim": [
            "model.preset=hmoe_me", "model.tasks=[like]", "train.batch_size=256",
            "model.options={dim: 16, sequence_encoder: tim, dropout: 0.1}"],
        "dnn + tim, xavier": [
            "model.preset=dnn", "model.tasks=[like]", "train.batch_size=256",
            "model.options={dim: 16, sequence_encoder: tim, expert_hidden: [200, 80], "
            "tower: [], dropout: 0.1, dense_init: xavier_normal}"],
        "hmoe_me + tim, xavier": [
            "model.preset=hmoe_me", "model.tasks=[like]", "train.batch_size=256",
            "model.options={dim: 16, sequence_encoder: tim, dropout: 0.1, "
            "dense_init: xavier_normal}"],
    },
}


# --------------------------------------------------------------------------------------------
# The splits


def _valid_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, valid rows), each sorted: PEERS.md's random 90/10 split."""
    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    cut = int(0.1 * n)
    return np.sort(order[cut:]), np.sort(order[:cut])


def _write(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    temporary.replace(path)


def _prepare_avazu(data: Path, out: Path) -> dict[str, Path]:
    with open(data / "avazu_10k" / "avazu_train_9000.csv", newline="") as file:
        reader = csv.reader(file)
        header = next(reader)
        rows = list(reader)
    with open(data / "avazu_10k" / "avazu_test_1000.csv", newline="") as file:
        test = list(csv.reader(file))
    hour = header.index("hour")

    def hour_of_day(row):
        return [value[6:8] if i == hour else value for i, value in enumerate(row)]

    train, valid = _valid_rows(len(rows))
    files = {}
    for split, chosen in (("train", [rows[i] for i in train]),
                          ("valid", [rows[i] for i in valid]), ("test", test)):
        files[split] = out / f"{split}.csv"
        _write(files[split], header, map(hour_of_day, chosen))
    return files


def _prepare_adult(data: Path, out: Path) -> dict[str, Path]:
    lines = (data / "adult" / "adult.data").read_text().splitlines()
    rows = [line for line in lines if line.strip()]
    test = [line for line in (data / "adult" / "adult.test").read_text().splitlines()[1:]
            if line.strip()]
    train, valid = _valid_rows(len(rows))
    files = {}
    for split, chosen in (("train", [rows[i] for i in train]),
                          ("valid", [rows[i] for i in valid]), ("test", test)):
        files[split] = out / f"{split}.csv"
        files[split].parent.mkdir(parents=True, exist_ok=True)
        files[split].write_text("\n".join(chosen) + "\n")
    return files


def _prepare_movielens(data: Path, out: Path) -> dict[str, Path]:
    root = data / "ml-100k"
    users = {}
    for line in (root / "u.user").read_text(encoding="latin-1").splitlines():
        user, age, gender, occupation, _ = line.split("|")
        users[user] = (gender, age, occupation)
    genres = {}
    for line in (root / "u.item").read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        flags = fields[5:24]
        genres[fields[0]] = str(flags.index("1")) if "1" in flags else "none"
    ratings = [line.split("\t") for line in (root / "u.data").read_text().splitlines()]
    order = sorted(range(len(ratings)),
                   key=lambda i: (int(ratings[i][0]), int(ratings[i][3]), i))
    header = ["user_id", "gender", "age", "occupation", "item_id", "cate_id", "hist_item",
              "hist_cate", "hist_dt", "rating"]
    splits = {"train": [], "valid": [], "test": []}
    by_user: dict[str, list[int]] = {}
    for i in order:
        by_user.setdefault(ratings[i][0], []).append(i)
    for user, events in by_user.items():
        n = len(events)  # (floors for valid and test; train takes the remainder)
        n_valid, n_test = int(0.1 * n), int(0.2 * n)
        n_train = n - n_valid - n_test
        for k, i in enumerate(events):
            _, item, rating, when = ratings[i]
            history = [ratings[j] for j in events[max(0, k - 50):k]]
            row = [user, *users[user], item, genres[item],
                   "|".join(h[1] for h in history), "|".join(genres[h[1]] for h in history),
                   "|".join(str(int(when) - int(h[3])) for h in history), rating]
            split = "train" if k < n_train else "valid" if k < n_train + n_valid else "test"
            splits[split].append(row)
    files = {}
    for split, rows in splits.items():
        files[split] = out / f"{split}.csv"
        _write(files[split], header, rows)
    return files


PREPARE = {"avazu_10k": (_prepare_avazu, "avazu"), "adult": (_prepare_adult, "adult"),
           "movielens": (_prepare_movielens,
                         str(ROOT / "experiments" / "configs" / "movielens_peers.yaml"))}


def load(name: str):
    """(dataset streamed from its cache, the split files, the dataset config), or None when
    the raw files are absent."""
    from hmoe.train.config import DataConfig
    from hmoe.train.trainer import load_data
    from real import data_dir

    root = data_dir()
    needed = {"avazu_10k": "avazu_10k/avazu_test_1000.csv", "adult": "adult/adult.test",
              "movielens": "ml-100k/u.item"}[name]
    if root is None or not (root / needed).is_file():
        return None
    prepare, config = PREPARE[name]
    files = prepare(root, CACHE / name / "files")
    dataset = load_data(DataConfig(source="files", dataset=config,
                                   files={k: str(v) for k, v in files.items()},
                                   cache=str(CACHE / name / "cache")))
    # the run cache's key for these rows: the split files and the dataset config, byte for byte
    digest = hashlib.sha256()
    config_file = Path(config) if config.endswith(".yaml") else \
        ROOT / "configs" / "datasets" / f"{config}.yaml"
    for path in [*(files[k] for k in sorted(files)), config_file]:
        digest.update(Path(path).read_bytes())
    dataset.fingerprint = f"{name}:{digest.hexdigest()}"
    return dataset, files, config


# --------------------------------------------------------------------------------------------
# The logistic-regression floor


def _one_hot_floor(files: dict[str, Path], config: str, seed: int) -> dict[str, float]:
    """Test AUC per task of a logistic regression on one-hot categorical values (and the
    standardised log1p of numeric ones), C chosen on valid from a small grid."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from hmoe.data.preprocess import load_dataset_config

    dataset = load_dataset_config(config)
    schema, source = dataset.schema, dataset.source
    reader = source.reader
    names = list(reader.column_names) if reader.column_names else None

    def read(path):
        with open(path, newline="") as file:
            rows = list(csv.reader(file, skipinitialspace=reader.strip_whitespace))
        header, rows = (rows[0], rows[1:]) if reader.header else (None, rows)
        return names or header, rows

    columns, data = {}, {}
    for split, path in files.items():
        header, rows = read(path)
        index = {c: i for i, c in enumerate(header)}
        columns[split] = index
        data[split] = [r for r in rows if len(r) == len(header)]
    categorical = [f.column or f.name for f in schema.categorical]
    numeric = [f.column or f.name for f in schema.numeric]

    def matrix(split):
        index, rows = columns[split], data[split]
        cats = np.array([[r[index[c]].strip() for c in categorical] for r in rows], dtype=object)
        nums = np.array([[np.log1p(max(float(r[index[c]]), 0.0)) for c in numeric] for r in rows])
        return cats, nums.reshape(len(rows), len(numeric))

    encoder = OneHotEncoder(handle_unknown="ignore", min_frequency=2)
    scaler = StandardScaler()
    cats, nums = matrix("train")
    encoder.fit(cats)
    if numeric:
        scaler.fit(nums)

    def features(split):
        from scipy.sparse import csr_matrix, hstack

        c, n = matrix(split)
        parts = [encoder.transform(c)]
        if numeric:
            parts.append(csr_matrix(scaler.transform(n)))
        return hstack(parts).tocsr()

    def labels(split, label):
        index, rows = columns[split], data[split]
        column = label.column or label.name
        rule = source.labels.get(label.name)
        raw = [r[index[column]].strip() for r in rows]
        if rule is not None and rule.positive is not None:
            return np.array([v in rule.positive for v in raw], dtype=int)
        if rule is not None:
            return np.array([float(v) >= rule.threshold for v in raw], dtype=int)
        return np.array([int(float(v)) for v in raw])

    x = {s: features(s) for s in ("train", "valid", "test")}
    out = {}
    for label in schema.labels:
        y = {s: labels(s, label) for s in ("train", "valid", "test")}
        best = None
        for c in (0.01, 0.1, 1.0):
            model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
            model.fit(x["train"], y["train"])
            auc = roc_auc_score(y["valid"], model.predict_proba(x["valid"])[:, 1])
            if best is None or auc > best[0]:
                best = (auc, model)
        out[label.name] = float(roc_auc_score(y["test"], best[1].predict_proba(x["test"])[:, 1]))
    return out


# --------------------------------------------------------------------------------------------
# The experiment


def run(dataset, seeds, log=print, datasets=("avazu_10k", "adult", "movielens"),
        real: bool = True, budget: list[str] | None = None) -> Section:
    """The peer table (``dataset``, the synthetic world, is not used: peers are real data;
    ``real`` False skips them all). ``budget``: overrides on top of the peers' budget (a smoke
    run's fewer epochs)."""
    rows, numbers, notes = [], {}, []
    for name in datasets if real else ():
        loaded = load(name)
        if loaded is None:
            notes.append(f"{name}: raw files not found, skipped")
            continue
        data, files, config = loaded
        started = time.perf_counter()
        runs = common.run_variants(
            data, {k: [*BUDGET, *v, *(budget or [])] for k, v in VARIANTS[name].items()},
            seeds, log, measure=_epochs)
        floor = _one_hot_floor(files, config, 0)
        numbers[name] = {"seconds": time.perf_counter() - started, "floor": floor,
                         "runs": {v: [{"seed": r.seed, "test": r.test, "valid": r.valid,
                                       **r.extra} for r in rs] for v, rs in runs.items()}}
        for (dataset_name, task), (peer, mean, std) in PEERS.items():
            if dataset_name != name:
                continue
            aucs = {v: values(rs, task, "auc") for v, rs in runs.items()}
            # hmoe's best is chosen on the valid split (choosing on test would flatter it)
            best_name = max(runs, key=lambda v: mean_std(values(runs[v], task, "auc",
                                                                "valid"))[0])
            best_mean, best_std = mean_std(aucs[best_name])
            verdict, gap = _against_peer(aucs[best_name], mean, std)
            same = next(v for v in runs if v.endswith("(the peer's)"))
            same_verdict, same_gap = _against_peer(aucs[same], mean, std)
            for variant, xs in aucs.items():
                epochs = [r.extra.get("epochs") for r in runs[variant]]
                rows.append([name, task, variant, fmt(xs),
                             fmt(values(runs[variant], task, "auc", "valid")),
                             f"{min(epochs)}-{max(epochs)}" if None not in epochs else "",
                             ""])
            rows.append([name, task, f"FuxiCTR {peer} (PEERS.md)", f"{mean:.4f} ± {std:.4f}",
                         "", "", ""])
            rows.append([name, task, "one-hot logistic regression (scikit-learn)",
                         f"{floor[task]:.4f}", "", "", ""])
            rows.append([name, task, f"**hmoe's {peer} ({same})**", fmt(aucs[same]), "", "",
                         f"{same_verdict} the peer ({same_gap:+.4f})"])
            rows.append([name, task, f"**hmoe's best ({best_name})**",
                         f"{best_mean:.4f} ± {best_std:.4f}", "", "",
                         f"{verdict} the peer ({gap:+.4f})"])
    markdown = (
        "Test AUC, mean ± std over seeds " + ", ".join(map(str, seeds)) + ", on the splits "
        "and budget of `../shared/reference/PEERS.md` (experiments/peers.py says how each split "
        "is rebuilt): up to 20 epochs, early stopping on valid AUC with patience 2, lr 1e-3 "
        "x 0.1 on a plateau, Adam, gradient clip 10, dim 16. The peer's figures are FuxiCTR "
        "2.3.10's, measured on another machine. \"hmoe's PEER\" is hmoe's model built like the "
        "peer's, its dense layers initialised as FuxiCTR's are (Xavier-normal weights, zero "
        "biases: `dense_init: xavier_normal`); \"MODEL, PyTorch init\" is the same model "
        "with hmoe's default initialisation (PyTorch's), and \"MODEL, xavier\" one of hmoe's "
        "own with FuxiCTR's. hmoe's best is the model with the "
        "highest mean valid AUC; the verdicts are "
        "computed: ahead or behind when the test gap exceeds two standard errors.\n\n"
        + table(["dataset", "task", "model", "test AUC", "valid AUC", "best epoch", "verdict"],
                rows))
    if not real:
        notes.append("real datasets not used (--no-real)")
    if notes:
        markdown += "\n\n" + "; ".join(notes)
    return Section("0. hmoe beside FuxiCTR on the same splits", markdown, numbers)


def _against_peer(aucs: list[float], mean: float, std: float) -> tuple[str, float]:
    """(verdict, gap) of hmoe's test AUCs against the peer's mean ± std over 3 seeds: ahead
    or behind when the gap exceeds two standard errors of the difference."""
    ours, spread = mean_std(aucs)
    gap = ours - mean
    se = (spread ** 2 / len(aucs) + std ** 2 / 3) ** 0.5
    return ("ahead of" if gap > 2 * se else "behind" if gap < -2 * se
            else "within noise of"), gap


def _epochs(trainer) -> dict[str, float]:
    """The epoch of the best checkpoint (1-based) of a finished run."""
    import torch

    best = torch.load(trainer.checkpoint_dir / "best.pt", weights_only=False)
    steps_per_epoch = max(1, -(-trainer.dataset.source("train").num_rows
                               // trainer.config.train.batch_size))
    return {"epochs": int(best["step"]) // steps_per_epoch}
