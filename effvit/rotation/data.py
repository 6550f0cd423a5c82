"""Rotation data: upright images in, (rotated image tensor, angle) pairs out.

Sources hold upright images: ``FolderImages`` (any folder of photos, any size, EXIF orientation
applied) and ``ArrayImages`` (e.g. Fashion-MNIST via ``fashion_mnist``). ``RotatedImages`` draws an
angle per sample, rotates on an expanded canvas, crops, optionally re-compresses / blurs (so the network
cannot read the angle off the rotated JPEG block grid or the resampling blur), then resizes the shorter
side and centre-crops a square, as the paper does. Training draws a fresh uniform angle every time a
sample is read (so every epoch); with ``seed`` set the angle (and any augmentation) of sample i is fixed,
for validation and test sets.

``to_input`` is the one preprocessing used by training, evaluation and ``straighten``: inference must see
exactly what training saw (crop ratio 1.0, same resize).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from effvit.data import FashionMNIST, Unreadable, list_images, load_image, resize_short

from .geometry import CROPS, rotate_crop

FULL_CIRCLE = (0.0, 360.0)


def centre_square(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size``, then the centred size x size square."""
    img = resize_short(img, size)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, H, W) float tensor, normalised. Done in numpy: tiny torch ops in a data pipeline pay for
    intra-op threading they cannot use."""
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if len(mean) != arr.shape[2] or len(std) != arr.shape[2]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for a {arr.shape[2]}-channel image")
    m = np.asarray(mean, dtype=np.float32) * 255.0
    s = np.asarray(std, dtype=np.float32) * 255.0
    return torch.from_numpy(np.ascontiguousarray(((arr - m) / s).transpose(2, 0, 1)))


def to_input(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The network's input for one (rotated, cropped) image: centre square of ``size``, normalised."""
    return to_tensor(centre_square(img, size), mean, std)


# -- sources of upright images -------------------------------------------------------------------------
class FolderImages:
    """Upright photos from files/folders; decoded (EXIF-rotated, shrunk to ``short_side``) once and kept
    in memory when ``cache`` is on, since a photo pool is small and decoding large JPEGs is slow."""

    def __init__(self, paths: Sequence[str | Path], short_side: int | None = 512, cache: bool = True,
                 mode: str = "RGB"):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no images given: pass image files or folders that contain .jpg/.png/... files")
        self.short_side = short_side
        self.mode = mode
        self._cache: dict[int, Image.Image] | None = {} if cache else None

    @classmethod
    def from_roots(cls, *roots: str | Path, **kwargs) -> FolderImages:
        return cls(list_images(*roots), **kwargs)

    @property
    def names(self) -> list[str]:
        return [str(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = load_image(self.paths[i], self.mode, self.short_side)
        if self._cache is not None:
            self._cache[i] = img
        return img


class ArrayImages:
    """Upright images from a uint8 array (N, H, W) or (N, H, W, C), optionally zero-padded to a square of
    side ``pad_to`` so that a rotation about the centre never cuts the content."""

    def __init__(self, images: np.ndarray, names: Sequence[str] | None = None, pad_to: int | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}")
        self.images = images
        self.pad_to = pad_to
        self._names = list(names) if names is not None else None

    @property
    def names(self) -> list[str]:
        return self._names if self._names is not None else [str(i) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Image.Image:
        img = Image.fromarray(self.images[i])
        if self.pad_to and (img.width < self.pad_to or img.height < self.pad_to):
            side = max(self.pad_to, img.width, img.height)
            canvas = Image.new(img.mode, (side, side))
            canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            img = canvas
        return img


def fashion_mnist(split: str = "train", root: str | Path | None = None,
                  pad_to: int | None = 40) -> ArrayImages:
    """Fashion-MNIST images (the engine's IDX reader) as an upright source; 28x28 zero-padded to 40x40
    (more than 28 * sqrt 2) by default, so a rotation about the centre never cuts the garment."""
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    images = FashionMNIST(root, train=split == "train").images
    names = [f"fashion-mnist-{split}-{i}" for i in range(len(images))]
    return ArrayImages(images, names=names, pad_to=pad_to)


class Subset:
    """Items ``indices`` of a source, keeping their names."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    @property
    def names(self) -> list[str]:
        names = self.source.names
        return [names[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[i]]


# -- the rotation dataset ------------------------------------------------------------------------------
class RotatedImages(Dataset):
    """(rotated image tensor, angle in degrees) from a source of upright images.

    ``angle_range``: (lo, hi) degrees; angles are uniform in [lo, hi), labels are taken mod 360 (the full
    circle (0, 360) or a tilt window such as (-45, 45)). ``seed``: None draws fresh angles on every read
    (training); an int fixes sample i's angle and augmentation (validation, test). ``repeats``: each
    source image appears that many times per epoch (several crops and angles of a small photo pool).
    Augmentation, all off by default (the paper uses none): ``crop_scale`` random crop of the upright
    image covering that fraction of its area, ``hflip`` (a mirrored upright photo is still upright),
    ``colour`` = (probability, strength): brightness, contrast and saturation each scaled by a factor in
    [1 - strength, 1 + strength] and the hue shifted by up to strength / 10 of the circle (torchvision's
    colour functions, with factors drawn from the sample's own generator so a seeded set stays fixed),
    ``noise`` = (probability, max Gaussian sigma in 0..255 units at the output size), ``jpeg`` =
    (probability, min quality, max quality) re-compression after the rotation, ``blur`` = (probability,
    max Gaussian radius in output pixels).
    """

    def __init__(self, source, size: int, mean: Sequence[float], std: Sequence[float],
                 angle_range: tuple[float, float] = FULL_CIRCLE, crop: str = "max_area",
                 seed: int | None = None, repeats: int = 1, crop_scale: tuple[float, float] = (1.0, 1.0),
                 hflip: bool = False, colour: tuple[float, float] | None = None,
                 noise: tuple[float, float] | None = None,
                 jpeg: tuple[float, int, int] | None = None, blur: tuple[float, float] | None = None):
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; choose from {', '.join(CROPS)}")
        lo, hi = float(angle_range[0]), float(angle_range[1])
        if not (hi > lo and hi - lo <= 360.0):
            raise ValueError(f"angle_range must be (lo, hi) with lo < hi <= lo + 360, got {angle_range}")
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if size < 1 or repeats < 1:
            raise ValueError(f"size and repeats must be >= 1, got {size}, {repeats}")
        for label, aug in (("colour", colour), ("noise", noise), ("jpeg", jpeg), ("blur", blur)):
            if aug is not None and not 0.0 <= aug[0] <= 1.0:
                raise ValueError(f"{label}'s first value is a probability in [0, 1], got {aug}")
        if colour is not None and not 0.0 <= colour[1] < 1.0:
            raise ValueError(f"colour strength must be in [0, 1), got {colour[1]}")
        if noise is not None and not noise[1] >= 0.0:
            raise ValueError(f"noise sigma must be >= 0, got {noise[1]}")
        self.source, self.size, self.mean, self.std = source, int(size), tuple(mean), tuple(std)
        self.angle_range, self.crop, self.seed, self.repeats = (lo, hi), crop, seed, int(repeats)
        self.crop_scale, self.hflip, self.jpeg, self.blur = tuple(crop_scale), hflip, jpeg, blur
        self.colour, self.noise = colour, noise

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    def name(self, i: int) -> str:
        return self.source.names[i % len(self.source)]

    def _rng(self, i: int) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng([self.seed, i])
        # torch's generator: seeded per DataLoader worker and epoch, so angles are fresh every epoch
        return np.random.default_rng(int(torch.randint(0, 2 ** 62, ()).item()))

    def angle(self, i: int) -> float:
        """The angle sample i gets (fixed-seed datasets only; fresh ones draw a new one per read)."""
        if self.seed is None:
            raise ValueError("angles are only fixed when the dataset has a seed")
        return self._draw_angle(self._rng(i))

    def _draw_angle(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(*self.angle_range) % 360.0)

    def _random_crop(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        lo, hi = self.crop_scale
        if lo >= 1.0:
            return img
        w, h = img.size
        area = w * h * rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = min(w, max(1, round(math.sqrt(area * aspect))))
        ch = min(h, max(1, round(math.sqrt(area / aspect))))
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        return img.crop((left, top, left + cw, top + ch))

    @staticmethod
    def _colour(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
        """Brightness, contrast, saturation and hue changed in a random order (as ColorJitter does)."""
        ops = [(TF.adjust_brightness, rng.uniform(1 - strength, 1 + strength)),
               (TF.adjust_contrast, rng.uniform(1 - strength, 1 + strength))]
        if img.mode == "RGB":  # saturation and hue mean nothing for a grey image
            ops += [(TF.adjust_saturation, rng.uniform(1 - strength, 1 + strength)),
                    (TF.adjust_hue, rng.uniform(-strength / 10, strength / 10))]
        for k in rng.permutation(len(ops)):
            fn, factor = ops[k]
            img = fn(img, float(factor))
        return img

    def render(self, i: int) -> tuple[Image.Image, float]:
        """Sample i as a PIL image (rotated, cropped, degraded, not yet resized) and its angle."""
        rng = self._rng(i)
        theta = self._draw_angle(rng)  # first draw, so angle(i) matches whatever augmentation is on
        img = self.source[i % len(self.source)]
        img = self._random_crop(img, rng)
        if min(img.size) > 2 * self.size:  # rotating a large crop costs much and adds nothing at this size
            img = resize_short(img, 2 * self.size)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = rotate_crop(img, theta, self.crop)
        if self.colour is not None and rng.random() < self.colour[0]:
            img = self._colour(img, rng, self.colour[1])
        if self.noise is not None and rng.random() < self.noise[0]:
            # sigma given at the output size: shrinking by a factor f (Pillow's antialiasing bilinear
            # filter) divides white noise by about 1.5 f, so draw it that much stronger here
            f = min(img.size) / self.size
            sigma = rng.uniform(0.0, self.noise[1]) * (1.5 * f if f > 1 else 1.0)
            arr = np.asarray(img, dtype=np.float32)
            arr = arr + rng.normal(0.0, sigma, arr.shape).astype(np.float32)
            img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), img.mode)
        if self.jpeg is not None and rng.random() < self.jpeg[0]:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(rng.integers(self.jpeg[1], self.jpeg[2] + 1)))
            img = Image.open(io.BytesIO(buf.getvalue()))
            img.load()
        if self.blur is not None and rng.random() < self.blur[0]:
            # radius given in output pixels: scale it to this image's resolution
            radius = rng.uniform(0.0, self.blur[1]) * min(img.size) / self.size
            img = img.filter(ImageFilter.GaussianBlur(radius))
        return img, theta

    def __getitem__(self, i: int):
        try:
            img, theta = self.render(i)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # the engine's collate drops it and reports the file by name instead of crashing a worker
            return Unreadable(self.name(i), f"{type(e).__name__}: {e}")
        return to_input(img, self.size, self.mean, self.std), torch.tensor(theta, dtype=torch.float32)
