"""EXIF orientation wherever an image is read for a model: a photo stored sideways with its orientation
tag (as phones write portraits) reaches predict, eval, training, calibration and rotation data upright,
exactly as the same photo stored upright does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effvit.cli import main
from effvit.data import ImageFolder, ImageList, build_transform, list_images, load_image

T = Image.Transpose
# what a viewer does to the stored pixels for each orientation, and the inverse that makes the stored
# pixels of an upright picture
SHOWN_BY = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
            7: T.TRANSVERSE, 8: T.ROTATE_90}
STORED_BY = {**SHOWN_BY, 6: T.ROTATE_90, 8: T.ROTATE_270}


def upright_picture(size=(48, 32)) -> Image.Image:
    """No symmetry: red top-left, green top-right, blue bottom-left, grey bottom-right, a white bar."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2:] = (0, 255, 0)
    arr[h // 2:, : w // 2] = (0, 0, 255)
    arr[h // 2:, w // 2:] = (128, 128, 128)
    arr[2:5, 4: w // 3] = 255
    return Image.fromarray(arr)


def save_with_orientation(picture: Image.Image, path: Path, orientation: int) -> Path:
    """``picture`` stored so that a viewer honouring the EXIF tag shows it as it is."""
    stored = picture if orientation == 1 else picture.transpose(STORED_BY[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def test_the_inverse_table_is_right():
    pic = upright_picture()
    for o in range(2, 9):
        assert pic.transpose(STORED_BY[o]).transpose(SHOWN_BY[o]).tobytes() == pic.tobytes(), o


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_every_orientation_reads_upright(tmp_path, orientation, suffix):
    pic = upright_picture()
    path = save_with_orientation(pic, tmp_path / f"o{orientation}{suffix}", orientation)
    if orientation in (5, 6, 7, 8):  # stored sideways: the file's own size is the transposed one
        assert Image.open(path).size == pic.size[::-1]
    got = load_image(path)
    assert got.size == pic.size
    if suffix == ".png":
        assert got.tobytes() == pic.tobytes()
    else:  # JPEG blurs the colour edges: compare 8x8 block means
        blocks = [np.asarray(im.resize((6, 4), Image.Resampling.BOX), np.int16) for im in (got, pic)]
        assert np.abs(blocks[0] - blocks[1]).max() <= 30  # a wrong turn differs by ~255
    # the same through the grey reader and the shrinking one
    assert load_image(path, "L").size == pic.size
    assert load_image(path, short_side=16).size == (24, 16)


@pytest.fixture()
def sideways_and_upright(tmp_path):
    """The same picture twice: stored upright, and stored sideways with orientation 6."""
    pic = upright_picture((64, 40))
    up = save_with_orientation(pic, tmp_path / "a_upright.png", 1)
    side = save_with_orientation(pic, tmp_path / "b_sideways.png", 6)
    return up, side


def test_datasets_give_the_model_the_upright_picture(sideways_and_upright, tmp_path):
    up, side = sideways_and_upright
    tf = build_transform(_Aug(), 32, 3, is_training=False)
    a, b = ImageList([up, side], tf)[0][0], ImageList([up, side], tf)[1][0]
    assert torch.equal(a, b)
    for cls in ("x", "y"):  # a class folder of each: the folder dataset reads them the same way
        (tmp_path / "folder" / cls).mkdir(parents=True)
    up.rename(tmp_path / "folder" / "x" / up.name)
    side.rename(tmp_path / "folder" / "y" / side.name)
    ds = ImageFolder(tmp_path / "folder", transform=tf)
    assert torch.equal(ds[0][0], ds[1][0])


class _Aug:
    mean, std, interpolation, crop_pct = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0


def test_predict_sees_the_upright_picture(classifier, sideways_and_upright, capsys):
    up, side = sideways_and_upright
    assert main(["predict", str(up), str(side), "-c", str(classifier), "--format", "json", "-k", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert len(rows) == 2 and rows[0]["predictions"] == rows[1]["predictions"]
    # and a picture actually turned is predicted differently (the check can fail)
    turned = up.parent / "c_turned.png"
    Image.open(up).transpose(T.ROTATE_90).save(turned)
    assert main(["predict", str(up), str(turned), "-c", str(classifier), "--format", "json", "-k", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert rows[0]["predictions"] != rows[1]["predictions"]


def test_rotation_data_and_calibration_read_upright(sideways_and_upright):
    from effvit.deploy.calibration import image_sets
    from effvit.models import create_model
    from effvit.rotation.data import FolderImages

    up, side = sideways_and_upright
    src = FolderImages([up, side], short_side=None)
    assert src[0].tobytes() == src[1].tobytes()
    model = create_model("efficientvit_m0", num_classes=4, img_size=32)
    sets = image_sets(model, build_transform(_Aug(), 32, 3, is_training=False), folder=up.parent,
                      calibration_images=1)
    inputs = [sets.calibration[i][0] for i in range(len(sets.calibration))]
    assert len(inputs) == 2 and torch.equal(inputs[0], inputs[1])
    assert list_images(up.parent) == [up, side]


@pytest.mark.slow
def test_training_and_eval_see_the_upright_picture(tmp_path):
    """Two runs, one on a folder of upright files and one on the same pictures stored sideways with
    orientation 6: same losses to the last bit, same evaluation."""
    from _train_helpers import make_image_folder, tiny_config

    from effvit.train import build_classification_task, seed_everything, train

    flat = make_image_folder(tmp_path / "flat", n_train=4, n_val=2)
    side = tmp_path / "side"
    for f in flat.rglob("*.png"):
        dst = side / f.relative_to(flat)
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_with_orientation(Image.open(f).convert("RGB"), dst, 6)
    results = []
    for root in (flat, side):
        cfg = tiny_config(root, tmp_path / root.name, "sched.epochs=1", "ema.enabled=false")
        seed_everything(0)
        result = train(build_classification_task(cfg, log=lambda *_: None), cfg)
        results.append(result)
    h = [(r.history[0]["train_loss"], r.history[0]["val_loss"]) for r in results]
    assert h[0] == h[1]
    evals = []
    for root, r in zip((flat, side), results, strict=True):
        out = tmp_path / f"eval-{root.name}"
        assert main(["eval", "-c", str(r.best_checkpoint), "--data", str(root), "--output", str(out)]) == 0
        evals.append(json.loads((out / "metrics.json").read_text()))
    assert evals[0]["top1"] == evals[1]["top1"] and evals[0]["loss"] == evals[1]["loss"]
