r"""The calibration of a trained model's scores: each task's Platt map (a · logit + b, a > 0).

Fitted at the end of training by :mod:`hmoe.train.calibrate` (which says why Platt scaling) and
applied wherever scores leave hmoe: ``hmoe eval`` and ``hmoe predict``, the exported artifact
and the prediction service (:mod:`hmoe.serving`, which must not import the trainer; hence this
module lives with the models). ``calibration.json`` in a run directory or an artifact::

    {"method": "platt", "split": "valid",
     "tasks": {task: {"a": float, "b": float, "rows": int, "positives": int}}}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["CALIBRATION_FILE", "Calibration", "Platt", "load_calibration"]

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Platt:
    """One task's map: calibrated logit = a · logit + b (a > 0)."""

    a: float = 1.0
    b: float = 0.0
    rows: int = 0
    positives: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.a) and math.isfinite(self.b) and self.a > 0):
            raise ValueError(f"a Platt map needs finite a > 0 and b, got a={self.a}, "
                             f"b={self.b}")

    def logits(self, z):
        """The calibrated logits of ``z`` (a numpy array or a tensor)."""
        return z * self.a + self.b


class Calibration(Mapping):
    """Each task's Platt map; ``apply`` calibrates a model's {task: logits}."""

    def __init__(self, maps: Mapping[str, Platt], split: str = "valid"):
        self._maps, self.split = dict(maps), split

    def __getitem__(self, task: str) -> Platt:
        return self._maps[task]

    def __iter__(self):
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def apply(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{task: calibrated logits}; tasks without a map pass unchanged."""
        return {t: self._maps[t].logits(z) if t in self._maps else z for t, z in logits.items()}

    def to_dict(self) -> dict:
        return {"method": "platt", "split": self.split,
                "tasks": {t: asdict(m) for t, m in self._maps.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Writes calibration.json at ``path`` atomically (a temporary file renamed)."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)


def load_calibration(path: str | os.PathLike) -> Calibration | None:
    """The calibration saved at ``path`` (a calibration.json or the run directory holding
    it), or None when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / CALIBRATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("method") != "platt" or not isinstance(data.get("tasks"), Mapping):
        raise ValueError(f"{path}: not a calibration written by hmoe (method platt)")
    return Calibration({t: Platt(**m) for t, m in data["tasks"].items()},
                       data.get("split", "valid"))
