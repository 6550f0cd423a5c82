"""Datasets: image folders (ImageNet layout), loose image files, Fashion-MNIST's IDX files.

An item is ``(image, target)``; an image that cannot be decoded comes back as an ``Unreadable`` marker
instead of raising inside a loader worker (``effvit.data.loaders.skip_collate`` takes it out of the batch).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .images import IMG_EXTENSIONS, Unreadable, load_image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# per-channel statistics of the Fashion-MNIST training images (grey, so one value; repeated for RGB)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


# -- image folders ---------------------------------------------------------------------------------
def find_classes(split_dir: Path) -> list[str]:
    if not split_dir.exists():
        raise FileNotFoundError(f"data folder {split_dir} does not exist; expected the ImageNet layout "
                                f"ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg")
    if not split_dir.is_dir():
        raise NotADirectoryError(f"{split_dir} is not a folder")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"data folder {split_dir} is empty: it needs one subfolder of images per class "
                         f"({split_dir}/<class>/*.jpg)")
    return classes


def scan_images(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    samples = []
    for idx, name in enumerate(classes):
        files = sorted(str(p) for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder {split_dir / name} holds no images (extensions: "
                             f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
        samples.extend((f, idx) for f in files)
    return samples


def check_same_classes(train: Sequence[str], val: Sequence[str], train_dir: Path, val_dir: Path) -> None:
    if list(train) == list(val):
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    raise ValueError(f"the class folders of {train_dir} and {val_dir} differ: only in train: "
                     f"{only_train[:10]}{' ...' if len(only_train) > 10 else ''}; only in val: "
                     f"{only_val[:10]}"
                     f"{' ...' if len(only_val) > 10 else ''}. Both splits need the same class subfolders")


class ImageFolder(Dataset):
    """``root/<class>/**/*.jpg``, classes in sorted order (or as given, to align val with train)."""

    def __init__(self, root: str | Path, classes: Sequence[str] | None = None, transform=None,
                 mode: str = "RGB"):
        self.root = Path(root)
        self.classes = list(classes) if classes is not None else find_classes(self.root)
        self.samples = scan_images(self.root, self.classes)
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = load_image(path, self.mode)
        except Exception as e:  # any decoder failure: the caller decides to skip or stop
            return Unreadable(path, f"{type(e).__name__}: {e}")
        return (self.transform(img) if self.transform else img), target


class ImageList(Dataset):
    """Loose image files (prediction): items are ``(image, index)``."""

    def __init__(self, files: Sequence[str | Path], transform=None, mode: str = "RGB"):
        self.files = [str(f) for f in files]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            img = load_image(self.files[index], self.mode)
        except Exception as e:
            return Unreadable(self.files[index], f"{type(e).__name__}: {e}")
        return (self.transform(img) if self.transform else img), index


# -- Fashion-MNIST ---------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array: (N,) labels or (N, H, W) images."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


class FashionMNIST(Dataset):
    """Zalando's Fashion-MNIST from its IDX files (Debian package dataset-fashion-mnist)."""

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, root: str | Path | None = None, train: bool = True, transform=None, mode: str = "L"):
        root = Path(root or FASHION_MNIST_DIR)
        prefix = "train" if train else "t10k"
        files = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            cands = [root / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"Fashion-MNIST file {cands[0]} not found; install the Debian package "
                    f"dataset-fashion-mnist (`make data`) or set data.root to the folder holding the IDX "
                    f"files")
            files.append(found)
        self.images = read_idx(files[0])
        self.targets = read_idx(files[1]).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise ValueError(f"{files[0]} has {len(self.images)} images but {files[1]} has "
                             f"{len(self.targets)} labels")
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index], mode="L")
        if self.mode != "L":
            img = img.convert(self.mode)
        return (self.transform(img) if self.transform else img), int(self.targets[index])
