"""``effvit straighten IN... --out DIR``: estimate each photo's tilt, rotate it back, crop; same format."""

from __future__ import annotations

import argparse
import json
import sys

from effvit.rotation.decision import DecisionRule, summary
from effvit.rotation.model import load_rotation_model
from effvit.rotation.straighten import StraightenOptions, parse_range, plan_outputs, straighten_files


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
    p.add_argument("--min-confidence", type=float, default=None, metavar="C",
                   help="copy images whose confidence (0..1) is below C unchanged (default: the threshold "
                        "recorded in the model, chosen on validation photos so that upright photos are "
                        "rarely turned; 0 acts on every estimate; docs/rotation.md)")
    p.add_argument("--always", action="store_true",
                   help="act on every estimate, however unsure (the same as --min-confidence 0)")
    p.add_argument("--tta", default="full", choices=["none", "flip", "crops", "full"],
                   help="test-time augmentation: flip = also the mirrored image (it must give the negated "
                        "tilt), crops = three squares along the long side, full = both (default full: the "
                        "lowest error over the held-out photos, BENCHMARKS.md; none is the fastest)")
    p.add_argument("--lines", action=argparse.BooleanOptionalAction, default=True,
                   help="refine the tilt on the photo's dominant straight lines when a clear one lies within "
                        "5 degrees of the estimate (default on: it raised acc@2 on held-out photos, "
                        "BENCHMARKS.md; --no-lines: the network's answer alone)")
    p.add_argument("--min-angle", type=float, default=None, metavar="DEG",
                   help="copy images whose estimated tilt is smaller than DEG unchanged (default: the tilt "
                        "at which the photo's crop changes by one pixel)")
    p.add_argument("--fill", default=None, help="corner colour for --crop none (default: black, or "
                                                "transparent for images with alpha)")
    p.add_argument("--quality", type=int, default=None,
                   help="JPEG/WebP quality to write (default: a JPEG keeps its own quantisation tables)")
    p.add_argument("--overwrite", action="store_true", help="replace files that exist in --out (never an input)")
    p.add_argument("--dry-run", action="store_true", help="only print angles and confidences")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)


def _row(r) -> str:
    if r.error:
        return f"{'-':>8} {'-':>8} {'-':>6}  {r.path}  unreadable"
    return f"{r.angle:>8.2f} {-r.angle:>8.2f} {r.confidence:>6.3f}  {r.path}  {r.reason}"


def run(args: argparse.Namespace) -> int:
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise ValueError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    if args.always and args.min_confidence not in (None, 0.0):
        raise ValueError(f"--always acts on every estimate: it contradicts --min-confidence {args.min_confidence}")
    if args.min_angle is not None and not args.min_angle >= 0.0:
        raise ValueError(f"--min-angle must be >= 0 degrees, got {args.min_angle}")
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {args.quality}")
    if args.out is None and not args.dry_run:
        raise ValueError("give an output folder with --out DIR, or --dry-run to only print the angles")
    if not args.dry_run:  # refused outputs before the model loads
        plan_outputs(args.inputs, args.out, overwrite=args.overwrite)
    model = load_rotation_model(args.model, device=args.device)
    window = parse_range(args.range) if args.range is not None else model.trained_range
    rule = DecisionRule.for_model(model.config, 0.0 if args.always else args.min_confidence, args.min_angle)
    options = StraightenOptions(window=window, crop=args.crop, fill=args.fill, tta=args.tta, lines=args.lines,
                                rule=rule)

    def show(r) -> None:
        if r.error:
            print(f"effvit straighten: skipped {r.path}: {r.error}", file=sys.stderr)
        if not args.json:
            print(_row(r), flush=True)

    if not args.json:
        win = "full circle" if window is None else f"{window[0]:g}..{window[1]:g} deg"
        print(f"model {model.config['backbone']}/{model.config['method']}, search window {win}, "
              f"tta {args.tta}, lines {'on' if args.lines else 'off'}; {rule.describe()}")
        print(f"{'tilt':>8} {'fix':>8} {'conf':>6}  file  action: reason")
    results = straighten_files(args.inputs, args.out, model, options, quality=args.quality,
                               dry_run=args.dry_run, overwrite=args.overwrite, on_result=show)
    if not results:
        raise ValueError("no images found in the given inputs")
    line = summary([r.action for r in results]) + (" (dry run: nothing written)" if args.dry_run else "")
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        print(line, file=sys.stderr)  # stdout stays one JSON document
    else:
        print(line)
    return 1 if any(r.error for r in results) else 0
