r"""Load test of the prediction service (``hmoe serve``) with a real HTTP client, against a
no-batching baseline.

What runs:

- the model: ``--artifact DIR`` (written by ``hmoe export``), or ``--run RUN_DIR`` (exported
  here to a temporary directory with ``hmoe.serving.export``), or neither: a quick model is
  trained here first (``hmoe train --config quickstart --data.synthetic.num_rows=N
  --train.epochs=1``, N = ``--train-rows``, default 60,000) and exported. The README's
  quickstart model (600k rows, ~2.5 min to train) is benched with
  ``--run runs/quickstart-...`` (its run directory). The AOTInductor package is compiled
  (~40 s) only when the aoti server is asked for.
- the requests: real rows of the model's data, the first ``--pool-rows`` rows of the run's test
  split (a synthetic run's split is regenerated from its config) turned back into raw JSON rows
  with ``predictor.encoder.rows``; each request holds ``--rows-per-request`` rows (default 1:
  an ads ranking call scores one candidate or a few; try 8), cycling through the pool. The
  bodies are serialised once, before the clock starts.
- the servers, each a subprocess on 127.0.0.1 (a free port), one at a time: started, waited
  for (``GET /health`` answers 200), checked (one request of 8 rows must score what the eager
  predictor scores in this process, within 1e-4), measured at every concurrency, stopped with
  SIGTERM:
      eager / exported / aoti   ``python -m hmoe serve ART --mode M --threads T`` (dynamic
                                batching: ``--max-batch``, ``--max-wait-ms``, the service's
                                defaults unless given);
      baseline                  benchmarks/_serve_baseline.py: the eager predictor behind a
                                minimal FastAPI endpoint (a plain ``def`` in FastAPI's
                                threadpool, one request at a time through the model, no
                                batching; its docstring says exactly what it does);
      null                      (not run by default) the same file's ``--null`` app: no model,
                                a constant answer per row; the ceiling of the HTTP stack and
                                of this client on this machine.
- the client: this process, one asyncio loop, C workers at concurrency C, each with its own
  keep-alive HTTP/1.1 connection, sending requests back to back: ``--warmup-seconds`` untimed,
  then ``--seconds`` measured. ``--client raw`` (the default) speaks HTTP/1.1 over asyncio
  streams itself (a request is one write of prebuilt bytes; the answer is read by its
  Content-Length; ~0.1 ms of client CPU a request); ``--client httpx`` posts with one
  ``httpx.AsyncClient`` of one connection per worker (~1 ms of client CPU a request: at
  concurrency 64 on a 2-core machine the client then takes a whole core from the server; a
  shared httpx pool is worse still, cf. encode/httpx#3215). A request's latency is
  ``time.perf_counter()`` around it (sending, waiting, reading the whole answer). Every answer
  must be 200 and hold one prediction (every task, a probability) per row; anything else,
  timeouts and connection errors included, is an error: counted, reported, never dropped
  silently (the exit status is 1 when any request failed).

Reported per server and concurrency: requests/s and rows/s of the answered requests over the
measured window, p50 / p99 latency (ms) of the answered requests, errors, the mean rows per
model call (the service's /metadata counters; the baseline calls the model once a request), and
the CPU used by the server process and by the client (cores: 1.00 = one core busy). Then the
goals, from the measured numbers:
    (a) p99 < 20 ms at concurrency 8, for each of eager / exported / aoti;
    (b) requests/s at concurrency 64 >= 3x the baseline's at concurrency 64.

The client and the server share this machine's cores (on a 2-core machine: one asyncio client
and one server process, the server's torch on ``--server-threads`` threads, default 1): the
client's CPU column shows what it takes from the server.

    python benchmarks/bench_serve.py                                  # trains a quick model
    python benchmarks/bench_serve.py --run runs/quickstart-...        # the README's model
    python benchmarks/bench_serve.py --artifact models/quick --servers exported,baseline
    python benchmarks/bench_serve.py --quick                          # smoke-test sizes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _harness import _cpu_model, _version, print_aligned  # noqa: E402

SERVERS = ("baseline", "eager", "exported", "aoti", "null")
DEFAULT_SERVERS = ("baseline", "eager", "exported", "aoti")
HMOE_MODES = ("eager", "exported", "aoti")
P99_GOAL_MS = 20.0  # goal (a): p99 below this at concurrency 8
P99_GOAL_CONCURRENCY = 8
QPS_GOAL_RATIO = 3.0  # goal (b): this many times the baseline's requests/s at concurrency 64
QPS_GOAL_CONCURRENCY = 64
CHECK_ROWS = 8  # rows of the agreement check made on every server before it is measured
CHECK_TOLERANCE = 1e-4  # largest |probability difference| from the eager predictor here
DEFAULTS = {"train_rows": 60_000, "seconds": 10.0, "warmup_seconds": 2.0,
            "concurrency": "1,8,64", "servers": ",".join(DEFAULT_SERVERS)}
QUICK = {"train_rows": 8_000, "seconds": 1.0, "warmup_seconds": 0.2, "concurrency": "1,8",
         "servers": "exported,baseline"}
QUICK_MAX_STEPS = 5


@dataclasses.dataclass
class Measurement:
    server: str
    concurrency: int
    rows_per_request: int
    seconds: float  # the measured window: its start to the last answer
    requests: int  # answered correctly
    errors: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    rows_per_call: float | None  # mean rows per model call (the service's counters)
    server_cpu: float | None  # cores used by the server process over the window
    client_cpu: float  # cores used by this process over the window
    error_examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else math.nan

    @property
    def rows_per_s(self) -> float:
        return self.requests_per_s * self.rows_per_request


@dataclasses.dataclass
class ServerRun:
    server: str
    command: list[str]
    startup_s: float | None = None
    check_max_abs_diff: float | None = None
    exit_code: int | None = None
    failure: str | None = None  # why it was not (fully) measured
    skipped: str | None = None  # why it was not started (not a failure)


# --------------------------------------------------------------------------------------------
# The model and the request rows


def _run(command: list[str], what: str) -> None:
    print(f"{what}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
    print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)


def prepare_artifact(args, workdir: Path) -> tuple[Path, Path | None]:
    """(artifact directory, run directory of its rows)."""
    if args.artifact is not None:
        manifest = json.loads((args.artifact / "artifact.json").read_text(encoding="utf-8"))
        run = Path(manifest["run"]) if manifest.get("run") else None
        return args.artifact, run
    run = args.run
    if run is None:
        run = workdir / "run"
        command = [sys.executable, "-m", "hmoe", "train", "--config", "quickstart",
                   "--out", str(run), f"--data.synthetic.num_rows={args.train_rows}",
                   "--train.epochs=1", "--train.progress=off"]
        if args.quick:
            command.append(f"--train.max_steps={QUICK_MAX_STEPS}")
        _run(command, "train")
    import hmoe.serving

    artifact = workdir / "artifact"
    devices = ("cpu",) if "aoti" in args.servers else ()
    print(f"export: hmoe.serving.export({str(run)!r}, {str(artifact)!r}, devices={devices})",
          flush=True)
    start = time.perf_counter()
    hmoe.serving.export(run, artifact, devices=devices)
    print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    return artifact, run


def request_rows(run: Path | None, predictor, count: int) -> list[dict]:
    """The first ``count`` rows of the run's test split as raw JSON rows."""
    if run is None or not (run / "config.resolved.yaml").is_file():
        raise SystemExit(f"the artifact's run directory {run} is not here: its test split is "
                         f"where the request rows come from; give --run RUN_DIR instead")
    from hmoe.train.trainer import load_run

    start = time.perf_counter()
    columns = load_run(run).dataset.source("test").columns(count)
    rows = predictor.encoder.rows(columns, 0, count)
    print(f"request rows: {len(rows):,} rows of {run}'s test split "
          f"({time.perf_counter() - start:.1f} s to read)", flush=True)
    return rows


def request_bodies(rows: list[dict], per_request: int) -> list[bytes]:
    if per_request > len(rows):
        raise SystemExit(f"--rows-per-request {per_request} exceeds the {len(rows)} pool rows")
    return [json.dumps({"rows": rows[i:i + per_request]}).encode()
            for i in range(0, len(rows) - per_request + 1, per_request)]


# --------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(server: str, artifact: Path, port: int, args) -> list[str]:
    if server in ("baseline", "null"):
        return [sys.executable, str(HERE / "_serve_baseline.py"), str(artifact),
                "--port", str(port), "--threads", str(args.server_threads),
                "--log-level", "warning"] + (["--null"] if server == "null" else [])
    command = [sys.executable, "-m", "hmoe", "serve", str(artifact), "--port", str(port),
               "--mode", server, "--threads", str(args.server_threads), "--log-level", "warning"]
    if args.max_batch is not None:
        command += ["--max-batch", str(args.max_batch)]
    if args.max_wait_ms is not None:
        command += ["--max-wait-ms", str(args.max_wait_ms)]
    return command


class Server:
    """A server subprocess: started, waited for until /health answers 200, stopped."""

    def __init__(self, command: list[str], port: int, log: Path):
        self.command, self.port, self.log_path = command, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        import httpx

        start = time.perf_counter()
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed by stop)
        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode} before answering "
                                   f"/health:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"/health did not answer 200 in {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AttributeError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, then waits (kills after ``timeout``); the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


# --------------------------------------------------------------------------------------------
# The client


def check_answer(status: int, body: bytes, rows: int, tasks: Sequence[str]) -> str | None:
    """Why an answer (HTTP status, body) is not a correct answer to a request of ``rows`` rows
    (None if it is)."""
    text = body[:200].decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {text}"
    try:
        predictions = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable answer ({type(error).__name__}: {error}): {text}"
    if not isinstance(predictions, list) or len(predictions) != rows:
        return f"{len(predictions) if isinstance(predictions, list) else predictions!r} " \
               f"predictions for {rows} rows"
    for prediction in predictions:
        if not isinstance(prediction, dict) or any(
                not isinstance(prediction.get(t), float) or not 0 <= prediction[t] <= 1
                for t in tasks):
            return f"a prediction is not a probability per task {list(tasks)}: {prediction!r}"
    return None


class ClientError(Exception):
    """A request that got no HTTP answer: refused, reset, timed out, or an unreadable answer."""


class RawConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams, speaking what this benchmark
    needs and no more: ``POST path`` with a JSON body, answers framed by Content-Length (what
    uvicorn sends for a JSON response). A connection the server closes, or one that failed, is
    opened again by the next request."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: ").encode()

    async def post(self, body: bytes) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._post(body), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, ValueError) as error:
            await self.close()
            raise ClientError(f"{type(error).__name__}: {error}") from None

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"%s%d\r\n\r\n%s" % (self.head, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        length, close = None, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise ValueError(f"transfer-encoding {value.strip()!r} is not read by this "
                                 f"client (answers must have a Content-Length)")
        if length is None:
            raise ValueError("an answer without Content-Length")
        answer = await self.reader.readexactly(length)
        if close:
            await self.close()
        return int(status_line[1]), answer

    async def close(self) -> None:
        if self.writer is not None:
            writer, self.reader, self.writer = self.writer, None, None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class HttpxConnection:
    """The same interface over an ``httpx.AsyncClient`` of one keep-alive connection."""

    def __init__(self, url: str, timeout: float):
        import httpx

        self.client = httpx.AsyncClient(
            base_url=url, timeout=timeout,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            headers={"content-type": "application/json"})
        self.errors = httpx.HTTPError

    async def post(self, body: bytes) -> tuple[int, bytes]:
        try:
            response = await self.client.post("/predict", content=body)
        except self.errors as error:
            raise ClientError(f"{type(error).__name__}: {error}") from None
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


@dataclasses.dataclass
class _Tally:
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def fail(self, why: str) -> None:
        self.errors += 1
        if len(self.examples) < 5:
            self.examples.append(why)


async def _drive(connections: Sequence, bodies: list[bytes], offset: int, seconds: float,
                 rows: int, tasks: Sequence[str]) -> tuple[_Tally, float, int]:
    """One worker per connection, posting back to back for ``seconds``: (tally, elapsed
    seconds from the start to the last answer, the next body offset)."""
    tally = _Tally()
    counter = [offset]
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(connection):
        while time.perf_counter() < deadline:
            body = bodies[counter[0] % len(bodies)]
            counter[0] += 1
            began = time.perf_counter()
            try:
                status, answer = await connection.post(body)
            except ClientError as error:
                tally.fail(str(error))
                continue
            elapsed_ms = (time.perf_counter() - began) * 1e3
            problem = check_answer(status, answer, rows, tasks)
            if problem is None:
                tally.latencies_ms.append(elapsed_ms)
            else:
                tally.fail(problem)

    await asyncio.gather(*(worker(connection) for connection in connections))
    return tally, time.perf_counter() - start, counter[0]


async def _served(url: str) -> tuple[int, int] | None:
    """(batches, rows) scored so far by an hmoe service (None for the baseline)."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            served = (await client.get(url + "/metadata")).json()["served"]
        return int(served["batches"]), int(served["rows"])
    except Exception:  # noqa: BLE001  (the baseline has no /metadata)
        return None


async def measure(server: Server, name: str, bodies: list[bytes], concurrency: int, args,
                  tasks: Sequence[str], offset: int) -> tuple[Measurement, int]:
    if args.client == "raw":
        connections = [RawConnection("127.0.0.1", server.port, args.request_timeout)
                       for _ in range(concurrency)]
    else:
        connections = [HttpxConnection(server.url, args.request_timeout)
                       for _ in range(concurrency)]
    try:
        if args.warmup_seconds > 0:
            _, _, offset = await _drive(connections, bodies, offset, args.warmup_seconds,
                                        args.rows_per_request, tasks)
        before = await _served(server.url)
        cpu_server, cpu_client = server.cpu_seconds(), time.process_time()
        tally, elapsed, offset = await _drive(connections, bodies, offset, args.seconds,
                                              args.rows_per_request, tasks)
        cpu_client = (time.process_time() - cpu_client) / elapsed
        after_cpu = server.cpu_seconds()
        server_cpu = None if cpu_server is None or after_cpu is None \
            else (after_cpu - cpu_server) / elapsed
        after = await _served(server.url)
    finally:
        for connection in connections:
            await connection.close()
    rows_per_call = None
    if before is not None and after is not None and after[0] > before[0]:
        rows_per_call = (after[1] - before[1]) / (after[0] - before[0])
    elif name == "baseline":
        rows_per_call = float(args.rows_per_request)  # one model call a request
    latencies = sorted(tally.latencies_ms)
    return Measurement(
        name, concurrency, args.rows_per_request, elapsed, len(latencies), tally.errors,
        percentile(latencies, 0.50), percentile(latencies, 0.99),
        sum(latencies) / len(latencies) if latencies else math.nan,
        latencies[-1] if latencies else math.nan, rows_per_call, server_cpu, cpu_client,
        tally.examples), offset


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not sorted_values:
        return math.nan
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def agreement(server: Server, rows: list[dict], predictor) -> float:
    """Largest |probability difference| between the server's answer to ``rows`` and the eager
    predictor of this process (raises on a wrong answer)."""
    import httpx

    response = httpx.post(server.url + "/predict", json={"rows": rows}, timeout=60)
    problem = check_answer(response.status_code, response.content, len(rows), predictor.tasks)
    if problem is not None:
        raise RuntimeError(f"the check request failed: {problem}")
    expected = predictor.predict(rows)
    got = response.json()["predictions"]
    return max(abs(g[t] - e[t]) for g, e in zip(got, expected) for t in predictor.tasks)


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def print_results(results: Sequence[Measurement]) -> None:
    lines = [["server", "conc", "requests", "req/s", "rows/s", "p50 ms", "p99 ms", "max ms",
              "errors", "rows/call", "server cpu", "client cpu"]]
    for m in results:
        lines.append([m.server, str(m.concurrency), f"{m.requests:,}",
                      _fmt(m.requests_per_s, ",.1f"), _fmt(m.rows_per_s, ",.1f"),
                      _fmt(m.p50_ms, ".2f"), _fmt(m.p99_ms, ".2f"), _fmt(m.max_ms, ".1f"),
                      str(m.errors), _fmt(m.rows_per_call, ".2f"), _fmt(m.server_cpu, ".2f"),
                      _fmt(m.client_cpu, ".2f")])
    print_aligned(lines, names=1)


def evaluate_goals(results: Sequence[Measurement], servers: Sequence[str]) -> list[dict]:
    """The two goals, from the measurements (a goal is met only without errors)."""
    find = {(m.server, m.concurrency): m for m in results}
    goals = []
    for mode in (s for s in HMOE_MODES if s in servers):
        m = find.get((mode, P99_GOAL_CONCURRENCY))
        goal = {"goal": "a", "server": mode,
                "text": f"{mode}: p99 < {P99_GOAL_MS:g} ms at concurrency "
                        f"{P99_GOAL_CONCURRENCY}"}
        if m is None or m.requests == 0:
            goal.update(met=None, verdict="not measured")
        else:
            met = m.p99_ms < P99_GOAL_MS and m.errors == 0
            goal.update(met=met, value=m.p99_ms, errors=m.errors)
            if met:
                verdict = f"met: p99 {m.p99_ms:.2f} ms"
            elif m.p99_ms >= P99_GOAL_MS:
                verdict = (f"MISSED: p99 {m.p99_ms:.2f} ms, {m.p99_ms - P99_GOAL_MS:.2f} ms "
                           f"({m.p99_ms / P99_GOAL_MS:.2f}x) over the limit")
            else:
                verdict = f"MISSED: p99 {m.p99_ms:.2f} ms but {m.errors} errors"
            goal["verdict"] = verdict
        goals.append(goal)
    base = find.get(("baseline", QPS_GOAL_CONCURRENCY))
    for mode in (s for s in HMOE_MODES if s in servers):
        m = find.get((mode, QPS_GOAL_CONCURRENCY))
        goal = {"goal": "b", "server": mode,
                "text": f"{mode}: req/s at concurrency {QPS_GOAL_CONCURRENCY} >= "
                        f"{QPS_GOAL_RATIO:g}x the baseline's"}
        if m is None or base is None or m.requests == 0 or base.requests == 0:
            goal.update(met=None, verdict="not measured")
        else:
            ratio = m.requests_per_s / base.requests_per_s
            met = ratio >= QPS_GOAL_RATIO and m.errors == 0
            goal.update(met=met, value=ratio, errors=m.errors)
            detail = (f"{m.requests_per_s:,.1f} / {base.requests_per_s:,.1f} req/s = "
                      f"{ratio:.2f}x")
            if met:
                goal["verdict"] = f"met: {detail}"
            elif ratio < QPS_GOAL_RATIO:
                share = m.requests_per_s / (QPS_GOAL_RATIO * base.requests_per_s)
                goal["verdict"] = (f"MISSED: {detail}, {QPS_GOAL_RATIO - ratio:.2f}x short "
                                   f"({share:.0%} of the target)")
            else:
                goal["verdict"] = f"MISSED: {detail} but {m.errors} errors"
        goals.append(goal)
    return goals


def machine() -> dict[str, object]:
    import platform

    import torch

    return {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "fastapi": _version("fastapi"), "uvicorn": _version("uvicorn"),
            "httpx": _version("httpx"), "uvloop": _version("uvloop"),
            "httptools": _version("httptools"), "hmoe": _version("hmoe")}


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--artifact", type=Path, help="an artifact written by hmoe export")
    source.add_argument("--run", type=Path, help="a run directory (exported here)")
    parser.add_argument("--train-rows", type=int,
                        help=f"rows of the quick model trained when neither is given "
                             f"(default {DEFAULTS['train_rows']:,}; --quick "
                             f"{QUICK['train_rows']:,})")
    parser.add_argument("--servers",
                        help=f"comma-separated subset of {', '.join(SERVERS)} (default "
                             f"{DEFAULTS['servers']}; --quick: {QUICK['servers']})")
    parser.add_argument("--concurrency", help="comma-separated (default 1,8,64)")
    parser.add_argument("--seconds", type=float, help="measured seconds per concurrency "
                                                      "(default 10)")
    parser.add_argument("--warmup-seconds", type=float, help="untimed seconds before (default 2)")
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--pool-rows", type=int, default=4096,
                        help="distinct test rows the requests cycle through (default 4096)")
    parser.add_argument("--server-threads", "--threads", type=int, default=1,
                        dest="server_threads", help="each server's torch threads (default 1)")
    parser.add_argument("--max-batch", type=int, help="hmoe serve --max-batch (default: its own)")
    parser.add_argument("--max-wait-ms", type=float,
                        help="hmoe serve --max-wait-ms (default: its own)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="raw: HTTP/1.1 over asyncio streams (default; ~0.1 ms of client CPU "
                             "a request); httpx: an httpx.AsyncClient per connection (~1 ms)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--workdir", type=Path,
                        help="keep the trained run, the artifact and the server logs here "
                             "(default: a temporary directory, removed)")
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes: " + ", ".join(f"{k}={v}" for k, v in
                                                              QUICK.items())
                             + f", train.max_steps={QUICK_MAX_STEPS}")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown or not args.servers:
        parser.error(f"--servers: unknown {unknown}; choose from {list(SERVERS)}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency: integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: integers >= 1")
    if args.rows_per_request < 1 or args.pool_rows < 1 or args.seconds <= 0:
        parser.error("--rows-per-request, --pool-rows and --seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like an exception: the server running is stopped, the temporary
    # directory removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    import torch

    torch.set_num_threads(1)  # this process is the client; its torch only checks answers
    info = machine()
    command = shlex.join(sys.orig_argv if argv is None else
                         [sys.executable, "benchmarks/bench_serve.py", *argv])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench_serve {date}\ncommand: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_serve_")))
        return _bench(args, info, command, date, workdir)


def _bench(args, info, command: str, date: str, workdir: Path) -> int:
    import hmoe.serving

    artifact, run = prepare_artifact(args, workdir)
    predictor = hmoe.serving.load(artifact, mode="eager")
    packages = predictor.manifest["files"].get("aoti", {})
    rows = request_rows(run, predictor, max(args.pool_rows, CHECK_ROWS))
    bodies = request_bodies(rows, args.rows_per_request)
    tasks = list(predictor.tasks)
    print(f"artifact: {artifact} (model {predictor.metadata['model_version']}, tasks {tasks}, "
          f"aoti packages {sorted(packages) or 'none'})")
    print(f"requests: {args.rows_per_request} row(s) each, cycling through {len(bodies):,} "
          f"bodies; {args.warmup_seconds:g} s warm-up + {args.seconds:g} s measured per "
          f"concurrency {args.concurrency}; server torch threads {args.server_threads}, "
          f"hmoe serve --max-batch {args.max_batch or 'default'} --max-wait-ms "
          f"{args.max_wait_ms if args.max_wait_ms is not None else 'default'}")
    print(f"note: the client (this process: one asyncio loop) and each server share the "
          f"{os.cpu_count()} logical CPUs of this machine; 'client cpu' is what the client "
          f"took", flush=True)

    results: list[Measurement] = []
    runs: list[ServerRun] = []
    for name in args.servers:
        port = free_port()
        record = ServerRun(name, server_command(name, artifact, port, args))
        runs.append(record)
        if name == "aoti" and "cpu" not in packages:
            record.skipped = "the artifact has no AOTInductor package for cpu"
            print(f"{name}: skipped: {record.skipped}", flush=True)
            continue
        server = Server(record.command, port, workdir / f"server_{name}.log")
        try:
            record.startup_s = server.start(args.startup_timeout)
            if name == "null":  # a constant answer: nothing to check but its shape
                print(f"{name}: up in {record.startup_s:.1f} s ({shlex.join(record.command)})",
                      flush=True)
            else:
                record.check_max_abs_diff = agreement(server, rows[:CHECK_ROWS], predictor)
                print(f"{name}: up in {record.startup_s:.1f} s ({shlex.join(record.command)}); "
                      f"{CHECK_ROWS}-row check: max |difference| from the eager predictor "
                      f"{record.check_max_abs_diff:.2e}", flush=True)
            if record.check_max_abs_diff is not None and \
                    not record.check_max_abs_diff <= CHECK_TOLERANCE:
                record.failure = (f"its scores differ from the eager predictor's by "
                                  f"{record.check_max_abs_diff:.2e} > {CHECK_TOLERANCE}")
            offset = 0
            for concurrency in args.concurrency:
                m, offset = asyncio.run(measure(server, name, bodies, concurrency, args, tasks,
                                                offset))
                results.append(m)
                print(f"  c={concurrency:<3} {m.requests_per_s:8.1f} req/s  p50 "
                      f"{m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms  errors {m.errors}"
                      + (f"  (e.g. {m.error_examples[0]})" if m.error_examples else ""),
                      flush=True)
        except Exception as error:  # noqa: BLE001  (reported; the other servers still run)
            record.failure = f"{type(error).__name__}: {error}"
            print(f"{name}: FAILED: {record.failure}", flush=True)
        finally:
            record.exit_code = server.stop()
            # uvicorn re-raises the SIGTERM it handled once shut down: -15 is a clean exit
            clean = record.exit_code in (None, 0, -signal.SIGTERM) and \
                "Traceback" not in server.log_tail(1 << 20)
            if not clean and record.failure is None:
                record.failure = f"exited with {record.exit_code} after SIGTERM:\n" \
                                 f"{server.log_tail(1500)}"
                print(f"{name}: {record.failure}", flush=True)

    print()
    print(f"{args.rows_per_request} row(s) a request; {args.seconds:g} s measured per row of "
          f"the table; latency = time.perf_counter() around each POST (answered requests); "
          f"cpu in cores ({os.cpu_count()} logical CPUs shared by client and server)")
    print_results(results)
    goals = evaluate_goals(results, args.servers)
    print("\ngoals (from the measurements above):")
    for goal in goals:
        print(f"  ({goal['goal']}) {goal['text']}: {goal['verdict']}")
    failures = [r for r in runs if r.failure is not None]
    for r in runs:
        if r.skipped is not None:
            print(f"server {r.server}: skipped: {r.skipped}")
    for r in failures:
        print(f"server {r.server}: {r.failure}")
    errors = sum(m.errors for m in results)
    for m in results:
        for example in m.error_examples[:2]:
            print(f"error ({m.server}, c={m.concurrency}): {example}")
    if args.json is not None:
        document = {"date": date, "command": command, "machine": info,
                    "args": {k: (str(v) if isinstance(v, Path) else v)
                             for k, v in vars(args).items()},
                    "artifact": str(artifact), "model_version": predictor.metadata["model_version"],
                    "servers": [dataclasses.asdict(r) for r in runs],
                    "results": [dict(dataclasses.asdict(m), requests_per_s=m.requests_per_s,
                                     rows_per_s=m.rows_per_s) for m in results],
                    "goals": goals}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if errors or failures:
        print(f"FAILED: {errors} request errors, {len(failures)} servers not measured cleanly")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
