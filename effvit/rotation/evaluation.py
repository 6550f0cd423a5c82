"""Test a rotation model on fixed-angle samples: every metric, per-image predictions, an error histogram.

Binned heads (cls, cgd) are scored with both decoders: ``paper`` (argmax, as the paper) and
``subdegree`` (local circular mean); for the other heads both are the same. ``selective`` shows what the
confidence is worth: the metrics on the most confident 50% and 80% of the images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from effvit.data import skip_collate
from effvit.outputs import writable_dir, write_csv
from effvit.plots import pyplot, save_figure

from .data import FolderImages, RotatedImages, Subset, fashion_mnist
from .metrics import circular_error, format_metrics, rotation_metrics
from .model import RotationModel, load_rotation_model

TRAINED_WINDOW = "trained"  # evaluate_rotation_checkpoint's default window: the model's own training range


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


def build_test_set(model: RotationModel, *, data: Sequence[str | Path] = (), dataset: str = "folder",
                   split: str = "test", angle_range: tuple[float, float] | None = None, repeats: int = 1,
                   seed: int = 0, limit: int | None = None) -> tuple[RotatedImages, str, tuple[float, float]]:
    """Fixed-angle test samples for ``model``: (samples, the data's label, the angle range used).

    ``data``: files or folders of upright images (for Fashion-MNIST, optionally its IDX folder first);
    ``angle_range`` defaults to the model's training range.
    """
    c = model.config
    settings = c.get("settings") or {}
    angle_range = tuple(angle_range) if angle_range else tuple(c["angle_range"])
    mode = "L" if c["in_chans"] == 1 else "RGB"
    if dataset == "fashion_mnist":
        root = data[0] if data else None
        src = fashion_mnist(split, root, pad_to=settings.get("pad_to", 40))
        label = f"fashion-mnist-{split}"
    else:
        if not data:
            raise ValueError("give the test images with --data DIR... (or --dataset fashion_mnist)")
        src = FolderImages.from_roots(*data, short_side=settings.get("short_side", 512), mode=mode)
        label = Path(data[0]).name or "data"
    if limit:
        src = Subset(src, range(min(limit, len(src))))
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    ds = RotatedImages(src, c["img_size"], c["mean"], c["std"], angle_range=angle_range,
                       crop=c.get("crop", "max_area"), seed=seed, repeats=repeats)
    return ds, label, angle_range


@dataclass
class RotationCheckpointEval:
    """What ``evaluate_rotation_checkpoint`` measured; ``info`` heads metrics.json (what was tested)."""

    result: RotationEval
    info: dict
    backbone: str
    method: str
    label: str
    angle_range: tuple[float, float]
    window: tuple[float, float] | None
    output_dir: Path
    written: dict = field(default_factory=dict)  # filled by save_rotation_evaluation

    @property
    def title(self) -> str:
        return f"{self.backbone} / {self.method} on {self.label}"


def evaluate_rotation_checkpoint(checkpoint: str | Path, *, data: Sequence[str | Path] = (),
                                 dataset: str = "folder", split: str = "test",
                                 angle_range: tuple[float, float] | None = None,
                                 window: tuple[float, float] | None | str = TRAINED_WINDOW, repeats: int = 1,
                                 seed: int = 0, limit: int | None = None, batch_size: int = 128,
                                 workers: int = 0, device: str = "cpu", ema: bool = False,
                                 out: str | Path | None = None, progress: bool = True) -> RotationCheckpointEval:
    """Load a rotation model and score it on fixed-angle samples (``build_test_set``); writes nothing.

    ``window`` restricts the answers (None: any angle; default: the model's training range when it is a
    tilt window). ``out`` (default eval-<data> beside the checkpoint) is checked writable before evaluating.
    """
    model = load_rotation_model(checkpoint, device=device, use_ema=ema)
    ds, label, angle_range = build_test_set(model, data=data, dataset=dataset, split=split,
                                            angle_range=angle_range, repeats=repeats, seed=seed, limit=limit)
    if isinstance(window, str):
        if window != TRAINED_WINDOW:
            raise ValueError(f"window is a (low, high) pair, None or {TRAINED_WINDOW!r}, not {window!r}")
        window = model.trained_range
    out = writable_dir(Path(out) if out else Path(checkpoint).parent / f"eval-{label}", "--out")
    res = evaluate_rotation(model, ds, window=window, batch_size=batch_size, workers=workers, device=device,
                            progress=progress)
    c = model.config
    info = {"checkpoint": str(checkpoint), "method": c["method"], "backbone": c["backbone"],
            "data": label, "images": len(ds) // repeats, "samples": len(res.rows),
            "repeats": repeats,
            "seed": seed, "angle_range": list(angle_range), "window": list(window) if window else None}
    return RotationCheckpointEval(result=res, info=info, backbone=c["backbone"], method=c["method"],
                                  label=label, angle_range=angle_range, window=window, output_dir=out)


def save_rotation_evaluation(evaluation: RotationCheckpointEval) -> dict:
    """``write_report`` into ``evaluation.output_dir``; returns (and records) the paths written."""
    evaluation.written = write_report(evaluation.result, evaluation.output_dir, title=evaluation.title,
                                      extra=evaluation.info)
    return evaluation.written
