r"""Post-hoc calibration of each task's scores: Platt scaling fitted on the valid split.

Ads are priced on the predicted probability itself (eCPM = pCTR x bid), so a model whose mean
prediction is off the observed rate mis-prices every ad. The training losses move the level on
purpose (the combined-pair loss adds a ranking term, IPW re-weights positives), so the scores
are calibrated after training, task by task:

    calibrated logit = a · logit + b,    (a, b) = argmin logloss on the valid split

Why Platt scaling (logistic regression on the model's logit):

- it is strictly increasing (a > 0 is enforced), so AUC and gAUC are exactly unchanged;
  isotonic regression maps runs of scores to one value, and those ties change the AUC;
- at its optimum the mean calibrated prediction equals the observed rate on the fitting rows
  (the intercept's gradient is Σ (p - y) = 0): it fixes the level, which is what pricing needs;
  temperature scaling (a alone) cannot move the level;
- two parameters: stable with the few positives of a conversion task, where a histogram or
  isotonic map would overfit.

It cannot fix a miscalibration that is not monotone in the logit's scale (a bent reliability
curve); the ECE reported beside it shows what is left.

``calibration.json`` in a run directory (the map and its file live in
:mod:`hmoe.models.calibration`, which serving reads without the trainer)::

    {"method": "platt", "split": "valid",
     "tasks": {task: {"a": float, "b": float, "rows": int, "positives": int}}}

A task whose fitting rows hold one class only keeps a = 1, b = 0 (nothing to fit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hmoe.models.calibration import CALIBRATION_FILE, Calibration, Platt, load_calibration

__all__ = ["CALIBRATION_FILE", "Calibration", "Platt", "fit_calibration", "fit_platt",
           "load_calibration"]


def _logloss_and_steps(z: np.ndarray, y: np.ndarray, a: float, b: float, fit_a: bool):
    """(mean logloss, Newton step for (a, b) or b alone) at (a, b)."""
    t = a * z + b
    p = 1.0 / (1.0 + np.exp(-t))
    loss = float(np.mean(np.logaddexp(0.0, t) - y * t))
    r, w = p - y, np.maximum(p * (1.0 - p), 1e-12)
    if not fit_a:
        return loss, np.array([0.0, r.sum() / w.sum()])
    gradient = np.array([np.dot(r, z), r.sum()])
    hessian = np.array([[np.dot(w * z, z), np.dot(w, z)], [np.dot(w, z), w.sum()]])
    hessian += np.eye(2) * 1e-9 * max(1.0, float(np.trace(hessian)))
    return loss, np.linalg.solve(hessian, gradient)


def fit_platt(logits, labels) -> Platt:
    """Platt scaling of one task: logistic regression of ``labels`` (0/1) on ``logits``,
    Newton's method with step halving (float64). If the fitted slope is not positive, the
    slope stays 1 and only the intercept is fitted, so the map stays increasing."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if z.shape != y.shape:
        raise ValueError(f"logits and labels must have the same length, got {z.shape} and "
                         f"{y.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits: not all finite")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    rows, positives = len(y), int(y.sum())
    if positives in (0, rows):
        return Platt(rows=rows, positives=positives)
    for fit_a in (True, False):
        a, b = 1.0, 0.0
        loss, step = _logloss_and_steps(z, y, a, b, fit_a)
        for _ in range(100):
            scale = 1.0
            while scale > 1e-10:
                na, nb = a - scale * step[0], b - scale * step[1]
                new_loss, new_step = _logloss_and_steps(z, y, na, nb, fit_a)
                if new_loss <= loss:
                    break
                scale /= 2
            else:
                break
            converged = abs(loss - new_loss) < 1e-14 and np.abs(step).max() < 1e-10
            a, b, loss, step = na, nb, new_loss, new_step
            if converged:
                break
        if a > 0:
            return Platt(float(a), float(b), rows, positives)
    return Platt(1.0, float(b), rows, positives)


@torch.no_grad()
def fit_calibration(model, source, tasks: Sequence[str], batch_size: int, *,
                    max_rows: int = 1_000_000, split: str = "valid") -> Calibration:
    """Platt maps of ``model``'s tasks fitted on the first ``max_rows`` rows of ``source``
    (a split in batch layout; its rows are scored in evaluation mode)."""
    from hmoe.data.stream import as_source, stream_batches

    columns = [model.schema.task_index(t) for t in tasks]
    logits = {t: [] for t in tasks}
    labels, seen = [], 0
    was_training = model.training
    model.eval()
    try:
        for batch in stream_batches(as_source(source, model.schema), batch_size):
            take = min(len(batch["labels"]), max_rows - seen)
            out = model(batch)["logits"]
            for t in tasks:
                logits[t].append(out[t][:take].double().numpy())
            labels.append(batch["labels"][:take, columns].double().numpy())
            seen += take
            if seen >= max_rows:
                break
    finally:
        model.train(was_training)
    y = np.concatenate(labels) if labels else np.zeros((0, len(tasks)))
    return Calibration({t: fit_platt(np.concatenate(logits[t]) if logits[t] else np.zeros(0),
                                     y[:, i]) for i, t in enumerate(tasks)}, split)
