"""``effvit predict``: top-k labels with probabilities for images or folders of images.

    effvit predict photo.jpg photos/ --checkpoint runs/NAME/best.pth --topk 3
    effvit predict photos/ -c best.pth --format json > predictions.json

Class names come from the checkpoint. Files that cannot be decoded are reported by name on stderr and
skipped; the others are still predicted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys

from effvit.data import list_images, resolve_device
from effvit.models import load_model
from effvit.outputs import output_file, write_text
from effvit.predict import Predictions, predict


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k labels and probabilities for images (table, JSON or CSV)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="IMAGE|FOLDER", help="image files and/or folders (recursive)")
    p.add_argument("-c", "--checkpoint", required=True, help="training checkpoint or weights file")
    p.add_argument("-k", "--topk", type=int, default=5)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("-o", "--output", help="write the predictions to this file instead of stdout (an input, or a "
                   "file that holds something other than predictions, is refused)")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if it is not a predictions file")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--img-size", type=int, help="run at another resolution (bias tables resized)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def format_results(predictions: Predictions, fmt: str) -> str:
    results = [dataclasses.asdict(r) for r in predictions.images]
    if fmt == "json":
        return json.dumps({"predictions": results, "unreadable": predictions.unreadable}, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "rank", "label", "index", "prob"])
        for r in results:
            for rank, p in enumerate(r["predictions"], 1):
                w.writerow([r["file"], rank, p["label"], p["index"], f"{p['prob']:.6f}"])
        return buf.getvalue()
    lines = []
    width = max([len(r["file"]) for r in results] + [4])
    lines.append(f"{'file':<{width}}  {'rank':>4}  {'prob':>7}  label")
    for r in results:
        for rank, p in enumerate(r["predictions"], 1):
            name = r["file"] if rank == 1 else ""
            lines.append(f"{name:<{width}}  {rank:>4}  {100 * p['prob']:>6.2f}%  {p['label']}")
    return "\n".join(lines) + "\n"


def holds_predictions(path) -> bool:
    """Whether ``path`` starts like a file ``effvit predict`` writes (table, JSON or CSV)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    first = head.split("\n", 1)[0]
    return (first.startswith("file") and first.split()[1:4] == ["rank", "prob", "label"]
            or first == "file,rank,label,index,prob"
            or head.startswith('{\n  "predictions": '))


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    files = [f for p in args.paths for f in list_images(p)]
    if args.output:  # before predicting, not after
        output_file(args.output, [*files, args.checkpoint], is_own=holds_predictions, overwrite=args.overwrite)
    model = load_model(args.checkpoint, use_ema=args.ema, img_size=args.img_size)
    result = predict(model, files, topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                     device=resolve_device(args.device))
    for name in result.unreadable:
        print(f"effvit predict: skipped unreadable image {name}", file=sys.stderr)
    text = format_results(result, args.format)
    if args.output:
        write_text(text, args.output)
    else:
        sys.stdout.write(text)
    if result.unreadable:
        print(f"effvit predict: {len(result.images)} predicted, {len(result.unreadable)} unreadable skipped",
              file=sys.stderr)
    return 0 if result.images else 1
