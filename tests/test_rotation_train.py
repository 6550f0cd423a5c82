"""Rotation training on the engine: a tiny run on real photos learns, checkpoints export, eval reports."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from effvit.train.rotation import RotationSettings, RotationTask, load_rotation_config, split_indices

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "clock")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Six skimage photos, small, as train/ and (the same photos) val/."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "val"):
        (root / split).mkdir()
    for name in PHOTOS:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.thumbnail((96, 96))
        for split in ("train", "val"):
            img.save(root / split / f"{name}.png")
    return root


def tiny_config(root, out, **task):
    overrides = [f"data.root={root}", "model.img_size=32", "data.batch_size=32", "data.num_workers=0",
                 "sched.epochs=5", "sched.warmup_epochs=0", "optim.lr=3e-3", "run.progress=false",
                 f"run.output={out}", "run.threads=1",
                 "task.short_side=64", "task.repeats=100", "task.val_repeats=8",
                 "task.crop_scale=[1.0, 1.0]", "task.hflip=false", "task.jpeg=null", "task.blur=null"]
    overrides += [f"task.{k}={v}" for k, v in task.items()]
    return load_rotation_config("rotation_photos_m0", overrides)


@pytest.mark.slow
def test_tiny_training_on_photos_learns(photo_dir, tmp_path):
    """Full circle, UV head, six real photos at fresh angles (~90 steps on the engine): the error on the
    same photos at other, fixed angles falls far below the 90 degrees MAE of chance (memorising the
    photos is fine here; generalisation is the benchmark's job)."""
    from effvit.rotation.model import load_rotation_model
    from effvit.train import seed_everything, train
    from effvit.train.rotation import build_rotation_task, export_best

    cfg = tiny_config(photo_dir, tmp_path, method="uv", angle_range="[0, 360]")
    seed_everything(0)
    task = build_rotation_task(cfg, log=lambda *_: None)
    assert len(task.train_dataset) == 600 and len(task.val_dataset) == 48 and task.name == "m0-folder"
    result = train(task, cfg, output_dir=tmp_path / "run")
    maes = [round(h["val_mae"], 1) for h in result.history]
    assert min(maes) < 35.0 and maes[-1] < maes[0], maes
    path = export_best(result, task, log=lambda *_: None)
    model = load_rotation_model(path)
    assert model.config["method"] == "uv" and model.config["settings"]["repeats"] == 100
    # the training checkpoint loads the same way
    sd = load_rotation_model(result.best_checkpoint).state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_settings_are_checked():
    with pytest.raises(ValueError, match="did you mean task.method"):
        load_rotation_config("rotation_photos_m0", ["task.methd=uv"])
    with pytest.raises(ValueError, match="choose from"):
        load_rotation_config("rotation_photos_m0", ["task.method=angle"])
    s = load_rotation_config("rotation_photos_m0", ["task.angle_range=[-10, 10]", "task.jpeg=[0.5, 30, 90]"]).task
    assert s.window == (-10.0, 10.0) and s.jpeg == (0.5, 30, 90)
    assert RotationSettings().window is None  # full circle


def test_settings_rotation_does_not_use_are_refused():
    """A classifier's aug.* and distill.* would do nothing here: they are refused, not ignored."""
    for override in ("aug.mixup=0.8", "distill.teacher=efficientvit_m5"):
        with pytest.raises(ValueError, match=f"unknown config section '{override[:override.index('.')]}' for "
                                             "RotationConfig; sections: model, data, optim"):
            load_rotation_config("rotation_photos_m0", [override])
    with pytest.raises(ValueError, match="unknown setting model.finetune"):
        load_rotation_config("rotation_photos_m0", ["model.finetune=m0.pth"])


def test_rotation_recipes_resolve_to_their_values():
    """The shipped recipes, on the neutral engine defaults, give the values they always had."""
    cfg = load_rotation_config("rotation_fashion_mnist_m0")
    assert (cfg.model.name, cfg.model.img_size, cfg.model.in_chans, cfg.data.dataset) == (
        "efficientvit_m0", 40, 1, "fashion_mnist")
    assert (cfg.data.batch_size, cfg.data.num_workers, cfg.data.pin_memory, cfg.data.repeated_aug) == (
        128, 0, False, 1)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad, cfg.optim.clip_mode) == (
        2e-3, 0.025, 1.0, "norm")
    assert (cfg.sched.epochs, cfg.sched.warmup_epochs, cfg.sched.min_lr, cfg.ema.enabled) == (10, 1, 1e-5, False)
    assert (cfg.run.output, cfg.run.amp, cfg.task.method, cfg.task.crop) == (
        "runs/rotation", "none", "cgd", "same")
    cfg = load_rotation_config("rotation_photos_m0")
    assert (cfg.model.img_size, cfg.data.batch_size, cfg.data.num_workers, cfg.optim.weight_decay) == (
        128, 64, 1, 0.05)
    assert (cfg.sched.epochs, cfg.run.log_interval, cfg.task.repeats, cfg.task.angle_range) == (30, 20, 32, (-45, 45))


def test_timm_backbone_run_folder_is_one_level(tmp_path):
    """model.name=timm/<name> names a backbone; the default run folder replaces its '/' (no nested folder)."""
    from effvit.train import Task
    from effvit.train.engine import default_run_name

    task = Task(torch.nn.Linear(1, 1), [])
    task.name = "timm/resnet18-folder"  # what build_rotation_task names a run of model.name=timm/resnet18
    name = default_run_name(task)
    assert "/" not in name and name.endswith("-timm-resnet18-folder")


def test_task_metrics_match_rotation_metrics():
    from effvit.rotation.methods import get_method
    from effvit.rotation.metrics import rotation_metrics
    from effvit.rotation.model import RotationModel

    model = RotationModel("m0", "uv", img_size=32)
    task = RotationTask(model, [], None)
    g = torch.Generator().manual_seed(0)
    theta = torch.rand(400, generator=g) * 360
    pred = theta + torch.randn(400, generator=g) * 8
    out = get_method("uv").perfect_output(pred)
    stats = [task.eval_stats(out[i:i + 100], theta[i:i + 100]) for i in range(0, 400, 100)]
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    got = task.summarize(total)
    ref = rotation_metrics((pred - theta).numpy())
    for k in ("mae", "rmse", "acc@2", "acc@5", "acc@10", "auc@2", "auc@5", "auc@10"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-4), k
    for k in ("median", "p90", "p95"):  # histogram estimates, 0.05 degree bins
        assert got[k] == pytest.approx(ref[k], abs=0.05), k


def test_split_indices():
    tr, va = split_indices(10, 0.3, seed=0)
    assert len(va) == 3 and sorted(tr + va) == list(range(10))
    assert split_indices(10, 0.3, seed=0) == (tr, va)
    assert len(split_indices(3, 0.01, 0)[1]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_indices(1, 0.5, 0)


@pytest.mark.slow
def test_eval_command_writes_report(photo_dir, tmp_path, capsys):
    from effvit.cli import main
    from effvit.rotation.model import RotationModel, save_rotation_model

    model = RotationModel("m0", "cgd", img_size=32, angle_range=(-45, 45))
    ckpt = save_rotation_model(model, tmp_path / "m.safetensors", extra={"settings": {"short_side": 64}})
    rc = main(["rotation", "eval", "--checkpoint", str(ckpt), "--data", str(photo_dir / "val"),
               "--repeats", "3", "--out", str(tmp_path / "ev"), "--no-progress", "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 3 * len(PHOTOS) and printed["window"] == [-45.0, 45.0]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["paper"]) >= {"mae", "median", "rmse", "p90", "p95", "acc@2", "auc@10"}
    lines = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("index,name,true,pred,error,abs_error,confidence")
    assert len(lines) == 1 + 3 * len(PHOTOS)
    true = np.array([float(line.split(",")[2]) for line in lines[1:]])
    assert ((true <= 45) | (true >= 315)).all()
    assert (tmp_path / "ev" / "errors.png").stat().st_size > 1000


def test_build_test_set_takes_plain_arguments(photo_dir):
    from effvit.rotation.evaluation import build_test_set
    from effvit.rotation.model import RotationModel

    model = RotationModel("m0", "cgd", img_size=32, angle_range=(-45, 45))
    ds, label, angles = build_test_set(model, data=[photo_dir / "val"], repeats=2, seed=1, limit=4)
    assert label == "val" and angles == (-45.0, 45.0) and len(ds) == 2 * 4
    x, angle = ds[0]
    assert x.shape == (3, 32, 32) and (angle <= 45 or angle >= 315)
    _, _, narrow = build_test_set(model, data=[photo_dir / "val"], angle_range=(-5.0, 5.0))
    assert narrow == (-5.0, 5.0)
    with pytest.raises(ValueError, match="--data"):
        build_test_set(model)
    with pytest.raises(ValueError, match="repeats"):
        build_test_set(model, data=[photo_dir / "val"], repeats=0)


@pytest.mark.slow
def test_evaluate_rotation_checkpoint_measures_then_saves(photo_dir, tmp_path):
    from effvit.rotation.evaluation import evaluate_rotation_checkpoint, save_rotation_evaluation
    from effvit.rotation.model import RotationModel, save_rotation_model

    model = RotationModel("m0", "uv", img_size=32, angle_range=(-30, 30))
    ckpt = save_rotation_model(model, tmp_path / "m.safetensors", extra={"settings": {"short_side": 64}})
    ev = evaluate_rotation_checkpoint(ckpt, data=[photo_dir / "val"], repeats=2, progress=False)
    assert ev.output_dir == tmp_path / "eval-val" and ev.written == {}
    assert not any(ev.output_dir.iterdir())  # measuring writes nothing
    assert ev.window == (-30.0, 30.0) and ev.angle_range == (-30.0, 30.0)  # the model's training range
    assert ev.title == "m0 / uv on val" and len(ev.result.rows) == 2 * len(PHOTOS)
    assert ev.info["images"] == len(PHOTOS) and ev.info["samples"] == 2 * len(PHOTOS)
    assert ev.info["window"] == [-30.0, 30.0] and ev.info["method"] == "uv"
    paths = save_rotation_evaluation(ev)
    assert paths == ev.written and set(paths) == {"metrics", "predictions", "plot"}
    saved = json.loads(paths["metrics"].read_text())
    assert saved["samples"] == 2 * len(PHOTOS) and saved["subdegree"] == ev.result.metrics["subdegree"]
    free = evaluate_rotation_checkpoint(ckpt, data=[photo_dir / "val"], window=None, out=tmp_path / "free",
                                        progress=False)
    assert free.window is None and free.info["window"] is None and free.output_dir == tmp_path / "free"


def test_export_command_half(tmp_path):
    from effvit.cli import main
    from effvit.rotation.model import RotationModel, load_rotation_model, save_rotation_model

    src = save_rotation_model(RotationModel("m0", "psc", img_size=32), tmp_path / "a.safetensors")
    assert main(["rotation", "export", "--checkpoint", str(src), "--out", str(tmp_path / "b.safetensors"),
                 "--half"]) == 0
    assert (tmp_path / "b.safetensors").stat().st_size < 0.6 * src.stat().st_size
    assert load_rotation_model(tmp_path / "b.safetensors").config["method"] == "psc"
