"""Top-k predictions of a classifier on image files: class names, image mode and transform from the
model's config (``effvit.load_model`` reads them from the checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effvit.data import ImageList, build_loader, eval_transform, image_mode
from effvit.models.pretrained import class_names, input_channels

__all__ = ["ClassScore", "ImagePrediction", "Predictions", "predict"]


@dataclass
class ClassScore:
    label: str
    index: int
    prob: float  # softmax probability, rounded to 6 decimals


@dataclass
class ImagePrediction:
    file: str
    predictions: list[ClassScore]  # the top k, most probable first


@dataclass
class Predictions:
    images: list[ImagePrediction] = field(default_factory=list)  # the readable files, in input order
    unreadable: list[str] = field(default_factory=list)  # 'FILE (why)' for each file that could not be decoded


def predict(model: nn.Module, files: list[str], *, topk: int = 5, batch_size: int = 32, workers: int = 0,
            device: torch.device | None = None) -> Predictions:
    """The ``topk`` most probable classes (at most all of them) of every file; an undecodable file is
    listed in ``unreadable`` and the others are still predicted."""
    device = device or torch.device("cpu")
    names = class_names(model)
    ds = ImageList(files, eval_transform(model), mode=image_mode(input_channels(model)))
    loader = build_loader(ds, batch_size, num_workers=workers)
    k = min(topk, model.num_classes)
    out = Predictions()
    model.to(device).eval()
    with torch.no_grad():
        for batch in loader:
            inputs, idx = batch[0], batch[1]
            out.unreadable += list(batch[2]) if len(batch) == 3 else []
            if idx.numel() == 0:
                continue
            probs = model(inputs.to(device)).float().softmax(dim=1).cpu()
            top = probs.topk(k, dim=1)
            for i, p, c in zip(idx.tolist(), top.values.tolist(), top.indices.tolist(), strict=True):
                out.images.append(ImagePrediction(ds.files[i], [
                    ClassScore(names[ci], ci, round(pi, 6)) for pi, ci in zip(p, c, strict=True)]))
    return out
