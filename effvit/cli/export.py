"""``effvit export``: the fused inference model as ONNX, TorchScript, OpenVINO IR and/or an ExecuTorch program,
verified after writing; ``--int8`` adds the post-training int8 forms, checked against fp32 on held-out images."""

from __future__ import annotations

import argparse

from effvit.deploy.exports import ExportResult, build_export_model, check_formats, export_model


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
                   help="comma-separated: onnx, torchscript, openvino (IR converted from the ONNX export), "
                   "openvino-kernel (IR with effvit's C++ attention kernel, and the standard IR beside it), "
                   "executorch (.pte with the XNNPACK delegate, batch 1; needs effvit[mobile])")
    p.add_argument("--out", default="exports", help="output folder")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference accepted by verification")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime / reload check")
    p.add_argument("--allow-portable", action="store_true",
                   help="executorch: write the program even where XNNPACK leaves ops to the portable kernels")
    q = p.add_argument_group("int8 (post-training static quantization of the ONNX export)")
    q.add_argument("--int8", action="store_true", help="also write NAME.int8.onnx (and NAME.int8.xml with "
                   "openvino; NAME.int8.pte with executorch), checked against fp32 on held-out images (the check "
                   "in NAME.int8.json, NAME.int8.pte.json)")
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
    formats = check_formats([f.strip().lower() for f in args.format.split(",") if f.strip()])
    model = build_export_model(args.model, args.checkpoint, args.num_classes, args.img_size)
    export_model(model, args.out, formats=formats, opset=args.opset, dynamo=args.dynamo,
                 verify=not args.no_verify, atol=args.atol, int8=args.int8, calib=args.calib, data=args.data,
                 calib_images=args.calib_images, check_images=args.check_images, calib_method=args.calib_method,
                 int8_ops=args.int8_ops.split(","), min_agreement=args.min_agreement,
                 allow_portable=args.allow_portable, on_result=print_result)
    return 0


def print_result(result: ExportResult) -> None:
    for line in result.lines:
        print(line)
