"""``effvit bench``: inference throughput by the paper's protocol, optionally against timm.

Scenarios: ``cpu1`` (``--threads`` threads, default 1, batch 16, fp32), ``cpu`` (all threads), ``ort``
(ONNX Runtime CPU on our export, ``--threads`` threads, batch 16), ``gpu`` (batch 2048, fp16 autocast)
and ``gpu-bf16``; ``deploy`` (batch 16) and ``latency`` (batch 1): every CPU deployment form of both
sides (PyTorch, ONNX Runtime, OpenVINO; fp32, int8, bf16 where the CPU has it), median and p90.
Each implementation runs in its fastest form (chosen by a short probe), the two
alternate in rounds, and medians are reported with params, MACs, the output difference to the
unfused model and, on CPU, the fraction of the measured peak FLOP/s.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

CPU_SCENARIOS = ("cpu1", "cpu", "ort")
DEPLOY_SCENARIOS = ("deploy", "latency")  # not in the default set: they export and quantize every model
GPU_SCENARIOS = ("gpu", "gpu-bf16")
ALL_SCENARIOS = CPU_SCENARIOS + DEPLOY_SCENARIOS + GPU_SCENARIOS
COLUMNS = ["model", "scenario", "impl", "form", "device", "precision", "batch", "threads", "img_s",
           "ms_batch", "p90_ms", "min_ms", "params_m", "macs_m", "peak_frac", "max_abs_diff", "ratio_vs_timm", "best",
           "paper_top1"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference throughput (paper protocol), optionally vs timm")
    p.add_argument("--models", default="all", help="comma-separated variants (m0,m4) or 'all'")
    p.add_argument("--scenarios", default=None,
                   help=f"comma-separated among {', '.join(ALL_SCENARIOS)} "
                        "(default: the CPU ones, plus the GPU ones when CUDA is used)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CPU scenarios, and GPU ones when CUDA is present")
    p.add_argument("--batch", type=int, default=None, help="batch size for every scenario "
                   "(default: 16 on CPU, 2048 on GPU)")
    p.add_argument("--threads", type=int, default=1, help="threads of the cpu1 and ort scenarios")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per implementation "
                   "and scenario, split over --rounds alternating rounds")
    p.add_argument("--rounds", type=int, default=10,
                   help="alternating rounds; the ratio is the median of the per-round ratios")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before timing")
    p.add_argument("--probe", type=float, default=None,
                   help="seconds per candidate form when picking each side's fastest (default seconds/5)")
    p.add_argument("--peak-seconds", type=float, default=2.0,
                   help="seconds of 2048^3 matmuls measuring the CPU's peak FLOP/s")
    p.add_argument("--vs", default=None, choices=["timm"], help="also run timm's implementation")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile forms (inductor; minutes of compilation per model)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.csv, bench.json, bench.png")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=run)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _scenarios(args: argparse.Namespace, cuda: bool) -> list[str]:
    if args.scenarios:
        out = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        for s in out:
            if s not in ALL_SCENARIOS:
                raise ValueError(f"unknown scenario {s!r}; choose from {', '.join(ALL_SCENARIOS)}")
    else:
        out = [] if args.device == "cuda" else list(CPU_SCENARIOS)
        if args.device == "cuda" or (args.device == "auto" and cuda):
            out += list(GPU_SCENARIOS)
    if any(s in GPU_SCENARIOS for s in out) and not cuda:
        raise ValueError("GPU scenarios need CUDA, which this machine does not have; use --device cpu")
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from effvit.cli.info import resolve_models

    if args.seconds <= 0 or args.rounds < 1 or args.threads < 1:
        raise ValueError("--seconds must be > 0, --rounds >= 1 and --threads >= 1")
    if args.vs == "timm":
        try:
            import timm  # noqa: F401
        except ImportError as e:
            raise ValueError("--vs timm needs timm: pip install timm") from e
    names = resolve_models(args.models)
    scenarios = _scenarios(args, torch.cuda.is_available())
    all_threads = torch.get_num_threads()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "all_threads": all_threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "argv": sys.argv[1:],
    }
    peaks = {}
    int8_peaks = {}
    ort_fp32_peaks = {}  # MLAS sgemm: a second view of the fp32 peak (PyTorch's is MKL/oneDNN)
    exports = tempfile.TemporaryDirectory()  # the deploy scenarios' files, shared by their batch sizes
    rows: list[dict] = []
    bar = tqdm(total=len(names) * len(scenarios), desc="bench", unit="run", file=sys.stderr,
               dynamic_ncols=True)
    try:
        for scenario in scenarios:
            threads = all_threads if scenario == "cpu" else args.threads
            if scenario not in GPU_SCENARIOS and threads not in peaks:
                bar.set_postfix_str(f"CPU peak FLOP/s, {threads} thread(s)")
                from effvit.fast.benchmark import cpu_peak_flops
                peaks[threads] = cpu_peak_flops(threads, seconds=args.peak_seconds)
            if scenario in DEPLOY_SCENARIOS and threads not in int8_peaks:
                bar.set_postfix_str(f"CPU peak int8 op/s, {threads} thread(s)")
                from effvit.fast.deploy_bench import ort_peak_ops
                int8_peaks[threads] = ort_peak_ops(threads, "int8", seconds=args.peak_seconds)
                ort_fp32_peaks[threads] = ort_peak_ops(threads, "fp32", seconds=args.peak_seconds)
            for name in names:
                bar.set_postfix_str(f"{name} {scenario}")
                if scenario in DEPLOY_SCENARIOS:
                    workdir = Path(exports.name) / f"{name}_{args.img_size}"
                    workdir.mkdir(exist_ok=True)
                    # fp32 peak: the faster of the two GEMM libraries (MKL's sgemm lags on some AMD CPUs)
                    peak = {"fp32": max(peaks[threads], ort_fp32_peaks[threads]), "int8": int8_peaks[threads]}
                    rows += _bench_deploy(name, scenario, threads, args, peak, bar, str(workdir))
                else:
                    rows += _bench_one(name, scenario, threads, args, peaks.get(threads), bar)
                bar.update(1)
    finally:
        bar.close()
        exports.cleanup()
        torch.set_num_threads(all_threads)
    meta.update(_versions())
    meta["cpu_peak_gflops"] = {str(k): round(v / 1e9, 1) for k, v in peaks.items()}
    meta["cpu_peak_int8_gops"] = {str(k): round(v / 1e9, 1) for k, v in int8_peaks.items()}
    meta["cpu_peak_ort_fp32_gflops"] = {str(k): round(v / 1e9, 1) for k, v in ort_fp32_peaks.items()}
    from effvit.fast.cpuinfo import bf16_unit, int8_unit
    meta["bf16_unit"], meta["int8_unit"] = bf16_unit(), int8_unit()
    _report(rows, meta, args)
    return 0


def _versions() -> dict:
    out = {}
    for mod in ("timm", "onnxruntime", "onnx", "openvino"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _bench_one(name: str, scenario: str, threads: int, args, peak: float | None, bar) -> list[dict]:
    import torch

    from effvit.fast import benchmark as B
    from effvit.models import VARIANTS, create_model
    from effvit.models.complexity import count_macs, count_params

    gpu = scenario in GPU_SCENARIOS
    device = torch.device("cuda" if gpu else "cpu")
    amp = {"gpu": torch.float16, "gpu-bf16": torch.bfloat16}.get(scenario)
    batch = args.batch or (2048 if gpu else 16)
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = gpu  # fixed shapes: let cuDNN time its algorithms (as timm's bench)
    size = args.img_size
    model = B.randomise_norms(create_model(name, img_size=size)).eval()
    params, macs = count_params(model), count_macs(model, size)
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        ref = model(x).float()
    probe = args.probe if args.probe is not None else max(args.seconds / 5, 0.05)
    # a form is only timed if it computes the same logits: fp32 to rounding, fp16/bf16 to their precision
    check = {"reference": ref, "tol": (5e-2 if amp is not None else 1e-3) * max(1.0, ref.abs().max().item())}

    impls: dict[str, tuple[str, B.Forward]] = {}
    probes: dict[str, dict[str, float]] = {}  # every candidate form's probe median: JSON only
    if scenario == "ort":
        tmp = tempfile.TemporaryDirectory()
        from effvit.fast.export import export_onnx
        path = os.path.join(tmp.name, f"{name}.onnx")
        export_onnx(model, path, size, verify=False)
        impls["effvit"] = ("fused onnx", B.onnx_forward(path, x, threads))
    else:
        forms = B.effvit_forms(model, x, amp, args.compile)
        form, fn, probes["effvit"] = B.pick_fastest(forms, probe, device, **check)
        impls["effvit"] = (form, fn)
    if args.vs == "timm":
        import timm

        tm = timm.create_model(name, num_classes=model.num_classes, img_size=size)
        tm.load_state_dict(model.state_dict())
        tm = tm.to(device).eval()
        if scenario == "ort":
            from timm.utils import reparameterize_model
            tpath = os.path.join(tmp.name, f"timm_{name}.onnx")
            B.export_plain_onnx(reparameterize_model(tm).cpu(), x[:2].cpu(), tpath)
            impls["timm"] = ("reparam onnx", B.onnx_forward(tpath, x, threads))
        else:
            forms = B.timm_forms(tm, x, amp, args.compile)
            form, fn, probes["timm"] = B.pick_fastest(forms, probe, device, **check)
            impls["timm"] = (form, fn)

    rounds_done = [0]

    def on_round():
        rounds_done[0] += 1
        bar.set_postfix_str(f"{name} {scenario} round {rounds_done[0]}/{args.rounds}")

    timings = B.alternate({k: fn for k, (_, fn) in impls.items()}, args.seconds, args.rounds, device,
                          warmup=args.warmup, on_round=on_round)
    out = []
    for impl, (form, fn) in impls.items():
        t = timings[impl]
        img_s = t.img_s(batch)
        out.append({
            "model": name, "scenario": scenario, "impl": impl, "form": form, "device": device.type,
            "precision": {torch.float16: "fp16-autocast", torch.bfloat16: "bf16-autocast"}.get(amp, "fp32"),
            "batch": batch, "threads": threads if not gpu else None, "img_s": round(img_s, 1),
            "ms_batch": round(t.median * 1e3, 2), "params_m": round(params / 1e6, 3),
            "macs_m": round(macs / 1e6, 1),
            "peak_frac": round(macs * 2 * img_s / peak, 3) if peak else None,
            "max_abs_diff": float(f"{B.max_abs_diff(fn(), ref):.3g}"),
            "ratio_vs_timm": None, "paper_top1": VARIANTS[name].top1,
            "probe_ms": {k: round(v * 1e3, 2) for k, v in probes.get(impl, {}).items()},
        })
    if "timm" in timings:
        out[0]["ratio_vs_timm"] = round(B.ratio(timings["timm"], timings["effvit"]), 3)
    if scenario == "ort":
        tmp.cleanup()
    return out


def _bench_deploy(name: str, scenario: str, threads: int, args, peaks: dict[str, float], bar,
                  workdir: str) -> list[dict]:
    """The ``deploy`` (batch 16) and ``latency`` (batch 1) scenarios: every CPU deployment form; the
    exported files in ``workdir`` serve both."""
    import torch

    from effvit.fast import benchmark as B
    from effvit.fast.deploy_bench import bench_deploy
    from effvit.models import VARIANTS, create_model
    from effvit.models.complexity import count_macs, count_params

    batch = 1 if scenario == "latency" else (args.batch or 16)
    torch.set_num_threads(threads)
    size = args.img_size
    with torch.random.fork_rng():  # the same weights at every batch size: the exported files are shared
        torch.manual_seed(0)
        model = B.randomise_norms(create_model(name, img_size=size)).eval()
    params, macs = count_params(model), count_macs(model, size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    peer = None
    if args.vs == "timm":
        import timm

        peer = timm.create_model(name, num_classes=model.num_classes, img_size=size)
        peer.load_state_dict(model.state_dict())
        peer.eval()
    rounds_done = [0]

    def on_round():
        rounds_done[0] += 1
        bar.set_postfix_str(f"{name} {scenario} round {rounds_done[0]}/{args.rounds}")

    probe = args.probe if args.probe is not None else max(args.seconds / 5, 0.05)
    rows = bench_deploy(model, x, threads, args.seconds, args.rounds, args.warmup, peer, args.compile, probe,
                        on_round, workdir=workdir)
    for r in rows:
        peak = peaks["int8" if r["precision"] == "int8" else "fp32"]
        r.update(model=name, scenario=scenario, device="cpu", params_m=round(params / 1e6, 3),
                 macs_m=round(macs / 1e6, 1), peak_frac=round(macs * 2 * r["img_s"] / peak, 3),
                 paper_top1=VARIANTS[name].top1)
    return rows


def _report(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = (f"{'model':<16}{'scenario':<10}{'impl':<8}{'form':<18}{'batch':>6}{'thr':>4}{'img/s':>10}"
            f"{'ms/batch':>10}{'p90 ms':>9}{'params':>8}{'MACs':>8}{'peak':>7}{'maxdiff':>10}{'vs timm':>9}")
    print(f"{meta['cpu']} ({meta['cpu_count']} CPUs), torch {meta['torch']}, timm {meta.get('timm')}, "
          f"onnxruntime {meta.get('onnxruntime')}; GPU: {meta['gpu'] or 'none'}")
    if meta["cpu_peak_gflops"]:
        print("CPU peak (2048^3 fp32 matmul): " + ", ".join(
            f"{v} GFLOP/s at {k} thread(s)" for k, v in meta["cpu_peak_gflops"].items()))
    if meta.get("cpu_peak_int8_gops"):
        print(f"CPU peak int8 ({meta['int8_unit']}; 1024^3 u8 x s8 MatMulInteger): " + ", ".join(
            f"{v} Gop/s at {k} thread(s)" for k, v in meta["cpu_peak_int8_gops"].items())
            + "; ONNX Runtime fp32 MatMul: " + ", ".join(
            f"{v} GFLOP/s at {k} thread(s)" for k, v in meta["cpu_peak_ort_fp32_gflops"].items())
            + f"; bf16 unit: {meta['bf16_unit'] or 'none (bf16 forms skipped)'}")
    print(head)
    print("-" * len(head))
    for r in rows:
        peak = f"{100 * r['peak_frac']:.0f}%" if r["peak_frac"] is not None else "-"
        ratio = f"{r['ratio_vs_timm']:.2f}x" if r["ratio_vs_timm"] is not None else ""
        p90 = f"{r['p90_ms']:.2f}" if r.get("p90_ms") is not None else "-"
        form = r["form"] + (" *" if r.get("best") else "")
        print(f"{r['model']:<16}{r['scenario']:<10}{r['impl']:<8}{form:<18}{r['batch']:>6}"
              f"{r['threads'] or '-':>4}{r['img_s']:>10.1f}{r['ms_batch']:>10.2f}{p90:>9}{r['params_m']:>7.2f}M"
              f"{r['macs_m']:>7.0f}M{peak:>7}{r['max_abs_diff']:>10.1e}{ratio:>9}")
    if any(r.get("best") is not None for r in rows):
        print("deploy/latency: * = the fastest form of its side; 'vs timm' = timm's fastest fp32 form's time / "
              "this form's (median of per-round ratios); peak = fp32 peak, int8 peak for int8 forms")
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    written = ["bench.csv", "bench.json"]
    if not args.no_plot:
        _plot(rows, out / "bench.png")
        written.append("bench.png")
    print(f"wrote {', '.join(str(out / w) for w in written)}")


def _plot(rows: list[dict], path: Path) -> None:
    """Throughput against the paper's top-1, one panel per scenario (like the paper's figure 1)."""
    from effvit.plots import pyplot, save_figure

    plt = pyplot()

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4), squeeze=False)
    for ax, sc in zip(axes[0], scenarios, strict=True):
        for impl, style in (("effvit", "o-"), ("timm", "s--")):
            pts = sorted((r["paper_top1"], r["img_s"], r["model"]) for r in rows  # deploy: each side's best
                         if r["scenario"] == sc and r["impl"] == impl and r.get("best") is not False)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
            if impl == "effvit":
                for top1, ips, name in pts:
                    ax.annotate(name.split("_")[-1].upper(), (top1, ips), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
        r0 = next(r for r in rows if r["scenario"] == sc)
        ax.set_title(f"{sc}: batch {r0['batch']}, {r0['precision']}"
                     + (f", {r0['threads']} thread(s)" if r0["threads"] else ""))
        ax.set_xlabel("ImageNet top-1 (%, paper)")
        ax.set_ylabel("throughput (images/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, dpi=120)
