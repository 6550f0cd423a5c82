"""Evaluation of a saved classifier: top-1, top-5, loss, per-class accuracy and a confusion-matrix PNG.

``evaluate_checkpoint`` measures and returns the numbers; ``save_evaluation`` writes metrics.json and
confusion.png. They are two steps so that a caller can show the numbers before a write that may fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from effvit.data import (
    FashionMNIST,
    ImageFolder,
    build_loader,
    check_same_classes,
    eval_transform,
    find_classes,
    image_mode,
)
from effvit.models import load_model
from effvit.models.pretrained import arch_name, class_names, has_own_class_names, input_channels
from effvit.outputs import writable_dir

from .classification import ClassificationTask
from .distributed import cleanup, init_distributed
from .engine import evaluate
from .metrics import per_class_accuracy, plot_confusion


@dataclass
class CheckpointEvaluation:
    """What ``evaluate_checkpoint`` measured. ``report`` is the content of metrics.json."""

    report: dict
    arch: str
    dataset: str
    split: str
    ema: bool
    class_names: list[str]
    per_class: list[float]  # top-1 per class in %, NaN for a class without images
    confusion: torch.Tensor  # [true class, predicted class] counts
    output_dir: Path
    written: list[Path] = field(default_factory=list)  # filled by save_evaluation


def build_eval_dataset(model: nn.Module, dataset: str, root: str | None, split: str | None,
                       transform) -> tuple[Dataset, str]:
    """The images to evaluate ``model`` on and the split's name; folder classes must match the model's."""
    mode = image_mode(input_channels(model))
    if dataset == "fashion_mnist":
        if split not in (None, "test", "val", "train"):
            raise ValueError(f"Fashion-MNIST has the splits train and test, not {split!r}")
        ds = FashionMNIST(root, train=split == "train", transform=transform, mode=mode)
        return ds, split or "test"
    if not root:
        raise ValueError("pass --data DIR: the folder holding DIR/val/<class>/*.jpg (or --split NAME)")
    split = split or "val"
    split_dir = Path(root) / split
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    classes = find_classes(split_dir)
    names = class_names(model)
    if has_own_class_names(model):
        check_same_classes(names, classes, Path(f"{arch_name(model)} checkpoint classes"), split_dir)
    elif len(classes) != model.num_classes:
        raise ValueError(f"{split_dir} has {len(classes)} class folders but the model has {model.num_classes} "
                         "outputs")
    else:
        names = classes
    return ImageFolder(split_dir, names, transform=transform, mode=mode), split


def evaluate_checkpoint(checkpoint: str | Path, *, data: str | None = None, dataset: str | None = None,
                        split: str | None = None, ema: bool = False, img_size: int | None = None,
                        batch_size: int = 100, workers: int = 2, device: str = "auto", amp: str = "none",
                        strict: bool = False, output: str | Path | None = None,
                        progress: bool = True) -> CheckpointEvaluation | None:
    """Evaluate a checkpoint (torchrun-aware); None on the ranks other than the main one.

    ``dataset`` defaults to what the checkpoint was trained on (folder for outside weights); ``output``
    to eval-<split>/ beside the checkpoint, and it is checked to be writable before evaluating.
    """
    ctx = init_distributed(device)
    try:
        model = load_model(checkpoint, use_ema=ema, img_size=img_size)
        names = class_names(model)
        trained_on = model.pretrained_cfg.get("dataset")
        dataset = dataset or ("fashion_mnist" if trained_on == "fashion_mnist" else "folder")
        ds, split = build_eval_dataset(model, dataset, data, split, eval_transform(model))
        out = Path(output) if output else Path(checkpoint).parent / f"eval-{split}"
        if ctx.is_main:
            writable_dir(out)  # before the evaluation, not after it
        loader = build_loader(ds, batch_size, rank=ctx.rank, world_size=ctx.world_size, num_workers=workers,
                              pin_memory=ctx.device.type == "cuda")
        task = ClassificationTask(model, None, ds, num_classes=model.num_classes, class_names=names)
        model.to(ctx.device)
        res = evaluate(model, loader, task, ctx=ctx, amp=amp, strict=strict, progress=progress,
                       desc=f"eval {split}")
    finally:
        cleanup()
    if not ctx.is_main:
        return None
    confusion = res.stats["confusion"]
    per_class = per_class_accuracy(confusion)
    report = {"checkpoint": str(checkpoint), "weights": "ema" if ema else "model", "split": split,
              "samples": int(res.stats["count"]), "skipped": res.skipped, **res.metrics,
              "per_class": {n: (None if math.isnan(a) else a) for n, a in zip(names, per_class,
                                                                               strict=True)}}
    return CheckpointEvaluation(report=report, arch=arch_name(model), dataset=dataset, split=split, ema=ema,
                                class_names=names, per_class=per_class, confusion=confusion, output_dir=out)


def save_evaluation(result: CheckpointEvaluation) -> list[Path]:
    """Write metrics.json and confusion.png into ``result.output_dir``; returns (and records) their paths."""
    metrics = result.output_dir / "metrics.json"
    metrics.write_text(json.dumps(result.report, indent=2))
    title = f"{result.arch} on {result.dataset} {result.split}: top-1 {result.report['top1']:.2f}%"
    png = plot_confusion(result.confusion, result.class_names, result.output_dir / "confusion.png", title=title)
    result.written = [metrics, Path(png)]
    return result.written
