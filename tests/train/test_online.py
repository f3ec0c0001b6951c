"""Online training (hmoe.train.online): windows of a time-ordered stream, progressive validation,
exact resume after kill -9, and a warm start that equals training straight through."""

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

from hmoe.data.stream import ColumnSource
from hmoe.data.synthetic import SyntheticConfig, generate
from hmoe.train import Trainer, load_run, read_metrics
from hmoe.train.config import RunConfig
from hmoe.train.metrics import auc, calibration, logloss
from hmoe.train.online import parse_window, window_batches
from hmoe.train.trainer import Dataset, _with_vocab, load_snapshots

DAY = 86_400


def _columns(n: int, seed: int = 0, days: int = 5) -> dict[str, torch.Tensor]:
    times = np.sort(np.random.default_rng(seed).integers(0, days * DAY, n))
    return {"labels": torch.arange(n, dtype=torch.float32)[:, None],
            "categorical": torch.zeros(n, 2, dtype=torch.int64),
            "timestamp": torch.as_tensor(times)}


def _windows(source, batch, window, **options):
    return list(window_batches(source, batch, parse_window(window), **options))


# ---- windows of the stream


@pytest.mark.parametrize(("value", "kind", "size"), [("1d", "time", DAY), ("6h", "time", 21_600),
                                                     ("30m", "time", 1800), ("90s", "time", 90),
                                                     ("1w", "time", 7 * DAY), (500, "rows", 500),
                                                     ("500", "rows", 500)])
def test_parse_window(value, kind, size):
    window = parse_window(value)
    assert (window.kind, window.size) == (kind, size)


@pytest.mark.parametrize("value", ["0d", "1y", "", "d", -3, 0, True, 1.5, None])
def test_parse_window_refuses_what_is_not_a_window(value):
    with pytest.raises(ValueError, match="train.window"):
        parse_window(value)


@pytest.mark.parametrize("batch", [7, 64, 1000])
def test_day_windows_partition_the_rows_in_batches_from_each_windows_first_row(batch):
    columns = _columns(1000)
    source = ColumnSource(columns, unit_rows=128)
    out = _windows(source, batch, "1d", time_column="timestamp")
    seen = {}
    for w, rows, _ in out:
        if rows is not None:
            assert (rows["timestamp"] // DAY == w).all()
            assert len(rows["labels"]) <= batch
            seen.setdefault(w, []).append(rows["labels"][:, 0])
    days = columns["timestamp"].numpy() // DAY
    assert sorted(seen) == sorted(set(days.tolist()))
    for w, parts in seen.items():  # every row once, in order; only a window's last batch is short
        assert torch.equal(torch.cat(parts), columns["labels"][days == w, 0])
        assert all(len(p) == batch for p in parts[:-1])
    boundaries = [(w, position) for w, rows, position in out if rows is None]
    assert [w for w, _ in boundaries] == sorted(seen) and boundaries[-1][1] is None


def test_a_stream_started_at_a_boundary_continues_the_same_batches():
    source = ColumnSource(_columns(1000), unit_rows=128)
    out = _windows(source, 50, "1d", time_column="timestamp")
    for k, position in enumerate(p for _, rows, p in out if rows is None and p is not None):
        rest = _windows(source, 50, "1d", time_column="timestamp", start=position)
        expected = [rows for w, rows, _ in out if rows is not None and w > k]
        got = [rows for _, rows, _ in rest if rows is not None]
        assert len(got) == len(expected)
        assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(got, expected))


def test_windows_of_rows_and_a_time_range():
    columns = _columns(1000)
    source = ColumnSource(columns, unit_rows=100)
    out = _windows(source, 64, 300, time_column=None)
    assert [sum(len(r["labels"]) for w2, r, _ in out if w2 == w and r is not None)
            for w in range(4)] == [300, 300, 300, 100]
    ranged = _windows(source, 64, "1d", time_column="timestamp", time_range=(2 * DAY, 4 * DAY))
    rows = torch.cat([r["timestamp"] for _, r, _ in ranged if r is not None])
    expected = columns["timestamp"][(columns["timestamp"] >= 2 * DAY)
                                   & (columns["timestamp"] < 4 * DAY)]
    assert torch.equal(rows, expected) and {w for w, _, _ in ranged} == {2, 3}


def test_time_going_backwards_is_an_error_naming_the_row():
    columns = _columns(1000)
    columns["timestamp"][417] = 3
    with pytest.raises(ValueError, match=r"row 417 of the train split has timestamp 3.*time "
                                         r"order"):
        _windows(ColumnSource(columns, unit_rows=128), 64, "1d", time_column="timestamp")
    with pytest.raises(ValueError, match="no column 'time'"):
        _windows(ColumnSource(_columns(100)), 64, "1d", time_column="time")
    with pytest.raises(ValueError, match="needs data.time_column"):
        _windows(ColumnSource(_columns(100)), 64, "1d", time_column=None)


# ---- the trainer in online mode


def _world(seed: int = 1, rows: int = 4000):
    """A small synthetic world whose train split gets a time column: 5 days, in order; its ads
    in a dynamic vocabulary of half their number (ids are admitted and rows reclaimed)."""
    world = generate(SyntheticConfig(num_rows=rows, num_users=80, num_ads=120, max_len=8,
                                     seed=seed))
    train = dict(world.splits["train"])
    n = len(train["labels"])
    train["timestamp"] = np.sort(np.random.default_rng(seed).integers(0, 5 * DAY, n))
    schema = _with_vocab(world.schema, {"ad_id": {"kind": "dynamic", "capacity": 60,
                                                   "min_count": 2}})
    return Dataset(schema, {**world.splits, "train": train}, world.ground_truth)


def _config(**train) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"time_column": "timestamp", **train.pop("data", {})},
        "model": {"preset": "stem", "options": {"dim": 8}},
        "train": {"mode": "online", "window": "1d", "batch_size": 128, "progress": "off",
                  "threads": 1, "log_every": 5, **train}})


def test_progressive_validation_scores_each_window_before_training_on_it(tmp_path):
    dataset = _world()
    Trainer(_config(snapshot_every=1), tmp_path / "run", dataset=dataset).fit()
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
               if r["kind"] == "window"]
    train = dataset.splits["train"]
    days = train["timestamp"] // DAY
    assert [r["window"] for r in records] == sorted(set(days.tolist()))
    snapshots = dict(load_snapshots(tmp_path / "run"))
    run = load_run(tmp_path / "run", "last", dataset=dataset)
    model = run.model
    click = model.schema.task_index("click")
    moved = []
    for record in records:
        # by hand: the model that tests window w is the snapshot at the step the record names
        model.load_state_dict(snapshots[record["step"]])
        rows = {key: torch.as_tensor(value[days == record["window"]])
                for key, value in train.items()}
        with torch.no_grad():
            scores = torch.sigmoid(model(rows)["logits"]["click"].double()).numpy()
        labels = rows["labels"][:, click].numpy()
        metrics = record["metrics"]["click"]
        assert record["rows"] == len(labels) == metrics["count"]
        assert metrics["auc"] == pytest.approx(auc(scores, labels), abs=1e-9)
        assert metrics["logloss"] == pytest.approx(logloss(scores, labels), rel=1e-6)
        assert metrics["calibration"] == pytest.approx(calibration(scores, labels), rel=1e-6)
        moved.append(record["step"])
    assert moved == sorted(set(moved)) and moved[0] == 0 and moved[-1] > 0  # trained between


def test_a_warm_start_equals_training_straight_through(tmp_path):
    """Days 0-1 in one run, then days 2-4 in a warm start from it, end where one run over
    days 0-4 ends: the model (with MultiEmbedding's fused optimizer state and the dynamic
    vocabulary's id map), the dense optimizer and the RNG all carry over, and each window's
    batches start at its first row."""
    dataset = _world()
    whole = Trainer(_config(), tmp_path / "whole", dataset=dataset)
    whole.fit()
    Trainer(_config(data={"time_range": [0, 2 * DAY]}), tmp_path / "first",
            dataset=dataset).fit()
    Trainer(_config(data={"time_range": [2 * DAY, 5 * DAY]}), tmp_path / "then",
            dataset=dataset, init_from=tmp_path / "first").fit()
    expected = load_run(tmp_path / "whole", "last", dataset=dataset).model.state_dict()
    got = load_run(tmp_path / "then", "last", dataset=dataset).model.state_dict()
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, different

    def windows(run):
        return {r["window"]: r["metrics"] for r in read_metrics(tmp_path / run / "metrics.jsonl")
                if r["kind"] == "window"}

    assert windows("then") == {w: m for w, m in windows("whole").items() if w >= 2}


def test_a_warm_start_refuses_another_schema_or_model(tmp_path):
    dataset = _world()
    Trainer(_config(data={"time_range": [0, DAY]}), tmp_path / "first", dataset=dataset).fit()
    other = _world(seed=2, rows=3000)  # other vocab sizes
    with pytest.raises(ValueError, match="--init-from .*schema differs"):
        Trainer(_config(), tmp_path / "a", dataset=other, init_from=tmp_path / "first")
    bigger = RunConfig.from_dict({**_config().to_dict(),
                                  "model": {"preset": "stem", "options": {"dim": 16}}})
    with pytest.raises(ValueError, match="--init-from .*model differs"):
        Trainer(bigger, tmp_path / "b", dataset=dataset, init_from=tmp_path / "first")
    with pytest.raises(ValueError, match="not a run directory"):
        Trainer(_config(), tmp_path / "c", dataset=dataset, init_from=tmp_path)


def test_online_config_is_checked():
    with pytest.raises(ValueError, match="train.window: online training needs a window"):
        RunConfig.from_dict({"train": {"mode": "online"}})
    with pytest.raises(ValueError, match="train.window: applies to train.mode: online"):
        RunConfig.from_dict({"train": {"window": "1d"}})
    with pytest.raises(ValueError, match="data.time_range: needs data.time_column"):
        RunConfig.from_dict({"data": {"time_range": [0, 10]}})
    with pytest.raises(ValueError, match="data.time_range"):
        RunConfig.from_dict({"data": {"time_column": "t", "time_range": [10, 0]}})


# ---- exact resume after kill -9, through the CLI (real processes)

_CLI = ["--data.synthetic.num_rows=6000", "--data.synthetic.num_users=100",
        "--data.synthetic.num_ads=200", "--data.synthetic.max_len=8", "--model.options.dim=8",
        "--train.mode=online", "--train.window=300", "--train.batch_size=64",
        "--train.threads=1", "--train.progress=off", "--train.log_every=3",
        "--data.vocab={ad_id: {kind: dynamic, capacity: 60, min_count: 2}}"]


def _hmoe_train(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hmoe", "train", "--out", str(out), *_CLI, *extra]


def test_an_online_run_killed_mid_pass_resumes_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(_hmoe_train(tmp_path / "whole"), env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    job = subprocess.Popen(_hmoe_train(killed), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    last = killed / "checkpoints" / "last.pt"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            try:
                state = torch.load(last, weights_only=False) if last.is_file() else None
            except (OSError, EOFError, RuntimeError):
                state = None
            if state is not None and state["loop"]["online"]["windows"] >= 3:
                os.kill(job.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run(_hmoe_train(killed, "--resume"), env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)
    got = torch.load(last, weights_only=False)
    different = [k for k in expected["model"]
                 if not torch.equal(got["model"][k], expected["model"][k])]
    assert not different, different
    assert got["loop"]["online"] == expected["loop"]["online"]

    def lines(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] in ("window", "final")]

    assert lines(killed) == lines(tmp_path / "whole")


_FILES_CONFIG = """
name: daily
features:
  - {name: user, type: categorical}
  - {name: ad, type: categorical}
  - {name: price, type: numeric, quantizer: quantile, num_bins: 4}
labels:
  - {name: click}
"""


def _day_csv(path: Path, seed: int, ads: range) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["user,ad,price,click"]
    for _ in range(400):
        lines.append(f"u{rng.integers(30)},a{rng.choice(ads)},{rng.random() * 10:.2f},"
                     f"{rng.integers(2)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_warm_start_on_new_files_keeps_the_ids(tmp_path):
    """The next day's raw file, with ads never seen before, is encoded with the vocabularies
    of the run it warm-starts from (its own cache beside that one): the schema is the same, a
    known ad keeps its id and a new one is out of vocabulary."""
    from hmoe.data.preprocess import load_preprocessed

    (tmp_path / "daily.yaml").write_text(_FILES_CONFIG)
    day1 = _day_csv(tmp_path / "day1.csv", 1, range(0, 20))
    day2 = _day_csv(tmp_path / "day2.csv", 2, range(10, 30))

    def config(files, **data):
        return RunConfig.from_dict({
            "data": {"source": "files", "dataset": str(tmp_path / "daily.yaml"),
                     "files": str(files), **data},
            "model": {"preset": "dnn", "tasks": ["click"], "options": {"dim": 4}},
            "train": {"epochs": 1, "batch_size": 64, "progress": "off", "threads": 1}})

    cache = tmp_path / "cache1"
    first = Trainer(config(day1, cache=str(cache)), tmp_path / "run1")
    first.fit()
    second = Trainer(config(day2), tmp_path / "run2", init_from=tmp_path / "run1")
    assert second.dataset.schema == first.dataset.schema
    second.fit()
    fitted = load_preprocessed(cache)
    nxt = load_preprocessed(f"{cache.resolve()}-next")
    assert nxt.vocabulary("ad") == fitted.vocabulary("ad")
    ids = {value: i + 1 for i, value in enumerate(fitted.vocabulary("ad"))}
    raw = [line.split(",")[1] for line in day2.read_text().splitlines()[1:]]
    encoded = nxt.columns()["categorical"][:, 1].tolist()
    assert encoded == [ids.get(value, 0) for value in raw]
    assert 0 in encoded and any(e > 0 for e in encoded)


def test_online_training_on_raw_files_with_a_time_column(tmp_path):
    """A dataset config's source.time_column reaches online training through the cache."""
    (tmp_path / "daily.yaml").write_text(_FILES_CONFIG + "source:\n  time_column: ts\n")
    rng = np.random.default_rng(0)
    times = np.sort(rng.integers(1_700_000_000, 1_700_000_000 + 3 * DAY, 600))
    lines = ["user,ad,price,click,ts"] + [
        f"u{rng.integers(30)},a{rng.integers(20)},{rng.random() * 10:.2f},{rng.integers(2)},{t}"
        for t in times]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    config = RunConfig.from_dict({
        "data": {"source": "files", "dataset": str(tmp_path / "daily.yaml"),
                 "files": str(tmp_path / "log.csv"), "cache": str(tmp_path / "cache"),
                 "time_column": "timestamp"},
        "model": {"preset": "dnn", "tasks": ["click"], "options": {"dim": 4}},
        "train": {"mode": "online", "window": "1d", "batch_size": 64, "progress": "off",
                  "threads": 1}})
    Trainer(config, tmp_path / "run").fit()
    windows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
               if r["kind"] == "window"]
    assert [r["window"] for r in windows] == sorted(set((times // DAY).tolist()))
    assert 0 < sum(r["rows"] for r in windows) < len(times)  # the train share of the rows
