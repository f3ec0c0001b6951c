r"""The HTTP prediction service: ``hmoe serve DIR`` (FastAPI + uvicorn, the extra hmoe[serve]).

Endpoints:

- ``POST /predict`` with ``{"rows": [{column: raw value, ...}, ...]}`` (what a row holds:
  :mod:`hmoe.serving.rows`) answers ``{"predictions": [{task: score, ...}, ...],
  "model_version": str}``: one score per task per row, in the rows' order, calibrated when the
  artifact is.
- ``GET /health``: ``{"status": "ok"}``.
- ``GET /metadata``: tasks, columns (what each must hold), model version, run, checkpoint,
  mode, and the batching settings.

Errors answer ``{"error": message, "errors": [{"row", "field", "message"}]}`` and score nothing
of the request: 400 for a body that is not JSON or not ``{"rows": [...]}``, 413 for a body or
a row count over the limits, 422 for rows that cannot be read (each bad row and field named),
500 for a failure inside the model (the service stays up).

Dynamic batching: the event loop reads each request's JSON and queues its rows; one worker
takes queued requests until ``max_batch`` rows or ``max_wait_ms`` after the first, then, on a
single scoring thread (the event loop keeps accepting), encodes them together (the parser's
cost is mostly per call, so one call for the batch; a request with a bad row fails alone) and
scores them as one batch, and hands each request its own slice of the scores. A request larger
than ``max_batch`` rows is scored alone. Shutdown (SIGINT / SIGTERM): uvicorn stops accepting,
the requests in flight are finished (the worker keeps scoring until the queue is empty), then
the process exits with status 0.
"""

# (no "from __future__ import annotations": FastAPI reads the endpoints' annotations, and
# Request is imported inside create_app because FastAPI is optional)

import asyncio
import contextlib
import gc
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hmoe.serving.artifact import Predictor
from hmoe.serving.rows import RowError

__all__ = ["BatchSettings", "INSTALL", "create_app", "serve"]

INSTALL = "pip install 'hmoe[serve]' (FastAPI and uvicorn)"


def _require():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"hmoe serve needs FastAPI and uvicorn ({error}); {INSTALL}") \
            from None


@dataclass(frozen=True)
class BatchSettings:
    """max_batch: the most rows scored at once (requests are joined up to it); max_wait_ms:
    how long the first queued request waits for others; max_request_rows and max_body_bytes:
    the largest request accepted."""

    max_batch: int = 256
    max_wait_ms: float = 2.0
    max_request_rows: int = 4096
    max_body_bytes: int = 32 << 20

    def __post_init__(self):
        for key in ("max_batch", "max_request_rows", "max_body_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: must be an int >= 1, got {value!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and math.isfinite(self.max_wait_ms)
                and self.max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms: must be a number >= 0, got {self.max_wait_ms!r}")


@dataclass
class _Pending:
    rows: list
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class _Batcher:
    """Joins queued requests into batches, encodes and scores them on one thread."""

    def __init__(self, predictor: Predictor, settings: BatchSettings):
        self.predictor, self.settings = predictor, settings
        self.queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hmoe-score")
        self.task: asyncio.Task | None = None
        self.batches = self.rows = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Scores everything queued before it (the requests in flight), then stops."""
        await self.queue.put(None)
        if self.task is not None:
            await self.task
        self.executor.shutdown(wait=True)

    async def submit(self, rows: list):
        """The request's (rows, T) scores, or its RowError."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(rows, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        while True:
            first = await self.queue.get()
            if first is None:  # stop(): nothing is queued behind it
                return
            taken, rows = [first], len(first.rows)
            deadline = first.queued + settings.max_wait_ms / 1000
            while rows < settings.max_batch:
                if self.queue.empty():
                    wait = deadline - time.perf_counter()
                    if wait <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), wait)
                    except asyncio.TimeoutError:
                        break
                else:
                    item = self.queue.get_nowait()
                if item is None:
                    await self._score(loop, taken)
                    return
                if rows + len(item.rows) > settings.max_batch:
                    await self._score(loop, taken)  # full: the newcomer starts the next batch
                    taken, rows = [item], len(item.rows)
                    deadline = item.queued + settings.max_wait_ms / 1000
                    continue
                taken.append(item)
                rows += len(item.rows)
            await self._score(loop, taken)

    async def _score(self, loop, taken: list[_Pending]) -> None:
        live = [p for p in taken if not p.future.done()]  # (a client that left is skipped)
        if not live:
            return
        try:
            results = await loop.run_in_executor(self.executor, self.predictor.score_many,
                                                 [p.rows for p in live])
        except Exception as error:  # noqa: BLE001  (answered as a 500; the service stays up)
            for p in live:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        self.batches += 1
        for p, result in zip(live, results):
            if not isinstance(result, RowError):
                self.rows += len(p.rows)
            if not p.future.done():
                p.future.set_result(result)


def _error(status: int, message: str, errors: list | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, "errors": errors or []}, status_code=status)


def create_app(predictor: Predictor, settings: BatchSettings | None = None):
    """The FastAPI application serving ``predictor`` (module docstring)."""
    _require()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request, Response

    settings = settings or BatchSettings()
    state = {"batcher": None}

    @asynccontextmanager
    async def lifespan(app):
        batcher = _Batcher(predictor, settings)
        batcher.start()
        state["batcher"] = batcher
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="hmoe prediction service", version=predictor.metadata["model_version"],
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    tasks = list(predictor.tasks)
    version = predictor.metadata["model_version"]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata():
        batcher = state["batcher"]
        return {**predictor.metadata,
                "batching": {"max_batch": settings.max_batch,
                             "max_wait_ms": settings.max_wait_ms,
                             "max_request_rows": settings.max_request_rows,
                             "max_body_bytes": settings.max_body_bytes},
                "served": {"batches": batcher.batches if batcher else 0,
                           "rows": batcher.rows if batcher else 0}}

    @app.post("/predict")
    async def predict(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and \
                int(declared) > settings.max_body_bytes:
            return _error(413, f"the body holds {int(declared)} bytes, more than "
                               f"{settings.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                return _error(413, f"the body holds more than {settings.max_body_bytes} bytes")
        try:
            document = json.loads(body)
        except ValueError as error:  # JSONDecodeError, bad UTF-8, a 5000-digit integer
            return _error(400, f"the body is not valid JSON: {error}")
        except RecursionError:
            return _error(400, "the body is not valid JSON: nested too deeply")
        if not isinstance(document, dict):
            return _error(400, f'the body must be an object {{"rows": [...]}}, got '
                               f"{type(document).__name__}")
        unknown = sorted(set(document) - {"rows"})
        if unknown:
            return _error(400, f'unknown keys {unknown}; the body is {{"rows": [...]}}')
        rows = document.get("rows")
        if not isinstance(rows, list):
            return _error(400, f'"rows" must be a list of objects, got '
                               f"{'nothing' if rows is None else type(rows).__name__}")
        if len(rows) > settings.max_request_rows:
            return _error(413, f'"rows" holds {len(rows)} rows, more than '
                               f"{settings.max_request_rows}; split the request")
        try:
            scores = await state["batcher"].submit(rows)
        except Exception as error:  # noqa: BLE001
            return _error(500, f"scoring failed: {type(error).__name__}: {error}")
        if isinstance(scores, RowError):
            return _error(422, str(scores), scores.as_json())
        # serialised here: FastAPI's route for a returned dict walks it with
        # jsonable_encoder first, which cost more than encoding and scoring a row
        try:
            body = json.dumps({"predictions": [dict(zip(tasks, row)) for row in scores.tolist()],
                               "model_version": version}, allow_nan=False)
        except ValueError:
            return _error(500, "scoring failed: the model produced a non-finite score")
        return Response(body, media_type="application/json")

    return app


def serve(path: str, *, host: str = "127.0.0.1", port: int = 8000, mode: str = "auto",
          device: str = "cpu", calibrated: bool = True, settings: BatchSettings | None = None,
          threads: int | None = None, log_level: str = "info") -> None:
    """Loads the artifact at ``path`` and serves it until SIGINT / SIGTERM."""
    _require()
    import torch
    import uvicorn

    if threads is not None:
        torch.set_num_threads(threads)
    predictor = Predictor(path, mode=mode, device=device, calibrated=calibrated)
    app = create_app(predictor, settings)
    # The model and the libraries are long-lived: moved out of the collector's generations,
    # its full collections no longer walk them (each walk was a pause of tens of ms)
    gc.collect()
    gc.freeze()
    print(f"serving {path} (model {predictor.metadata['model_version']}, {predictor.mode} on "
          f"{device}, tasks {list(predictor.tasks)}) at http://{host}:{port}", flush=True)

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, so the process
        would end by the signal; a shutdown asked for is a clean exit here (status 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=30)
    Server(config).run()
