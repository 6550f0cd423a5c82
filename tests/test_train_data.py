"""Data: folder checks with clear errors, unreadable images (skip and count, or stop), Fashion-MNIST,
samplers, configs."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import TwoClasses, make_image_folder, tiny_config

from effvit.data import FASHION_MNIST_DIR, FashionMNIST, build_loader, read_idx
from effvit.train import (
    ClassificationConfig,
    EngineConfig,
    build_classification_task,
    evaluate,
    load_classification_config,
    load_config,
    packaged_configs,
)
from effvit.train.distributed import DistContext
from effvit.train.samplers import build_train_sampler


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


@pytest.mark.slow
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
    assert {f"efficientvit_m{i}" for i in range(6)} | {"imagenet", "fashion_mnist_m0"} <= set(names)
    for n in names:
        if not n.startswith("rotation_"):
            load_classification_config(n)
    cfg = load_classification_config("efficientvit_m0", ["optim.base_lr=2e-3", "aug.scale=[0.5, 1]",
                                                         "distill.teacher=null"])
    assert cfg.optim.base_lr == 2e-3 and cfg.aug.scale == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"unknown setting optim.lrr \(did you mean optim.lr\?\)"):
        load_config(EngineConfig, None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="sched.epochs: expected an integer"):
        load_config(EngineConfig, None, ["sched.epochs=ten"])
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        load_config(EngineConfig, None, ["sched.epochs"])
    with pytest.raises(ValueError, match="unknown config section 'aug' for EngineConfig"):
        load_config(EngineConfig, None, ["aug.mixup=0.8"])
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        load_classification_config("no_such_config")


def test_each_variant_is_the_imagenet_recipe_with_its_model():
    """efficientvit_m0..m5 resolve to imagenet.yaml, model.name aside: the recipe is stated once."""
    recipe = load_classification_config("imagenet").to_dict()
    for i in range(6):
        variant = load_classification_config(f"efficientvit_m{i}").to_dict()
        assert variant["model"].pop("name") == f"efficientvit_m{i}"
        assert variant == {**recipe, "model": {k: v for k, v in recipe["model"].items() if k != "name"}}


def test_imagenet_recipe_values():
    """The official recipe, pinned (the engine's and the task's defaults are neutral: it is all data)."""
    cfg = load_classification_config("efficientvit_m0")
    d, a, o, s = cfg.data, cfg.aug, cfg.optim, cfg.sched
    assert (cfg.model.name, cfg.model.img_size, d.batch_size, d.num_workers, d.repeated_aug) == (
        "efficientvit_m0", 224, 256, 8, 3)
    assert (a.mixup, a.cutmix, a.auto_augment, a.smoothing, a.re_prob, a.crop_pct) == (
        0.8, 1.0, "rand-m9-mstd0.5-inc1", 0.1, 0.25, 0.875)
    assert (s.epochs, s.warmup_epochs, o.base_lr, o.lr_base_size, o.weight_decay) == (300, 5, 1e-3, 512, 0.025)
    assert (o.clip_grad, o.clip_mode, cfg.ema.enabled, cfg.ema.decay, cfg.run.amp) == (
        0.02, "agc", True, 0.99996, "fp16")
    neutral = ClassificationConfig()
    assert (neutral.data.repeated_aug, neutral.aug.mixup, neutral.aug.cutmix, neutral.aug.auto_augment,
            neutral.aug.re_prob, neutral.aug.smoothing, neutral.ema.enabled) == (1, 0, 0, None, 0, 0, False)
    assert EngineConfig().to_dict().keys() == {"data", "optim", "sched", "ema", "run"}


def test_fashion_mnist_recipe_values():
    """fashion_mnist_m0 is the ImageNet recipe with its stated differences."""
    cfg = load_classification_config("fashion_mnist_m0")
    assert (cfg.model.img_size, cfg.model.in_chans, cfg.data.dataset, cfg.data.batch_size, cfg.data.num_workers,
            cfg.data.repeated_aug, cfg.data.val_batch_size) == (112, 1, "fashion_mnist", 256, 1, 1, 500)
    assert (cfg.aug.scale, cfg.aug.auto_augment, cfg.aug.re_prob, cfg.aug.mixup, cfg.aug.cutmix,
            cfg.aug.smoothing, cfg.aug.crop_pct) == ((0.8, 1.0), None, 0.0, 0.0, 0.0, 0.1, 1.0)
    assert (cfg.optim.lr, cfg.optim.clip_grad, cfg.optim.clip_mode, cfg.sched.epochs, cfg.sched.warmup_epochs,
            cfg.sched.warmup_lr) == (2e-3, 0.02, "agc", 16, 1, 1e-5)
    assert (cfg.ema.enabled, cfg.ema.decay, cfg.ema.warmup, cfg.run.amp, cfg.run.log_interval) == (
        True, 0.9998, True, "none", 20)
    # from the ImageNet recipe
    assert (cfg.aug.ratio, cfg.aug.color_jitter, cfg.optim.base_lr, cfg.optim.weight_decay) == (
        (0.75, 4 / 3), 0.4, 1e-3, 0.025)


def test_recipe_base_chains_and_loops(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: efficientvit_m3\nsched:\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\ndata:\n  batch_size: 32\n")
    cfg = load_classification_config(tmp_path / "child.yaml")
    assert (cfg.model.name, cfg.sched.epochs, cfg.data.batch_size, cfg.data.repeated_aug) == (
        "efficientvit_m3", 7, 32, 3)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="loops back"):
        load_classification_config(tmp_path / "a.yaml")


def test_saved_config_of_an_earlier_version_resumes():
    """A run saved before run.debug_ranks was retired still gives its config (the retired key dropped)."""
    saved = load_classification_config("fashion_mnist_m0").to_dict()
    saved["run"]["debug_ranks"] = False
    cfg = load_classification_config(None, base=saved)
    assert cfg.to_dict() == load_classification_config("fashion_mnist_m0").to_dict()


def test_lr_scaling_rule_and_no_decay_groups():
    from effvit.models import create_model
    from effvit.train.engine import build_optimizer

    cfg = load_classification_config("efficientvit_m0")
    model = create_model("efficientvit_m0", num_classes=10, img_size=64)
    opt = build_optimizer(model, cfg, global_batch=2048)
    assert all(abs(g["lr"] - 4e-3) < 1e-12 for g in opt.param_groups)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, p in model.named_parameters():
        expect = p.ndim <= 1 or name.endswith("attention_biases")
        assert (id(p) in no_decay) == expect, name


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
                              TwoClasses(12, bad=first_batch[:3]), None, num_classes=2, mixup=mix)
    result = train(task, cfg)
    out = capsys.readouterr().out
    assert "step 1/3 dropped: 1 readable image(s) left in a batch after skipping unreadable ones" in out, out
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
        for cfg in (load_classification_config("fashion_mnist_m0"),
                    load_classification_config("fashion_mnist_m0", DEMO_OVERRIDES)):
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
