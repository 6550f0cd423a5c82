"""Straighten photos: EXIF orientation, estimate the tilt, rotate back, crop, save in the same format.

The estimate is the counter-clockwise rotation theta the photo carries (signed, in [-180, 180)); the fix
rotates by -theta. Files are written under an output folder, never over their input, in their format,
mode and bit depth (16-bit and float images are rotated in float; every frame of an animation by the
same angle); JPEGs keep their quantisation tables (so their quality), chroma subsampling, EXIF
(orientation reset) and ICC profile. What cannot be written back without loss (16-bit colour, multi-page
TIFF) is refused for that file. Whether a photo is turned is decided by a ``DecisionRule``
(``effvit.rotation.decision``): a photo it keeps is copied unchanged, with the reason.

``straighten_photo`` is the whole job for one image in memory (estimate, decision, corrected image), for
callers that are not folders of files; ``straighten_files`` does it for files and folders.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, JpegImagePlugin

from effvit.data import list_images, resize_short
from effvit.data.images import decoded_at_fewer_bits, frame_count, is_high_bit, to_mode, value_range
from effvit.outputs import atomic_path, same_file, writable_dir

from .data import to_tensor
from .decision import ROTATED, DecisionRule
from .geometry import CROPS, rotate_crop
from .lines import into_window, refine_with_lines
from .methods import wrap180
from .model import RotationModel

_ORIENTATION_TAG = 0x0112
ANIMATED = ("GIF", "PNG", "WEBP")  # formats whose frames are one animation: all turned by the same angle
# chosen with a Lite0 model fine-tuned on 25 photos, on its training photos (benchmarks/rotation_straighten_eval.py)
LINE_SEARCH, LINE_STRENGTH = 5.0, 4.0
TTA = {"none": {"flip": False, "crops": 1}, "flip": {"flip": True, "crops": 1},
       "crops": {"flip": False, "crops": 3}, "full": {"flip": True, "crops": 3}}  # test-time augmentation


@dataclass
class Result:
    path: str
    angle: float | None = None  # estimated counter-clockwise tilt, degrees in [-180, 180)
    confidence: float | None = None
    action: str = ""  # 'rotated', 'kept' or 'error'
    reason: str = ""  # why: 'kept: confidence 0.62 < 0.85'
    output: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StraightenOptions:
    """How photos are estimated, judged and corrected. ``window``: the answer's range in signed degrees
    (None: the full circle); ``rule``: None takes the model's recommended rule
    (``DecisionRule.for_model``); ``tta``: a key of ``TTA``; ``lines``: refine on dominant line directions;
    ``crop`` and ``fill``: as ``straighten_image``."""

    window: tuple[float, float] | None = None
    crop: str = "max_area"
    fill: str | None = None
    tta: str = "none"
    lines: bool = False
    rule: DecisionRule | None = None

    def __post_init__(self):
        if self.tta not in TTA:
            raise ValueError(f"tta must be one of {', '.join(TTA)}, got {self.tta!r}")
        if self.crop not in CROPS or self.crop == "same":
            raise ValueError(f"crop must be max_area, keep_aspect or none, got {self.crop!r}")

    def rule_for(self, model: RotationModel) -> DecisionRule:
        return self.rule if self.rule is not None else DecisionRule.for_model(model.config)


@dataclass
class Straightened:
    """One photo's outcome: the estimate, what was done and why, and the image to show or save (the
    corrected one when rotated, the upright input when kept)."""

    angle: float
    confidence: float
    action: str
    reason: str
    image: Image.Image


def parse_range(spec: str | None) -> tuple[float, float] | None:
    """'45' -> (-45, 45); '-10,30' -> (-10, 30); 'full' / '360' / None -> None (whole circle)."""
    if spec is None or str(spec).strip().lower() in ("full", "360", "none", ""):
        return None
    parts = [p for p in str(spec).replace(":", ",").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--range must be N (meaning -N..N), LO,HI or 'full', got {spec!r}") from None
    if len(vals) == 1:
        if not 0 < vals[0] <= 180:
            raise ValueError(f"--range N needs 0 < N <= 180, got {spec!r}")
        return None if vals[0] >= 180 else (-vals[0], vals[0])
    if len(vals) != 2 or not vals[0] < vals[1] or vals[1] - vals[0] > 360:
        raise ValueError(f"--range LO,HI needs LO < HI within 360 degrees, got {spec!r}")
    return vals[0], vals[1]


def open_upright(path: str | Path) -> tuple[Image.Image, Image.Image]:
    """(the file as opened, for its format info; the pixels with EXIF orientation applied, loaded)."""
    src = Image.open(path)
    src.load()
    return src, ImageOps.exif_transpose(src)


def upright_frames(src: Image.Image) -> list[Image.Image]:
    """Every frame of an animated image, EXIF orientation applied (their display times stay in ``info``)."""
    frames = []
    for i in range(frame_count(src)):
        src.seek(i)
        frame = ImageOps.exif_transpose(src)
        frame.info["duration"] = src.info.get("duration")
        frames.append(frame)
    src.seek(0)
    return frames


def check_writable_like(path: str | Path, src: Image.Image) -> None:
    """Refuse, before any work, an image whose straightened copy could not keep its mode and bit depth."""
    if decoded_at_fewer_bits(path):
        raise ValueError("it has 16 bits per colour channel, which Pillow reads at 8: the straightened copy "
                         "would lose precision. Convert it to 8 bits first (--dry-run still estimates)")
    if frame_count(src) > 1 and src.format not in ANIMATED:
        raise ValueError(f"it is a {frame_count(src)}-page {src.format}: straighten the pages as separate files")


def views(img: Image.Image, size: int, crops: int = 1) -> list[Image.Image]:
    """Square views of ``img`` at the network's input size: ``crops`` squares spread along its long side
    (1: the centre square, the training preprocessing; 3: both ends and the centre)."""
    if crops < 1:
        raise ValueError(f"crops must be >= 1, got {crops}")
    img = resize_short(img, size)
    w, h = img.size
    span = max(w, h) - size
    starts = sorted({round(span * k / (crops - 1)) for k in range(crops)}) if crops > 1 else [span // 2]
    return [img.crop((s, 0, s + size, size) if w >= h else (0, s, size, s + size)) for s in starts]


def working_copy(img: Image.Image, mode: str, long_side: int = 1280) -> Image.Image:
    """``img`` in ``mode``, box-reduced by an integer factor while its long side stays >= ``long_side``:
    a 12-megapixel photo costs a fraction of the conversion and resizing; the network's input (160-224 px)
    and the line histogram (640 px) are made from this copy."""
    factor = max(img.size) // long_side
    if factor >= 2 and img.mode in ("RGB", "L", "RGBA", "LA", "RGBX"):
        img = img.reduce(factor)
    return to_mode(img, mode) if img.mode != mode else img  # 16-bit and float scaled from their range


def combine(angles: torch.Tensor, conf: torch.Tensor) -> tuple[float, float]:
    """One answer from several views: their confidence-weighted circular mean, and a confidence that
    is the mean view confidence times the views' agreement (the length of the mean unit vector)."""
    w = conf.double().clamp_min(1e-6)
    r = torch.deg2rad(angles.double())
    c, s = (w * torch.cos(r)).sum() / w.sum(), (w * torch.sin(r)).sum() / w.sum()
    agreement = float(torch.hypot(c, s))
    return float(torch.rad2deg(torch.atan2(s, c))), float(conf.double().mean()) * agreement


@torch.no_grad()
def estimate(model: RotationModel, images: Sequence[Image.Image], window: tuple[float, float] | None = None,
             subdegree: bool = True, flip: bool = False, crops: int = 1, lines: bool = False,
             line_search: float = LINE_SEARCH, line_strength: float = LINE_STRENGTH) -> list[tuple[float, float]]:
    """[(signed tilt in degrees, confidence)] per PIL image, preprocessed exactly as in training.

    Test-time augmentation: ``crops`` squares along the long side instead of the centre one, and with
    ``flip`` each also mirrored (a mirrored photo carries the negated tilt); the answers are combined
    by ``combine``. ``lines``: the answer is then moved onto the photo's dominant line direction when a
    clear one (peak ``line_strength`` times the mean) lies within ``line_search`` degrees
    (``effvit.rotation.lines``)."""
    cfg = model.config
    mode = "L" if cfg["in_chans"] == 1 else "RGB"
    device = next(model.parameters()).device
    results = []
    for im in images:
        im = working_copy(im, mode)
        squares = views(im, cfg["img_size"], crops)
        x = torch.stack([to_tensor(v, cfg["mean"], cfg["std"]) for v in squares]).to(device)
        if not flip and crops == 1:
            angle, conf = model.predict(x, window=window, subdegree=subdegree)
            tilt, confidence = float(wrap180(angle)[0]), float(conf[0])
        else:
            angle, conf = model.predict(x, window=window, subdegree=subdegree, flip_check=False)
            if flip:
                mirrored = None if window is None else (-float(window[1]), -float(window[0]))
                angle_m, conf_m = model.predict(x.flip(-1), window=mirrored, subdegree=subdegree,
                                                flip_check=False)
                angle, conf = torch.cat([angle, -angle_m]), torch.cat([conf, conf_m])
            tilt, confidence = combine(wrap180(angle.cpu()), conf.cpu())
        if lines:
            tilt = into_window(refine_with_lines(im, tilt, line_search, line_strength).angle, window)
        results.append((tilt, confidence))
    return results


def straighten_image(img: Image.Image, angle: float, crop: str = "max_area",
                     fill: str | None = None) -> Image.Image:
    """Undo a counter-clockwise tilt of ``angle`` degrees: rotate by -angle (bicubic) and crop."""
    if crop not in CROPS or crop == "same":
        raise ValueError(f"crop must be max_area, keep_aspect or none, got {crop!r}")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if is_high_bit(img):  # interpolated in float, then back to the image's own mode and range
        values = np.asarray(img, dtype=np.float32)
        lo, hi = value_range(img, values)
        grey = ImageColor.getcolor(fill or "black", "L")
        rotated = rotate_crop(Image.fromarray(values), -angle, crop, resample=Image.Resampling.BICUBIC,
                              fill=lo + grey * (hi - lo) / 255.0)
        if img.mode == "F":
            return rotated
        dtype = np.uint16 if img.mode.startswith("I;16") else np.int32
        limits = np.iinfo(dtype)
        return Image.fromarray(np.clip(np.rint(np.asarray(rotated)), limits.min, limits.max).astype(dtype))
    fill_value = None
    if fill is not None:
        fill_value = ImageColor.getcolor(fill, img.mode)
    elif img.mode in ("RGBA", "LA"):
        fill_value = (0,) * len(img.getbands())  # transparent corners
    elif img.mode == "CMYK":
        fill_value = ImageColor.getcolor("black", "CMYK")  # zero ink would be white
    return rotate_crop(img, -angle, crop, resample=Image.Resampling.BICUBIC, fill=fill_value)


def judge(model: RotationModel, upright: Image.Image, options: StraightenOptions) -> tuple[float, float, str, str]:
    """(tilt, confidence, action, reason) for an upright (EXIF-applied) image."""
    (angle, confidence), = estimate(model, [upright], options.window, lines=options.lines, **TTA[options.tta])
    decision = options.rule_for(model).decide(angle, confidence, upright.size, options.crop)
    return angle, confidence, decision.action, decision.reason


def straighten_photo(img: Image.Image, model: RotationModel,
                     options: StraightenOptions | None = None) -> Straightened:
    """Estimate one image's tilt, decide by ``options.rule`` and return the outcome with the corrected
    image (or the upright input when kept). EXIF orientation is applied first; the input is not
    modified. Animated images: the first frame only (``straighten_files`` turns every frame)."""
    options = options or StraightenOptions(window=model.trained_range)
    upright = ImageOps.exif_transpose(img)
    angle, confidence, action, reason = judge(model, upright, options)
    out = straighten_image(upright, angle, options.crop, options.fill) if action == ROTATED else upright
    return Straightened(angle, confidence, action, reason, out)


def save_like(img: Image.Image | Sequence[Image.Image], src: Image.Image, path: Path,
              quality: int | None = None) -> None:
    """Save ``img`` (or the frames of an animation) in ``src``'s format, mode and bit depth, keeping what
    can be kept of its encoding and metadata."""
    frames = [img] if isinstance(img, Image.Image) else list(img)
    img = frames[0]
    fmt = src.format or (path.suffix.lstrip(".").upper() or "PNG")
    fmt = "JPEG" if fmt == "MPO" else fmt  # a camera JPEG with previews: the photo itself is written
    kw: dict = {}
    if src.info.get("icc_profile"):
        kw["icc_profile"] = src.info["icc_profile"]
    exif = src.getexif() if fmt in ("JPEG", "PNG", "WEBP") else None  # a TIFF's tags are its own header
    if exif:
        exif.pop(_ORIENTATION_TAG, None)  # the pixels are upright now
        kw["exif"] = exif.tobytes()
    if "dpi" in src.info:
        kw["dpi"] = src.info["dpi"]
    if fmt == "JPEG":
        if img.mode not in ("RGB", "L", "CMYK"):
            img = img.convert("RGB")
        if quality is not None:
            kw["quality"] = quality
        elif getattr(src, "quantization", None):
            kw["qtables"] = src.quantization  # the original's quality, table for table
        else:
            kw["quality"] = 95
        sampling = JpegImagePlugin.get_sampling(src)
        if sampling != -1 and img.mode == "RGB":
            kw["subsampling"] = sampling
        kw["progressive"] = bool(src.info.get("progressive"))
    elif fmt == "WEBP":
        kw["lossless"] = bool(src.info.get("lossless"))
        kw["quality"] = quality if quality is not None else 95  # WebP does not record its quality
    elif fmt == "TIFF" and src.info.get("compression") not in (None, "raw"):  # raw is Pillow's default
        kw["compression"] = src.info["compression"]
    elif fmt == "PNG" and img.mode == "I":  # older Pillow opened 16-bit PNGs as 'I'; PNG stores 16 bits
        frames = [f.convert("I;16") for f in frames]
        img = frames[0]
    if len(frames) > 1:
        kw.update(save_all=True, append_images=frames[1:], loop=src.info.get("loop", 0),
                  duration=[f.info.get("duration") or 100 for f in frames])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a crash or a full disk leaves no half-written photo
        img.save(tmp, format=fmt, **kw)


def plan_outputs(inputs: Sequence[str | Path], out_dir: str | Path,
                 overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs: files go to out_dir/name, folders keep their layout below it. An
    output that is its input is refused; one that exists already only with ``overwrite``."""
    out_dir = Path(out_dir)
    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            pairs += [(p, out_dir / p.relative_to(item)) for p in list_images(item)]
        else:
            pairs.append((item, out_dir / item.name))  # missing files are reported when read
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        if dst in seen:
            raise ValueError(f"{src} and {seen[dst]} would both be written to {dst}: "
                             "straighten them separately")
        if src.exists() and dst.exists() and same_file(src, dst):
            raise ValueError(f"{src} would be overwritten: choose an --out folder other than the input's")
        seen[dst] = src
    taken = [dst for _, dst in pairs if dst.exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{len(taken)} output file(s) exist already ({', '.join(map(str, taken[:3]))}"
                              f"{' ...' if len(taken) > 3 else ''}): pass --overwrite to replace them, or choose "
                              "another --out folder")
    return pairs


def straighten_files(inputs: Sequence[str | Path], out_dir: str | Path | None, model: RotationModel,
                     options: StraightenOptions | None = None, quality: int | None = None,
                     dry_run: bool = False, overwrite: bool = False, on_result=None) -> list[Result]:
    """Estimate, decide and (unless ``dry_run``) write each image: rotated ones corrected, kept ones copied
    byte for byte; unreadable files are reported and skipped. ``options``: default the model's own
    window and rule, no test-time augmentation, no lines."""
    options = options or StraightenOptions(window=model.trained_range)
    if out_dir is None and not dry_run:
        raise ValueError("give an output folder (--out DIR), or use --dry-run to only print the angles")
    pairs = plan_outputs(inputs, out_dir or ".", overwrite=overwrite or dry_run)
    if not dry_run:  # every output folder, before the first estimate
        for folder in dict.fromkeys(dst.parent for _, dst in pairs):
            writable_dir(folder, "--out")
    results = []
    for src_path, dst in pairs:
        res = Result(str(src_path))
        try:
            src, upright = open_upright(src_path)
            if not dry_run:
                check_writable_like(src_path, src)
            res.angle, res.confidence, res.action, res.reason = judge(model, upright, options)
            if not dry_run:
                res.output = str(dst)
                if res.action == ROTATED:
                    frames = upright_frames(src) if frame_count(src) > 1 else [upright]
                    save_like([straighten_image(f, res.angle, options.crop, options.fill) for f in frames],
                              src, dst, quality)
                else:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(dst) as tmp:
                        shutil.copy2(src_path, tmp)  # untouched: the original bytes
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            res.action, res.error = "error", f"{type(e).__name__}: {e}"
            res.reason = f"unreadable: {res.error}"
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results
