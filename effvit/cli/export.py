"""``effvit export``: the fused inference model as ONNX, TorchScript and/or OpenVINO IR, verified after
writing; ``--int8`` adds the post-training int8 form, checked against fp32 on held-out images."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

from effvit.fast.calibration import batches, image_sets
from effvit.fast.cpuinfo import bf16_unit
from effvit.fast.export import export_onnx, export_torchscript
from effvit.fast.openvino_ir import export_openvino, openvino_predictor
from effvit.fast.quantize import compare_predictions, export_int8, ort_predictor
from effvit.models import create_model, load_model, resolve_models
from effvit.train.inference import eval_transform

FORMATS = {"onnx": ".onnx", "torchscript": ".ts.pt", "openvino": ".xml"}


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
    p.add_argument("--format", default="onnx,torchscript",
                   help="comma-separated: onnx, torchscript, openvino (IR converted from the ONNX export)")
    p.add_argument("--out", default="exports", help="output folder")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference accepted by verification")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime / reload check")
    q = p.add_argument_group("int8 (post-training static quantization of the ONNX export)")
    q.add_argument("--int8", action="store_true", help="also write NAME.int8.onnx (and NAME.int8.xml with "
                   "openvino), checked against fp32 on held-out images (the check in NAME.int8.json)")
    q.add_argument("--calib", metavar="DIR", help="folder of calibration images (default: the checkpoint's "
                   "training data)")
    q.add_argument("--data", metavar="DIR", help="the checkpoint's data root (Fashion-MNIST IDX folder, or "
                   "ROOT with train/ and val/ for a folder dataset)")
    q.add_argument("--calib-images", type=int, default=512, help="calibration images (default 512)")
    q.add_argument("--check-images", type=int, default=10000,
                   help="held-out images for the agreement check (default 10000; 0: all)")
    q.add_argument("--calib-method", default="minmax", choices=["minmax", "percentile", "entropy"],
                   help="activation ranges: minmax (default), or percentile/entropy to clip outliers")
    q.add_argument("--int8-ops", default="Conv,Gemm",
                   help="ONNX op types to quantize; the rest stay fp32 (default Conv,Gemm: BENCHMARKS.md)")
    q.add_argument("--min-agreement", type=float, default=0.99,
                   help="least top-1 agreement with fp32 accepted (default 0.99)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = resolve_models(args.model or "m0")
    if len(names) != 1:
        raise ValueError(f"--model takes one variant, got {args.model!r}")
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    if args.img_size is not None and (len(args.img_size) not in (1, 2) or min(args.img_size) < 1):
        raise ValueError(f"--img-size takes H or H W, positive numbers of pixels, got {args.img_size}")
    size = None if args.img_size is None else (args.img_size[0], args.img_size[-1])
    if args.checkpoint:
        model = load_model(args.checkpoint, model_name=args.model and names[0], img_size=size)
        size = model.img_size
    else:
        size = size or (224, 224)
        model = create_model(names[0], num_classes=args.num_classes, img_size=size)
    # the int8 images are found before anything is written: a missing folder fails fast
    sets = _int8_images(args, model) if args.int8 else None
    out = Path(args.out)
    stem = f"{model.variant}_{size[0]}x{size[1]}"
    needs_onnx = (args.int8 or "openvino" in formats) and "onnx" not in formats
    with contextlib.ExitStack() as stack:
        onnx_path = out / f"{stem}.onnx"
        if needs_onnx:  # only the input of the int8 / OpenVINO conversion: written aside, never over an export
            out.mkdir(parents=True, exist_ok=True)
            aside = stack.enter_context(tempfile.TemporaryDirectory(dir=out, prefix=".export"))
            onnx_path = Path(aside) / onnx_path.name
        for f in (["onnx"] if needs_onnx else []) + [f for f in formats if f != "openvino"]:
            path = onnx_path if f == "onnx" else out / f"{stem}{FORMATS[f]}"
            if f == "onnx":
                diff = export_onnx(model, path, size, opset=args.opset, dynamo=args.dynamo,
                                   verify=not args.no_verify, atol=args.atol)
                check = "onnxruntime"
            else:
                diff = export_torchscript(model, path, size, verify=not args.no_verify, atol=args.atol)
                check = "torch.jit.load"
            note = "not verified" if diff is None else f"verified with {check}: max abs diff {diff:.2e}"
            shown = f"{path.name} (the conversion's input, not kept)" if needs_onnx and f == "onnx" else path
            print(f"{f:<12} {shown}  ({note}; dynamic batch, {size[0]}x{size[1]})")
        int8_path = out / f"{stem}.int8.onnx"
        if sets is not None:
            _export_int8(args, model, sets, onnx_path, int8_path)
        if "openvino" in formats:
            _export_openvino(args, model, size, onnx_path, out / f"{stem}.xml", int8_path, sets)
    return 0


def _int8_images(args, model):
    """Calibration and held-out images (``effvit.fast.calibration.ImageSets``) for ``--int8``."""
    return image_sets(model, eval_transform(model), folder=args.calib, data_root=args.data,
                      calibration_images=args.calib_images, held_out_images=args.check_images)


def _export_int8(args, model, sets, onnx_path: Path, int8_path: Path) -> None:
    ops = args.int8_ops.split(",")
    n, agreement, skipped = export_int8(onnx_path, int8_path, sets, ops=ops, method=args.calib_method,
                                        min_agreement=args.min_agreement)
    record = {"int8": int8_path.name, "fp32": onnx_path.name, "input_shape": [model.in_chans, *model.img_size],
              "ops": ops, "calibration_images": n,
              "calibration_method": args.calib_method, "source": sets.source, **vars(agreement),
              "delta": agreement.delta}
    int8_path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
    print(f"{'int8':<12} {int8_path}  (QDQ, per-channel int8 weights, {'+'.join(ops)} in int8; calibrated on "
          f"{n} images, {args.calib_method}; {sets.source})")
    print(f"{'':<12} {agreement.summary()}")


def _export_openvino(args, model, size, onnx_path: Path, xml: Path, int8_path: Path, sets) -> None:
    """fp32 IR (parity-checked); with ``--int8`` the int8 IR, and where the CPU has bf16 units the IR
    run in bf16, both checked against fp32 ONNX Runtime on the held-out images."""
    diff = export_openvino(onnx_path, xml, None if args.no_verify else model, size, args.atol)
    note = "not verified" if diff is None else f"verified with OpenVINO f32: max abs diff {diff:.2e}"
    print(f"{'openvino':<12} {xml}  ({note}; dynamic batch, {size[0]}x{size[1]})")
    if sets is None:
        return
    xml8 = int8_path.with_suffix(".xml")
    export_openvino(int8_path, xml8)
    forms = {f"{xml8}  (int8)": openvino_predictor(xml8, 0)}
    if bf16_unit():
        forms[f"{xml}  (run in bf16, {bf16_unit()})"] = openvino_predictor(xml, 0, "bf16")
    held = batches(sets.held_out, sets.held_out_idx, 64, sets.labelled)
    for name, agreement in compare_predictions(ort_predictor(onnx_path, 0), forms, held).items():
        print(f"{'openvino':<12} {name} {agreement.summary()}")
