"""Which ops to quantize, by measurement: accuracy and speed of int8 variants of a trained model.

For a training checkpoint (Fashion-MNIST), the fp32 ONNX export is quantized with several sets of op
types and calibration methods; every variant is checked against fp32 on the whole test set (top-1
agreement, accuracy change) and timed against fp32 in ONNX Runtime and OpenVINO, 1 thread, at batch 16
and batch 1, all forms alternating in rounds. BENCHMARKS.md, "CPU deployment", reads from its output.

    python benchmarks/cpu_int8.py --checkpoint runs/fmnist-m0-112/last.pth --out benchmarks/results/cpu_int8/m0_112
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from effvit.bench.runtimes import p90
from effvit.bench.timing import alternate, ratio
from effvit.data import eval_transform
from effvit.deploy.calibration import batches, image_sets
from effvit.deploy.cpuinfo import bf16_unit, int8_unit
from effvit.deploy.graph import export_onnx
from effvit.deploy.openvino import export_openvino, openvino_predictor
from effvit.deploy.quantize import compare_predictions, ort_predictor, quantize_onnx
from effvit.models import load_model

# (name, op types, calibration method); "all" = every op type onnxruntime quantizes
VARIANTS = [
    ("conv+gemm", ["Conv", "Gemm"], "minmax"),
    ("conv+gemm, percentile", ["Conv", "Gemm"], "percentile"),
    ("conv+gemm+matmul", ["Conv", "Gemm", "MatMul"], "minmax"),
    ("all", ["all"], "minmax"),
]


def op_profile(path: Path, x, threads: int, iters: int = 30) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per op type (after its graph rewrites) over ``iters`` runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(iters):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    total = sum(per_op.values())
    return {k: round(v / total, 4) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--check-images", type=int, default=0, help="0: the whole test set")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per form and batch size")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    sets = image_sets(model, eval_transform(model), data_root=args.data, calibration_images=args.calib_images,
                      held_out_images=args.check_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"checkpoint": args.checkpoint, "img_size": model.img_size[0], "source": sets.source,
                    "calibration_images": len(sets.calibration_idx), "argv": sys.argv[1:],
                    "int8_unit": int8_unit(), "bf16_unit": bf16_unit(), "variants": {}, "speed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32, model.img_size)
        paths = {}
        for name, ops, method in VARIANTS:
            path = Path(tmp) / f"{name.replace(' ', '').replace(',', '-')}.onnx"
            quantize_onnx(fp32, path, (x for x, _ in batches(sets.calibration, sets.calibration_idx, 64, False)),
                          ops=ops, method=method)
            paths[name] = path
        print(f"checking {len(paths)} int8 variants on {len(sets.held_out_idx)} images ({sets.source})", flush=True)
        ref = ort_predictor(fp32, 0)
        cands = {k: ort_predictor(v, 0) for k, v in paths.items()}
        checks = compare_predictions(ref, cands, batches(sets.held_out, sets.held_out_idx, 100, True))
        for (name, ops, method), a in zip(VARIANTS, checks.values()):
            result["variants"][name] = {"ops": ops, "method": method, "agreement": a.agreement,
                                        "top1_fp32": a.top1_ref, "top1_int8": a.top1, "delta": a.delta}
            print(f"{name:<24} {a.summary()}", flush=True)

        for batch in (16, 1):
            x = torch.randn(batch, model.in_chans, *model.img_size,
                            generator=torch.Generator().manual_seed(0)).numpy()
            fns = {}
            for name, path in {"fp32": fp32, **paths}.items():
                run = ort_predictor(path, args.threads)
                fns[f"ort {name}"] = lambda run=run, x=x: run(x)
            for name in ("fp32", VARIANTS[0][0]):
                path = fp32 if name == "fp32" else paths[name]
                export_openvino(path, path.with_suffix(".xml"))
                ov = openvino_predictor(path.with_suffix(".xml"), args.threads, "f32", batch)
                fns[f"openvino {name}"] = lambda ov=ov, x=x: ov(x)
            t = alternate(fns, args.seconds, args.rounds, torch.device("cpu"), warmup=0.5)
            base = t["ort fp32"]
            rows = {k: {"ms": round(v.median * 1e3, 3), "p90_ms": round(p90(v.times) * 1e3, 3),
                        "speedup_vs_ort_fp32": round(ratio(base, v), 3)} for k, v in t.items()}
            result["speed"][str(batch)] = rows
            result.setdefault("op_time_share", {})[str(batch)] = {
                k: op_profile(p, x, args.threads) for k, p in (("fp32", fp32), (VARIANTS[0][0], paths[VARIANTS[0][0]]))}
            print(f"batch {batch}: " + ", ".join(f"{k} {r['ms']} ms ({r['speedup_vs_ort_fp32']}x)"
                                                 for k, r in rows.items()), flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
