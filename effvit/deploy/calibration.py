"""Images for int8 calibration and for the held-out check, preprocessed as the model's inputs.

Two sources: a training checkpoint's dataset (calibrate on a seeded sample of its training split,
check on its test/val split with labels) or a plain folder of images (split in two disjoint parts:
calibration and a label-free held-out set). Unreadable files are skipped and counted.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from effvit.data import FashionMNIST, ImageFolder, ImageList, Unreadable, find_classes, image_mode, list_images
from effvit.models.pretrained import class_names, input_channels

__all__ = ["ImageSets", "image_sets", "batches"]


@dataclass
class ImageSets:
    calibration: Dataset  # items (image tensor, anything) or Unreadable
    calibration_idx: list[int]
    held_out: Dataset  # items (image tensor, label or index)
    held_out_idx: list[int]
    labelled: bool  # held_out's second element is a class label
    source: str  # what the images are, for messages


def _sample(n_total: int, n: int, seed: int) -> list[int]:
    idx = list(range(n_total))
    random.Random(seed).shuffle(idx)
    return sorted(idx[:n]) if n > 0 else sorted(idx)


def _dataset_splits(model, transform, data_root: str | None) -> tuple[Dataset, Dataset, str] | None:
    """(training split, labelled held-out split, name of the held-out split) of the checkpoint's
    dataset, or None where it cannot be had (outside weights, or a folder dataset without its root)."""
    dataset, mode = model.pretrained_cfg.get("dataset"), image_mode(input_channels(model))
    if dataset == "fashion_mnist":
        return (FashionMNIST(data_root, train=True, transform=transform, mode=mode),
                FashionMNIST(data_root, train=False, transform=transform, mode=mode), "the Fashion-MNIST test set")
    if dataset == "folder" and data_root:
        root = Path(data_root)
        return (ImageFolder(root / "train", find_classes(root / "train"), transform=transform, mode=mode),
                ImageFolder(root / "val", class_names(model), transform=transform, mode=mode), str(root / "val"))
    return None


def image_sets(model, transform, *, folder: str | Path | None = None, data_root: str | None = None,
               calibration_images: int = 512, held_out_images: int = 10000, seed: int = 0) -> ImageSets:
    """The calibration and held-out images for ``model`` (its ``pretrained_cfg`` names the dataset of
    the training checkpoint it was loaded from, if any).

    The checkpoint's dataset (``data_root``: its folder; needed for image-folder datasets) gives both:
    calibration from its training split, the check on its labelled test/val split. ``folder``
    replaces the calibration images; without a labelled dataset, the images of ``folder`` not used to
    calibrate are the (label-free) held-out set. ``held_out_images=0`` takes the whole held-out split.
    """
    if calibration_images < 1:
        raise ValueError(f"calibration needs at least one image, got {calibration_images}")
    splits = _dataset_splits(model, transform, data_root)
    if folder is None and splits is None:
        if model.pretrained_cfg.get("dataset") == "folder":
            raise ValueError("this checkpoint was trained on an image folder: pass --data ROOT (its "
                             "ROOT/train and ROOT/val) or --calib DIR (a folder of images)")
        raise ValueError("int8 calibration needs images: pass --calib DIR (a folder of images like the "
                         "model's inputs) or a --checkpoint of a training run on Fashion-MNIST or a folder")
    if splits is not None:
        calib, held, held_name = splits
        what = "training images"
        if folder is not None:
            mode = image_mode(input_channels(model))
            calib, what = ImageList(list_images(folder), transform=transform, mode=mode), str(folder)
        return ImageSets(calib, _sample(len(calib), calibration_images, seed), held,
                         _sample(len(held), held_out_images, seed), True,
                         f"calibration on {what}, check on {held_name}")
    files = list_images(folder)
    if len(files) < 2:
        raise ValueError(f"{folder} has {len(files)} image: it needs at least two, one to calibrate and one "
                         f"to check (better hundreds)")
    images = ImageList(files, transform=transform, mode=image_mode(input_channels(model)))
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_cal = min(calibration_images, len(files) // 2)  # at least half of a small folder stays for the check
    rest = order[n_cal:]
    rest = rest[:held_out_images] if held_out_images > 0 else rest
    return ImageSets(images, sorted(order[:n_cal]), images, sorted(rest), False,
                     f"{folder}: {n_cal} images to calibrate, {len(rest)} other images to check")


def batches(dataset: Dataset, indices: Sequence[int], batch_size: int = 64, labels: bool = True,
            skipped: list[str] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(images float32 NCHW, labels or None) in batches; unreadable files go to ``skipped``."""
    for start in range(0, len(indices), batch_size):
        xs, ys = [], []
        for i in indices[start:start + batch_size]:
            item = dataset[i]
            if isinstance(item, Unreadable):
                if skipped is not None:
                    skipped.append(f"{item.name} ({item.error})")
                else:
                    warnings.warn(f"skipped unreadable image {item.name}: {item.error}", stacklevel=2)
                continue
            xs.append(item[0])
            ys.append(item[1])
        if xs:
            yield torch.stack(xs).numpy(), (np.asarray(ys) if labels else None)
