"""``effvit straighten IN... --out DIR``: estimate each photo's tilt, rotate it back, crop; same format."""

from __future__ import annotations

import argparse
import json
import sys

from effvit.rotation.model import load_rotation_model
from effvit.rotation.straighten import parse_range, straighten_files


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("straighten", help="estimate and undo the rotation of photos (files or folders)",
                       description="Applies EXIF orientation, estimates the counter-clockwise tilt of each "
                                   "image, rotates it back and crops. Files are written under --out with "
                                   "their format and JPEG quality kept; inputs are never overwritten.")
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders (searched recursively)")
    p.add_argument("--out", metavar="DIR", help="output folder (required unless --dry-run)")
    p.add_argument("--model", default=None,
                   help="rotation model (.safetensors from `effvit rotation train`); default: the bundled "
                        "photo model")
    p.add_argument("--range", default=None, metavar="N|LO,HI|full",
                   help="search window in degrees: N means -N..N; default: the window the model was "
                        "trained on (the bundled model: 45)")
    p.add_argument("--crop", default="max_area", choices=["max_area", "keep_aspect", "none"],
                   help="max_area: largest rectangle without empty corners; keep_aspect: same aspect "
                        "ratio; none: whole rotated image with filled corners (default: max_area)")
    p.add_argument("--min-confidence", type=float, default=0.0, metavar="C",
                   help="copy images whose confidence (0..1) is below C unchanged (default 0; BENCHMARKS.md "
                        "lists what each threshold keeps and how accurate the kept answers are)")
    p.add_argument("--tta", default="full", choices=["none", "flip", "crops", "full"],
                   help="test-time augmentation: flip = also the mirrored image (it must give the negated "
                        "tilt), crops = three squares along the long side, full = both (default full: the "
                        "lowest error over the held-out photos, BENCHMARKS.md; none is the fastest)")
    p.add_argument("--lines", action=argparse.BooleanOptionalAction, default=True,
                   help="refine the tilt on the photo's dominant straight lines when a clear one lies within "
                        "5 degrees of the estimate (default on: it raised acc@2 on held-out photos, "
                        "BENCHMARKS.md; --no-lines: the network's answer alone)")
    p.add_argument("--min-angle", type=float, default=0.0, metavar="DEG",
                   help="copy images whose estimated tilt is smaller than DEG unchanged (default 0)")
    p.add_argument("--fill", default=None, help="corner colour for --crop none (default: black, or "
                                                "transparent for images with alpha)")
    p.add_argument("--quality", type=int, default=None,
                   help="JPEG/WebP quality to write (default: a JPEG keeps its own quantisation tables)")
    p.add_argument("--dry-run", action="store_true", help="only print angles and confidences")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)


def _row(r) -> str:
    if r.error:
        return f"{'-':>8} {'-':>8} {'-':>6}  {'error':<28} {r.path}"
    return f"{r.angle:>8.2f} {-r.angle:>8.2f} {r.confidence:>6.3f}  {r.action:<28} {r.path}"


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.min_confidence <= 1.0:
        raise ValueError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {args.quality}")
    if args.out is None and not args.dry_run:
        raise ValueError("give an output folder with --out DIR, or --dry-run to only print the angles")
    model = load_rotation_model(args.model, device=args.device)
    window = parse_range(args.range) if args.range is not None else model.trained_range

    def show(r) -> None:
        if r.error:
            print(f"effvit straighten: skipped {r.path}: {r.error}", file=sys.stderr)
        if not args.json:
            print(_row(r), flush=True)

    if not args.json:
        win = "full circle" if window is None else f"{window[0]:g}..{window[1]:g} deg"
        print(f"model {model.config['backbone']}/{model.config['method']}, search window {win}, "
              f"tta {args.tta}, lines {'on' if args.lines else 'off'}")
        print(f"{'tilt':>8} {'fix':>8} {'conf':>6}  {'action':<28} file")
    results = straighten_files(args.inputs, args.out, model, window=window, crop=args.crop,
                               min_confidence=args.min_confidence, min_angle=args.min_angle, fill=args.fill,
                               quality=args.quality, dry_run=args.dry_run, tta=args.tta,
                               lines=args.lines, on_result=show)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    if not results:
        raise ValueError("no images found in the given inputs")
    return 1 if any(r.error for r in results) else 0
