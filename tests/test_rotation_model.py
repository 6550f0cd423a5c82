"""Rotation model (effvit and timm backbones), its weight file, and the straighten library."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from effvit.rotation.decision import DecisionRule
from effvit.rotation.methods import METHODS, get_method, wrap180
from effvit.rotation.model import (
    RotationModel,
    load_rotation_model,
    read_rotation_config,
    save_rotation_model,
)
from effvit.rotation.straighten import (
    StraightenOptions,
    parse_range,
    plan_outputs,
    straighten_files,
    straighten_image,
)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_head_on_effvit_trains_and_predicts(name):
    torch.manual_seed(0)
    model = RotationModel("m0", name, img_size=32, in_chans=1)
    x, theta = torch.randn(4, 1, 32, 32), torch.tensor([0.0, 90.0, 200.0, 359.0])
    out = model(x)
    assert out.shape == (4, get_method(name).num_outputs)
    model.method.criterion(out, theta).backward()
    assert model.backbone.patch_embed.conv1.conv.weight.grad.abs().sum() > 0  # the loss reaches the stem
    model.eval()
    angle, conf = model.predict(x)
    assert angle.shape == conf.shape == (4,)
    assert (angle >= 0).all() and (angle < 360).all() and (conf >= 0).all() and (conf <= 1).all()
    assert model.config["mean"] == (pytest.approx(0.449, abs=1e-3),)  # ImageNet mean folded to grey


def test_timm_backbone_by_name():
    model = RotationModel("timm/resnet18", "uv", img_size=32).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    assert model.config["backbone"] == "timm/resnet18"
    with pytest.raises(ValueError, match="unknown backbone"):
        RotationModel("no_such_net", "cgd")
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        RotationModel("timm/resnet18", "cgd", pretrained="/nonexistent/weights.pth")


@pytest.mark.slow
def test_effvit_backbone_loads_local_pretrained_weights(tmp_path):
    from effvit.models import create_model
    from effvit.models.weights import save_checkpoint

    src = create_model("efficientvit_m0", num_classes=10, img_size=32)
    save_checkpoint(src, tmp_path / "m0.pth", {})
    model = RotationModel("m0", "cls", img_size=32, pretrained=tmp_path / "m0.pth")
    w0 = src.patch_embed.conv1.conv.weight
    assert torch.equal(model.backbone.patch_embed.conv1.conv.weight, w0)
    assert model.backbone.head.linear.out_features == 360  # the classifier is replaced


@pytest.mark.slow
@pytest.mark.parametrize("half", [False, True])
def test_weight_file_round_trip(tmp_path, half):
    model = RotationModel("m0", "cgd", img_size=32, angle_range=(-45, 45)).eval()
    path = save_rotation_model(model, tmp_path / "r.safetensors", half=half, extra={"note": "test"})
    cfg = read_rotation_config(path)
    assert cfg["method"] == "cgd" and cfg["angle_range"] == [-45.0, 45.0] and cfg["note"] == "test"
    loaded = load_rotation_model(path)
    assert loaded.trained_range == (-45.0, 45.0) and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=5e-2 if half else 1e-6)
    with pytest.raises(ValueError, match=".safetensors"):
        save_rotation_model(model, tmp_path / "r.pth")


def test_weight_file_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an effvit rotation model"):
        load_rotation_model(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_rotation_model(tmp_path / "missing.safetensors")


def fake_predictions(model, answer):
    """Make ``model`` answer with the perfect output for ``answer(x)`` degrees (a per-image function)."""
    method = model.method

    def forward(x):
        return method.perfect_output(answer(x))

    model.forward = forward
    return model


def test_flip_check_confidence_for_direct_angle():
    model = RotationModel("m0", "da", img_size=32).eval()
    x = torch.zeros(2, 3, 32, 32)
    x[:, :, :, :4] = 1.0  # a marker on the left: flipped inputs have it on the right
    consistent = torch.tensor([20.0, -20.0])  # second image's angle of the mirrored view (see below)

    def answer(inp):
        flipped = inp[:, 0, 0, -1] > 0.5
        return torch.where(flipped, -consistent, consistent) + torch.where(
            flipped, torch.tensor([0.0, 60.0]), torch.tensor([0.0, 0.0]))

    fake_predictions(model, answer)
    angle, conf = model.predict(x)
    assert wrap180(angle).tolist() == pytest.approx([20.0, -20.0], abs=1e-3)
    # image 0: the mirror gives exactly -20 -> agreement 1; image 1: off by 60 degrees -> cos 60 = 0.5
    assert conf.tolist() == pytest.approx([1.0, 0.5], abs=1e-4)
    _, conf_off = model.predict(x, flip_check=False)
    assert conf_off.tolist() == [1.0, 1.0]


def test_parse_range():
    assert parse_range("45") == (-45.0, 45.0)
    assert parse_range("-10,30") == (-10.0, 30.0)
    assert parse_range("full") is None and parse_range(None) is None and parse_range("180") is None
    for bad in ("abc", "0", "30,10", "1,2,3"):
        with pytest.raises(ValueError, match="--range"):
            parse_range(bad)


def write_photos(folder):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / "a.jpg", "JPEG", quality=70, subsampling=2)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(folder / "b.jpg", "JPEG", quality=90, exif=exif.tobytes())
    Image.fromarray(arr).convert("RGBA").save(folder / "c.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


def constant_model(angle, confidence=0.9):
    model = RotationModel("m0", "uv", img_size=32).eval()
    uv = model.method

    def forward(x):
        return confidence * uv.perfect_output(torch.full((x.shape[0],), float(angle)))

    model.forward = forward
    return model


def test_straighten_files_writes_same_format_and_reports_errors(tmp_path):
    write_photos(tmp_path / "in")
    results = straighten_files([tmp_path / "in"], tmp_path / "out", constant_model(10.0))
    by_name = {r.path.split("/")[-1]: r for r in results}
    assert by_name["broken.jpg"].action == "error" and by_name["broken.jpg"].error
    assert not (tmp_path / "out" / "broken.jpg").exists()
    for name in ("a.jpg", "b.jpg", "c.png"):
        r = by_name[name]
        assert r.action == "rotated" and r.angle == pytest.approx(10.0, abs=1e-3)
        assert r.confidence == pytest.approx(0.9, abs=1e-4)
    src_a, out_a = Image.open(tmp_path / "in" / "a.jpg"), Image.open(tmp_path / "out" / "a.jpg")
    assert out_a.format == "JPEG" and out_a.quantization == src_a.quantization  # same quality
    from PIL import JpegImagePlugin
    assert JpegImagePlugin.get_sampling(out_a) == JpegImagePlugin.get_sampling(src_a) == 2
    # max-area crop of 90x60 at 10 degrees, and the EXIF-rotated one is portrait without the tag any more
    assert out_a.size[0] < 90 and out_a.size[0] > out_a.size[1]
    out_b = Image.open(tmp_path / "out" / "b.jpg")
    assert out_b.size[1] > out_b.size[0] and out_b.getexif().get(0x0112) is None
    out_c = Image.open(tmp_path / "out" / "c.png")
    assert out_c.format == "PNG" and out_c.mode == "RGBA"


@pytest.mark.slow
def test_straighten_min_confidence_dry_run_and_safety(tmp_path):
    write_photos(tmp_path / "in")
    (tmp_path / "in" / "broken.jpg").unlink()
    results = straighten_files([tmp_path / "in" / "a.jpg"], tmp_path / "out", constant_model(10.0, 0.4),
                               StraightenOptions(rule=DecisionRule(min_confidence=0.5)))
    assert results[0].action == "kept" and results[0].reason == "kept: confidence 0.40 < 0.5"
    assert (tmp_path / "out" / "a.jpg").read_bytes() == (tmp_path / "in" / "a.jpg").read_bytes()
    seen = []
    results = straighten_files([tmp_path / "in"], tmp_path / "dry", constant_model(-3.0), dry_run=True,
                               on_result=seen.append)
    assert len(seen) == 3 and not (tmp_path / "dry").exists()
    assert json.dumps([r.to_dict() for r in results])  # the --json output
    res = straighten_files([tmp_path / "in" / "a.jpg"], tmp_path / "o2", constant_model(-3.0),
                           StraightenOptions(rule=DecisionRule(min_angle=5)))
    assert res[0].action == "kept" and res[0].reason == "kept: tilt 3.00 deg < min angle 5"
    with pytest.raises(ValueError, match="overwritten"):
        plan_outputs([tmp_path / "in"], tmp_path / "in")
    (tmp_path / "other").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "a.jpg")
    with pytest.raises(ValueError, match="both be written"):
        plan_outputs([tmp_path / "in" / "a.jpg", tmp_path / "other" / "a.jpg"], tmp_path / "o3")
    with pytest.raises(ValueError, match="--out"):
        straighten_files([tmp_path / "in"], None, constant_model(1.0))


def test_straighten_image_undoes_a_rotation():
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).resize((200, 200))
    tilted = base.rotate(25, resample=Image.Resampling.BICUBIC, expand=True)
    fixed = straighten_image(tilted, 25.0, crop="none")
    # the centre of the straightened image matches the original's centre
    c = np.asarray(fixed, dtype=np.float32)
    cy, cx = c.shape[0] // 2, c.shape[1] // 2
    ref = np.asarray(base, dtype=np.float32)[80:120, 80:120]
    assert np.abs(c[cy - 20:cy + 20, cx - 20:cx + 20] - ref).mean() < 12
    with pytest.raises(ValueError, match="crop"):
        straighten_image(tilted, 5.0, crop="same")
    rgba = straighten_image(tilted.convert("RGBA"), 25.0, crop="none")
    assert rgba.getpixel((0, 0))[3] == 0  # corners transparent


def test_bundled_photo_model_runs_straighten_by_default(tmp_path, capsys):
    from effvit.cli import main
    from effvit.rotation.model import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_file():
        pytest.skip("bundled model not installed")
    assert DEFAULT_MODEL.stat().st_size < 10e6
    model = load_rotation_model()
    assert model.trained_range == (-45.0, 45.0) and model.config["backbone"] == "timm/efficientnet_lite0"
    # its default threshold, chosen on validation photos, is recorded in the file and used by default
    assert 0.0 < model.config["min_confidence"] < 1.0
    assert DecisionRule.for_model(model.config).min_confidence == model.config["min_confidence"]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    assert main(["straighten", str(tmp_path / "x.jpg"), "--dry-run", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert -45.0 <= row["angle"] <= 45.0 and 0.0 <= row["confidence"] <= 1.0 and row["output"] is None


@pytest.mark.slow
def test_damaged_or_mismatched_rotation_models_get_clear_errors(tmp_path, capsys):
    """straighten --model / rotation eval --checkpoint: one line saying what is wrong, no traceback."""
    from safetensors.torch import load_file, save_file

    from effvit.cli import main

    good = save_rotation_model(RotationModel("m0", "cgd", img_size=32), tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cfg = read_rotation_config(good)
    save_file(load_file(str(good)), str(tmp_path / "other.safetensors"),  # uv config, cgd weights
              metadata={"effvit_rotation": json.dumps({**cfg, "method": "uv"})})
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    expected = {"cut.safetensors": "is not a readable safetensors file",
                "other.safetensors": "does not hold the weights its config describes .*method uv",
                ".": "is a folder, not a rotation model"}
    for name, message in expected.items():
        for cmd in (["straighten", str(tmp_path / "a.png"), "--dry-run", "--model", str(tmp_path / name)],
                    ["rotation", "eval", "--checkpoint", str(tmp_path / name), "--data", str(tmp_path)]):
            assert main(cmd) == 2, cmd
            err = capsys.readouterr().err
            assert re.search(message, err) and "Traceback" not in err, err


def test_views_centre_square_and_crops_along_the_long_side():
    from effvit.rotation.data import centre_square
    from effvit.rotation.straighten import views

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 150, 3), dtype=np.uint8))
    (centre,) = views(img, 40)
    assert np.array_equal(np.asarray(centre), np.asarray(centre_square(img, 40)))
    three = views(img, 40, crops=3)
    small = np.asarray(img.resize((100, 40), Image.Resampling.BILINEAR))
    assert [v.size for v in three] == [(40, 40)] * 3
    assert np.array_equal(np.asarray(three[0]), small[:, :40]) and np.array_equal(np.asarray(three[2]), small[:, 60:])
    portrait = views(img.transpose(Image.Transpose.ROTATE_90), 40, crops=3)
    assert [v.size for v in portrait] == [(40, 40)] * 3
    assert len(views(img.resize((40, 40)), 40, crops=3)) == 1  # a square has one view
    with pytest.raises(ValueError, match="crops"):
        views(img, 40, crops=0)


def test_combine_weighted_circular_mean_and_agreement():
    from effvit.rotation.straighten import combine

    angle, conf = combine(torch.tensor([170.0, -170.0]), torch.tensor([1.0, 1.0]))
    assert abs(wrap180(torch.tensor(angle)).abs().item() - 180.0) < 1e-6  # across the +-180 seam
    assert conf == pytest.approx(np.cos(np.radians(10.0)), abs=1e-6)
    angle, conf = combine(torch.tensor([10.0, 20.0]), torch.tensor([0.9, 0.0]))
    assert angle == pytest.approx(10.0, abs=1e-3) and conf == pytest.approx(0.45, abs=1e-3)


def test_estimate_flip_tta_negates_the_mirrored_answer():
    """A network that answers 10 degrees whatever it sees contradicts itself under mirroring: the mirrored
    image must give -10. The combined answer is then 0, and the confidence drops by the disagreement."""
    from effvit.rotation.straighten import estimate

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    model = constant_model(10.0, 0.9)
    ((plain, c_plain),) = estimate(model, [img], window=(-45, 45))
    assert plain == pytest.approx(10.0, abs=1e-3) and c_plain == pytest.approx(0.9, abs=1e-4)
    ((flipped, c_flip),) = estimate(model, [img], window=(-45, 45), flip=True, crops=3)
    assert flipped == pytest.approx(0.0, abs=1e-3)
    assert c_flip == pytest.approx(0.9 * np.cos(np.radians(10.0)), abs=1e-4)


def line_grid(seed=0):
    """A noisy image of horizontal and vertical bars: every strong edge is axis-aligned."""
    a = np.full((600, 900), 200, np.uint8)
    for y in range(40, 600, 70):
        a[y:y + 6] = 30
    for x in range(50, 900, 130):
        a[:, x:x + 4] = 60
    noise = np.random.default_rng(seed).normal(0, 10, a.shape)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("tilt", [-31.0, -7.3, 0.0, 3.3, 12.6, 40.0])
def test_lines_refine_a_rough_estimate(tilt):
    from effvit.rotation.geometry import rotate_crop
    from effvit.rotation.lines import refine_with_lines

    img = rotate_crop(line_grid(), tilt, "max_area")
    for rough in (tilt - 2.0, tilt + 1.5):
        fit = refine_with_lines(img, rough)
        assert fit.used and abs(fit.angle - tilt) < 0.7, (rough, fit)
    far = refine_with_lines(img, tilt + 8.0)  # no line direction within 3 degrees: unchanged
    assert not far.used and far.angle == tilt + 8.0


def test_lines_leave_a_photo_without_lines_alone():
    from effvit.rotation.lines import refine_with_lines

    rng = np.random.default_rng(0)
    blobs = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).resize((450, 300),
                                                                                     Image.Resampling.BICUBIC)
    fit = refine_with_lines(blobs, 7.0)
    assert not fit.used and fit.angle == 7.0
    assert refine_with_lines(Image.new("RGB", (50, 40), "grey"), -3.0).angle == -3.0  # flat: no edge at all


@pytest.mark.slow
def test_straighten_files_tta_and_lines(tmp_path):
    from effvit.rotation.geometry import rotate_crop

    (tmp_path / "in").mkdir()
    rotate_crop(line_grid(), 12.6, "max_area").save(tmp_path / "in" / "grid.png")
    (res,) = straighten_files([tmp_path / "in"], None, constant_model(11.0), StraightenOptions(lines=True),
                              dry_run=True)
    assert res.angle == pytest.approx(12.6, abs=0.7)
    (res,) = straighten_files([tmp_path / "in"], None, constant_model(11.0), StraightenOptions(tta="flip"),
                              dry_run=True)
    assert res.angle == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="tta"):
        StraightenOptions(tta="all")
