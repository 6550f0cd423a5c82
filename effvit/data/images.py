"""Images of any kind in, the network's 8-bit pixels out: orientation, bit depth, colour space and frames.

``load_image`` is the one reader every model input goes through (training, evaluation, prediction,
calibration, rotation data). It turns the pixels as the EXIF orientation tag says (a phone's portrait JPEG
is stored sideways with orientation 6; every viewer shows it upright, and so does the model get it).

Pillow opens 16-bit greyscale PNG and TIFF as 'I;16' (older versions 'I') and float TIFF as 'F', and its
``convert('L' or 'RGB')`` clips those at 255: a 16-bit image turns white, a float one in [0, 1] black.
``to_mode`` scales by the image's range first: 16-bit values by 255/65535, floats in [0, 1] by 255
(other floats, and 32-bit integers beyond 16 bits, from their own minimum and maximum). CMYK, palette and
the other 8-bit modes convert as Pillow does. Of an animated image the first frame is used (and said).
``list_images`` finds the image files of a path (a file, or a folder searched recursively).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HIGH_BIT_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a sample whose file could not be decoded (a dataset returns it instead of raising
    inside a loader worker)."""

    name: str
    error: str


def image_mode(in_chans: int) -> str:
    """The Pillow mode a network with ``in_chans`` input channels reads: 'L' (grey) or 'RGB'."""
    if in_chans not in (1, 3):
        raise ValueError(f"image data needs 1 (grey) or 3 (RGB) input channels, got {in_chans}")
    return "L" if in_chans == 1 else "RGB"


def load_image(path: str | Path, mode: str = "RGB", short_side: int | None = None) -> Image.Image:
    """Decode fully (Pillow is lazy: truncated files only fail on load), turn upright by the EXIF
    orientation, convert to ``mode`` (16-bit and float images scaled from their range, the first frame of
    an animation, said once) and, with ``short_side``, shrink (never enlarge) so the shorter side is that
    many pixels (a JPEG is then decoded at a reduced scale: much faster)."""
    with Image.open(path) as img:
        note_first_frame(img, path)
        if short_side and img.format == "JPEG":
            img.draft(img.mode, (short_side, short_side))
        img.load()
        img = to_mode(upright(img), mode)
    if short_side and min(img.size) > short_side:
        img = resize_short(img, short_side)
    return img


def resize_short(img: Image.Image, size: int, resample=Image.Resampling.BILINEAR) -> Image.Image:
    """Resize so the shorter side is ``size`` (Pillow's filters antialias when shrinking)."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, resample)


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (unchanged without one)."""
    return ImageOps.exif_transpose(img)


def list_images(*paths: str | Path) -> list[Path]:
    """The image files of the given paths: a file as itself, a folder searched recursively (sorted); a
    missing path or a folder without images raises with its name."""
    files = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if p.is_file():
            files.append(p)
            continue
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise ValueError(f"no images under {p} (extensions: {', '.join(IMG_EXTENSIONS)})")
        files += found
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
