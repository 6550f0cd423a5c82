"""``effvit eval``: top-1, top-5, loss, per-class accuracy and a confusion-matrix PNG.

    effvit eval --checkpoint runs/NAME/best.pth --data /path/to/imagenet     # ROOT/val/<class>/*
    effvit eval --checkpoint runs/NAME/best.pth              # Fashion-MNIST: its 10k test set
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from effvit.models import load_model
from effvit.outputs import writable_dir
from effvit.train import ClassificationTask, build_loader, evaluate, init_distributed
from effvit.train.data import FashionMNIST, ImageFolder, check_same_classes, find_classes
from effvit.train.distributed import cleanup
from effvit.train.inference import (
    arch_name,
    class_names,
    eval_transform,
    has_own_class_names,
    image_mode,
)
from effvit.train.metrics import per_class_accuracy, plot_confusion


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


def build_eval_dataset(model, dataset: str, root: str | None, split: str | None, transform):
    if dataset == "fashion_mnist":
        if split not in (None, "test", "val", "train"):
            raise ValueError(f"Fashion-MNIST has the splits train and test, not {split!r}")
        ds = FashionMNIST(root, train=split == "train", transform=transform, mode=image_mode(model))
        return ds, split or "test"
    if not root:
        raise ValueError("pass --data DIR: the folder holding DIR/val/<class>/*.jpg (or --split NAME)")
    split = split or "val"
    split_dir = Path(root) / split
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    classes = find_classes(split_dir)
    names = class_names(model)
    if has_own_class_names(model):
        check_same_classes(names, classes, Path(f"{arch_name(model)} checkpoint classes"), split_dir)
    elif len(classes) != model.num_classes:
        raise ValueError(f"{split_dir} has {len(classes)} class folders but the model has {model.num_classes} "
                         "outputs")
    else:
        names = classes
    return ImageFolder(split_dir, names, transform=transform, mode=image_mode(model)), split


def run(args: argparse.Namespace) -> int:
    ctx = init_distributed(args.device)
    try:
        model = load_model(args.checkpoint, use_ema=args.ema, img_size=args.img_size)
        names = class_names(model)
        trained_on = model.pretrained_cfg.get("dataset")
        dataset = args.dataset or ("fashion_mnist" if trained_on == "fashion_mnist" else "folder")
        ds, split = build_eval_dataset(model, dataset, args.data, args.split, eval_transform(model))
        out = Path(args.output) if args.output else Path(args.checkpoint).parent / f"eval-{split}"
        if ctx.is_main:
            writable_dir(out)  # before the evaluation, not after it
        loader = build_loader(ds, args.batch_size, ctx=ctx, num_workers=args.workers, pin_memory=True)
        task = ClassificationTask(model, None, ds, num_classes=model.num_classes, class_names=names)
        model.to(ctx.device)
        res = evaluate(model, loader, task, ctx=ctx, amp=args.amp, strict=args.strict,
                       progress=not args.no_progress, desc=f"eval {split}")
    finally:
        cleanup()
    if not ctx.is_main:
        return 0
    confusion = res.stats["confusion"]
    per_class = per_class_accuracy(confusion)
    report = {"checkpoint": str(args.checkpoint), "weights": "ema" if args.ema else "model", "split": split,
              "samples": int(res.stats["count"]), "skipped": res.skipped, **res.metrics,
              "per_class": {n: (None if math.isnan(a) else a) for n, a in zip(names, per_class,
                                                                               strict=True)}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, arch_name(model), names, dataset, confusion, per_class, args.ema)
    # the metrics are printed first: a write that fails now (a full disk) loses no result
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    title = f"{arch_name(model)} on {dataset} {split}: top-1 {res.metrics['top1']:.2f}%"
    png = plot_confusion(confusion, names, out / "confusion.png", title=title)
    if not args.json:
        print(f"\nwrote {out / 'metrics.json'} and {png}")
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
