"""Shared by tests/test_train*.py: tiny image folders and configs that train in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from effvit.train import Config, load_config


def make_image_folder(root: Path, classes=("circle", "square"), n_train: int = 8, n_val: int = 4,
                      size: int = 24, seed: int = 0) -> Path:
    """ROOT/{train,val}/<class>/*.png with an easy signal: each class has its own brightness and shape."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                lo, hi = size // 4, 3 * size // 4
                img[lo:hi, lo:hi] = 80 + 170 * c // max(1, len(classes) - 1)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def tiny_config(data: Path, out: Path, *overrides: str) -> Config:
    """M0 at 32 px, batch 4, no heavy augmentation, deterministic, quiet."""
    return load_config("fashion_mnist_m0", [
        "data.dataset=folder", f"data.root={data}", "data.batch_size=4", "data.val_batch_size=8",
        "data.num_workers=0", "model.img_size=32", "model.in_chans=3", "aug.mean=[0.5, 0.5, 0.5]",
        "aug.std=[0.25, 0.25, 0.25]", "aug.auto_augment=null", "aug.re_prob=0", "aug.scale=[0.8, 1.0]",
        "aug.smoothing=0", "sched.epochs=2", "sched.warmup_epochs=0", "optim.lr=2e-3", "ema.decay=0.9",
        f"run.output={out}", "run.name=run", "run.progress=false", "run.threads=1", "run.deterministic=true",
        *overrides])
