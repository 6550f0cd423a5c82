"""Images beyond 8-bit RGB (16-bit, float, CMYK, animated) through straighten, predict and training: the
network sees them scaled from their range, outputs keep their mode and bit depth (or are refused)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from _train_helpers import make_image_folder, tiny_config
from PIL import Image
from test_rotation_model import constant_model

from effvit.cli import main
from effvit.rotation.decision import DecisionRule
from effvit.rotation.straighten import StraightenOptions, straighten_files


def _photo16() -> np.ndarray:
    """A real photo (skimage's camera, grey) at 16 bits, tilted 12 degrees, cropped: values 0..65535."""
    from skimage import data

    grey = Image.fromarray(data.camera().astype(np.float32) * 257.0).resize((192, 192))
    tilted = np.asarray(grey.rotate(12, resample=Image.Resampling.BICUBIC))[32:-32, 16:-16]
    return np.clip(np.rint(tilted), 0, 65535).astype(np.uint16)


def _png16_rgb(path, arr: np.ndarray) -> None:
    """A 16-bit-per-channel colour PNG, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _recording(model):
    """The model's inputs, recorded as it predicts."""
    seen = []
    forward = model.forward
    model.forward = lambda x: (seen.append(x.clone()), forward(x))[1]
    return seen


def test_16bit_png_through_straighten_with_the_photo_model(tmp_path):
    from effvit.rotation.model import load_rotation_model

    arr = _photo16()
    (tmp_path / "in").mkdir()
    Image.fromarray(arr).save(tmp_path / "in" / "deep.png")
    Image.fromarray(np.rint(arr / 257.0).astype(np.uint8)).save(tmp_path / "in" / "flat.png")
    assert Image.open(tmp_path / "in" / "deep.png").mode == "I;16"
    always = StraightenOptions(window=(-45, 45), rule=DecisionRule.always(min_angle=0.0))  # the write path
    res = {r.path.split("/")[-1]: r for r in straighten_files([tmp_path / "in"], tmp_path / "out",
                                                                load_rotation_model(), always)}
    deep, flat = res["deep.png"], res["flat.png"]
    assert deep.action == flat.action == "rotated"
    assert deep.angle == pytest.approx(flat.angle, abs=1e-3) and deep.confidence == pytest.approx(flat.confidence)
    out = Image.open(tmp_path / "out" / "deep.png")
    assert out.mode == "I;16"  # written back at 16 bits, not as a near-black 8-bit image
    out16, out8 = np.asarray(out, dtype=np.float64), np.asarray(Image.open(tmp_path / "out" / "flat.png"), float)
    assert out16.max() > 50000 and np.abs(out16 / 257.0 - out8).mean() < 1.0
    # the test-time augmentation and line refinement see the same scaled pixels
    res = {r.path.split("/")[-1]: r for r in straighten_files([tmp_path / "in"], None, load_rotation_model(),
                                                                replace(always, tta="full", lines=True),
                                                                dry_run=True)}
    assert res["deep.png"].angle == pytest.approx(res["flat.png"].angle, abs=1e-3)
    assert res["deep.png"].confidence == pytest.approx(res["flat.png"].confidence)


def test_float_cmyk_animated_and_deep_colour_images_in_straighten(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    ramp = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    Image.fromarray(ramp).save(src / "float.tif")
    Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(src / "float8.png")
    rgb = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    rgb.convert("CMYK").save(src / "cmyk.jpg", quality=95)
    frames = [Image.fromarray(np.full((40, 60), v, np.uint8)).convert("P") for v in (30, 130, 230)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=[70, 80, 90], loop=0)
    _png16_rgb(src / "deep_rgb.png", np.full((20, 30, 3), 40000, np.uint16))
    frames[0].save(src / "pages.tif", save_all=True, append_images=frames[1:])
    model = constant_model(10.0)
    seen = _recording(model)
    res = {r.path.split("/")[-1]: r for r in straighten_files([src], tmp_path / "out", model,
                                                                StraightenOptions(crop="none"))}
    inputs = dict(zip(sorted(p.name for p in src.iterdir() if p.name not in ("deep_rgb.png", "pages.tif")),
                      seen, strict=False))
    assert torch.equal(inputs["float.tif"], inputs["float8.png"])  # seen in [0, 1], not clipped to black
    out = Image.open(tmp_path / "out" / "float.tif")
    assert out.mode == "F" and 0.9 < np.asarray(out).max() < 1.01  # bicubic may overshoot a little
    cmyk = Image.open(tmp_path / "out" / "cmyk.jpg")
    assert cmyk.mode == "CMYK" and cmyk.getpixel((0, 0))[3] > 240  # black corners (zero ink is white)
    gif = Image.open(tmp_path / "out" / "anim.gif")
    assert gif.n_frames == 3 and res["anim.gif"].action == "rotated"
    durations = []
    for i in range(3):
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert durations == [70, 80, 90]
    assert res["deep_rgb.png"].action == "error" and "16 bits per colour channel" in res["deep_rgb.png"].error
    assert res["pages.tif"].action == "error" and "3-page TIFF" in res["pages.tif"].error
    assert not (tmp_path / "out" / "deep_rgb.png").exists() and not (tmp_path / "out" / "pages.tif").exists()
    dry = straighten_files([src / "deep_rgb.png"], None, model, dry_run=True)  # estimating loses nothing
    assert dry[0].action == "rotated"


def test_straighten_checks_its_output_folder_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "in" / "a.png")
    (tmp_path / "taken").write_text("a file where the output folder should go")
    model = constant_model(5.0)
    seen = _recording(model)
    with pytest.raises(NotADirectoryError, match="is a file"):
        straighten_files([tmp_path / "in"], tmp_path / "taken", model)
    assert not seen  # nothing estimated


def test_rotation_eval_and_predict_check_their_outputs_first(classifier, tmp_path, capsys, monkeypatch):
    import effvit.rotation.evaluation
    from effvit.rotation.model import RotationModel, save_rotation_model

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "taken").write_text("a file where the output folder should go")
    rot = save_rotation_model(RotationModel("m0", "cgd", img_size=32), tmp_path / "rot.safetensors")
    monkeypatch.setattr(effvit.rotation.evaluation, "evaluate_rotation", lambda *a, **kw: pytest.fail("evaluated"))
    assert main(["rotation", "eval", "--checkpoint", str(rot), "--data", str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "taken" / "report")]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "a.png"), "-c", str(classifier), "-o", str(tmp_path)]) == 2
    assert "is a folder: give a file name with --output" in capsys.readouterr().err


def test_16bit_float_and_animated_images_through_predict(classifier, tmp_path, capsys):
    arr = _photo16()
    Image.fromarray(arr).save(tmp_path / "a_deep.png")
    Image.fromarray(np.rint(arr / 257.0).astype(np.uint8)).save(tmp_path / "b_flat.png")
    Image.fromarray(arr.astype(np.float32) / 65535.0).save(tmp_path / "c_float.tif")
    frames = [Image.fromarray(np.rint(arr / 257.0).astype(np.uint8)).convert("P"), Image.new("P", arr.shape[::-1])]
    frames[0].save(tmp_path / "d_anim.gif", save_all=True, append_images=frames[1:])
    assert main(["predict", str(tmp_path), "-c", str(classifier), "--format", "json", "-k", "4"]) == 0
    cap = capsys.readouterr()
    probs = {r["file"].split("/")[-1]: sorted((p["index"], p["prob"]) for p in r["predictions"])
             for r in json.loads(cap.out)["predictions"]}
    assert probs["a_deep.png"] == probs["b_flat.png"] == probs["c_float.tif"]
    assert "d_anim.gif has 2 frames: only the first is used" in cap.err


@pytest.mark.slow
def test_training_on_16bit_pngs_sees_what_it_sees_on_8bit_ones(tmp_path):
    from effvit.train import build_classification_task, seed_everything, train

    flat = make_image_folder(tmp_path / "flat", n_train=4, n_val=2)
    deep = tmp_path / "deep"
    for f in flat.rglob("*.png"):
        grey = np.asarray(Image.open(f).convert("L"), dtype=np.uint16) * 257
        (deep / f.relative_to(flat)).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey).save(deep / f.relative_to(flat))
        Image.fromarray((grey // 257).astype(np.uint8)).save(f)  # the same picture at 8 bits
    losses = []
    for root in (flat, deep):
        cfg = tiny_config(root, tmp_path / root.name, "sched.epochs=1", "ema.enabled=false", "model.in_chans=1",
                          "aug.mean=[0.5]", "aug.std=[0.25]")
        seed_everything(0)
        result = train(build_classification_task(cfg, log=lambda *_: None), cfg)
        losses.append((result.history[0]["train_loss"], result.history[0]["val_loss"]))
    assert losses[0] == losses[1]
