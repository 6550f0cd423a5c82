"""Reproduce the ``## Inference speed`` numbers of BENCHMARKS.md.

1. What ``effvit bench`` runs, for every variant against timm: CPU 1 thread batch 16 fp32 (best form of each side,
   torch.compile included with ``--compile``), ONNX Runtime 1 thread, CPU all threads.
2. Every form of both implementations for the chosen models, alternating in one process, so that the
   ratio against each of timm's forms (eager, reparameterised, traced, channels-last, compiled) is on
   record, not only against the fastest.
3. The CPU's peak fp32 FLOP/s at 1 thread (best of 2048^3 sgemm over --peak-seconds).

    nice -n 5 python benchmarks/inference_speed.py --out runs/inference_speed [--compile] [--seconds 10]

With ``--device cuda`` the same on the GPU, by the paper's GPU protocol: the bench at batch 2048 with
fp16 and bf16 autocast, and the all-forms table at batch 2048 fp16 (no ONNX Runtime, no CPU peak).

Writes markdown tables to stdout and runs/inference_speed/{forms.json, bench_*/}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import timm
import torch
from timm.utils import reparameterize_model

from effvit.bench.forms import effvit_forms, export_plain_onnx, onnx_forward, timm_forms
from effvit.bench.throughput import BenchSettings, report_lines, run_bench, save_bench
from effvit.bench.timing import alternate, cpu_peak_flops, max_abs_diff, ratio
from effvit.bench.weights import randomise_norms
from effvit.deploy.graph import export_onnx
from effvit.models import VARIANTS, create_model, resolve_models
from effvit.models.complexity import count_macs


def forms_table(name: str, seconds: float, rounds: int, compile: bool, device: str = "cpu") -> dict:
    """All forms of effvit and timm for one variant, alternating: on CPU 1 thread, batch 16, fp32 (with
    ONNX Runtime on both exports); on CUDA batch 2048, fp16 autocast."""
    gpu = device == "cuda"
    batch, amp = (2048, torch.float16) if gpu else (16, None)
    torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = gpu
    model = randomise_norms(create_model(name)).eval().to(device)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    tm = timm.create_model(name)
    tm.load_state_dict(model.state_dict())
    tm.eval().to(device)
    makers = {f"effvit {k}": v for k, v in effvit_forms(model, x, amp, compile).items()}
    makers |= {f"timm {k}": v for k, v in timm_forms(tm, x, amp, compile).items()}
    fns = {k: make() for k, make in makers.items()}
    if not gpu:  # ONNX Runtime on both exports, in the same alternation
        tmp = tempfile.TemporaryDirectory()
        ours, theirs = Path(tmp.name) / "effvit.onnx", Path(tmp.name) / "timm.onnx"
        export_onnx(model, ours)
        export_plain_onnx(reparameterize_model(tm), x[:2], str(theirs))
        fns["effvit onnxruntime"] = onnx_forward(str(ours), x, 1)
        fns["timm onnxruntime"] = onnx_forward(str(theirs), x, 1)
    with torch.inference_mode():
        ref = model(x).float()
    diffs = {k: max_abs_diff(fn(), ref) for k, fn in fns.items()}
    timings = alternate(fns, seconds * len(fns), rounds, torch.device(device), warmup=1.0)
    # the reference: effvit's fastest PyTorch form (the targets are PyTorch against PyTorch)
    best = min((k for k in timings if k.startswith("effvit") and "onnx" not in k),
               key=lambda k: timings[k].median)
    if not gpu:
        tmp.cleanup()
    return {k: {"img_s": round(batch / t.median, 1), "ms": round(t.median * 1e3, 2), "iters": len(t.times),
                "effvit_best_speedup": round(ratio(t, timings[best]), 3), "max_abs_diff": float(f"{diffs[k]:.3g}")}
            for k, t in timings.items()}


def bench(out: Path, **settings) -> None:
    """What ``effvit bench`` with these settings prints and writes (to ``out``)."""
    result = run_bench(BenchSettings(**settings), argv=sys.argv[1:])
    print("\n".join(report_lines(result)))
    written = save_bench(result, out)
    print(f"wrote {', '.join(str(w) for w in written)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/inference_speed")
    p.add_argument("--models", default="all")
    p.add_argument("--forms-models", default="m0,m4", help="variants for the all-forms table")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="include torch.compile forms on both sides")
    p.add_argument("--peak-seconds", type=float, default=10.0)
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = args.device == "cuda"

    peak = None
    if not gpu:
        peak = cpu_peak_flops(1, seconds=args.peak_seconds)
        print(f"CPU peak fp32, 1 thread (best 2048^3 sgemm over {args.peak_seconds:.0f}s): "
              f"{peak / 1e9:.1f} GFLOP/s")

    if not args.skip_bench:
        common = dict(models=args.models, seconds=args.seconds, rounds=args.rounds, vs="timm")
        if gpu:
            bench(out / "bench_gpu", device="cuda", compile=args.compile, **common)
        else:
            bench(out / "bench_1thread", scenarios="cpu1,ort", compile=args.compile, **common)
            bench(out / "bench_all_threads", scenarios="cpu", **common)

    record = {"device": torch.cuda.get_device_name() if gpu else "cpu", "forms": {}}
    if peak is not None:
        record["peak_gflops_1thread"] = round(peak / 1e9, 1)
    setting = "batch 2048, fp16 autocast" if gpu else "1 thread, batch 16, fp32"
    for name in resolve_models(args.forms_models):
        table = forms_table(name, args.seconds / 2, args.rounds, args.compile, args.device)
        record["forms"][name] = table
        macs = count_macs(create_model(name))
        best_e = max(v["img_s"] for k, v in table.items() if k.startswith("effvit") and "onnx" not in k)
        print(f"\n{name}: all forms, {setting} (alternating, medians)\n")
        print("| form | img/s | ms/batch | effvit best PyTorch form speed-up (per-round median) | max abs diff |")
        print("|---|---|---|---|---|")
        for k, v in sorted(table.items(), key=lambda kv: -kv[1]["img_s"]):
            print(f"| {k} | {v['img_s']} | {v['ms']} | {v['effvit_best_speedup']:.2f}x | {v['max_abs_diff']:.1e} |")
        if peak is not None:
            frac = macs * 2 * best_e / peak
            print(f"\n{name} best effvit PyTorch form: {macs / 1e6:.1f}M MACs x 2 x {best_e} img/s = "
                  f"{macs * 2 * best_e / 1e9:.1f} GFLOP/s = {100 * frac:.0f}% of peak")
            record["forms"][name + "_peak_frac"] = round(frac, 3)
        sys.stdout.flush()
    record["paper_top1"] = {k: v.top1 for k, v in VARIANTS.items()}
    (out / "forms.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
