"""Rotation geometry: the closed-form max-area crop against brute force, and no border pixel ever kept."""

import math
import random

import numpy as np
import pytest
from PIL import Image

from effvit.rotation.geometry import (
    centred_box,
    crop_size,
    keep_aspect_rect,
    max_area_rect,
    rotate,
    rotate_crop,
    rotated_size,
)


def inside(w, h, angle, rw, rh, tol=1e-6):
    """Does a centred, axis-aligned rw x rh rectangle fit in a w x h image rotated by ``angle``?
    Rotate its corners back into the image's frame and check them against the image (convexity)."""
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    for x, y in ((rw / 2, rh / 2), (-rw / 2, rh / 2)):
        u, v = ca * x + sa * y, -sa * x + ca * y
        if abs(u) > w / 2 * (1 + tol) + tol or abs(v) > h / 2 * (1 + tol) + tol:
            return False
    return True


def brute_force_area(w, h, angle, steps=600):
    """Largest area over a grid of widths, each with the tallest fitting height found by bisection."""
    bw, bh = rotated_size(w, h, angle)
    best = 0.0
    for rw in np.linspace(0, bw, steps)[1:]:
        lo, hi = 0.0, bh
        if not inside(w, h, angle, rw, 1e-9, tol=0):
            continue
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(w, h, angle, rw, mid, tol=0) else (lo, mid)
        best = max(best, rw * lo)
    return best


def random_cases(n, seed):
    rng = random.Random(seed)
    cases = [(rng.randint(2, 900), rng.randint(2, 900), rng.uniform(-360, 360)) for _ in range(n)]
    # thin strips, squares, near-45 and near-0 angles: both branches of the closed form
    return cases + [(1000, 10, 5.0), (10, 1000, 5.0), (640, 480, 45.0), (300, 300, 44.999), (64, 64, 30.0),
                    (500, 200, 0.01), (200, 500, 89.99), (123, 321, -135.0)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_max_area_matches_brute_force(seed):
    for w, h, a in random_cases(40, seed):
        rw, rh = max_area_rect(w, h, a)
        assert inside(w, h, a, rw, rh), (w, h, a, rw, rh)
        brute = brute_force_area(w, h, a)
        # never smaller than the search finds, and the search gets within 1% of it
        assert rw * rh >= brute * (1 - 1e-6), (w, h, a, rw * rh, brute)
        assert brute >= rw * rh * 0.99, (w, h, a, rw * rh, brute)


def test_max_area_special_angles_and_symmetry():
    assert max_area_rect(640, 480, 0) == (640, 480)
    assert max_area_rect(640, 480, 180) == (640, 480)
    assert max_area_rect(640, 480, 90) == (480, 640)
    assert max_area_rect(640, 480, -90) == (480, 640)
    for a in (10.0, 33.0, 45.0, 80.0):
        ref = max_area_rect(640, 480, a)
        for b in (-a, 180 - a, 180 + a, 360 - a):
            assert max_area_rect(640, 480, b) == pytest.approx(ref)
    # a square at 45 degrees keeps the inscribed square of side w / sqrt(2)
    assert max_area_rect(100, 100, 45) == pytest.approx((100 / math.sqrt(2),) * 2)
    with pytest.raises(ValueError, match="positive"):
        max_area_rect(0, 10, 5)


def test_rotnet_style_square_crop_is_not_max_area_for_non_square():
    # RotNet's crop treats every image as a square; for 640x240 at 20 degrees the exact answer is larger
    w, h, a = 640, 240, 20.0
    rw, rh = max_area_rect(w, h, a)
    assert rw / rh > 2.5  # a wide crop, not a square one
    assert inside(w, h, a, rw, rh)


def test_keep_aspect_rect():
    for w, h, a in random_cases(30, 3):
        rw, rh = keep_aspect_rect(w, h, a)
        assert rw / rh == pytest.approx(w / h)
        assert inside(w, h, a, rw, rh)
        assert not inside(w, h, a, rw * 1.01, rh * 1.01)  # as large as possible
        assert rw * rh <= np.prod(max_area_rect(w, h, a)) * (1 + 1e-9)
    assert keep_aspect_rect(640, 480, 0) == pytest.approx((640, 480))


@pytest.mark.parametrize("crop", ["max_area", "keep_aspect"])
def test_crop_never_contains_a_border_pixel(crop):
    rng = random.Random(5)
    for _ in range(60):
        w, h, a = rng.randint(3, 240), rng.randint(3, 240), rng.uniform(-360, 360)
        img = Image.new("L", (w, h), 255)
        out = rotate_crop(img, a, crop, fill=0)
        assert np.asarray(out).min() == 255, (w, h, a, crop)
        # and rounding inward loses at most a pixel per side
        ew, eh = crop_size(w, h, a, crop)
        assert out.width >= min(ew, w + h) - 2, (w, h, a, out.size, ew)
        assert out.height >= min(eh, w + h) - 2, (w, h, a, out.size, eh)


def test_rotation_is_counter_clockwise_about_the_centre():
    img = Image.new("L", (41, 41), 0)
    img.putpixel((30, 20), 255)  # 10 px right of the centre
    for crop in ("same", "none"):
        out = np.asarray(rotate_crop(img, 90, crop))
        y, x = np.unravel_index(out.argmax(), out.shape)
        cy, cx = (out.shape[0] - 1) / 2, (out.shape[1] - 1) / 2
        assert (x - cx, y - cy) == pytest.approx((0, -10), abs=1.01)  # now 10 px above: counter-clockwise


def test_crop_modes_sizes():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    full = rotate_crop(img, 30, "none")
    bw, bh = rotated_size(200, 100, 30)
    assert abs(full.width - bw) <= 2 and abs(full.height - bh) <= 2
    assert rotate_crop(img, 30, "same").size == (200, 100)
    assert rotate_crop(img, 0, "max_area").size == (200, 100)
    assert rotate_crop(img, 90, "max_area").size == (100, 200)
    with pytest.raises(ValueError, match="unknown crop"):
        rotate_crop(img, 10, "centre")
    # palette images are converted so they can be interpolated
    assert rotate(img.convert("P"), 10).mode == "RGB"


def test_centred_box_rounds_inward():
    assert centred_box(100, 80, 50.5, 40.2) == (25, 20, 75, 60)
    assert centred_box(10, 10, 0.2, 0.2) == (5, 5, 6, 6)  # at least one pixel
