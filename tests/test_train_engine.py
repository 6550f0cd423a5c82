"""The training engine: it learns, resumes exactly, stops on NaN, fine-tunes, refuses other variants."""

from __future__ import annotations

import os

import pytest
import torch
from _train_helpers import make_image_folder, tiny_config
from torch import nn
from torch.utils.data import Dataset

from effvit.data import build_loader
from effvit.train import (
    NonFiniteLossError,
    Task,
    build_classification_task,
    seed_everything,
    train,
)
from effvit.train.checkpoint import load_training_state


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def _build(cfg):
    seed_everything(cfg.run.seed)
    return build_classification_task(cfg, log=lambda *_: None)


def _batch_loss(model, inputs, targets):
    """Cross-entropy in train mode (batch statistics: a dozen steps cannot settle BN's running ones)."""
    import copy

    m = copy.deepcopy(model).train()
    with torch.no_grad():
        return nn.functional.cross_entropy(m(inputs), targets).item()


@pytest.mark.slow
def test_training_reduces_the_loss(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path, "sched.epochs=3", "ema.enabled=false")
    task = _build(cfg)
    inputs, targets = next(iter(build_loader(task.val_dataset, 8)))
    before = _batch_loss(task.model, inputs, targets)
    result = train(task, cfg)
    after = _batch_loss(task.model, inputs, targets)
    assert after < 0.7 * before, (before, after)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    for name in ("last.pth", "best.pth", "log.csv", "curves.png", "config.yaml"):
        assert (result.output_dir / name).is_file(), name


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(folder, tmp_path):
    """Run A: 2 epochs straight. Run B: stopped after epoch 1 (as if killed), then resumed from last.pth.
    With deterministic settings the weights, EMA and optimizer state are bit-identical."""
    extra = ("aug.re_prob=0.25", "aug.mixup=0.8", "aug.smoothing=0.1")  # consume every RNG stream
    cfg_a = tiny_config(folder, tmp_path / "a", *extra)
    res_a = train(_build(cfg_a), cfg_a)

    cfg_b = tiny_config(folder, tmp_path / "b", *extra, "run.stop_after=1")
    res_b1 = train(_build(cfg_b), cfg_b)
    assert load_training_state(res_b1.last_checkpoint)["epoch"] == 1
    cfg_b.run.stop_after = None
    res_b = train(_build(cfg_b), cfg_b, resume=res_b1.last_checkpoint)

    a, b = load_training_state(res_a.last_checkpoint), load_training_state(res_b.last_checkpoint)
    assert a["epoch"] == b["epoch"] == 2
    for key in ("state_dict", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


class _Regression(Task):
    """A non-classification task on the same engine: predict the mean brightness, MSE loss; the loss
    turns NaN from the second epoch on (as a diverging run would)."""

    best_metric, best_mode = "mse", "min"

    def __init__(self, *a, nan_from_step: int, **kw):
        super().__init__(*a, **kw)
        self.steps, self.nan_from_step = 0, nan_from_step

    def loss(self, outputs, targets):
        self.steps += 1
        loss = nn.functional.mse_loss(outputs.squeeze(1), targets.float())
        return loss * float("nan") if self.steps >= self.nan_from_step else loss

    def eval_stats(self, outputs, targets):
        err = (outputs.squeeze(1).float() - targets.float()) ** 2
        return {"sq": err.sum().double(), "count": torch.tensor(float(len(targets)), dtype=torch.float64)}

    def summarize(self, stats):
        return {"mse": float(stats["sq"] / stats["count"])}


class _Images(Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 32, 32, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.x[i].mean()


@pytest.mark.slow
def test_nan_loss_stops_with_the_last_good_checkpoint(folder, tmp_path):
    from effvit.models import create_model

    cfg = tiny_config(folder, tmp_path, "sched.epochs=3", "ema.enabled=false")
    model = create_model("efficientvit_m0", num_classes=1, img_size=32)
    task = _Regression(model, _Images(), _Images(8), nan_from_step=6)  # 4 steps per epoch: NaN in epoch 2
    with pytest.raises(NonFiniteLossError) as err:
        train(task, cfg)
    msg = str(err.value)
    assert "epoch 2, step 2/4" in msg and "last good checkpoint" in msg and "epoch 1" in msg, msg
    state = load_training_state(tmp_path / "run" / "last.pth")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["state_dict"].values()
                                       if v.is_floating_point())
    assert state["meta"]["num_classes"] == 1 and "val_mse" in state["history"][0]


@pytest.mark.slow
def test_finetune_to_other_classes_and_resolution(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path / "src", "sched.epochs=1", "ema.enabled=false")
    src = train(_build(cfg), cfg)
    three = make_image_folder(tmp_path / "three", classes=("a", "b", "c"), n_train=4, n_val=2)
    ft = tiny_config(three, tmp_path / "ft", "sched.epochs=1", "model.img_size=48",
                     f"model.finetune={src.last_checkpoint}", "model.freeze_bn=true")
    task = _build(ft)
    sd_src = load_training_state(src.last_checkpoint)["state_dict"]
    sd_new = task.model.state_dict()
    assert sd_new["head.linear.weight"].shape[0] == 3
    for k, v in sd_src.items():
        if k.startswith("head.linear"):
            continue
        if k.endswith("attention_biases") and v.shape != sd_new[k].shape:  # 32 px -> 48 px: 2x2 -> 3x3 tables
            assert sd_new[k].shape[1] > v.shape[1]
            continue
        assert torch.equal(sd_new[k], v), k
    bn_before = task.model.patch_embed.conv1.bn.running_mean.clone()
    head_before, stem_before = task.model.head.linear.weight.clone(), task.model.patch_embed.conv1.conv.weight.clone()
    result = train(task, ft)
    assert torch.equal(task.model.patch_embed.conv1.bn.running_mean, bn_before)  # --freeze-bn
    assert not torch.equal(task.model.head.linear.weight, head_before)  # the new head trained...
    assert not torch.equal(task.model.patch_embed.conv1.conv.weight, stem_before)  # ...and the whole network
    # the reported accuracy is the 3-class model's on the 48 px validation images
    x, y = next(iter(build_loader(task.val_dataset, 64)))
    with torch.no_grad():
        logits = task.model.eval()(x)
    assert x.shape[1:] == (3, 48, 48) and logits.shape == (6, 3)
    assert result.history[-1]["val_top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())


@pytest.mark.slow
def test_checkpoint_of_another_variant_is_refused(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path / "m0", "sched.epochs=1", "ema.enabled=false")
    src = train(_build(cfg), cfg)
    other = tiny_config(folder, tmp_path / "m1", "model.name=efficientvit_m1")
    refused = "holds efficientvit_m0 weights but the model being built is efficientvit_m1"
    with pytest.raises(ValueError, match=refused):
        train(_build(other), other, resume=src.last_checkpoint)
    other.model.finetune = str(src.last_checkpoint)
    with pytest.raises(ValueError, match=refused):
        _build(other)


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps(amp):
    from effvit.models import create_model
    from effvit.train import ClassificationTask, train_step

    torch.manual_seed(0)
    model = create_model("efficientvit_m0", num_classes=3, img_size=32)
    task = ClassificationTask(model, None, num_classes=3, smoothing=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # a small initial scale: the default 2**16 overflows the first steps, which the scaler then skips
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if amp == "fp16" else None
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = model.head.linear.weight.clone()
    loss = train_step(model, task, x, y, opt, device=torch.device("cpu"), amp=amp, scaler=scaler,
                      clip_grad=0.02)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert not torch.equal(model.head.linear.weight, before)
    assert model.head.linear.weight.dtype == torch.float32  # autocast: master weights stay fp32


@pytest.mark.slow
def test_agc_step_uses_effvits_batched_clip(monkeypatch):
    """clip_mode=agc runs effvit.train.agc (not timm's per-parameter loop) and updates as timm's AGC would."""
    import copy

    from timm.utils import adaptive_clip_grad

    from effvit.models import create_model
    from effvit.train import ClassificationTask, engine, train_step

    torch.manual_seed(0)
    model = create_model("efficientvit_m0", num_classes=3, img_size=32).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    ref = copy.deepcopy(model)
    nn.functional.cross_entropy(ref(x), y).backward()
    params = [p for p in ref.parameters() if p.grad is not None]
    unclipped = [p.grad.clone() for p in params]
    adaptive_clip_grad(params, clip_factor=0.02)
    assert any(not torch.equal(p.grad, g) for p, g in zip(params, unclipped))  # the clip changes something
    expected = [(p - p.grad).detach() for p in params]  # SGD at lr 1

    calls = []
    real = engine.adaptive_clip_grad_
    monkeypatch.setattr(engine, "adaptive_clip_grad_", lambda ps, **kw: (calls.append(kw), real(ps, **kw)))
    task = ClassificationTask(model, None, num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, task, x, y, opt, device=torch.device("cpu"), clip_grad=0.02, clip_mode="agc")
    assert calls == [{"clip_factor": 0.02}]
    for p, e in zip([p for p in model.parameters() if p.grad is not None], expected, strict=True):
        torch.testing.assert_close(p.detach(), e)

    train_step(model, task, x, y, opt, device=torch.device("cpu"), clip_grad=1.0, clip_mode="norm")
    assert len(calls) == 1  # other modes stay timm's
    with pytest.raises(ValueError, match="clip_mode must be agc, norm or value, got 'agx'"):
        train_step(model, task, x, y, opt, device=torch.device("cpu"), clip_grad=1.0, clip_mode="agx")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step():
    from effvit.models import create_model
    from effvit.train import ClassificationTask, train_step

    dev = torch.device("cuda")
    model = create_model("efficientvit_m0", num_classes=3, img_size=64).to(dev)
    task = ClassificationTask(model, None, num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 64, 64, device=dev), torch.randint(0, 3, (8,), device=dev)
    loss = train_step(model, task, x, y, opt, device=dev, amp="fp16", scaler=torch.amp.GradScaler("cuda"),
                      clip_grad=0.02)
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_distillation_from_an_effvit_teacher(folder, tmp_path):
    """DeiT-style: the teacher is the checkpoint, head included, and the student's distillation head learns
    from its arg-max (hard) or its distribution (soft): the loss is exactly that mix."""
    import torch.nn.functional as F

    cfg = tiny_config(folder, tmp_path / "teacher", "sched.epochs=1", "ema.enabled=false")
    teacher = train(_build(cfg), cfg)
    saved = load_training_state(teacher.last_checkpoint)["state_dict"]
    for kind in ("hard", "soft"):
        st = tiny_config(folder, tmp_path / kind, "sched.epochs=1", "ema.enabled=false",
                         "distill.teacher=efficientvit_m0", f"distill.teacher_checkpoint={teacher.last_checkpoint}",
                         f"distill.type={kind}", "distill.tau=2.0", "aug.mixup=0", "aug.smoothing=0")
        task = _build(st)
        assert task.model.head_dist is not None
        assert all(torch.equal(v, saved[k]) for k, v in task.teacher.state_dict().items())  # head too
        x, y = next(iter(build_loader(task.val_dataset, 4)))
        inputs, targets = task.train_batch(x, y)
        cls, dist = task.model.train()(inputs)
        with torch.no_grad():
            t = task.teacher(x)
        kd = (F.cross_entropy(dist, t.argmax(1)) if kind == "hard" else
              F.kl_div(F.log_softmax(dist / 2, 1), F.log_softmax(t / 2, 1), reduction="sum", log_target=True)
              * 4 / dist.numel())
        expected = 0.5 * F.cross_entropy(cls, y) + 0.5 * kd
        torch.testing.assert_close(task.loss((cls, dist), targets), expected)
        result = train(task, st)
        assert "val_top1" in result.history[0]
        assert "head_dist.linear.weight" in load_training_state(result.last_checkpoint)["state_dict"]
    with pytest.raises(ValueError, match="needs distill.teacher_checkpoint"):
        _build(tiny_config(folder, tmp_path / "x", "distill.teacher=efficientvit_m0"))


def test_a_teacher_of_other_classes_or_an_unsafe_file_is_refused(folder, tmp_path):
    from effvit.models import create_model
    from effvit.models.weights import save_checkpoint

    imagenet = save_checkpoint(create_model("efficientvit_m0"), tmp_path / "m0_in1k.pth")  # 1000 classes
    cfg = tiny_config(folder, tmp_path, "distill.teacher=efficientvit_m0", f"distill.teacher_checkpoint={imagenet}")
    with pytest.raises(ValueError, match="predicts 1000 classes, not the 2 asked for"):
        _build(cfg)
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Images()}, evil)
    for teacher in ("efficientvit_m0", "resnet18"):  # effvit's and timm's paths
        cfg = tiny_config(folder, tmp_path, f"distill.teacher={teacher}", f"distill.teacher_checkpoint={evil}")
        with pytest.raises(ValueError, match="holds pickled Python objects") as err:
            _build(cfg)
        assert "weights_only=False" not in str(err.value)


class _Scored(_Regression):
    """Validation 'score' read from a script, one value per evaluation: which epoch is best is known."""

    best_metric, best_mode = "score", "max"

    def __init__(self, *a, scores, **kw):
        super().__init__(*a, nan_from_step=10**9, **kw)
        self.scores = list(scores)

    def summarize(self, stats):
        return {"score": self.scores.pop(0)}


def _scored_run(cfg, scores, resume=None):
    from effvit.models import create_model

    seed_everything(0)
    model = create_model("efficientvit_m0", num_classes=1, img_size=32)
    return train(_Scored(model, _Images(8), _Images(4), scores=scores), cfg, resume=resume)


def _best_epoch(run):
    return load_training_state(run / "best.pth")["epoch"], load_training_state(run / "last.pth")["best"]["epoch"]


@pytest.mark.slow
def test_best_checkpoint_survives_a_full_disk_and_a_kill(folder, tmp_path, monkeypatch):
    """The disk fills up while epoch 2 (the new best) is saved: the run stops with best.pth and last.pth
    still agreeing (epoch 1); resumed, epoch 2 becomes best.pth again. A temporary file left by a killed
    process is cleaned up."""
    import errno

    cfg = tiny_config(folder, tmp_path, "sched.epochs=3", "ema.enabled=false")
    run = tmp_path / "run"
    real_replace = os.replace

    def full_disk(src, dst, *a, **kw):
        if os.fspath(dst).endswith("best.pth") and load_training_state(src)["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _scored_run(cfg, [1.0, 2.0, 3.0])
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in run.iterdir() if ".tmp" in p.name) == []
    assert _best_epoch(run) == (1, 1)
    (run / ".last.pth.tmp99999").write_bytes(b"half a checkpoint")  # what a SIGKILL leaves
    _scored_run(cfg, [2.0, 2.0], resume=run / "last.pth")  # epoch 2 is best, epoch 3 no better
    assert _best_epoch(run) == (2, 2)
    assert not (run / ".last.pth.tmp99999").exists()


@pytest.mark.slow
def test_resume_recreates_a_missing_best_checkpoint(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path, "sched.epochs=2", "ema.enabled=false", "run.stop_after=1")
    run = tmp_path / "run"
    _scored_run(cfg, [1.0])
    (run / "best.pth").unlink()  # e.g. lost in a crash of an older version, after last.pth was written
    cfg.run.stop_after = None
    result = _scored_run(cfg, [0.5], resume=run / "last.pth")  # epoch 2 is worse: best stays epoch 1
    assert result.best["epoch"] == 1 and _best_epoch(run) == (1, 1)
    assert "re-created" in (run / "log.txt").read_text()


@pytest.mark.slow
def test_run_folder_is_never_overwritten_nor_shared(folder, tmp_path):
    from effvit.train.rundir import RunFolder

    cfg = tiny_config(folder, tmp_path, "sched.epochs=1", "ema.enabled=false")
    first = train(_build(cfg), cfg)
    before = (first.output_dir / "last.pth").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds files .*--resume .*--overwrite"):
        train(_build(cfg), cfg)
    assert (first.output_dir / "last.pth").read_bytes() == before  # the old run is untouched
    with RunFolder(first.output_dir) as other:  # another process writing to the folder
        other.claim(resume=True)
        with pytest.raises(FileExistsError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            train(_build(cfg), cfg, resume=first.last_checkpoint)
    cfg.run.overwrite = True
    (first.output_dir / "notes.txt").write_text("mine")
    second = train(_build(cfg), cfg)
    assert (second.output_dir / "last.pth").read_bytes() != before
    assert (second.output_dir / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert "removed best.pth, config.yaml, curves.png, last.pth, log.csv, log.txt" in (
        second.output_dir / "log.txt").read_text()


@pytest.mark.slow
def test_nan_check_does_not_read_the_loss_on_the_host_every_step(folder, tmp_path):
    """A host read of a device tensor waits for the device: the finiteness check must not add one per
    step. Counted on the losses themselves: an epoch of 8 steps reads them as often as one of 2."""
    from effvit.models import create_model

    reads = []

    class Counted(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("item", "__bool__", "__float__", "__int__", "cpu", "tolist"):
                reads.append(func.__name__)
            return super().__torch_function__(func, types, args, kwargs or {})

    class Task_(_Regression):
        def loss(self, outputs, targets):
            return super().loss(outputs, targets).as_subclass(Counted)

    counts = []
    for steps in (2, 8):
        cfg = tiny_config(folder, tmp_path / str(steps), "sched.epochs=1", "ema.enabled=false",
                          "run.log_interval=100", "run.eval_every=0")
        model = create_model("efficientvit_m0", num_classes=1, img_size=32)
        reads.clear()
        train(Task_(model, _Images(4 * steps), None, nan_from_step=10**9), cfg)
        counts.append(len(reads))
    assert counts[0] == counts[1], counts  # before: one bool() per step


def test_resume_from_a_pickle_or_a_folder_says_what_it_is(tmp_path):
    evil = tmp_path / "last.pth"
    torch.save({"epoch": 1, "optimizer": _Images()}, evil)
    with pytest.raises(ValueError, match="holds pickled Python objects") as err:
        load_training_state(evil)
    assert "weights_only=False" not in str(err.value) and err.value.__cause__ is None
    with pytest.raises(IsADirectoryError, match="is a folder, not a checkpoint"):
        load_training_state(tmp_path)


@pytest.mark.slow
def test_ib_loss_plug_in_changes_training_only_when_on(folder, tmp_path):
    """The IB loss (LTM's) is a plug-in: off by default, nothing changes; on from epoch 2, the first epoch is
    bit-identical to a run without it (it only banks features and refits its clusters), the second not."""
    common = ("ema.enabled=false", "sched.epochs=2")
    off = tiny_config(folder, tmp_path, *common, "run.name=off")
    assert off.ib.weight == 0 and _build(off).ib is None
    on = tiny_config(folder, tmp_path, *common, "run.name=on", "ib.weight=0.5", "ib.start_epoch=1",
                     "ib.num_clusters=4", "ib.input_size=8")
    plain = train(_build(off), off).history
    task = _build(on)
    with_ib = train(task, on).history
    assert task.ib.refreshes == 2 and task.ib.ready
    for key in ("train_loss", "val_loss", "val_top1"):
        assert with_ib[0][key] == plain[0][key], key
    assert with_ib[1]["train_loss"] != plain[1]["train_loss"]
    assert with_ib[1]["val_loss"] != plain[1]["val_loss"]
