"""``effvit export``: the fused inference model as ONNX and/or TorchScript, verified after writing."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = {"onnx": ".onnx", "torchscript": ".ts.pt"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the fused model to ONNX / TorchScript (verified)")
    p.add_argument("--model", default=None, help="variant (m0..m5 or full name); default: the checkpoint's, "
                   "else m0")
    p.add_argument("--checkpoint", default=None,
                   help="weights: a path (official, timm, effvit or training checkpoint: classes, input "
                   "channels and size are taken from it); random weights if omitted")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head (without --checkpoint)")
    p.add_argument("--img-size", type=int, nargs="+", default=None,
                   help="H [W] fixed in the export (default: the checkpoint's, else 224)")
    p.add_argument("--format", default="onnx,torchscript", help="comma-separated: onnx, torchscript")
    p.add_argument("--out", default="exports", help="output folder")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference accepted by verification")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime / reload check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from effvit.cli.info import resolve_models
    from effvit.fast.export import export_onnx, export_torchscript
    from effvit.models import create_model, load_model

    names = resolve_models(args.model or "m0")
    if len(names) != 1:
        raise ValueError(f"--model takes one variant, got {args.model!r}")
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    if args.img_size is not None and len(args.img_size) not in (1, 2):
        raise ValueError(f"--img-size takes H or H W, got {args.img_size}")
    size = None if args.img_size is None else (args.img_size[0], args.img_size[-1])
    if args.checkpoint:
        model = load_model(args.checkpoint, model_name=args.model and names[0], img_size=size)
        size = model.img_size
    else:
        size = size or (224, 224)
        model = create_model(names[0], num_classes=args.num_classes, img_size=size)
    out = Path(args.out)
    stem = f"{model.variant}_{size[0]}x{size[1]}"
    for f in formats:
        path = out / f"{stem}{FORMATS[f]}"
        if f == "onnx":
            diff = export_onnx(model, path, size, opset=args.opset, dynamo=args.dynamo,
                               verify=not args.no_verify, atol=args.atol)
            check = "onnxruntime"
        else:
            diff = export_torchscript(model, path, size, verify=not args.no_verify, atol=args.atol)
            check = "torch.jit.load"
        note = "not verified" if diff is None else f"verified with {check}: max abs diff {diff:.2e}"
        print(f"{f:<12} {path}  ({note}; dynamic batch, {size[0]}x{size[1]})")
    return 0
