"""Images of any kind in, the network's 8-bit pixels out: bit depth, colour space and frames.

Pillow opens 16-bit greyscale PNG and TIFF as 'I;16' (older versions 'I') and float TIFF as 'F', and its
``convert('L' or 'RGB')`` clips those at 255: a 16-bit image turns white, a float one in [0, 1] black.
``to_mode`` scales by the image's range first: 16-bit values by 255/65535, floats in [0, 1] by 255
(other floats, and 32-bit integers beyond 16 bits, from their own minimum and maximum). CMYK, palette and
the other 8-bit modes convert as Pillow does. Of an animated image the first frame is used (and said).
``list_images`` finds the image files of a path (a file, or a folder searched recursively).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

HIGH_BIT_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def list_images(path: str | Path) -> list[Path]:
    """An image file, or every image under a folder (recursively, sorted)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ValueError(f"no images under {p} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return files


def is_high_bit(img: Image.Image) -> bool:
    return img.mode in HIGH_BIT_MODES


def value_range(img: Image.Image, values: np.ndarray) -> tuple[float, float]:
    """The range the pixel values of a high-bit image are meant in (see the module doc)."""
    if img.mode.startswith("I;16"):
        return 0.0, 65535.0
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if img.mode == "F" and 0.0 <= lo and hi <= 1.0:
        return 0.0, 1.0
    if img.mode == "I" and 0.0 <= lo and hi <= 65535.0:
        return 0.0, 65535.0
    return lo, hi if hi > lo else lo + 1.0


def to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit greyscale image as 8-bit 'L', scaled from its range; any other image unchanged."""
    if not is_high_bit(img):
        return img
    values = np.asarray(img, dtype=np.float64)
    lo, hi = value_range(img, values)
    scaled = np.nan_to_num((values - lo) * (255.0 / (hi - lo)), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img.convert(mode)``, high-bit images scaled from their range instead of clipped."""
    return to_8bit(img).convert(mode)


def frame_count(img: Image.Image) -> int:
    """Frames of an animation or pages of a document; MPO's extra images (a camera JPEG's previews or
    second view) do not count."""
    return 1 if img.format == "MPO" else getattr(img, "n_frames", 1)


def note_first_frame(img: Image.Image, path: str | Path) -> None:
    if (n := frame_count(img)) > 1:
        warnings.warn(f"{path} has {n} frames: only the first is used", stacklevel=2)


def decoded_at_fewer_bits(path: str | Path) -> bool:
    """True when Pillow decodes the file at fewer bits per channel than it holds (16-bit colour PNG and
    TIFF are read as 8-bit RGB(A)): pixels written back from it would lose precision."""
    with Image.open(path) as img:
        if is_high_bit(img):
            return False
        return any(";16" in str(getattr(tile, "args", "")) for tile in img.tile)
