"""effvit's C++ window-attention kernel in OpenVINO against timm's model in OpenVINO, side by side.

For each variant (random weights, BN statistics randomised, the same weights loaded into timm's
``efficientvit_msra``): effvit's kernel IR (fp32; and with the rest of the graph in bf16 on CPUs with bf16
units), effvit's standard IR and timm's IR (fp32, int8 QDQ, bf16) are compiled at a fixed batch and timed
in alternating rounds in one process, at each thread count and batch size. Reported per form: median, p90
and min ms per batch, the output difference to fp32 PyTorch, and the median over rounds of timm's fastest
OpenVINO form's time (any precision, that round) over this form's, with the spread (min and max over rounds).
With ``--profile``, OpenVINO's per-node counters of the kernel IR say where its time goes.

    python benchmarks/cpu_kernel.py --models all --out benchmarks/results/cpu_kernel
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from timm.utils import reparameterize_model

from effvit.bench.forms import export_plain_onnx
from effvit.bench.runtimes import _random_calibration, p90
from effvit.bench.throughput import _peer, cpu_name
from effvit.bench.timing import alternate
from effvit.bench.weights import randomise_norms
from effvit.deploy.cpuinfo import bf16_unit
from effvit.deploy.graph import export_onnx
from effvit.deploy.openvino import export_openvino, export_openvino_kernel, openvino_predictor
from effvit.deploy.quantize import quantize_onnx
from effvit.kernels.cpu import extension_path
from effvit.models import create_model, resolve_models


def export_all(name: str, size: int, workdir: Path) -> tuple[torch.nn.Module, dict[str, Path]]:
    """The model and its IR files: effvit kernel, effvit standard fp32 and int8, timm fp32 and int8."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = randomise_norms(create_model(name, img_size=size)).eval()
    peer = _peer(name, model, size)
    x = torch.randn(2, 3, size, size)
    files = {"effvit kernel": workdir / f"{name}.kernel.xml"}
    export_openvino_kernel(model, files["effvit kernel"], size)  # verified against PyTorch (1e-4)
    calib = _random_calibration(x)
    for impl, export in (("effvit", lambda p: export_onnx(model, p, size, verify=False)),
                         ("timm", lambda p: export_plain_onnx(reparameterize_model(peer), x, str(p)))):
        fp32, int8 = workdir / f"{name}.{impl}.onnx", workdir / f"{name}.{impl}.int8.onnx"
        export(fp32)
        quantize_onnx(fp32, int8, calib, ops=("Conv", "Gemm"))
        for tag, path in (("", fp32), (" int8", int8)):
            export_openvino(path, path.with_suffix(".xml"))
            files[f"{impl}{tag}"] = path.with_suffix(".xml")
    return model, files


def forms_for(files: dict[str, Path], threads: int, batch: int, bf16: bool) -> dict[str, callable]:
    """(impl form precision) -> predictor; bf16 forms only with the CPU's bf16 units."""
    out = {}
    for key, path in files.items():
        impl = key.split()[0]
        if key.endswith("int8"):
            out[f"{impl} openvino int8"] = (path, "f32")
            continue
        form = "openvino-kernel" if key.endswith("kernel") else "openvino"
        out[f"{impl} {form} fp32"] = (path, "f32")
        if bf16:
            out[f"{impl} {form} bf16"] = (path, "bf16")
    return {k: openvino_predictor(p, threads, hint, batch=batch) for k, (p, hint) in out.items()}


def measure(model, files, threads: int, batch: int, seconds: float, rounds: int, bf16: bool) -> list[dict]:
    x = torch.randn(batch, 3, *model.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x).numpy()
    xn = x.numpy()
    predictors = forms_for(files, threads, batch, bf16)
    diffs = {k: float(np.abs(p(xn) - ref).max()) for k, p in predictors.items()}
    timings = alternate({k: (lambda p=p: p(xn)) for k, p in predictors.items()}, seconds * len(predictors), rounds,
                        torch.device("cpu"), warmup=0.5)
    timm_keys = [k for k in timings if k.startswith("timm")]
    base = [min(statistics.median(timings[k].rounds[r]) for k in timm_keys) for r in range(rounds)]
    rows = []
    for k, t in timings.items():
        per_round = [b / statistics.median(r) for b, r in zip(base, t.rounds)]
        impl, form, precision = k.split()
        rows.append({"model": model.variant, "impl": impl, "form": form, "precision": precision, "threads": threads,
                     "batch": batch, "ms": round(t.median * 1e3, 3), "p90_ms": round(p90(t.times) * 1e3, 3),
                     "min_ms": round(min(t.times) * 1e3, 3), "max_abs_diff": float(f"{diffs[k]:.3g}"),
                     "vs_timm_best": round(statistics.median(per_round), 3),
                     "vs_timm_spread": [round(min(per_round), 3), round(max(per_round), 3)]})
    return rows


def profile(path: Path, threads: int, batch: int, size: int, precision: str, iters: int = 40) -> dict[str, float]:
    """Share of OpenVINO's per-node time by node type (the least-disturbed of ``iters`` runs)."""
    import openvino as ov

    core = ov.Core()
    core.add_extension(str(extension_path()))
    model = core.read_model(str(path))
    model.reshape([batch, 3, size, size])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
                                                 "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    best = None
    for i in range(iters + 5):
        request.infer({0: x})
        info = request.get_profiling_info()
        total = sum(p.real_time.total_seconds() for p in info)
        if i >= 5 and (best is None or total < best[0]):
            best = (total, info)
    total, info = best
    by = collections.Counter()
    for p in info:
        kind = "WindowAttention (effvit kernel)" if p.node_type == "Reference" else p.node_type
        by[kind] += p.real_time.total_seconds()
    return {"total_ms": round(total * 1e3, 3), **{k: round(v / total, 3) for k, v in by.most_common(8)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="all")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per form and setting")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--profile", default="efficientvit_m0,efficientvit_m4", help="variants to profile")
    ap.add_argument("--out", default="benchmarks/results/cpu_kernel")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = bf16_unit() is not None
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "bf16_unit": bf16_unit(), "argv": sys.argv,
            "flags": next((ln.split(":", 1)[1].split() for ln in lscpu.splitlines() if ln.startswith("Flags")), []),
            "load_avg_start": os.getloadavg(), "torch": torch.__version__,
            "openvino": __import__("openvino").__version__}
    rows, profiles = [], {}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in resolve_models(args.models):
            model, files = export_all(name, args.img_size, Path(tmp))
            for threads in map(int, args.threads.split(",")):
                for batch in map(int, args.batch.split(",")):
                    new = measure(model, files, threads, batch, args.seconds, args.rounds, bf16)
                    rows += new
                    for r in new:
                        print(f"{name} t{threads} b{batch} {r['impl']:<7}{r['form']:<16}{r['precision']:<5} "
                              f"{r['ms']:8.3f} ms (min {r['min_ms']:.3f}, p90 {r['p90_ms']:.3f})  "
                              f"{r['vs_timm_best']:.3f}x timm best {r['vs_timm_spread']}  diff {r['max_abs_diff']:.2g}",
                              flush=True)
            if name in args.profile.split(","):
                for batch in map(int, args.batch.split(",")):
                    for precision in ("f32", "bf16") if bf16 else ("f32",):
                        key = f"{name} b{batch} {precision}"
                        profiles[key] = profile(files["effvit kernel"], 1, batch, args.img_size, precision)
                        print("profile", key, profiles[key], flush=True)
    meta["load_avg_end"] = os.getloadavg()
    (out / "cpu_kernel.json").write_text(json.dumps({"meta": meta, "rows": rows, "profiles": profiles}, indent=2))


if __name__ == "__main__":
    main()
