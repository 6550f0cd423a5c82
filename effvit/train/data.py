"""Data: image folders (ImageNet layout), Fashion-MNIST's IDX files, samplers, loaders.

A dataset item is ``(image, target)``; an image that cannot be decoded comes back as an ``Unreadable``
marker instead of raising inside a loader worker, and ``skip_collate`` drops it from the batch and passes
its name on (a batch is then ``(inputs, targets, skipped_names)``), so the engine can count, report or,
under ``strict``, stop with the file's name.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from effvit.images import IMG_EXTENSIONS, note_first_frame, to_mode
from effvit.images import list_images as list_images  # where predict and calibration import it from

from .distributed import DistContext

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# per-channel statistics of the Fashion-MNIST training images (grey, so one value; repeated for RGB)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a sample whose file could not be decoded."""

    name: str
    error: str


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode fully (PIL is lazy: truncated files only fail on load) and convert to ``mode``: 16-bit and
    float images scaled from their range, the first frame of an animation (``effvit.images``)."""
    with Image.open(path) as img:
        note_first_frame(img, path)
        img.load()
        return to_mode(img, mode)


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


# -- batching --------------------------------------------------------------------------------------
def skip_collate(batch: list):
    """Default collation minus unreadable samples; their names ride along as a third element."""
    good = [b for b in batch if not isinstance(b, Unreadable)]
    bad = [f"{b.name} ({b.error})" for b in batch if isinstance(b, Unreadable)]
    if good:
        inputs, targets = default_collate(good)
    else:
        inputs, targets = torch.empty(0), torch.empty(0, dtype=torch.long)
    return (inputs, targets, bad) if bad else (inputs, targets)


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes items r, r + W, r + 2W, ... with no padding, so every item counts once."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(Sampler[int]):
    """Wraps the epoch-seeded training sampler: keeps a fraction of each epoch."""

    def __init__(self, sampler: Sampler, fraction: float = 1.0):
        self.sampler = sampler
        self.fraction = fraction
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(1, int(len(self.sampler) * self.fraction))

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[: len(self)])


def build_train_sampler(dataset: Dataset, ctx: DistContext, seed: int, repeated_aug: int = 1,
                        fraction: float = 1.0) -> EpochSampler:
    """Shuffled per epoch from (seed, epoch) alone, so a resumed run draws the same order; sharded over
    ranks; with ``repeated_aug`` > 1 timm's RepeatAugSampler (DeiT) spreads copies over ranks."""
    if repeated_aug > 1:
        base: Sampler = RepeatAugSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                         num_repeats=repeated_aug)
    else:
        base = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                  seed=seed)
    return EpochSampler(base, fraction)


def _seed_worker(worker_id: int) -> None:
    # torch seeds `random` and torch per worker from the loader's base seed; numpy too since 1.9, but
    # make it explicit so RandAugment's numpy draws are reproducible on any version.
    np.random.seed(torch.initial_seed() % 2**32)


def build_loader(dataset: Dataset, batch_size: int, *, sampler: Sampler | None = None, train: bool = False,
                 ctx: DistContext | None = None, num_workers: int = 0, pin_memory: bool = False,
                 collate_fn=skip_collate) -> DataLoader:
    """A DataLoader; without a sampler, eval sharding over ranks (no padding)."""
    ctx = ctx or DistContext()
    if sampler is None:
        sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory and ctx.device.type == "cuda",
                      drop_last=train and len(sampler) >= batch_size,  # no ragged last step, unless tiny
                      collate_fn=collate_fn, worker_init_fn=_seed_worker, persistent_workers=False)
