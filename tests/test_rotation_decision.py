"""The straighten decision rule: a confident estimate acts, an unsure one keeps the photo and says why,
tiny tilts are not rotations; the per-photo library function; the CLI's table, JSON and summary line."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from test_rotation_model import constant_model

from effvit.cli import main
from effvit.rotation.decision import (
    KEPT,
    ROTATED,
    DecisionRule,
    choose_min_confidence,
    one_pixel_angle,
    rule_outcome,
    summary,
)
from effvit.rotation.geometry import crop_size
from effvit.rotation.model import RotationModel, save_rotation_model
from effvit.rotation.straighten import StraightenOptions, straighten_files, straighten_image, straighten_photo


@pytest.mark.parametrize("size, crop", [((4000, 3000), "max_area"), ((3000, 4000), "max_area"),
                                        ((640, 480), "keep_aspect"), ((500, 500), "none")])
def test_one_pixel_angle_is_where_the_crop_first_changes_by_a_pixel(size, crop):
    w, h = size
    a = one_pixel_angle(w, h, crop)
    for angle, changed in ((a * 1.001, True), (a * 0.999, False)):
        cw, ch = crop_size(w, h, angle, crop)
        assert (max(abs(cw - w), abs(ch - h)) >= 1.0) == changed
    if crop == "max_area":  # small angles: the long side's pixel, 1 / L radians
        assert a == pytest.approx(math.degrees(1.0 / max(w, h)), rel=0.02)
    assert one_pixel_angle(w, h, "same") == 0.0
    with pytest.raises(ValueError, match="positive"):
        one_pixel_angle(0, h)


def test_a_confident_estimate_acts_and_an_unsure_one_keeps_the_photo_saying_why():
    rule = DecisionRule(min_confidence=0.85)
    acted = rule.decide(7.0, 0.93, (800, 600))
    assert acted.action == ROTATED and acted.reason == "rotated: confidence 0.93 >= 0.85"
    kept = rule.decide(7.0, 0.62, (800, 600))
    assert kept.action == KEPT and kept.reason == "kept: confidence 0.62 < 0.85"
    # enough decimals that the two numbers differ on the page
    assert rule.decide(7.0, 0.8499, (800, 600)).reason == "kept: confidence 0.8499 < 0.85"
    assert rule.decide(7.0, float("nan"), (800, 600)).action == KEPT
    # a tilt that would move the photo's crop by under a pixel is not a rotation
    tiny = rule.decide(0.05, 0.99, (800, 600))
    assert tiny.action == KEPT and "under one pixel" in tiny.reason and "0.072 deg" in tiny.reason
    assert rule.decide(0.05, 0.99, (4000, 3000)).action == ROTATED  # the same tilt moves a large photo
    explicit = DecisionRule(min_confidence=0.5, min_angle=1.0).decide(-0.8, 0.9, (800, 600))
    assert explicit.action == KEPT and explicit.reason == "kept: tilt 0.80 deg < min angle 1"
    # always: every estimate acts, however unsure
    always = DecisionRule.always().decide(7.0, 0.01, (800, 600))
    assert always.action == ROTATED and "every estimate" in always.reason
    assert DecisionRule.always(min_angle=0.0).decide(1e-4, 0.0, (800, 600)).action == ROTATED


def test_rule_from_the_model_file_and_its_errors():
    assert DecisionRule.for_model({"min_confidence": 0.7}) == DecisionRule(0.7, None)
    assert DecisionRule.for_model({}) == DecisionRule(0.0, None)  # a model that records none acts always
    assert DecisionRule.for_model({"min_confidence": 0.7}, 0.0, 2.0) == DecisionRule(0.0, 2.0)
    for bad in ({"min_confidence": 1.5}, {"min_confidence": -0.1}, {"min_angle": -1.0}):
        with pytest.raises(ValueError, match="min (confidence|angle)"):
            DecisionRule(**bad)


def test_summary_counts():
    assert summary(["rotated", "kept", "rotated", "error", "kept", "kept"]) == "2 rotated, 3 kept, 1 unreadable"
    assert summary([]) == "0 rotated, 0 kept, 0 unreadable"


def _photo(w=90, h=60):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_straighten_photo_returns_estimate_action_reason_and_image():
    img = _photo()
    done = straighten_photo(img, constant_model(10.0, 0.9), StraightenOptions(rule=DecisionRule(0.8)))
    assert done.action == ROTATED and done.angle == pytest.approx(10.0, abs=1e-3)
    assert done.reason == "rotated: confidence 0.90 >= 0.8"
    assert np.array_equal(np.asarray(done.image), np.asarray(straighten_image(img, done.angle)))
    assert done.image.width < 90 and done.image.height < 60
    kept = straighten_photo(img, constant_model(10.0, 0.4), StraightenOptions(rule=DecisionRule(0.8)))
    assert kept.action == KEPT and kept.reason == "kept: confidence 0.40 < 0.8"
    assert np.array_equal(np.asarray(kept.image), np.asarray(img))  # the photo itself
    # EXIF orientation is applied before the estimate: a portrait stored sideways comes back portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    img.info["exif"] = exif.tobytes()
    sideways = Image.open(_saved(img, exif))
    out = straighten_photo(sideways, constant_model(3.0, 0.4), StraightenOptions(rule=DecisionRule(0.8)))
    assert out.image.size == (60, 90)


def _saved(img, exif):
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    buf.seek(0)
    return buf


def test_straighten_files_reports_the_reason_and_copies_kept_photos(tmp_path):
    (tmp_path / "in").mkdir()
    _photo().save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "bad.jpg").write_bytes(b"\xff\xd8 nothing")
    res = {r.path.split("/")[-1]: r for r in straighten_files(
        [tmp_path / "in"], tmp_path / "out", constant_model(6.0, 0.5), StraightenOptions(rule=DecisionRule(0.6)))}
    assert res["a.png"].action == KEPT and res["a.png"].reason == "kept: confidence 0.50 < 0.6"
    assert (tmp_path / "out" / "a.png").read_bytes() == (tmp_path / "in" / "a.png").read_bytes()
    assert res["bad.jpg"].action == "error" and res["bad.jpg"].reason.startswith("unreadable: ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # no temporary files left
    assert summary([r.action for r in res.values()]) == "0 rotated, 1 kept, 1 unreadable"


@pytest.mark.slow
def test_cli_table_json_and_summary_line(tmp_path, capsys):
    model = save_rotation_model(RotationModel("m0", "uv", img_size=32), tmp_path / "m.safetensors",
                                extra={"min_confidence": 0.999999})  # a random network is never that sure
    (tmp_path / "in").mkdir()
    _photo().save(tmp_path / "in" / "a.png")
    _photo(64, 64).save(tmp_path / "in" / "b.jpg")
    (tmp_path / "in" / "c.jpg").write_bytes(b"\xff\xd8 nothing")
    args = ["straighten", str(tmp_path / "in"), "--model", str(model), "--tta", "none", "--no-lines"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 1  # an unreadable file: exit 1
    out = capsys.readouterr()
    assert "rotates when confidence >= 0.999999" in out.out
    assert out.out.count("kept: confidence") == 2 and "unreadable" in out.out
    assert out.out.rstrip().splitlines()[-1] == "0 rotated, 2 kept, 1 unreadable"
    assert "skipped" in out.err and "c.jpg" in out.err
    assert main(args + ["--dry-run", "--json", "--always", "--min-angle", "0"]) == 1
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert [r["action"] for r in rows] == ["rotated", "rotated", "error"]
    assert all(r["reason"] for r in rows) and "every estimate" in rows[0]["reason"]
    assert "2 rotated, 0 kept, 1 unreadable (dry run: nothing written)" in out.err
    assert main(args + ["--dry-run", "--min-confidence", "0", "--min-angle", "0"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("2 rotated, 0 kept, 1 unreadable (dry run: nothing written)")
    assert main(args + ["--dry-run", "--always", "--min-confidence", "0.5"]) == 2
    assert "contradicts" in capsys.readouterr().err


def test_rule_outcome_counts_the_harm_and_the_good():
    size = (1000, 800)  # its one-pixel angle is about 0.06 degree
    upright = [(0.5, 0.9, size), (3.0, 0.95, size), (-4.0, 0.6, size), (2.0, 0.7, size)]
    tilted = [(9.0, 0.97, size, 10.0), (5.0, 0.5, size, -20.0), (28.0, 0.85, size, 30.0)]
    every = rule_outcome(DecisionRule.always(), upright, tilted)
    assert every["upright_rotated"] == 100.0 and every["upright_turned"] == 75.0  # 0.5 deg is no turn
    assert every["tilted_worse"] == pytest.approx(100 / 3)  # 5 deg for a -20 deg tilt: 25 deg off
    assert every["tilted_fixed2"] == pytest.approx(200 / 3) and every["mae_after"] == pytest.approx(28 / 3)
    sure = rule_outcome(DecisionRule(0.8), upright, tilted)
    assert sure["upright_turned"] == 25.0 and sure["tilted_worse"] == 0.0 and sure["tilted_rotated"] == \
        pytest.approx(200 / 3)
    assert sure["mae_after"] == pytest.approx((1 + 20 + 2) / 3) and sure["mae_before"] == pytest.approx(20.0)
    # the smallest threshold within the limits; none at all gives 1.0 (never act)
    chosen, tried = choose_min_confidence(upright, tilted, max_rate=30.0)
    assert chosen == 0.85 and [t["min_confidence"] for t in tried] == [0.0, 0.5, 0.6, 0.7, 0.85]
    assert choose_min_confidence(upright, tilted, max_rate=0.0)[0] == 0.97  # only the best estimate acts
    assert choose_min_confidence([(3.0, 0.99, size)], tilted[:1], max_rate=5.0)[0] == 1.0  # a sure wrong one
    with pytest.raises(ValueError, match="upright and one tilted"):
        rule_outcome(DecisionRule(0.5), [], tilted)
