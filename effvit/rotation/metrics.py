"""Circular error and the paper's metrics: MAE, median, RMSE, P90, P95, acc@2/5/10, AUC@2/5/10.

The error of a prediction is wrapped first, e = ((pred - true + 180) mod 360) - 180 in [-180, 180), and
metrics use |e|. (min(|d|, 360 - |d|) without wrapping goes negative for negative labels.)

AUC@k is the area under the cumulative error curve F(t) = fraction of |e| <= t for t in [0, k],
divided by k; it equals mean(max(0, 1 - |e| / k)): 1 for a perfect model, 0 when every error is >= k.
"""

from __future__ import annotations

import numpy as np
import torch

THRESHOLDS = (2.0, 5.0, 10.0)
METRIC_KEYS = ("mae", "median", "rmse", "p90", "p95", "acc@2", "acc@5", "acc@10", "auc@2", "auc@5", "auc@10")


def circular_error(pred, true):
    """Signed wrapped error pred - true in [-180, 180) degrees; tensors, arrays or floats."""
    if isinstance(pred, torch.Tensor) or isinstance(true, torch.Tensor):
        pred = torch.as_tensor(pred, dtype=torch.float64)
        true = torch.as_tensor(true, dtype=torch.float64, device=pred.device)
        return torch.remainder(pred - true + 180.0, 360.0) - 180.0
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return np.mod(diff + 180.0, 360.0) - 180.0


def rotation_metrics(errors, thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, float]:
    """All metrics of a set of circular errors (signed or absolute, degrees). Accuracies in percent,
    AUCs in [0, 1]. The errors are wrapped again, so raw differences pred - true may be passed too."""
    if isinstance(errors, torch.Tensor):
        errors = errors.detach().cpu().double().numpy()
    e = np.abs(circular_error(np.asarray(errors, dtype=np.float64).ravel(), 0.0))
    if e.size == 0:
        raise ValueError("rotation_metrics needs at least one error")
    if not np.all(np.isfinite(e)):
        raise ValueError("errors contain NaN or inf: check the predictions")
    out = {
        "mae": float(e.mean()),
        "median": float(np.median(e)),
        "rmse": float(np.sqrt((e ** 2).mean())),
        "p90": float(np.percentile(e, 90)),
        "p95": float(np.percentile(e, 95)),
    }
    for k in thresholds:
        out[f"acc@{k:g}"] = float((e <= k).mean() * 100.0)
    for k in thresholds:
        out[f"auc@{k:g}"] = float(np.clip(1.0 - e / k, 0.0, None).mean())
    out["n"] = int(e.size)
    return out


def format_metrics(m: dict[str, float]) -> str:
    """One line: 'MAE 3.21  median 1.02  RMSE ...  acc@2 61.0% ... AUC@2 0.412 ...'."""
    parts = [f"MAE {m['mae']:.2f}", f"median {m['median']:.2f}", f"RMSE {m['rmse']:.2f}",
             f"P90 {m['p90']:.2f}", f"P95 {m['p95']:.2f}"]
    parts += [f"{k} {v:.1f}%" for k, v in m.items() if k.startswith("acc@")]
    parts += [f"{k.upper()} {v:.3f}" for k, v in m.items() if k.startswith("auc@")]
    return "  ".join(parts)
