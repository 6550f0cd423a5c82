"""Data: folder checks with clear errors, unreadable images (skip and count, or stop), Fashion-MNIST,
samplers, configs."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import make_image_folder, tiny_config

from effvit.train import Unreadable, build_classification_task, build_loader, evaluate, load_config, packaged_configs
from effvit.train.config import Config
from effvit.train.data import FASHION_MNIST_DIR, FashionMNIST, build_train_sampler, read_idx
from effvit.train.distributed import DistContext


def _task(cfg):
    return build_classification_task(cfg, log=lambda *_: None)


def test_missing_and_empty_folders_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*ImageNet layout"):
        _task(tiny_config(tmp_path / "nowhere", tmp_path))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(ValueError, match="is empty: it needs one subfolder of images per class"):
        _task(tiny_config(tmp_path / "empty", tmp_path))
    (tmp_path / "empty" / "train" / "cat").mkdir()
    (tmp_path / "empty" / "val" / "cat").mkdir()
    with pytest.raises(ValueError, match="class folder .*cat holds no images"):
        _task(tiny_config(tmp_path / "empty", tmp_path))
    with pytest.raises(ValueError, match="no data folder given"):
        _task(tiny_config(tmp_path, tmp_path, "data.root=null"))


def test_class_folders_must_match_between_train_and_val(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=2, n_val=1)
    (root / "val" / "square").rename(root / "val" / "squares")
    with pytest.raises(ValueError, match=r"differ: only in train: \['square'\]; only in val: \['squares'\]"):
        _task(tiny_config(root, tmp_path))


def test_unreadable_images_are_skipped_and_counted_or_stop_under_strict(tmp_path, capsys):
    from effvit.train import train

    root = make_image_folder(tmp_path / "d", n_train=4, n_val=2)
    (root / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "val" / "square" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    cfg = tiny_config(root, tmp_path / "out", "sched.epochs=1", "ema.enabled=false", "data.batch_size=3")
    result = train(_task(cfg), cfg)
    assert result.history[0]["skipped"] == 1
    out = capsys.readouterr().out
    assert "skipped unreadable image" in out and "broken.png" in out
    task = _task(cfg)
    res = evaluate(task.model, build_loader(task.val_dataset, 8), task, progress=False)
    assert len(res.skipped) == 1 and "truncated.jpg" in res.skipped[0] and int(res.stats["count"]) == 4
    strict = tiny_config(root, tmp_path / "strict", "sched.epochs=1", "data.strict=true", "data.batch_size=3")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png.*drop --strict"):
        train(_task(strict), strict)


def test_idx_reader_and_fashion_mnist(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 2, 3, 4) + imgs.tobytes())
    assert np.array_equal(read_idx(path), imgs)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path)
    if not Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (make data)")
    test = FashionMNIST(train=False)
    assert len(test) == 10000 and np.bincount(test.targets).tolist() == [1000] * 10
    img, label = test[0]
    assert img.size == (28, 28) and img.mode == "L" and label == 9  # the first test image is an ankle boot


def test_train_sampler_shards_ranks_and_repeats_augmentation():
    data = list(range(20))
    parts = [list(build_train_sampler(data, DistContext(rank=r, world_size=2), seed=0)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == data and not set(parts[0]) & set(parts[1])
    again = list(build_train_sampler(data, DistContext(rank=0, world_size=2), seed=0))
    assert again == parts[0]  # the order depends on (seed, epoch) only: resumable
    s = build_train_sampler(data, DistContext(rank=0, world_size=2), seed=0)
    s.set_epoch(1)
    assert list(s) != parts[0]
    ra = [list(build_train_sampler(data, DistContext(rank=r, world_size=3), seed=0, repeated_aug=3))
          for r in range(3)]
    assert ra[0] == ra[1] == ra[2]  # each rank sees the same images, augmented independently (DeiT's RA)
    half = build_train_sampler(data, DistContext(), seed=0, fraction=0.5)
    assert len(list(half)) == 10


def test_shipped_configs_and_overrides():
    names = packaged_configs()
    assert {f"efficientvit_m{i}" for i in range(6)} | {"fashion_mnist_m0"} <= set(names)
    for n in names:
        load_config(n)
    cfg = load_config("efficientvit_m4")
    assert (cfg.model.name, cfg.sched.epochs, cfg.optim.weight_decay, cfg.optim.clip_grad) == (
        "efficientvit_m4", 300, 0.025, 0.02)
    assert cfg.aug.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.repeated_aug == 3
    assert cfg.ema.decay == 0.99996
    assert load_config("efficientvit_m0").to_dict() == Config().to_dict() | {"run": load_config(
        "efficientvit_m0").to_dict()["run"]}  # the dataclass defaults are the official recipe
    cfg = load_config("efficientvit_m0", ["optim.base_lr=2e-3", "aug.scale=[0.5, 1]", "distill.teacher=null"])
    assert cfg.optim.base_lr == 2e-3 and cfg.aug.scale == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"unknown setting optim.lrr \(did you mean optim.lr\?\)"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="sched.epochs: expected an integer"):
        load_config(None, ["sched.epochs=ten"])
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        load_config(None, ["sched.epochs"])
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        load_config("no_such_config")


def test_lr_scaling_rule_and_no_decay_groups():
    from effvit.models import create_model
    from effvit.train.engine import build_optimizer

    cfg = load_config("efficientvit_m0")
    model = create_model("efficientvit_m0", num_classes=10, img_size=64)
    opt = build_optimizer(model, cfg, global_batch=2048)
    assert all(abs(g["lr"] - 4e-3) < 1e-12 for g in opt.param_groups)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, p in model.named_parameters():
        expect = p.ndim <= 1 or name.endswith("attention_biases")
        assert (id(p) in no_decay) == expect, name


class _SomeUnreadable(torch.utils.data.Dataset):
    """Two classes of flat images; the items in ``bad`` cannot be decoded."""

    def __init__(self, n: int, bad=()):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 2
        self.x = torch.rand(n, 3, 32, 32, generator=g) * 0.2 + self.y[:, None, None, None] * 0.5
        self.bad = set(bad)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return Unreadable(f"img{i}.png", "OSError: broken") if i in self.bad else (self.x[i], int(self.y[i]))


@pytest.mark.parametrize("mixup", [0.0, 0.8])
def test_a_batch_left_with_one_image_is_dropped_and_said(tmp_path, capsys, mixup):
    """Batch 4 whose first batch keeps one readable image: BatchNorm cannot train on it (and mixup would
    pair it with nothing, a NaN loss): the step is dropped with a warning, the rest of the epoch trains."""
    from effvit.models import create_model
    from effvit.train import ClassificationTask, train
    from effvit.train.engine import seed_everything

    cfg = tiny_config(tmp_path, tmp_path / "out", "sched.epochs=1", "ema.enabled=false", "run.eval_every=0",
                      f"aug.mixup={mixup}")
    first_batch = list(build_train_sampler(range(12), DistContext(), seed=cfg.run.seed))[:4]
    seed_everything(0)
    mix = None
    if mixup:
        from timm.data import Mixup

        mix = Mixup(mixup_alpha=mixup, num_classes=2)
    task = ClassificationTask(create_model("efficientvit_m0", num_classes=2, img_size=32),
                              _SomeUnreadable(12, bad=first_batch[:3]), None, num_classes=2, mixup=mix)
    result = train(task, cfg)
    out = capsys.readouterr().out
    assert "step 1/3 dropped: 1 readable image(s) left in a batch" in out, out
    assert result.history[0]["skipped"] == 3 and np.isfinite(result.history[0]["train_loss"])


def test_thread_count_does_not_follow_the_load_unless_asked(monkeypatch):
    """The shipped Fashion-MNIST recipe and the demo keep torch's thread count whatever the machine's
    load; counting the idle cores is opt-in (run.threads=idle)."""
    import os

    from effvit.cli.demo import DEMO_OVERRIDES
    from effvit.train.engine import configure_threads

    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))  # a very busy machine
    before = torch.get_num_threads()
    try:
        for cfg in (load_config("fashion_mnist_m0"), load_config("fashion_mnist_m0", DEMO_OVERRIDES)):
            configure_threads(cfg.run.threads, DistContext())
            assert torch.get_num_threads() == before
        configure_threads("idle", DistContext())
        assert torch.get_num_threads() == 1
        configure_threads(3, DistContext())
        assert torch.get_num_threads() == 3
        with pytest.raises(ValueError, match=r"run.threads must be .*'idle'"):
            configure_threads(0, DistContext())
    finally:
        torch.set_num_threads(before)
