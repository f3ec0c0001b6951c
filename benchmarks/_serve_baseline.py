r"""The no-batching baseline of benchmarks/bench_serve.py: the minimal FastAPI endpoint a user
would write around ``hmoe.serving.load(ART, mode="eager")``.

    python benchmarks/_serve_baseline.py ARTIFACT --port 8001 --threads 1

``POST /predict`` takes the same body as ``hmoe serve`` (``{"rows": [...]}``) and answers the
same ``{"predictions": [{task: score}], "model_version": ...}``; ``GET /health`` answers
``{"status": "ok"}``. What it does, and does not do:

- the endpoint is a plain ``def`` (FastAPI runs it in its threadpool, so the event loop keeps
  reading requests while one is scored); FastAPI parses the body into a ``dict`` (its
  ``Body()``), the endpoint calls ``predictor.encode(rows)`` and ``predictor.score(batch)``
  itself;
- one request at a time goes through the model: ``Predictor.score`` is documented as not
  thread-safe, so a lock guards it (encoding runs outside the lock, in the pool's threads);
- no batching: every request is one call of the model on its own rows;
- errors: rows that cannot be read answer 422 with the encoder's message (nothing else is
  handled; a failure inside the model is FastAPI's plain 500).

It is what ``hmoe serve`` is compared with: the same predictor, the same JSON, the same torch
threads (``--threads``), without the dynamic batcher.

``--null``: no model at all, the ceiling of the HTTP stack and the client on this machine. An
``async def`` endpoint reads the body with ``json.loads`` (as ``hmoe serve`` does) and answers
the same constant prediction for every row (the artifact's tasks, each 0.5) without encoding
or scoring anything.
"""

# (no "from __future__ import annotations": FastAPI reads the endpoint's annotations)

import argparse
import threading
from typing import Annotated


def create_app(artifact: str):
    from fastapi import Body, FastAPI, HTTPException

    import hmoe.serving

    predictor = hmoe.serving.load(artifact, mode="eager")
    tasks = list(predictor.tasks)
    version = predictor.metadata["model_version"]
    lock = threading.Lock()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: Annotated[dict, Body()]):
        try:
            batch = predictor.encode(body.get("rows"))
        except hmoe.serving.RowError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        with lock:
            scores = predictor.score(batch)
        return {"predictions": [dict(zip(tasks, map(float, row))) for row in scores],
                "model_version": version}

    return app


def create_null_app(artifact: str):
    import json
    from pathlib import Path

    from fastapi import FastAPI, Request

    manifest = json.loads((Path(artifact) / "artifact.json").read_text(encoding="utf-8"))
    prediction = {task: 0.5 for task in manifest["tasks"]}
    version = manifest["model_version"]
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request):
        rows = json.loads(await request.body())["rows"]
        return {"predictions": [prediction] * len(rows), "model_version": version}

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--null", action="store_true",
                        help="no model: a constant answer (the HTTP stack's ceiling)")
    args = parser.parse_args(argv)

    import torch
    import uvicorn

    torch.set_num_threads(args.threads)
    app = create_null_app(args.artifact) if args.null else create_app(args.artifact)
    print(f"{'null server (no model) for' if args.null else 'baseline serving'} "
          f"{args.artifact} at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
