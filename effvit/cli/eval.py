"""``effvit eval``: top-1, top-5, loss, per-class accuracy and a confusion-matrix PNG.

    effvit eval --checkpoint runs/NAME/best.pth --data /path/to/imagenet     # ROOT/val/<class>/*
    effvit eval --checkpoint runs/NAME/best.pth              # Fashion-MNIST: its 10k test set
"""

from __future__ import annotations

import argparse
import json
import math

from effvit.train.evaluation import evaluate_checkpoint, save_evaluation


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: top-1/5, loss, per-class accuracy, confusion PNG",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--checkpoint", required=True, help="training checkpoint or weights file")
    p.add_argument("--data", metavar="DIR", help="data root (ImageNet layout) or Fashion-MNIST IDX folder")
    p.add_argument("--dataset", choices=["folder", "fashion_mnist"],
                   help="default: what the checkpoint was trained on (folder for outside weights)")
    p.add_argument("--split", default=None, help="subfolder to evaluate (default val; Fashion-MNIST: test)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--img-size", type=int, help="evaluate at another resolution (bias tables resized)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--strict", action="store_true", help="stop at the first undecodable image")
    p.add_argument("--output", metavar="DIR", help="where metrics.json and confusion.png go "
                   "(default: eval-<split>/ next to the checkpoint)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args.checkpoint, data=args.data, dataset=args.dataset, split=args.split,
                                 ema=args.ema, img_size=args.img_size, batch_size=args.batch_size,
                                 workers=args.workers, device=args.device, amp=args.amp, strict=args.strict,
                                 output=args.output, progress=not args.no_progress)
    if result is None:  # not the main rank
        return 0
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        print_report(result.report, result.arch, result.class_names, result.dataset, result.confusion,
                     result.per_class, result.ema)
    # the metrics are printed first: a write that fails now (a full disk) loses no result
    metrics, png = save_evaluation(result)
    if not args.json:
        print(f"\nwrote {metrics} and {png}")
    return 0


def print_report(report: dict, arch: str, names: list[str], dataset: str, confusion, per_class: list[float],
                 ema: bool) -> None:
    skipped = f", {len(report['skipped'])} unreadable skipped" if report["skipped"] else ""
    print(f"{arch} ({'EMA' if ema else 'model'} weights) on {dataset} {report['split']}, "
          f"{report['samples']} images{skipped}")
    print(f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  loss {report['loss']:.4f}")
    if len(per_class) <= 50:
        width = max(len(n) for n in names)
        counts = confusion.sum(dim=1)
        print(f"\n{'class':<{width}}  {'images':>6}  {'top-1':>6}")
        for name, acc, n in zip(names, per_class, counts.tolist(), strict=True):
            print(f"{name:<{width}}  {n:>6}  {acc:>5.1f}%")
    else:
        order = sorted(range(len(per_class)), key=lambda i: -1 if math.isnan(per_class[i]) else per_class[i])
        worst = ", ".join(f"{names[i]} {per_class[i]:.0f}%" for i in order[:10])
        print(f"worst classes: {worst} (all in metrics.json)")
