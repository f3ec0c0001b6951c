"""hmoe train on 2 ranks, end to end through the CLI (real torchrun processes): the run reads
like a single-process one, a killed rank fails the job without tearing a checkpoint, and the run
resumes exactly on 2 ranks, and at another world size (2 -> 1, 1 -> 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmoe.cli import main
from hmoe.distributed import checkpoint
from hmoe.train import load_run

TINY = ["--data.synthetic.num_rows=3000", "--data.synthetic.num_users=200",
        "--data.synthetic.num_ads=400", "--data.synthetic.max_len=8", "--model.options.dim=8",
        "--train.batch_size=128", "--train.threads=1", "--train.progress=off",
        "--train.embedding_optimizer=sgd", "--train.embedding_lr=0.05"]


def _train(*args: str) -> list[str]:
    return [sys.executable, "-m", "hmoe", "train", *TINY, *args]


def _env():
    return {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def test_two_ranks_train_a_run_that_reads_like_a_single_process_one(tmp_path, capsys):
    run = tmp_path / "run"
    done = subprocess.run(_train("--out", str(run), "--nproc", "2", "--train.epochs=2"),
                          env=_env(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] > 0 and set(results["test"]) == {"click", "conversion"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("eval") == 2  # one per epoch, written once
    # the checkpoints are torch.distributed.checkpoint directories, each rank wrote its shards
    names = sorted(path.name for path in (run / "checkpoints").iterdir())
    assert names == ["best.dcp", "last.dcp"], names
    for name in names:
        assert sorted(p.name for p in (run / "checkpoints" / name).glob("*.distcp")) == \
            ["__0_0.distcp", "__1_0.distcp"]
    # eval and load_run read it in one process as they read a one-process run: the metrics of
    # the sharded model evaluated across the ranks are those of the model read back
    assert main(["eval", str(run), "--split", "test"]) == 0
    again = json.loads((run / "eval_test_best.json").read_text())
    assert again.keys() == results["test"].keys()
    for task, metrics in results["test"].items():
        assert again[task] == pytest.approx(metrics, rel=1e-6, abs=1e-9), task
    assert isinstance(load_run(run).model.groups[0].categorical.weight, torch.nn.Parameter)


def _rank_pid(run: Path, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run) in command and f"RANK={rank}".encode() in environ and \
                b"LOCAL_RANK=" + str(rank).encode() in environ:
            return int(entry.name)
    return None


SLOW = ["--train.epochs=4", "--train.checkpoint_every=2", "--train.patience=0",
        "--train.deterministic=true"]


def _last_state(run: Path) -> dict | None:
    """The trainer state of the run's last checkpoint (either kind), None before the first (or
    while one is being moved in)."""
    try:
        if (run / "checkpoints" / "last.pt").is_file():
            return torch.load(run / "checkpoints" / "last.pt", weights_only=False)
        return checkpoint.read_extra(run / "checkpoints" / "last.dcp")
    except (OSError, EOFError, RuntimeError):
        return None


def _start_and_kill(run: Path, ranks: int, at_step: int = 6) -> str:
    """Starts a run on ``ranks`` processes and SIGKILLs one (rank 1, or the only one) once a
    checkpoint at step >= ``at_step`` is written; the job's output."""
    nproc = ["--nproc", str(ranks)] if ranks > 1 else []
    job = subprocess.Popen(_train("--out", str(run), *nproc, *SLOW), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        victim = None
        while time.monotonic() < deadline and job.poll() is None:
            state = _last_state(run)
            if state is not None and state["loop"]["step"] >= at_step:
                victim = _rank_pid(run, 1) if ranks > 1 else job.pid
                if victim is not None:
                    break
            time.sleep(0.05)
        assert victim is not None, "the run ended before a rank could be killed"
        os.kill(victim, signal.SIGKILL)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0  # one rank gone: the job fails, it does not hang
    assert not (run / "results.json").exists()
    return output


def _resume(run: Path, ranks: int) -> subprocess.CompletedProcess:
    nproc = ["--nproc", str(ranks)] if ranks > 1 else []
    done = subprocess.run(_train("--out", str(run), "--resume", *nproc, *SLOW), env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_a_killed_rank_fails_the_job_and_the_run_resumes_exactly(tmp_path):
    """kill -9 of rank 1 mid-run: the job fails naming it, last.dcp is intact, and the run
    resumed on 2 ranks ends bit for bit where an uninterrupted 2-rank run ends (the tables'
    row-wise Adagrad state, the dense optimizer, RNG and data position all come back)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(_train("--out", str(whole), "--nproc", "2", *SLOW), env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = _start_and_kill(killed, 2)
    assert "local_rank: 1" in output and "SIGKILL" in output, output[-3000:]
    state = _last_state(killed)  # intact: written aside, then moved in
    assert state["ranks"] == 2 and state["loop"]["step"] >= 6
    load_run(killed, "last")  # readable in one process as it is
    resumed = _resume(killed, 2)
    assert "resuming" not in resumed.stderr  # same world size: nothing starts afresh
    expected = load_run(whole, "last").model.state_dict()
    got = load_run(killed, "last").model.state_dict()
    assert list(got) == list(expected)
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, different
    assert json.loads((killed / "results.json").read_text()) == \
        json.loads((whole / "results.json").read_text())


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_killed_run_resumes_at_another_world_size(tmp_path, before, after):
    run = tmp_path / "run"
    _start_and_kill(run, before)
    resumed = _resume(run, after)
    assert f"resuming a run of {before} rank(s) on {after}" in resumed.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 4 and set(results["test"]) == {"click", "conversion"}
    # the last checkpoint is now of the new kind, the old one gone
    kinds = {path.name for path in (run / "checkpoints").iterdir() if path.name.startswith("last")}
    assert kinds == {"last.pt" if after == 1 else "last.dcp"}
    assert main(["eval", str(run), "--checkpoint", "last", "--split", "valid"]) == 0
