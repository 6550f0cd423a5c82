"""What the commands refuse, before anything is lost or written: outputs that are inputs, files that are not
a command's own output, bad checkpoint metadata, settings no run can use."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import TwoClasses, tiny_config
from PIL import Image
from safetensors.torch import save_file

import effvit.cli.straighten as straighten_cli
from effvit.cli import main
from effvit.models import create_model, load_model
from effvit.models.weights import FORMAT_TAG, read_checkpoint
from effvit.rotation.model import DEFAULT_MODEL
from effvit.train import ClassificationTask, load_classification_config, train
from effvit.train.distributed import DistContext
from effvit.train.rotation import load_rotation_config
from effvit.train.rundir import RunFolder
from effvit.train.samplers import build_train_sampler


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "img" / "one.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


# -- predict's output ------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["image", "checkpoint", "link"])
def test_predict_refuses_to_write_over_an_input(classifier, photo, tmp_path, capsys, target):
    link = tmp_path / "link.png"
    link.symlink_to(photo)
    out = {"image": photo, "checkpoint": classifier, "link": link}[target]
    before = Path(out).read_bytes()
    assert main(["predict", str(photo), "-c", str(classifier), "-o", str(out)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert Path(out).read_bytes() == before


def test_predict_replaces_only_its_own_output_unless_told(classifier, photo, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(["predict", str(photo), "-c", str(classifier), "-o", str(notes)]) == 2
    assert "--overwrite" in capsys.readouterr().err and notes.read_text() == "my notes\n"
    for fmt in ("table", "json", "csv"):  # an earlier run's predictions are replaced without asking
        out = tmp_path / f"p.{fmt}"
        for _ in range(2):
            assert main(["predict", str(photo), "-c", str(classifier), "--format", fmt, "-o", str(out)]) == 0
        assert "one.png" in out.read_text()
    assert main(["predict", str(photo), "-c", str(classifier), "-o", str(notes), "--overwrite"]) == 0
    assert notes.read_text().startswith("file")


# -- checkpoint metadata ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(classifier):
    return torch.load(classifier, weights_only=True)


@pytest.mark.parametrize("field, value, says", [
    ("class_names", ["a", "b"], "a list of 4 names"),
    ("class_names", "abcd", "a list of strings"),
    ("interpolation", "bogus", "one of nearest, bilinear, bicubic"),
    ("ltm", "abc", "a keep ratio in (0, 1]"),
    ("ltm", 1.5, "a keep ratio in (0, 1]"),
    ("ltm_mode", "zzz", "one of learned, pool"),
    ("img_size", "big", "a size in pixels"),
    ("img_size", [32, 0], "a size in pixels"),
    ("num_classes", "x", "a positive whole number"),
    ("num_classes", 7, "4, the number of outputs of the weights' head"),
    ("in_chans", 1, "3, the input channels"),
    ("mean", [0.5, "a", 0.2], "a list of 1 or 3 numbers"),
    ("std", [0.0, 1.0, 1.0], "positive numbers"),
    ("crop_pct", 3, "a fraction in (0, 1]"),
    ("distillation", "yes", "true or false"),
])
def test_bad_metadata_is_refused_at_load_naming_the_field(saved, tmp_path, field, value, says):
    bad = {**saved, "meta": {**saved["meta"], field: value}}
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=f"metadata field '{field}'") as e:
        load_model(path)
    assert says in str(e.value)


def test_metadata_that_is_not_a_mapping_is_refused(saved, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"format": FORMAT_TAG, "state_dict": saved["state_dict"], "meta": [1, 2]}, path)
    with pytest.raises(ValueError, match="its metadata is a list"):
        read_checkpoint(path)


def test_bad_metadata_in_a_safetensors_header_is_refused(tmp_path):
    sd = create_model("efficientvit_m0", num_classes=3, img_size=32).state_dict()
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"class_names": '["a"]'})
    with pytest.raises(ValueError, match="'class_names'.*a list of 3 names"):
        load_model(path)


# -- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, says", [
    ("sched.epochs=-1", "sched.epochs=-1 is not allowed"),
    ("run.amp=fp8", "run.amp='fp8' is not allowed: it must be one of none, bf16, fp16"),
    ("aug.scale=[1, 0.5]", "aug.scale=(1.0, 0.5) is not allowed: it must be [min, max] with min <= max"),
    ("data.train_fraction=0", "data.train_fraction=0.0 is not allowed"),
    ("data.train_fraction=1.5", "data.train_fraction=1.5 is not allowed"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("optim.lr=-1", "optim.lr=-1.0"),
    ("optim.clip_mode=foo", "optim.clip_mode='foo'"),
    ("ema.decay=1.5", "ema.decay=1.5"),
    ("aug.hflip=2", "aug.hflip=2.0"),
    ("aug.interpolation=cubic", "aug.interpolation='cubic'"),
    ("model.ltm=0", "model.ltm=0.0"),
    ("distill.type=loud", "distill.type='loud'"),
    ("run.threads=0", "run.threads=0"),
])
def test_settings_no_run_can_use_are_refused_when_read(override, says):
    with pytest.raises(ValueError) as e:
        load_classification_config("fashion_mnist_m0", [override])
    assert says in str(e.value)


@pytest.mark.parametrize("override, says", [
    ("task.angle_range=[10, 5]", "task.angle_range"),
    ("task.crop=foo", "one of max_area, keep_aspect, none, same"),
    ("task.jpeg=[0.5, 90, 10]", "task.jpeg"),
    ("task.crop_scale=[0.5, 2]", "task.crop_scale"),
    ("task.val_fraction=1", "task.val_fraction"),
    ("model.in_chans=2", "model.in_chans=2"),
])
def test_rotation_settings_are_refused_when_read(override, says):
    with pytest.raises(ValueError) as e:
        load_rotation_config("rotation_fashion_mnist_m0", [override])
    assert says in str(e.value)


def test_a_refused_setting_leaves_no_run_folder(tmp_path, capsys):
    code = main(["train", "--config", "fashion_mnist_m0", "run.amp=fp8", "--output", str(tmp_path), "--name", "x"])
    assert code == 2 and "run.amp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_config_changed_in_python_is_checked_before_the_folder(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "out")
    cfg.run.amp = "fp8"
    task = ClassificationTask(create_model("efficientvit_m0", num_classes=2, img_size=32), TwoClasses(8),
                              None, num_classes=2)
    with pytest.raises(ValueError, match="run.amp"):
        train(task, cfg)
    assert not (tmp_path / "out").exists()


def test_advice_names_only_files_that_exist(tmp_path):
    (tmp_path / "config.yaml").write_text("x")
    with pytest.raises(FileExistsError) as e:
        RunFolder(tmp_path).claim()
    assert "--resume" not in str(e.value) and "--overwrite" in str(e.value)
    (tmp_path / "last.pth").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=f"--resume {tmp_path / 'last.pth'}"):
        RunFolder(tmp_path).claim()


def test_a_training_set_too_small_for_one_step_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "out", "data.train_fraction=0.1", "sched.epochs=1", "run.eval_every=0")
    task = ClassificationTask(create_model("efficientvit_m0", num_classes=2, img_size=32), TwoClasses(12),
                              None, num_classes=2)
    with pytest.raises(ValueError, match="gives 1 sample.*data.train_fraction=0.1"):
        train(task, cfg)


def test_an_epoch_without_a_step_stops_the_run(tmp_path):
    """Every batch dropped (one readable image in each): no 'done' with loss 0."""
    cfg = tiny_config(tmp_path, tmp_path / "out", "sched.epochs=1", "run.eval_every=0")
    order = list(build_train_sampler(range(8), DistContext(), seed=cfg.run.seed))  # two batches of 4
    task = ClassificationTask(create_model("efficientvit_m0", num_classes=2, img_size=32),
                              TwoClasses(8, bad=order[:3] + order[4:7]), None, num_classes=2)
    with pytest.raises(ValueError, match="epoch 1 took no training step"):
        train(task, cfg)


# -- export, bench, the model ----------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--num-classes", "-3"], "num_classes must be a whole number >= 1"),
    (["--atol", "-1"], "atol must be 0 or more"),
    (["--int8", "--check-images", "-1"], "check_images must be >= 0"),
])
def test_export_refuses_bad_options_before_writing(tmp_path, capsys, args, says):
    out = tmp_path / "exports"
    assert main(["export", "--model", "m0", "--img-size", "32", "--format", "onnx", "--out", str(out), *args]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--warmup", "-1"), ("--probe", "0"), ("--rounds", "0")])
def test_bench_refuses_bad_options(tmp_path, capsys, flag, value):
    assert main(["bench", "--models", "m0", "--out", str(tmp_path), flag, value]) == 2
    assert f"{flag} {value}" in capsys.readouterr().err.replace(".0 ", " ")


def test_a_negative_class_count_is_refused_by_the_model():
    with pytest.raises(ValueError, match="num_classes must be"):
        create_model("efficientvit_m0", num_classes=-1)
    model = create_model("efficientvit_m0", num_classes=3, img_size=32)
    with pytest.raises(ValueError, match="num_classes must be"):
        model.reset_classifier(-2)


# -- straighten's output ---------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """The model must not load: the refusal comes first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(straighten_cli, "load_rotation_model", refuse)


def test_straighten_refuses_the_input_folder_as_output_before_loading(photo, capsys, no_model):
    before = photo.read_bytes()
    assert main(["straighten", str(photo.parent), "--out", str(photo.parent)]) == 2
    assert "would be overwritten" in capsys.readouterr().err
    assert photo.read_bytes() == before


def test_straighten_refuses_a_hard_link_to_the_input(photo, tmp_path, capsys, no_model):
    (tmp_path / "out").mkdir()
    os.link(photo, tmp_path / "out" / photo.name)
    assert main(["straighten", str(photo), "--out", str(tmp_path / "out"), "--overwrite"]) == 2
    assert "would be overwritten" in capsys.readouterr().err


def test_straighten_replaces_existing_outputs_only_with_overwrite(photo, tmp_path, capsys, no_model):
    (tmp_path / "out").mkdir()
    other = tmp_path / "out" / photo.name
    other.write_bytes(b"another photo")
    assert main(["straighten", str(photo), "--out", str(tmp_path / "out")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and other.read_bytes() == b"another photo"


def test_rotation_export_never_writes_over_its_checkpoint_or_another_file(photo, tmp_path, capsys):
    ckpt = tmp_path / "r.safetensors"
    ckpt.write_bytes(DEFAULT_MODEL.read_bytes())
    assert main(["rotation", "export", "--checkpoint", str(ckpt), "--out", str(ckpt)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    before = photo.read_bytes()
    assert main(["rotation", "export", "--checkpoint", str(ckpt), "--out", str(photo)]) == 2
    assert "--overwrite" in capsys.readouterr().err and photo.read_bytes() == before
    out = tmp_path / "again.safetensors"
    for _ in range(2):  # an earlier export is replaced
        assert main(["rotation", "export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert ckpt.read_bytes() == DEFAULT_MODEL.read_bytes()
