"""The trainer: run directory, exact resume (also after kill -9), early stopping, non-finite
losses, IPW weights, bad input before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hmoe.train import Dataset, Trainer, load_data, load_run, load_run_config, read_metrics
from hmoe.train.trainer import predict_scores

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.num_rows=3000", "data.synthetic.num_users=300",
        "data.synthetic.num_ads=600", "data.synthetic.max_len=12", "model.options.dim=8",
        "train.batch_size=256", "train.epochs=2", "train.checkpoint_every=3",
        "train.log_every=2", "train.threads=1", "train.eval_batch_size=1024"]


def tiny_config(*extra: str):
    return load_run_config(None, TINY + list(extra))


@pytest.fixture(scope="module")
def dataset():
    return load_data(tiny_config().data)


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]


def _same_parameters(a: Path, b: Path) -> bool:
    sa = torch.load(a / "checkpoints" / "last.pt", weights_only=False)["model"]
    sb = torch.load(b / "checkpoints" / "last.pt", weights_only=False)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_run_directory_contents(tmp_path, dataset):
    config = tiny_config("train.gradient_cosine_every=4")
    results = Trainer(config, tmp_path / "run", dataset=dataset).fit()
    run = tmp_path / "run"
    for name in ("config.resolved.yaml", "schema.yaml", "model.yaml", "metrics.jsonl",
                 "results.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert load_run_config(str(run / "config.resolved.yaml")) == config
    records = read_metrics(run / "metrics.jsonl")
    kinds = {r["kind"] for r in records}
    assert kinds == {"train", "eval", "grad_cosine", "final"}
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]  # one per epoch
    steps_per_epoch = -(-len(dataset.splits["train"]["labels"]) // 256)
    assert results["steps"] == 2 * steps_per_epoch
    for record in (r for r in records if r["kind"] == "grad_cosine"):
        (value,) = record["cosine"].values()
        assert -1.0 <= value <= 1.0
    assert json.loads((run / "results.json").read_text())["test"] == results["test"]
    for task in results["tasks"]:
        assert 0.5 < results["test"][task]["auc"] <= 1.0  # it learned something
    # The best checkpoint reproduces the reported test metrics.
    loaded = load_run(run, "best", dataset=dataset)
    scores = predict_scores(loaded.model, dataset.splits["test"])
    from hmoe.train.metrics import auc
    column = dataset.schema.task_index(results["tasks"][0])
    assert auc(scores[results["tasks"][0]], dataset.splits["test"]["labels"][:, column]) == \
        pytest.approx(results["test"][results["tasks"][0]]["auc"], abs=1e-12)


def test_interrupted_run_resumes_exactly(tmp_path, dataset):
    config = tiny_config("train.gradient_cosine_every=4")
    expected = Trainer(config, tmp_path / "a", dataset=dataset).fit()

    trainer = Trainer(config, tmp_path / "b", dataset=dataset)
    original, calls = trainer._step, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 11:  # after the checkpoint of step 9, two steps lost
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    trainer._step = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert not (tmp_path / "b" / "results.json").exists()
    # What a kill in the middle of a write leaves: a temporary beside its intact target.
    (tmp_path / "b" / "checkpoints" / ".last.pt.tmp999").write_bytes(b"torn")
    (tmp_path / "b" / ".results.json.tmp999").write_bytes(b"torn")
    resumed = Trainer(config, tmp_path / "b", resume=True, dataset=dataset).fit()
    assert not list((tmp_path / "b").rglob(".*.tmp*"))
    assert resumed["test"] == expected["test"]
    assert _same_parameters(tmp_path / "a", tmp_path / "b")
    assert _without_timing(read_metrics(tmp_path / "a" / "metrics.jsonl")) == \
        _without_timing(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    # Resuming a finished run changes nothing.
    assert Trainer(config, tmp_path / "b", resume=True, dataset=dataset).fit() == resumed


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hmoe", "train", *args, *TINY]


STREAMED = ["--data.source=world", "--data.shuffle_buffer=400", "--train.num_workers=1"]


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed_from_disk"])
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, streamed):
    """A training process killed with SIGKILL mid-run (mid-epoch) resumes from its last
    checkpoint and ends exactly where an uninterrupted run ends; no file in the run directory is
    torn. Streamed: a world written to disk in row groups of 150 rows, read by a worker through
    a 400-row shuffle buffer, so the resume reopens the stream in the middle of a window."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    slow = ["--train.epochs=4", "--train.checkpoint_every=2"]
    if streamed:
        world = tmp_path / "world"
        made = subprocess.run([sys.executable, "-m", "hmoe", "generate", "--rows", "3000",
                               "--out", str(world), "--row-group-rows", "150",
                               "--num_users=300", "--num_ads=600", "--max_len=12"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr
        slow += STREAMED + [f"--data.world={world}"]
    full = subprocess.run(_cli("--out", str(tmp_path / "full"), *slow), env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    process = subprocess.Popen(_cli("--out", str(run), *slow), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        loop = torch.load(last, weights_only=False)["loop"] if last.is_file() else None
        if loop is not None and loop["step"] >= 10 and loop["batch"] > 0:  # mid-epoch
            break
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.fail("the run ended before it could be killed; make it longer")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (run / "results.json").exists()
    records = read_metrics(run / "metrics.jsonl")  # readable, torn last line dropped
    assert records

    resumed = subprocess.run(_cli("--out", str(run), "--resume", *slow), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "results.json").read_text())["test"] == \
        json.loads((tmp_path / "full" / "results.json").read_text())["test"]
    assert _same_parameters(tmp_path / "full", run)
    assert not list(run.rglob(".*.tmp*"))  # no temporary file left behind


def test_non_empty_run_directory_is_not_touched(tmp_path, dataset):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty: resume it"):
        Trainer(tiny_config(), run, dataset=dataset)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_refuses_a_different_config(tmp_path, dataset):
    Trainer(tiny_config("train.max_steps=3"), tmp_path / "run", dataset=dataset).fit()
    with pytest.raises(ValueError, match=r"train.lr"):
        Trainer(tiny_config("train.max_steps=3", "train.lr=0.1"), tmp_path / "run",
                resume=True, dataset=dataset)
    with pytest.raises(ValueError, match="holds no run"):
        Trainer(tiny_config(), tmp_path / "empty", resume=True, dataset=dataset)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, dataset):
    trainer = Trainer(tiny_config(), tmp_path / "run", dataset=dataset)
    forward, calls = trainer.model.forward, [0]

    def poisoned(batch, **kwargs):
        out = forward(batch, **kwargs)
        calls[0] += 1
        if calls[0] == 5:
            first = next(iter(out["logits"]))
            out["logits"][first] = out["logits"][first] * float("nan")
        return out

    trainer.model.forward = poisoned
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 5 \(epoch 1\)"):
        trainer.fit()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert state["loop"]["step"] == 3  # the checkpoint before the bad step
    assert all(torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())


def test_early_stopping_and_best_checkpoint(tmp_path, dataset):
    trainer = Trainer(tiny_config("train.eval_every=2", "train.patience=2", "train.epochs=3"),
                      tmp_path / "run", dataset=dataset)
    values = iter([0.7, 0.8, 0.75, 0.79, 0.9, 0.95])
    trainer._monitored = lambda metrics: next(values)
    results = trainer.fit()
    assert results["stopped_early"]
    assert results["best"] == 0.8 and results["best_step"] == 4
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
    assert best["step"] == 4
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]


def test_ipw_weights_down_weight_repeated_positives(dataset):
    trainer = Trainer(tiny_config("loss.ipw_gamma=1.0"), "/nonexistent/never-written",
                      dataset=dataset)
    batch = {k: torch.as_tensor(v[:512]) for k, v in dataset.splits["train"].items()}
    weights = trainer._sample_weight(batch)
    assert set(weights) == set(trainer.tasks)
    for task, column in zip(trainer.tasks, trainer.label_columns):
        positive = batch["labels"][:, column] == 1
        count = batch["exposure_count"]
        w = weights[task]
        assert torch.all(w[~positive] == 1)
        if positive.sum() > 1 and (count[positive] > 1).any():
            assert w[positive & (count > 1)].max() < w[positive & (count == 1)].min()
    assert Trainer(tiny_config(), "/nonexistent/x", dataset=dataset)._sample_weight(batch) is None


@pytest.mark.parametrize("override, match", [
    ("train.monitor=like/auc", "task 'like' is not trained"),
    ("loss.tasks={nope: {kind: bce}}", r"loss.tasks: names task\(s\) \['nope'\]"),
    ("model.options={bogus: 1}", "bogus"),
    ("model.tasks=[nope]", "nope"),
])
def test_bad_config_fails_before_training(tmp_path, dataset, override, match):
    with pytest.raises(ValueError, match=match):
        Trainer(tiny_config(override), tmp_path / "run", dataset=dataset)
    assert not (tmp_path / "run").exists()


def _broken(dataset: Dataset, split: str, key: str, fn) -> Dataset:
    splits = {s: dict(c) for s, c in dataset.splits.items()}
    splits[split][key] = fn(np.array(splits[split][key]))
    return Dataset(dataset.schema, splits, dataset.ground_truth)


def _set(index, value):
    def fn(a):
        a[index] = value
        return a
    return fn


@pytest.mark.parametrize("split, key, fn, match", [
    ("train", "labels", _set((3, 0), 2.0), r"data \(train split\).*labels must be 0 or 1"),
    ("valid", "labels", _set((0, 1), np.nan), r"data \(valid split\).*labels"),
    ("test", "categorical", _set((0, 0), 10 ** 9), r"data \(test split\).*vocab_size"),
])
def test_bad_data_fails_before_training(tmp_path, dataset, split, key, fn, match):
    with pytest.raises(ValueError, match=match):
        Trainer(tiny_config(), tmp_path / "run", dataset=_broken(dataset, split, key, fn))
    assert not (tmp_path / "run").exists()


def test_empty_or_missing_split_fails_before_training(tmp_path, dataset):
    splits = dict(dataset.splits)
    splits["train"] = {k: v[:0] for k, v in splits["train"].items()}
    with pytest.raises(ValueError, match="'train' split is empty"):
        Trainer(tiny_config(), tmp_path / "run", dataset=Dataset(dataset.schema, splits))
    del splits["train"]
    with pytest.raises(ValueError, match="no 'train' split"):
        Trainer(tiny_config(), tmp_path / "run", dataset=Dataset(dataset.schema, splits))
    assert not (tmp_path / "run").exists()


def test_files_source_trains_from_a_csv_and_a_dataset_config(tmp_path):
    """A click log and a dataset config: preprocessed into the cache, valid and test drawn
    from train, trained, and the cache reused by a second load."""
    rng = np.random.default_rng(0)
    n = 1200
    user = rng.integers(0, 40, n)
    ad = rng.integers(0, 30, n)
    price = rng.lognormal(3, 1, n)
    click = (rng.random(n) < 1 / (1 + np.exp(-(0.05 * (user % 7) - 0.1 * (ad % 5))))).astype(int)
    lines = ["user,ad,price,click"] + [f"u{u},a{a},{p:.3f},{c}" for u, a, p, c
                                       in zip(user, ad, price, click)]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dataset.yaml").write_text(
        "name: tiny_log\n"
        "features:\n"
        "  - {name: user, type: categorical}\n"
        "  - {name: ad, type: categorical}\n"
        "  - {name: price, type: numeric, quantizer: log, log_transform: log1p}\n"
        "labels:\n"
        "  - {name: click}\n"
        "group_id: user\n")
    overrides = ["data.source=files", f"data.dataset={tmp_path / 'dataset.yaml'}",
                 f"data.files={tmp_path / 'log.csv'}", f"data.cache={tmp_path / 'cache'}",
                 "model.preset=dnn", "model.options.dim=8", "train.batch_size=128",
                 "train.epochs=1", "train.threads=1"]
    config = load_run_config(None, overrides)
    data = load_data(config.data)
    sizes = {s: data.source(s).num_rows for s in data.splits}
    # valid and test are drawn by a hash of the row: about 10 % each (binomial sd ~10 rows)
    assert sum(sizes.values()) == n and abs(sizes["valid"] - 120) < 45 \
        and abs(sizes["test"] - 120) < 45
    assert {s: load_data(config.data).source(s).num_rows for s in data.splits} == sizes
    results = Trainer(config, tmp_path / "run", dataset=data).fit()
    assert set(results["test"]) == {"click"} and "gauc" in results["test"]["click"]
    assert (tmp_path / "cache" / "feature_map.yaml").is_file()


@pytest.mark.parametrize("override, match", [
    (["data.source=files"], "data.dataset: source 'files' needs a dataset config"),
    (["data.source=files", "data.dataset=x.yaml"], "data.files: source 'files' needs"),
    (["data.source=files", "data.dataset=x.yaml", "data.files={valid: v.csv}"],
     "keys must be train"),
    (["data.split={valid: 0.7}"], r"data.split.valid: must be a fraction in \(0, 0.5\)"),
    (["data.on_error=ignore"], r"data.on_error: must be one of \['raise', 'skip'\]"),
])
def test_files_source_config_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_run_config(None, override)


def test_files_source_missing_file(tmp_path):
    config = load_run_config(None, ["data.source=files",
                                    f"data.dataset={ROOT / 'configs/datasets/avazu.yaml'}",
                                    f"data.files={tmp_path / 'nope.csv'}"])
    with pytest.raises(ValueError, match="nope.csv does not exist"):
        load_data(config.data)


def test_files_source_malformed_row_raises_or_is_skipped(tmp_path):
    lines = ["user,ad,click"] + [f"u{i % 9},a{i % 7},{i % 2}" for i in range(300)]
    lines[120] = "u1,a2"  # a row with a missing field
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dataset.yaml").write_text(
        "name: broken_log\nfeatures:\n  - {name: user, type: categorical}\n"
        "  - {name: ad, type: categorical}\nlabels:\n  - {name: click}\n")
    base = ["data.source=files", f"data.dataset={tmp_path / 'dataset.yaml'}",
            f"data.files={tmp_path / 'log.csv'}"]
    with pytest.raises(ValueError, match=r"log.csv.*line 121"):
        load_data(load_run_config(None, [*base, f"data.cache={tmp_path / 'c1'}"]).data)
    with pytest.warns(UserWarning):
        data = load_data(load_run_config(None, [*base, f"data.cache={tmp_path / 'c2'}",
                                                "data.on_error=skip"]).data)
    assert sum(data.source(s).num_rows for s in data.splits) == 299
