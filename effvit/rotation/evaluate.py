"""Test a rotation model on fixed-angle samples: every metric, per-image predictions, an error histogram.

Binned heads (cls, cgd) are scored with both decoders: ``paper`` (argmax, as the paper) and
``subdegree`` (local circular mean); for the other heads both are the same. ``selective`` shows what the
confidence is worth: the metrics on the most confident 50% and 80% of the images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from effvit.outputs import write_csv
from effvit.plots import pyplot, save_figure
from effvit.train.data import skip_collate

from .metrics import circular_error, format_metrics, rotation_metrics
from .model import RotationModel


class _Indexed(Dataset):
    """(input, (angle, index)) so that predictions keep their image's name through skipped samples."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if not isinstance(item, tuple):
            return item  # an Unreadable marker: the collate drops it
        return item[0], (item[1], i)


@dataclass
class RotationEval:
    rows: list[dict]  # per image: name, true, pred, error, confidence (+ pred_argmax for binned heads)
    metrics: dict  # {'paper': {...}, 'subdegree': {...}, 'selective': {...}}
    skipped: list[str]


@torch.no_grad()
def evaluate_rotation(model: RotationModel, dataset, *, window: tuple[float, float] | None = None,
                      batch_size: int = 128, workers: int = 0, device: str | torch.device = "cpu",
                      progress: bool = True) -> RotationEval:
    """Predict every sample of a fixed-angle ``RotatedImages`` and score the predictions."""
    model = model.to(device).eval()
    method = model.method
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=skip_collate)
    true, idx, coarse, fine, conf, skipped = [], [], [], [], [], []
    for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress):
        x, (angle, index) = batch[0], batch[1]
        skipped += list(batch[2]) if len(batch) == 3 else []
        if x.numel() == 0:
            continue
        out = model(x.to(device)).float()
        coarse.append(method.decode(out, window, subdegree=False).cpu())
        fine.append(method.decode(out, window, subdegree=True).cpu())
        _, c = model.predict(x.to(device), window=window)  # flip check included for DA
        conf.append(c.cpu())
        true.append(angle.float())
        idx.append(index)
    if not true:
        raise ValueError("no readable test image: nothing to evaluate")
    true_t, coarse_t, fine_t, conf_t = (torch.cat(v).double() for v in (true, coarse, fine, conf))
    index_t = torch.cat(idx)
    err_coarse, err_fine = circular_error(coarse_t, true_t), circular_error(fine_t, true_t)
    names = [dataset.name(int(i)) for i in index_t]
    rows = []
    binned = method.name in ("cls", "cgd")
    for k, name in enumerate(names):
        row = {"index": int(index_t[k]), "name": name, "true": float(true_t[k]), "pred": float(fine_t[k]),
               "error": float(err_fine[k]), "abs_error": abs(float(err_fine[k])),
               "confidence": float(conf_t[k])}
        if binned:
            row["pred_argmax"] = float(coarse_t[k])
        rows.append(row)
    metrics = {"paper": rotation_metrics(err_coarse), "subdegree": rotation_metrics(err_fine),
               "selective": selective_metrics(err_fine.numpy(), conf_t.numpy())}
    return RotationEval(rows, metrics, skipped)


def selective_metrics(errors: np.ndarray, confidence: np.ndarray,
                      coverages: tuple[float, ...] = (0.5, 0.8)) -> dict[str, dict]:
    """Metrics on the most confident share of the images (ties broken by order), per coverage."""
    order = np.argsort(-confidence, kind="stable")
    out = {}
    for cov in coverages:
        keep = order[:max(1, int(round(cov * len(order))))]
        m = rotation_metrics(errors[keep])
        out[f"top{round(cov * 100)}%"] = {"min_confidence": float(confidence[keep].min()), **m}
    return out


def plot_errors(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Signed-error histogram (log counts, full circle) and the cumulative |error| curve up to 20 deg."""
    plt = pyplot()

    e = np.array([r["error"] for r in rows])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.hist(e, bins=np.arange(-180, 181, 2), color="tab:blue")
    ax1.set_yscale("log")
    ax1.set_xlabel("error (degrees, predicted - true, wrapped)")
    ax1.set_ylabel("images")
    ax1.set_xticks(range(-180, 181, 45))
    ax1.grid(alpha=0.3)
    t = np.linspace(0, 20, 401)
    a = np.abs(e)
    ax2.plot(t, [(a <= v).mean() * 100 for v in t])
    ax2.set_xlabel("|error| threshold (degrees)")
    ax2.set_ylabel("images within (%)")
    ax2.set_ylim(0, 100)
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def write_report(result: RotationEval, out_dir: str | Path, title: str = "",
                 extra: dict | None = None) -> dict:
    """metrics.json, predictions.csv and errors.png under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "predictions": out / "predictions.csv",
             "plot": out / "errors.png"}
    paths["metrics"].write_text(json.dumps({**(extra or {}), **result.metrics, "skipped": result.skipped},
                                           indent=2))
    write_csv(result.rows, paths["predictions"])
    plot_errors(result.rows, paths["plot"], title)
    return paths


def summary_lines(result: RotationEval, method: str) -> list[str]:
    m = result.metrics
    lines = []
    if method in ("cls", "cgd"):
        lines.append(f"argmax     {format_metrics(m['paper'])}")
        lines.append(f"sub-degree {format_metrics(m['subdegree'])}")
    else:
        lines.append(format_metrics(m["subdegree"]))
    for k, v in m["selective"].items():
        lines.append(f"most confident {k} (conf >= {v['min_confidence']:.3f}): MAE {v['mae']:.2f}  "
                     f"median {v['median']:.2f}  acc@5 {v['acc@5']:.1f}%")
    return lines
