"""hmoe train on 2 ranks, end to end through the CLI (real torchrun processes): the run reads
like a single-process one, a killed rank fails the job without tearing a checkpoint, and the run
resumes on one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from hmoe.cli import main
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
    # eval and load_run read it as they read a one-process run: same metrics
    assert main(["eval", str(run), "--split", "test"]) == 0
    assert json.loads((run / "eval_test_best.json").read_text()) == results["test"]
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


def test_a_killed_rank_fails_the_job_and_the_run_resumes_on_one_process(tmp_path):
    run = tmp_path / "run"
    slow = ["--train.epochs=6", "--train.checkpoint_every=2", "--train.patience=0"]
    job = subprocess.Popen(_train("--out", str(run), "--nproc", "2", *slow), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    last = run / "checkpoints" / "last.pt"
    try:
        deadline = time.monotonic() + 300
        victim = None
        while time.monotonic() < deadline and job.poll() is None:
            loop = torch.load(last, weights_only=False)["loop"] if last.is_file() else None
            if loop is not None and loop["step"] >= 6:
                victim = _rank_pid(run, 1)
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
    assert "local_rank: 1" in output and "SIGKILL" in output, output[-3000:]
    assert not (run / "results.json").exists()
    state = torch.load(last, weights_only=False)  # intact (written by rename)
    assert state["ranks"] == 2 and state["loop"]["step"] >= 6
    resumed = subprocess.run(_train("--out", str(run), "--resume", *slow), env=_env(),
                             capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming a run of 2 rank(s) on 1" in resumed.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 6 and set(results["test"]) == {"click", "conversion"}
