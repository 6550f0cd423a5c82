"""Rotation estimation as a ``Task`` of the training engine: model, data, loss and circular metrics.

The engine (``effvit.train.engine``) owns the loop: optimizer, schedule, checkpoints, resume, torchrun, logs.
This module says what is learned, and declares its settings (``RotationConfig``): the engine's sections,
``model`` (the backbone: ``name`` is an effvit variant or ``timm/<name>``), ``data`` (where the upright
images are, and the loader) and ``task`` (``RotationSettings``: head, angles, augmentation). Settings it
does not use (a classifier's ``aug`` or ``distill``) are refused with the list of its sections.

Validation metrics are summed statistics, as the engine requires: MAE, RMSE, acc@k and AUC@k exactly,
median / P90 / P95 from a histogram of the errors in 0.05 degree bins (``effvit rotation eval`` computes
them exactly from every prediction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from effvit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from effvit.data import list_images as list_image_files
from effvit.models.weights import read_checkpoint
from effvit.rotation.data import FolderImages, RotatedImages, Subset, fashion_mnist
from effvit.rotation.geometry import CROPS
from effvit.rotation.methods import get_method
from effvit.rotation.metrics import THRESHOLDS, circular_error
from effvit.rotation.model import RotationModel, save_rotation_model

from .config import (
    Config,
    EmaConfig,
    LoaderConfig,
    OptimConfig,
    RunConfig,
    SchedConfig,
    check_range,
    is_fraction,
    load_config,
    require,
)
from .engine import TrainResult
from .task import Task

HIST_BIN = 0.05  # degrees per histogram bin of the validation errors
HIST_BINS = int(180 / HIST_BIN)


@dataclass
class RotationSettings:
    """The ``task:`` section of a rotation config."""

    method: str = "cgd"  # da | cls | uv | psc | cgd
    angle_range: tuple[float, float] = (0.0, 360.0)  # uniform in [lo, hi): full circle or a tilt window
    crop: str = "max_area"  # max_area | keep_aspect | none | same (plain backgrounds, e.g. Fashion-MNIST)
    subdegree: bool = True  # binned heads: local circular mean around the peak (else argmax, the paper's)
    restrict_to_range: bool = True  # decode inside angle_range (a tilt-window model answers inside it)
    repeats: int = 1  # each training image this many times per epoch (small photo pools)
    val_repeats: int = 1  # each validation image with this many fixed angles
    val_seed: int = 0  # the seed of the validation angles
    val_fraction: float = 0.1  # folder without a val/ subfolder: this share of the images validates
    val_size: int = 5000  # fashion_mnist: the last N training images validate (the test set stays unseen)
    short_side: int | None = 512  # photos are decoded once at this shorter side and cached in memory
    pad_to: int = 40  # fashion_mnist: 28x28 padded to this square
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random crop of the upright image (area share)
    hflip: bool = False  # mirror upright images (still upright)
    colour: tuple[float, float] | None = None  # (probability, strength): brightness/contrast/saturation/hue
    noise: tuple[float, float] | None = None  # (probability, max Gaussian sigma, 0..255 at the input size)
    jpeg: tuple[float, int, int] | None = None  # (probability, min quality, max quality) after rotation
    blur: tuple[float, float] | None = None  # (probability, max Gaussian radius in input pixels)
    mean: tuple[float, ...] | None = None  # None: Fashion-MNIST's statistics, or the backbone's
    std: tuple[float, ...] | None = None

    def check(self) -> None:
        get_method(self.method)  # a typo fails with the list of heads
        lo, hi = self.angle_range
        require(lo < hi and hi - lo <= 360, "task.angle_range", self.angle_range,
                "[low, high) with low < high, at most 360 degrees wide")
        require(self.crop in CROPS, "task.crop", self.crop, "one of " + ", ".join(CROPS))
        for key in ("repeats", "val_repeats"):
            require(getattr(self, key) >= 1, f"task.{key}", getattr(self, key), "a whole number >= 1")
        require(0 < self.val_fraction < 1, "task.val_fraction", self.val_fraction, "a fraction in (0, 1)")
        require(self.val_size >= 1, "task.val_size", self.val_size, "a whole number >= 1")
        require(self.short_side is None or self.short_side >= 1, "task.short_side", self.short_side,
                "a size in pixels >= 1, or null (full size)")
        check_range("task.crop_scale", self.crop_scale, 0, 1)
        if self.jpeg is not None:
            p, qmin, qmax = self.jpeg
            require(is_fraction(p) and 1 <= qmin <= qmax <= 100, "task.jpeg", self.jpeg,
                    "[probability in [0, 1], min quality, max quality] with 1 <= min <= max <= 100, or null")
        if self.blur is not None:
            p, radius = self.blur
            require(is_fraction(p) and radius >= 0, "task.blur", self.blur,
                    "[probability in [0, 1], max radius >= 0], or null")
        require(self.std is None or all(v > 0 for v in self.std), "task.std", self.std, "positive numbers, or null")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def window(self) -> tuple[float, float] | None:
        lo, hi = self.angle_range
        return None if not self.restrict_to_range or hi - lo >= 360 else (lo, hi)


@dataclass
class BackboneConfig:
    """The ``model`` section: the backbone the rotation head sits on."""

    name: str = "efficientvit_m0"  # m0..m5, or a timm model as timm/<name>
    img_size: int = 224
    in_chans: int = 3
    pretrained: str | None = None  # backbone weights (any layout), or 'imagenet' (see RotationModel)
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (small data sets)
    channels_last: bool = False

    def check(self) -> None:
        require(self.img_size >= 1, "model.img_size", self.img_size, "a size in pixels >= 1")
        require(self.in_chans in (1, 3), "model.in_chans", self.in_chans, "1 (grey) or 3 (RGB)")


@dataclass
class RotationDataConfig(LoaderConfig):
    """Where the upright images are; the loader settings come from ``LoaderConfig``."""

    dataset: str = "folder"  # folder (upright photos) | fashion_mnist
    root: str | None = None  # folder: the images; fashion_mnist: the IDX files (None: Debian path)
    train_split: str = "train"
    val_split: str = "val"
    strict: bool = False  # stop at the first image that cannot be decoded instead of skipping it


@dataclass
class RotationConfig(Config):
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: RotationDataConfig = field(default_factory=RotationDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: RotationSettings = field(default_factory=RotationSettings)


def load_rotation_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                         base: RotationConfig | dict | None = None, values: dict | None = None) -> RotationConfig:
    """``load_config`` for rotation (a recipe such as 'rotation_photos_m0', overrides), the head checked."""
    return load_config(RotationConfig, path, overrides, base=base, values=values)


class RotationTask(Task):
    """Loss = the method's criterion on the angle labels; metrics = circular errors of the decoded angle."""

    best_metric, best_mode = "mae", "min"

    def __init__(self, model: RotationModel, train_dataset, val_dataset=None, *,
                 window: tuple[float, float] | None = None, subdegree: bool = True, meta: dict | None = None):
        super().__init__(model, train_dataset, val_dataset, meta=meta)
        self.method = model.method
        self.window, self.subdegree = window, subdegree

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.method.criterion(outputs, targets)

    def eval_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = self.method.decode(outputs.float(), self.window, self.subdegree)
        e = circular_error(pred, targets).abs()  # float64
        n = e.numel()
        stats = {
            "loss": self.loss(outputs, targets).detach().double() * n,
            "count": torch.tensor(float(n), dtype=torch.float64, device=e.device),
            "abs": e.sum(), "sq": (e ** 2).sum(),
            "hist": torch.bincount((e / HIST_BIN).long().clamp_(max=HIST_BINS - 1),
                                   minlength=HIST_BINS).double(),
        }
        for k in THRESHOLDS:
            stats[f"acc@{k:g}"] = (e <= k).double().sum()
            stats[f"auc@{k:g}"] = (1.0 - e / k).clamp(min=0.0).sum()
        return stats

    def summarize(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        n = float(stats["count"].clamp(min=1))
        out = {"loss": float(stats["loss"]) / n, "mae": float(stats["abs"]) / n,
               "rmse": (float(stats["sq"]) / n) ** 0.5}
        cdf = torch.cumsum(stats["hist"].double(), 0) / n
        for name, q in (("median", 0.5), ("p90", 0.9), ("p95", 0.95)):
            out[name] = (int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64))) + 0.5) * HIST_BIN
        for k in THRESHOLDS:
            out[f"acc@{k:g}"] = 100.0 * float(stats[f"acc@{k:g}"]) / n
        for k in THRESHOLDS:
            out[f"auc@{k:g}"] = float(stats[f"auc@{k:g}"]) / n
        return out


# -- building a task from a config ---------------------------------------------------------------------
def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: a seeded random ``fraction`` of 0..n-1 (at least one each) validates."""
    if not 0 < fraction < 1:
        raise ValueError(f"task.val_fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 images to hold some out for validation, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[k:].tolist()), sorted(order[:k].tolist())


def build_sources(cfg: RotationConfig, s: RotationSettings, mode: str):
    """(train source, val source) of upright images for ``cfg.data``."""
    d = cfg.data
    if d.dataset == "fashion_mnist":
        full = fashion_mnist("train", d.root, pad_to=s.pad_to)
        n = len(full)
        if not 0 < s.val_size < n:
            raise ValueError(f"task.val_size must be in 1..{n - 1}, got {s.val_size}")
        return Subset(full, range(n - s.val_size)), Subset(full, range(n - s.val_size, n))
    if d.dataset != "folder":
        raise ValueError(f"data.dataset must be 'folder' (upright photos) or 'fashion_mnist', "
                         f"got {d.dataset!r}")
    if not d.root:
        raise ValueError("no data given: pass --data DIR, a folder of upright images (any size; with "
                         f"{d.train_split}/ and {d.val_split}/ subfolders, or split by task.val_fraction)")
    root = Path(d.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    kw = dict(short_side=s.short_side, mode=mode)
    if (root / d.train_split).is_dir() and (root / d.val_split).is_dir():
        return (FolderImages.from_roots(root / d.train_split, **kw),
                FolderImages.from_roots(root / d.val_split, **kw))
    paths = list_image_files(root)
    tr, va = split_indices(len(paths), s.val_fraction, s.val_seed)
    return FolderImages([paths[i] for i in tr], **kw), FolderImages([paths[i] for i in va], **kw)


def build_rotation_model(cfg: RotationConfig, s: RotationSettings) -> RotationModel:
    m = cfg.model
    mean, std = s.mean, s.std
    if mean is None and cfg.data.dataset == "fashion_mnist":
        mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    return RotationModel(m.name, s.method, img_size=m.img_size, in_chans=m.in_chans,
                         pretrained=m.pretrained or None, mean=mean, std=std,
                         angle_range=s.angle_range, crop=s.crop)


def build_rotation_task(cfg: RotationConfig, log=print) -> RotationTask:
    """Model, rotated datasets (fresh angles for training, fixed ones for validation) and metrics."""
    s = cfg.task
    get_method(s.method)
    if cfg.model.in_chans not in (1, 3):
        raise ValueError(f"model.in_chans must be 1 (grey) or 3 (RGB), got {cfg.model.in_chans}")
    mode = "L" if cfg.model.in_chans == 1 else "RGB"
    train_src, val_src = build_sources(cfg, s, mode)
    model = build_rotation_model(cfg, s)
    c = model.config
    common = dict(size=c["img_size"], mean=c["mean"], std=c["std"], angle_range=s.angle_range, crop=s.crop)
    train_ds = RotatedImages(train_src, repeats=s.repeats, crop_scale=s.crop_scale, hflip=s.hflip,
                             colour=s.colour, noise=s.noise, jpeg=s.jpeg, blur=s.blur, **common)
    val_ds = RotatedImages(val_src, seed=s.val_seed, repeats=s.val_repeats, **common)
    log(f"rotation {s.method} on {cfg.model.name}: {len(train_src)} training images x {s.repeats}, "
        f"{len(val_src)} validation x {s.val_repeats}; angles {s.angle_range[0]:g}..{s.angle_range[1]:g}, "
        f"crop {s.crop}, {c['img_size']} px")
    meta = {"task": "rotation", "arch": f"rotation-{s.method}-{cfg.model.name}", "rotation": plain(c),
            "settings": s.to_dict()}
    task = RotationTask(model, train_ds, val_ds, window=s.window, subdegree=s.subdegree, meta=meta)
    task.name = f"{cfg.model.name.removeprefix('efficientvit_')}-{cfg.data.dataset}"
    task.channels_last, task.freeze_bn = cfg.model.channels_last, cfg.model.freeze_bn
    task.strict = cfg.data.strict
    return task


def plain(d: dict) -> dict:
    """Tuples to lists: checkpoints hold plain data only (they load with weights_only=True)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def export_best(result: TrainResult, task: RotationTask, log: Callable[[str], object] = print) -> Path | None:
    """best.safetensors beside the run's best.pth (the model with its settings and best metrics); None
    when the run saved no best checkpoint. Moves ``task.model`` to the CPU."""
    if not Path(result.best_checkpoint).is_file():
        return None
    sd, meta = read_checkpoint(result.best_checkpoint)
    model = task.model.cpu()
    model.load_state_dict(sd)
    path = save_rotation_model(model, Path(result.output_dir) / "best.safetensors",
                               extra={"settings": meta.get("settings"), "best": result.best})
    log(f"exported {path}")
    return path
