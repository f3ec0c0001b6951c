r"""Serving: a trained model exported for inference, and the HTTP prediction service.

    hmoe export RUN_DIR --out DIR          # hmoe.serving.export: program, AOTInductor, state
    predictor = hmoe.serving.load(DIR)     # no run directory, data or trainer needed
    predictor.predict([{"user_id": "u1", "ad_id": "a9", ...}])   # [{task: score}]
    hmoe serve DIR --port 8000             # FastAPI + uvicorn (the optional extra hmoe[serve])

:mod:`hmoe.serving.artifact` documents the artifact, :mod:`hmoe.serving.rows` what a raw row
holds and which rows are refused, :mod:`hmoe.serving.server` the service. This package reads a
run or an artifact and never imports :mod:`hmoe.train`; FastAPI and uvicorn are imported only by
the server module.
"""

from hmoe.serving.artifact import MODES, Predictor, concat, export, load
from hmoe.serving.rows import RowEncoder, RowError, model_inputs

__all__ = ["MODES", "Predictor", "RowEncoder", "RowError", "concat", "export", "load",
           "model_inputs"]
