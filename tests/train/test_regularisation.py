"""The regularisation deep CTR models need on small data (FuxiCTR's budget, PEERS.md): dropout
in experts and towers, an L2 penalty on the embedding rows a batch reads, lr decay on a
plateau, and early stopping on the mean of the tasks' AUCs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.models import preset, preset_config
from hmoe.train import Dataset, Trainer, load_run_config, read_metrics


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticConfig(num_rows=2000, num_users=100, num_ads=200, max_len=7,
                                    seed=3))


def _batch(world, n=64, split="train"):
    return {k: torch.as_tensor(v[:n]) for k, v in world.splits[split].items()}


def test_dropout_reaches_every_expert_and_tower(world):
    config = preset_config("mmoe", world.schema, dropout=0.3, dim=8)
    assert {e.dropout for e in config.experts} == {0.3}
    assert {t.dropout for t in config.tasks} == {0.3}
    assert {e.dropout for e in preset_config("mmoe", world.schema).experts} == {0.0}
    torch.manual_seed(0)
    model = preset("mmoe", world.schema, dropout=0.3, dim=8)
    batch = _batch(world)
    model.train()
    a, b = (model(batch)["logits"]["click"] for _ in range(2))
    assert not torch.equal(a, b)  # dropout draws differ
    model.eval()
    a, b = (model(batch)["logits"]["click"] for _ in range(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dropout"):
        preset_config("mmoe", world.schema, dropout=1.5)


def test_the_embedding_penalty_is_the_norm_of_the_rows_read(world):
    """aux_losses["embedding_l2"] = mean over the batch of Σ ||row||² over the rows each row
    read (categorical ids and the valid steps of its sequences; padding is no read), and its
    gradient reaches those rows only."""
    torch.manual_seed(0)
    model = preset("stem", world.schema, dim=4, expert_hidden=(8,), tower=())
    batch = _batch(world, 32)
    out = model(batch, embedding_l2=True)
    schema = world.schema
    expected = torch.zeros((), dtype=torch.float64)
    read = set()
    for group in model.groups:
        table = group.categorical
        weight = table.weight.detach().double()  # (N, K, D)
        ids = batch["categorical"] + table.offsets[:-1]  # (B, F) global rows
        rows = ids.reshape(-1).tolist()
        for s in schema.sequence:
            lo = int(table.offsets[schema.categorical_index(s.item)])
            for r, length in enumerate(batch[f"seq/{s.name}/lengths"].tolist()):
                rows += (batch[f"seq/{s.name}"][r, :length] + lo).tolist()
        expected += sum(weight[row].pow(2).sum() for row in rows)
        read |= set(rows)
    expected /= 32
    got = out["aux_losses"]["embedding_l2"]
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()
    assert "embedding_l2" not in model(batch)["aux_losses"]  # only on request
    got.backward()
    grad = model.groups[0].categorical.weight.grad  # (N, K, D)
    touched = set(torch.nonzero(grad.abs().sum((1, 2))).reshape(-1).tolist())
    assert touched == read


def _fit(tmp_path, world, *extra, name="run"):
    config = load_run_config(None, [
        "model.preset=mmoe", "model.tasks=[click, conversion]", "model.options.dim=4",
        "train.batch_size=128", "train.threads=1", "train.eval_every=3", "train.epochs=2",
        "train.progress=off", *extra])
    dataset = Dataset(world.schema, dict(world.splits))
    trainer = Trainer(config, tmp_path / name, dataset=dataset)
    return trainer, trainer.fit()


def test_the_penalty_enters_the_loss_and_is_logged(tmp_path, world):
    trainer, _ = _fit(tmp_path, world, "train.embedding_l2=0.01", "train.log_every=2")
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert train and all(r["losses"]["embedding_l2"] > 0 for r in train)
    plain, _ = _fit(tmp_path, world, "train.log_every=2", name="plain")
    a = trainer.model.groups[0].categorical.weight
    b = plain.model.groups[0].categorical.weight
    assert a.detach().norm() < b.detach().norm()  # the penalty shrinks the rows read


def test_lr_decays_after_each_evaluation_that_does_not_improve(tmp_path, world):
    _fit(tmp_path, world, "train.lr_decay=0.1", "train.patience=0", "train.monitor=mean/auc",
         "train.lr=0.05")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    values = [np.mean([r["metrics"][t]["auc"] for t in ("click", "conversion")])
              for r in evals]
    best, bad = -1.0, 0
    for value in values:
        if value > best:
            best = value
        else:
            bad += 1
    lrs = [r["lr"][0] for r in records if r["kind"] == "lr"]
    assert len(lrs) == bad  # one decay per non-improving evaluation
    assert lrs == pytest.approx([0.05 * 0.1 ** (i + 1) for i in range(bad)])


def test_the_mean_monitor_follows_the_mean_of_the_tasks(tmp_path, world):
    trainer, results = _fit(tmp_path, world, "train.monitor=mean/auc")
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    means = [np.mean([r["metrics"][t]["auc"] for t in ("click", "conversion")]) for r in evals]
    best = max(range(len(means)), key=lambda i: means[i])
    assert torch.load(tmp_path / "run" / "checkpoints" / "best.pt",
                      weights_only=False)["step"] == evals[best]["step"]


@pytest.mark.parametrize("key, value, message", [
    ("train.lr_decay", "1.0", "must be in \\(0, 1\\)"),
    ("train.lr_decay", "-0.5", "train.lr_decay"),
    ("train.embedding_l2", "-1", "train.embedding_l2"),
])
def test_bad_settings_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [f"{key}={value}"])
