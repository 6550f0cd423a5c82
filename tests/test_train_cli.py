"""The commands: effvit train / eval / predict, and the same training under torchrun (2 CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import make_image_folder

from effvit.cli import main
from effvit.train.evaluation import evaluate_checkpoint, save_evaluation

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "fashion_mnist_m0", "--dataset", "folder", "--img-size", "32", "--in-chans", "3",
        "--batch-size", "4", "--workers", "0", "--no-progress", "--set", "aug.mean=[0.5,0.5,0.5]",
        "aug.std=[0.25,0.25,0.25]", "aug.auto_augment=null", "aug.re_prob=0", "sched.warmup_epochs=0",
        "run.threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run of `effvit train` on a tiny folder: (data root, run folder)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = make_image_folder(tmp / "data", n_train=4, n_val=3)
    args = ["train", *TINY, "--data", str(data), "--epochs", "1", "--output", str(tmp), "--name", "run",
            "--tensorboard"]
    assert main(args) == 0
    return data, tmp / "run"


@pytest.mark.slow
def test_train_writes_checkpoints_logs_and_curves(trained):
    _, run = trained
    for f in ("last.pth", "best.pth", "log.csv", "curves.png", "config.yaml", "log.txt"):
        assert (run / f).is_file(), f
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    expected = {"epoch", "train_loss", "lr", "train_img_s", "val_top1", "val_top5", "val_loss", "ema_top1"}
    assert expected <= set(header)
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["meta"]["class_names"] == ["circle", "square"] and state["config"]["model"]["img_size"] == 32
    for key in ("optimizer", "scheduler", "ema", "rng", "epoch", "history"):
        assert key in state


@pytest.mark.slow
def test_eval_reports_per_class_accuracy_and_confusion_png(trained, tmp_path, capsys):
    data, run = trained
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--data", str(data), "--output",
                 str(tmp_path), "--no-progress", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "circle" in out and "square" in out
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["samples"] == 6 and set(report["per_class"]) == {"circle", "square"}
    assert {"top1", "top5", "loss"} <= set(report)
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--ema", "--data", str(data), "--output",
                 str(tmp_path / "ema"), "--no-progress", "--json", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "ema"


@pytest.mark.slow
def test_evaluate_checkpoint_returns_the_numbers_and_save_writes_them(trained, tmp_path):
    data, run = trained
    result = evaluate_checkpoint(run / "best.pth", data=str(data), output=tmp_path / "out", workers=0,
                                 progress=False)
    assert result.arch == "efficientvit_m0" and result.dataset == "folder" and result.split == "val"
    assert result.class_names == ["circle", "square"] and not result.ema
    assert result.confusion.shape == (2, 2) and int(result.confusion.sum()) == 6 == result.report["samples"]
    assert result.confusion.sum(dim=1).tolist() == [3, 3]
    hits = result.confusion.diag().tolist()
    assert result.per_class == [100 * hits[0] / 3, 100 * hits[1] / 3]
    assert result.report["per_class"] == dict(zip(result.class_names, result.per_class, strict=True))
    assert result.output_dir == tmp_path / "out" and result.written == []
    assert not (tmp_path / "out" / "metrics.json").exists()  # evaluating writes nothing
    written = save_evaluation(result)
    assert written == result.written == [tmp_path / "out" / "metrics.json", tmp_path / "out" / "confusion.png"]
    assert json.loads(written[0].read_text()) == result.report
    assert written[1].stat().st_size > 1000


@pytest.mark.slow
def test_eval_refuses_other_class_folders(trained, tmp_path, capsys):
    _, run = trained
    other = make_image_folder(tmp_path / "other", classes=("cat", "dog"), n_train=1, n_val=1)
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--data", str(other), "--no-progress"]) == 2
    assert "differ" in capsys.readouterr().err


@pytest.mark.slow
def test_train_stops_on_nan_loss_with_exit_code_3(trained, tmp_path, monkeypatch, capsys):
    """A loss that turns NaN in epoch 2: exit status 3, a message naming the last good checkpoint, and
    that checkpoint (epoch 1) still on disk."""
    from effvit.train.classification import ClassificationTask

    data, _ = trained
    calls = {"n": 0}
    real_loss = ClassificationTask.loss

    def diverging(self, outputs, targets):
        calls["n"] += 1  # 2 steps per epoch (4 images per class, batch 4)
        loss = real_loss(self, outputs, targets)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(ClassificationTask, "loss", diverging)
    rc = main(["train", *TINY, "--data", str(data), "--epochs", "3", "--output", str(tmp_path), "--name", "nan"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "effvit train: error: non-finite loss at epoch 2" in err and "last good checkpoint" in err, err
    assert torch.load(tmp_path / "nan" / "last.pth", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_predict_table_json_csv_and_skips_corrupt_images(trained, tmp_path, capsys):
    data, run = trained
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, f in enumerate(sorted((data / "val").rglob("*.png"))[:3]):
        (imgs / f"{i}.png").write_bytes(f.read_bytes())
    (imgs / "1b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    ckpt = str(run / "best.pth")
    assert main(["predict", str(imgs), "-c", ckpt, "--format", "json", "-k", "2", "--batch-size", "2"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert [Path(r["file"]).name for r in res["predictions"]] == ["0.png", "1.png", "2.png"]
    assert all(len(r["predictions"]) == 2 and abs(sum(p["prob"] for p in r["predictions"]) - 1) < 1e-4
               and {p["label"] for p in r["predictions"]} == {"circle", "square"} for r in res["predictions"])
    assert len(res["unreadable"]) == 1 and "1b_corrupt.png" in res["unreadable"][0]
    assert "skipped unreadable image" in cap.err and "1b_corrupt.png" in cap.err
    assert main(["predict", str(imgs / "0.png"), "-c", ckpt, "--format", "csv", "-k", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "file,rank,label,index,prob" and len(lines) == 2
    assert main(["predict", str(imgs / "0.png"), "-c", ckpt]) == 0
    assert "circle" in capsys.readouterr().out
    assert main(["predict", str(imgs / "1b_corrupt.png"), "-c", ckpt]) == 1
    assert main(["predict", str(tmp_path / "missing.png"), "-c", ckpt]) == 2


def test_imagenet_checkpoint_gets_the_paper_eval_transform(tmp_path):
    from torchvision.transforms import CenterCrop, Resize

    from effvit.data import eval_transform, image_mode
    from effvit.models import create_model, load_model
    from effvit.models.pretrained import class_names, input_channels
    from effvit.models.weights import save_checkpoint

    path = save_checkpoint(create_model("efficientvit_m0"), tmp_path / "m0.pth")
    model = load_model(path)
    tf = eval_transform(model).transforms
    resize = next(t for t in tf if isinstance(t, Resize))
    crop = next(t for t in tf if isinstance(t, CenterCrop))
    assert resize.size == 256 and resize.interpolation.value == "bicubic" and crop.size == (224, 224)
    assert len(class_names(model)) == 1000 and image_mode(input_channels(model)) == "RGB"


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    """DDP over gloo: the ranks draw disjoint samples and end with identical weights (and BN statistics)."""
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=2)  # 16 training images
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "_ddp_probe.py"), "train", *TINY, "--data", str(data), "--epochs", "2",
           "--output", str(tmp_path), "--name", "ddp", "--set", "data.repeated_aug=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert "on 2 x cpu" in (run / "log.txt").read_text()
    seen = [dict(line.split(" ", 1) for line in (run / f"samples_rank{r}.txt").read_text().splitlines())
            for r in range(2)]
    for epoch in ("0", "1"):
        a, b = (set(map(int, s[epoch].split())) for s in seen)
        assert not a & b and a | b == set(range(16)), (epoch, a, b)
    w0, w1 = (torch.load(run / f"weights_rank{r}.pth", weights_only=True) for r in range(2))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    last = torch.load(run / "last.pth", weights_only=True)
    assert len(last["rng"]) == 2 and last["epoch"] == 2
    assert all(torch.equal(last["state_dict"][k], w0[k]) for k in w0)


def test_flag_values_are_text_and_overrides_follow_the_declared_type(tmp_path):
    """--data 'data/good #2' is that folder (not 'data/good', YAML's comment), --name 007 is '007' (not 7);
    --set parses by the setting's type: text for strings, YAML for the rest."""
    from effvit.cli import build_parser
    from effvit.cli import rotation as rotation_cli
    from effvit.cli import train as train_cli

    args = build_parser().parse_args(["train", "--data", "data/good #2", "--name", "007", "--output",
                                      "runs: 2", "--epochs", "3", "--lr", "1e-3"])
    cfg = train_cli.resolve_config(args)
    assert (cfg.data.root, cfg.run.name, cfg.run.output) == ("data/good #2", "007", "runs: 2")
    assert (cfg.sched.epochs, cfg.optim.lr) == (3, 1e-3)
    args = build_parser().parse_args(["train", "--set", "run.name=007", "data.root=a #b", "model.pretrained=null",
                                      "sched.epochs=4", "aug.scale=[0.5, 1]", "run.output='quoted'"])
    cfg = train_cli.resolve_config(args)
    assert (cfg.run.name, cfg.data.root, cfg.model.pretrained) == ("007", "a #b", None)
    assert (cfg.sched.epochs, cfg.aug.scale, cfg.run.output) == (4, (0.5, 1.0), "quoted")
    args = build_parser().parse_args(["rotation", "train", "--data", "photos #1", "--name", "0042"])
    cfg = rotation_cli.resolve_config(args)
    assert (cfg.data.root, cfg.run.name) == ("photos #1", "0042")


@pytest.mark.slow
def test_a_second_run_with_the_same_name_is_refused(trained, capsys):
    data, run = trained
    before = (run / "last.pth").read_bytes()
    rc = main(["train", *TINY, "--data", str(data), "--epochs", "1", "--output", str(run.parent), "--name", "run"])
    assert rc == 2 and "already holds files" in capsys.readouterr().err
    assert (run / "last.pth").read_bytes() == before


@pytest.mark.slow
def test_distributed_run_with_a_batch_unreadable_on_one_rank_does_not_hang(tmp_path, capfd):
    """2 gloo processes; rank 1's first batch is all unreadable files. Every rank drops that step (it holds
    DDP's all-reduce), so both finish the epoch, with identical weights, instead of waiting forever."""
    import multiprocessing as mp

    from _train_helpers import ddp_rank

    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=ddp_rank, args=(r, 2, str(tmp_path / "init"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    hung = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(hung), "the ranks waited for each other"
    assert [p.exitcode for p in procs] == [0, 0]
    assert "step 1/2 dropped on every process: 0 readable image(s)" in capfd.readouterr().out
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pth", weights_only=True) for r in range(2))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    rows = [json.loads((tmp_path / f"row_rank{r}.json").read_text()) for r in range(2)]
    assert rows[0]["skipped"] == rows[1]["skipped"] == 4  # summed over the ranks


@pytest.mark.slow
def test_eval_checks_its_output_first_and_always_prints_the_metrics(trained, tmp_path, capsys, monkeypatch):
    import errno

    import effvit.train.evaluation

    data, run = trained
    (tmp_path / "taken").write_text("a file where the output folder should go")
    calls = []
    real_evaluate = effvit.train.evaluation.evaluate
    monkeypatch.setattr(effvit.train.evaluation, "evaluate",
                        lambda *a, **kw: calls.append(1) or real_evaluate(*a, **kw))
    args = ["eval", "--checkpoint", str(run / "best.pth"), "--data", str(data), "--no-progress", "--workers", "0"]
    assert main([*args, "--output", str(tmp_path / "taken")]) == 2
    assert "is a file" in capsys.readouterr().err and not calls  # refused before evaluating

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(effvit.train.evaluation, "plot_confusion", full_disk)
    assert main([*args, "--output", str(tmp_path / "ok")]) == 2
    cap = capsys.readouterr()
    assert "top-1" in cap.out and "No space left" in cap.err  # the numbers were shown before the write failed
