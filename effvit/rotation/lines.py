"""Refine a tilt estimate from the photo's dominant line directions (horizons, walls, poles, frames).

In an upright photo many strong edges are horizontal or vertical; after a counter-clockwise tilt by
theta they lie at theta (mod 90 degrees). The magnitude-weighted histogram of edge orientations, folded
to [0, 90), then peaks at theta. The network's estimate says which peak to trust: only a clear peak
within ``search`` degrees of it is taken, so a photo without straight lines keeps the network's answer
and a wrong line can move it by at most ``search`` degrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

BIN = 0.1  # degrees per orientation bin
_BINS = int(round(90 / BIN))


@dataclass
class LineFit:
    angle: float  # the refined tilt (the input estimate when no clear line was found), signed degrees
    strength: float  # the peak's height over the histogram's mean (0 when none)
    used: bool  # whether the lines changed the estimate


def orientation_histogram(img: Image.Image, max_side: int = 640, sigma: float = 0.4, blur: float = 2.0) -> np.ndarray:
    """Edge orientations (mod 90, counter-clockwise, degrees; bin k = k * BIN) weighted by gradient
    magnitude, of the strongest 10% of the edges, smoothed circularly by a Gaussian of ``sigma`` degrees."""
    grey = img.convert("L")
    if max(grey.size) > max_side:
        s = max_side / max(grey.size)
        grey = grey.resize((max(8, round(grey.width * s)), max(8, round(grey.height * s))),
                           Image.Resampling.BILINEAR)
    a = np.asarray(grey.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    gx = a[1:-1, 2:] - a[1:-1, :-2]
    gy = a[2:, 1:-1] - a[:-2, 1:-1]
    mag = np.hypot(gx, gy)
    if mag.size == 0:
        return np.zeros(_BINS)
    keep = mag > max(np.percentile(mag, 90), 8.0)
    # the gradient is perpendicular to its edge, so mod 90 both give the same angle; image y points down
    theta = np.degrees(np.arctan2(-gy[keep], gx[keep])) % 90.0
    hist = np.bincount((theta / BIN).astype(np.int64) % _BINS, weights=mag[keep], minlength=_BINS)
    k = np.arange(-4 * sigma / BIN, 4 * sigma / BIN + 1) * BIN
    kernel = np.exp(-0.5 * (k / sigma) ** 2)
    padded = np.concatenate([hist[-len(k):], hist, hist[:len(k)]])
    return np.convolve(padded, kernel / kernel.sum(), mode="same")[len(k):-len(k)]


def refine_with_lines(img: Image.Image, angle: float, search: float = 3.0, min_strength: float = 3.0,
                      hist: np.ndarray | None = None) -> LineFit:
    """The tilt ``angle`` (signed degrees) moved onto the dominant line direction within ``search``
    degrees of it, when that direction's peak is at least ``min_strength`` times the histogram's mean
    and a true local maximum (not the edge of the search range)."""
    h = orientation_histogram(img) if hist is None else hist
    mean = float(h.mean())  # a photo without straight lines has a flat histogram: peaks near the mean
    if mean <= 0 or not np.isfinite(mean):
        return LineFit(angle, 0.0, False)
    offsets = np.arange(-round(search / BIN), round(search / BIN) + 1)
    idx = (np.round(angle / BIN).astype(np.int64) + offsets) % _BINS
    vals = h[idx]
    j = int(np.argmax(vals))
    strength = float(vals[j] / mean)
    if j == 0 or j == len(vals) - 1 or strength < min_strength:
        return LineFit(angle, strength, False)
    left, mid, right = vals[j - 1], vals[j], vals[j + 1]
    denom = left - 2 * mid + right
    frac = 0.5 * (left - right) / denom if denom < 0 else 0.0  # parabola through the peak's neighbours
    refined = (round(angle / BIN) + offsets[j] + frac) * BIN
    return LineFit(float(refined), strength, True)


def into_window(angle: float, window: tuple[float, float] | None) -> float:
    """A line direction is only known mod 90 degrees: the equivalent angle inside ``window`` (if any)."""
    if window is None:
        return angle
    lo, hi = window
    for shift in (0.0, -90.0, 90.0, -180.0, 180.0):
        if lo <= angle + shift <= hi:
            return angle + shift
    return angle
