"""Shared by tests/test_train*.py: tiny image folders and configs that train in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effvit.train import ClassificationConfig, EngineConfig, Task, load_classification_config, load_config


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


def tiny_config(data: Path, out: Path, *overrides: str) -> ClassificationConfig:
    """M0 at 32 px, batch 4, no heavy augmentation, deterministic, quiet."""
    return load_classification_config("fashion_mnist_m0", [
        "data.dataset=folder", f"data.root={data}", "data.batch_size=4", "data.val_batch_size=8",
        "data.num_workers=0", "model.img_size=32", "model.in_chans=3", "aug.mean=[0.5, 0.5, 0.5]",
        "aug.std=[0.25, 0.25, 0.25]", "aug.auto_augment=null", "aug.re_prob=0", "aug.scale=[0.8, 1.0]",
        "aug.smoothing=0", "sched.epochs=2", "sched.warmup_epochs=0", "optim.lr=2e-3", "ema.decay=0.9",
        f"run.output={out}", "run.name=run", "run.progress=false", "run.threads=1", "run.deterministic=true",
        *overrides])


class SomeUnreadable(torch.utils.data.Dataset):
    """Flat images with a brightness target; the items in ``bad`` cannot be decoded."""

    def __init__(self, n: int, bad=()):
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        self.bad = set(bad)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from effvit.data import Unreadable

        return Unreadable(f"img{i}.png", "OSError: broken") if i in self.bad else (self.x[i], self.x[i].mean())


class TwoClasses(torch.utils.data.Dataset):
    """Two classes of flat images; the items in ``bad`` cannot be decoded."""

    def __init__(self, n: int, bad=()):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 2
        self.x = torch.rand(n, 3, 32, 32, generator=g) * 0.2 + self.y[:, None, None, None] * 0.5
        self.bad = set(bad)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from effvit.data import Unreadable

        return Unreadable(f"img{i}.png", "OSError: broken") if i in self.bad else (self.x[i], int(self.y[i]))


class Brightness(Task):
    best_metric, best_mode = "loss", "min"

    def loss(self, outputs, targets):
        return torch.nn.functional.mse_loss(outputs.squeeze(1), targets.float())


def ddp_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One process of a 2-rank gloo epoch in which rank 1's first batch is entirely unreadable; writes
    this rank's weights and the epoch's row to ``out``."""
    import datetime
    import json
    import os
    import sys

    import torch.distributed as dist

    from effvit.data import build_loader
    from effvit.train.distributed import DistContext
    from effvit.train.engine import train_one_epoch
    from effvit.train.samplers import build_train_sampler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ctx = DistContext(rank=rank, world_size=world)
    cfg = load_config(EngineConfig, None, ["sched.epochs=1", "run.progress=false", "run.log_interval=1",
                                           "optim.clip_grad=null"])
    ds = SomeUnreadable(16)
    sampler = build_train_sampler(ds, ctx, seed=0)
    sampler.set_epoch(0)
    if rank == 1:
        ds.bad = set(list(sampler)[:4])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loader = build_loader(ds, 4, sampler=sampler, train=True, rank=ctx.rank, world_size=ctx.world_size)
    row = train_one_epoch(ddp, Brightness(model, ds), loader, torch.optim.SGD(model.parameters(), lr=0.1),
                          epoch=0, cfg=cfg, ctx=ctx, raw_model=model)
    torch.save(dict(model.named_parameters()), f"{out}/weights_rank{rank}.pth")  # BN statistics are per rank
    with open(f"{out}/row_rank{rank}.json", "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # the results are on disk: skip the seconds of interpreter teardown with torch loaded
