"""Rotation on an expanded canvas and the crops that remove its empty corners.

Convention: ``angle`` in degrees, counter-clockwise, as PIL's ``Image.rotate``. Rotating with
``expand=True`` gives a canvas that holds the whole rotated image, centred; the empty corners are filled.
Crops, all centred on that canvas:

- ``max_area``: the largest axis-aligned rectangle inside the rotated image (closed form below), so no
  filled pixel remains. RotNet's widely copied crop is wrong for non-square images; this one is exact.
- ``keep_aspect``: the largest rectangle of the original aspect ratio inside the rotated image.
- ``none``: the whole expanded canvas, filled corners included.
- ``same``: a window of the original size (for content on a plain background, e.g. Fashion-MNIST).
"""

from __future__ import annotations

import math

from PIL import Image

CROPS = ("max_area", "keep_aspect", "none", "same")
_EPS = 1e-6


def _sin_cos(angle: float) -> tuple[float, float]:
    r = math.radians(angle)
    # exact zeros at multiples of 90 degrees, where sin/cos of a float radian are only ~1e-16
    s, c = abs(math.sin(r)), abs(math.cos(r))
    return (0.0 if s < 1e-12 else s), (0.0 if c < 1e-12 else c)


def rotated_size(w: float, h: float, angle: float) -> tuple[float, float]:
    """Bounding box (width, height) of a w x h rectangle rotated by ``angle``."""
    s, c = _sin_cos(angle)
    return w * c + h * s, w * s + h * c


def max_area_rect(w: float, h: float, angle: float) -> tuple[float, float]:
    """Width and height of the largest axis-aligned rectangle inside a w x h image rotated by ``angle``.

    With s = |sin a|, c = |cos a| and the long/short sides L/S: when S <= 2 s c L the rectangle touches
    both long sides (half-constrained) and x = S/2 gives x/s along the long axis, x/c along the short;
    otherwise it touches all four sides: w' = (w c - h s) / cos 2a, h' = (h c - w s) / cos 2a.
    """
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w} x {h}")
    s, c = _sin_cos(angle)
    if s == 0.0:
        return float(w), float(h)
    if c == 0.0:
        return float(h), float(w)
    width_is_long = w >= h
    long_side, short_side = (w, h) if width_is_long else (h, w)
    if short_side <= 2.0 * s * c * long_side or abs(s - c) < 1e-10:
        x = 0.5 * short_side
        return (x / s, x / c) if width_is_long else (x / c, x / s)
    cos2a = c * c - s * s
    return (w * c - h * s) / cos2a, (h * c - w * s) / cos2a


def keep_aspect_rect(w: float, h: float, angle: float) -> tuple[float, float]:
    """Largest rectangle of the image's own aspect ratio inside the rotated image: k*w x k*h."""
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w} x {h}")
    s, c = _sin_cos(angle)
    k = min(w / (w * c + h * s), h / (w * s + h * c))
    return k * w, k * h


def crop_size(w: float, h: float, angle: float, crop: str) -> tuple[float, float]:
    """The (width, height) that ``crop`` keeps of a w x h image rotated by ``angle`` (see module doc)."""
    if crop == "max_area":
        return max_area_rect(w, h, angle)
    if crop == "keep_aspect":
        return keep_aspect_rect(w, h, angle)
    if crop == "none":
        return rotated_size(w, h, angle)
    if crop == "same":
        return float(w), float(h)
    raise ValueError(f"unknown crop {crop!r}; choose from {', '.join(CROPS)}")


def centred_box(canvas_w: int, canvas_h: int, crop_w: float, crop_h: float) -> tuple[int, int, int, int]:
    """Integer (left, top, right, bottom) of a crop_w x crop_h rectangle centred on the canvas, rounded
    inward so every kept pixel lies wholly inside the exact rectangle (at least one pixel is kept)."""
    cx, cy = canvas_w / 2.0, canvas_h / 2.0
    left = max(0, math.ceil(cx - crop_w / 2.0 - _EPS))
    top = max(0, math.ceil(cy - crop_h / 2.0 - _EPS))
    right = min(canvas_w, math.floor(cx + crop_w / 2.0 + _EPS))
    bottom = min(canvas_h, math.floor(cy + crop_h / 2.0 + _EPS))
    if right <= left:
        left, right = int(cx), int(cx) + 1
    if bottom <= top:
        top, bottom = int(cy), int(cy) + 1
    return left, top, min(right, canvas_w), min(bottom, canvas_h)


def rotate(img: Image.Image, angle: float, resample: int = Image.Resampling.BILINEAR,
           fill=None) -> Image.Image:
    """``img`` rotated counter-clockwise by ``angle`` degrees on a canvas that holds all of it.

    PIL centres the canvas on the image centre, which is what ``centred_box`` assumes."""
    if img.mode == "P":  # palette images cannot be interpolated
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.rotate(angle, resample=resample, expand=True, fillcolor=fill)


def rotate_window(img: Image.Image, angle: float, size: tuple[int, int],
                  resample: int = Image.Resampling.BILINEAR, fill=None) -> Image.Image:
    """The ``size`` window centred on ``img`` rotated counter-clockwise by ``angle`` degrees, in one affine
    transform: only the kept pixels are interpolated (no expanded canvas to fill and crop)."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    r = math.radians(angle)
    c, s = math.cos(r), math.sin(r)
    ow, oh = size
    # output pixel (x, y) -> input: rotate its offset from the output centre clockwise (y points down)
    # and add the input centre; PIL samples at continuous coordinates, so the centres line up exactly
    matrix = (c, -s, img.width / 2 - c * ow / 2 + s * oh / 2,
              s, c, img.height / 2 - s * ow / 2 - c * oh / 2)
    return img.transform((ow, oh), Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def rotate_crop(img: Image.Image, angle: float, crop: str = "max_area",
                resample: int = Image.Resampling.BILINEAR, fill=None) -> Image.Image:
    """Rotate by ``angle`` (counter-clockwise, degrees) and apply ``crop`` (see module doc)."""
    cw, ch = crop_size(img.width, img.height, angle, crop)
    if crop == "none":
        return rotate(img, angle, resample, fill)
    if crop == "same":  # rotate about the centre on the original canvas
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return img.rotate(angle, resample=resample, expand=False, fillcolor=fill)
    # rounded down: every kept pixel lies wholly inside the exact rectangle (at least one pixel is kept)
    size = (max(1, math.floor(cw + _EPS)), max(1, math.floor(ch + _EPS)))
    return rotate_window(img, angle, size, resample, fill)
