"""Inference throughput of every variant by the paper's protocol, optionally against timm: what
``effvit bench`` runs, prints and writes.

Scenarios: ``cpu1`` (``threads`` threads, default 1, batch 16, fp32), ``cpu`` (all threads), ``ort``
(ONNX Runtime CPU on our export, ``threads`` threads, batch 16), ``gpu`` (batch 2048, fp16 autocast)
and ``gpu-bf16``; ``deploy`` (batch 16) and ``latency`` (batch 1): every CPU deployment form of both
sides (PyTorch, ONNX Runtime, OpenVINO; fp32, int8, bf16 where the CPU has it), median and p90;
``mobile`` (batch 1): both sides as ExecuTorch programs with the XNNPACK delegate, fp32 and int8.
Each implementation runs in its fastest form (chosen by a short probe), the two alternate in rounds,
and medians are reported with params, MACs, the output difference to the unfused model and, on CPU,
the fraction of the measured peak FLOP/s. The thread count and cuDNN's autotuning are set for each
measurement and restored after it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.utils import reparameterize_model
from tqdm import tqdm

from effvit.deploy.cpuinfo import bf16_unit, int8_unit
from effvit.deploy.graph import export_onnx
from effvit.models import VARIANTS, create_model, resolve_models
from effvit.models.complexity import count_macs, count_params
from effvit.plots import pyplot, save_figure

from .forms import effvit_forms, export_plain_onnx, onnx_forward, timm_forms
from .runtimes import bench_deploy, deploy_forms, executorch_forms, ort_peak_ops
from .timing import Forward, alternate, cpu_peak_flops, max_abs_diff, pick_fastest, ratio
from .weights import randomise_norms

__all__ = ["CPU_SCENARIOS", "DEPLOY_SCENARIOS", "GPU_SCENARIOS", "ALL_SCENARIOS", "COLUMNS", "BenchSettings",
           "BenchResult", "resolve_scenarios", "run_bench", "bench_model", "bench_deploy_model", "report_lines",
           "save_bench"]

CPU_SCENARIOS = ("cpu1", "cpu", "ort")
DEPLOY_SCENARIOS = ("deploy", "latency", "mobile")  # not in the default set: they export and quantize every model
GPU_SCENARIOS = ("gpu", "gpu-bf16")
ALL_SCENARIOS = CPU_SCENARIOS + DEPLOY_SCENARIOS + GPU_SCENARIOS
COLUMNS = ["model", "scenario", "impl", "form", "device", "precision", "batch", "threads", "img_s",
           "ms_batch", "p90_ms", "min_ms", "params_m", "macs_m", "peak_frac", "max_abs_diff", "ratio_vs_timm", "best",
           "paper_top1"]


@dataclass
class BenchSettings:
    """What to measure; the fields are ``effvit bench``'s options."""
    models: str = "all"  # comma-separated variants (m0,m4) or 'all'
    scenarios: str | None = None  # comma-separated among ALL_SCENARIOS; None: CPU ones (+ GPU ones on CUDA)
    device: str = "auto"  # auto, cpu or cuda
    batch: int | None = None  # None: 16 on CPU, 2048 on GPU
    threads: int = 1  # of the cpu1, ort, deploy and latency scenarios
    img_size: int = 224
    seconds: float = 10.0  # timed seconds per implementation and scenario, over `rounds` rounds
    rounds: int = 10
    warmup: float = 2.0
    probe: float | None = None  # seconds per candidate form; None: seconds / 5
    peak_seconds: float = 2.0
    vs: str | None = None  # 'timm': also time timm's implementation
    compile: bool = False  # add torch.compile forms

    @property
    def probe_seconds(self) -> float:
        return self.probe if self.probe is not None else max(self.seconds / 5, 0.05)


@dataclass
class BenchResult:
    rows: list[dict]  # one per model, scenario, implementation (and form, for deploy/latency)
    meta: dict = field(default_factory=dict)  # machine, versions, measured peaks


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_scenarios(spec: str | None, device: str, cuda: bool) -> list[str]:
    """The scenarios ``spec`` names, or by default the CPU ones plus the GPU ones when CUDA is used;
    unknown names, and GPU scenarios without CUDA, raise."""
    if spec:
        out = [s.strip() for s in spec.split(",") if s.strip()]
        for s in out:
            if s not in ALL_SCENARIOS:
                raise ValueError(f"unknown scenario {s!r}; choose from {', '.join(ALL_SCENARIOS)}")
    else:
        out = [] if device == "cuda" else list(CPU_SCENARIOS)
        if device == "cuda" or (device == "auto" and cuda):
            out += list(GPU_SCENARIOS)
    if any(s in GPU_SCENARIOS for s in out) and not cuda:
        raise ValueError("GPU scenarios need CUDA, which this machine does not have; use --device cpu")
    return out


@contextlib.contextmanager
def _torch_settings(threads: int, cudnn_benchmark: bool = False) -> Iterator[None]:
    """``threads`` intra-op threads and cuDNN autotuning for one measurement, restored afterwards."""
    old = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        torch.backends.cudnn.benchmark = old[1]


def _versions() -> dict:
    out = {}
    for mod in ("timm", "onnxruntime", "onnx", "openvino", "executorch"):
        try:
            module = __import__(mod)
        except ImportError:
            out[mod] = None
            continue
        # executorch has no __version__: its distribution's
        out[mod] = getattr(module, "__version__", None) or importlib.metadata.version(mod)
    return out


def run_bench(settings: BenchSettings, argv: list[str] | None = None, progress: bool = True) -> BenchResult:
    """Every model in every scenario (progress on stderr); ``argv`` is recorded in the metadata."""
    s = settings
    for ok, flag, value, want in ((s.seconds > 0, "--seconds", s.seconds, "above 0"),
                                  (s.rounds >= 1, "--rounds", s.rounds, "a whole number >= 1"),
                                  (s.threads >= 1, "--threads", s.threads, "a whole number >= 1"),
                                  (s.batch is None or s.batch >= 1, "--batch", s.batch, "a whole number >= 1"),
                                  (s.warmup >= 0, "--warmup", s.warmup, "0 or more seconds"),
                                  (s.peak_seconds >= 0, "--peak-seconds", s.peak_seconds, "0 or more seconds"),
                                  (s.probe is None or s.probe > 0, "--probe", s.probe, "above 0")):
        if not ok:
            raise ValueError(f"{flag} {value} is not allowed: it must be {want}")
    names = resolve_models(s.models)
    scenarios = resolve_scenarios(s.scenarios, s.device, torch.cuda.is_available())
    all_threads = torch.get_num_threads()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "all_threads": all_threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "argv": list(argv or []),
    }
    peaks: dict[int, float] = {}
    int8_peaks: dict[int, float] = {}
    ort_fp32_peaks: dict[int, float] = {}  # MLAS sgemm: a second view of the fp32 peak (PyTorch's is MKL/oneDNN)
    rows: list[dict] = []
    bar = tqdm(total=len(names) * len(scenarios), desc="bench", unit="run", file=sys.stderr,
               dynamic_ncols=True, disable=not progress)
    # the deploy scenarios' files, shared by their batch sizes
    with tempfile.TemporaryDirectory() as exports, contextlib.closing(bar):
        for scenario in scenarios:
            threads = all_threads if scenario == "cpu" else s.threads
            if scenario not in GPU_SCENARIOS and threads not in peaks:
                bar.set_postfix_str(f"CPU peak FLOP/s, {threads} thread(s)")
                peaks[threads] = cpu_peak_flops(threads, seconds=s.peak_seconds)
            if scenario in DEPLOY_SCENARIOS and threads not in int8_peaks:
                bar.set_postfix_str(f"CPU peak int8 op/s, {threads} thread(s)")
                int8_peaks[threads] = ort_peak_ops(threads, "int8", seconds=s.peak_seconds)
                ort_fp32_peaks[threads] = ort_peak_ops(threads, "fp32", seconds=s.peak_seconds)
            for name in names:
                bar.set_postfix_str(f"{name} {scenario}")
                rounds_done = [0]

                def on_round(name=name, scenario=scenario, rounds_done=rounds_done) -> None:
                    rounds_done[0] += 1
                    bar.set_postfix_str(f"{name} {scenario} round {rounds_done[0]}/{s.rounds}")

                if scenario in DEPLOY_SCENARIOS:
                    workdir = Path(exports) / f"{name}_{s.img_size}"
                    workdir.mkdir(exist_ok=True)
                    # fp32 peak: the faster of the two GEMM libraries (MKL's sgemm lags on some AMD CPUs)
                    peak = {"fp32": max(peaks[threads], ort_fp32_peaks[threads]), "int8": int8_peaks[threads]}
                    rows += bench_deploy_model(name, scenario, threads, s, peak, str(workdir), on_round)
                else:
                    rows += bench_model(name, scenario, threads, s, peaks.get(threads), on_round)
                bar.update(1)
    meta.update(_versions())
    meta["cpu_peak_gflops"] = {str(k): round(v / 1e9, 1) for k, v in peaks.items()}
    meta["cpu_peak_int8_gops"] = {str(k): round(v / 1e9, 1) for k, v in int8_peaks.items()}
    meta["cpu_peak_ort_fp32_gflops"] = {str(k): round(v / 1e9, 1) for k, v in ort_fp32_peaks.items()}
    meta["bf16_unit"], meta["int8_unit"] = bf16_unit(), int8_unit()
    return BenchResult(rows, meta)


def _peer(name: str, model: torch.nn.Module, size: int) -> torch.nn.Module:
    """timm's implementation of ``name`` with ``model``'s weights, in eval mode."""
    peer = timm.create_model(name, num_classes=model.num_classes, img_size=size)
    peer.load_state_dict(model.state_dict())
    return peer.eval()


def bench_model(name: str, scenario: str, threads: int, settings: BenchSettings, peak: float | None,
                on_round: Callable[[], None] | None = None) -> list[dict]:
    """One variant in one of the cpu1, cpu, ort, gpu and gpu-bf16 scenarios: a row per implementation,
    each in its fastest form; ``peak`` (FLOP/s) gives the fraction of the CPU's peak reached."""
    s = settings
    gpu = scenario in GPU_SCENARIOS
    # fixed shapes on GPU: let cuDNN time its algorithms (as timm's bench)
    with _torch_settings(threads, cudnn_benchmark=gpu), tempfile.TemporaryDirectory() as tmp:
        return _bench_model(name, scenario, threads, s, peak, on_round, gpu, tmp)


def _bench_model(name: str, scenario: str, threads: int, s: BenchSettings, peak: float | None,
                 on_round: Callable[[], None] | None, gpu: bool, tmp: str) -> list[dict]:
    device = torch.device("cuda" if gpu else "cpu")
    amp = {"gpu": torch.float16, "gpu-bf16": torch.bfloat16}.get(scenario)
    batch = s.batch or (2048 if gpu else 16)
    size = s.img_size
    model = randomise_norms(create_model(name, img_size=size)).eval()
    params, macs = count_params(model), count_macs(model, size)
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        ref = model(x).float()
    # a form is only timed if it computes the same logits: fp32 to rounding, fp16/bf16 to their precision
    check = {"reference": ref, "tol": (5e-2 if amp is not None else 1e-3) * max(1.0, ref.abs().max().item())}

    impls: dict[str, tuple[str, Forward]] = {}
    probes: dict[str, dict[str, float]] = {}  # every candidate form's probe median: JSON only
    if scenario == "ort":
        path = os.path.join(tmp, f"{name}.onnx")
        export_onnx(model, path, size, verify=False)
        impls["effvit"] = ("fused onnx", onnx_forward(path, x, threads))
    else:
        form, fn, probes["effvit"] = pick_fastest(effvit_forms(model, x, amp, s.compile), s.probe_seconds, device,
                                                  **check)
        impls["effvit"] = (form, fn)
    if s.vs == "timm":
        tm = _peer(name, model, size).to(device)
        if scenario == "ort":
            tpath = os.path.join(tmp, f"timm_{name}.onnx")
            export_plain_onnx(reparameterize_model(tm).cpu(), x[:2].cpu(), tpath)
            impls["timm"] = ("reparam onnx", onnx_forward(tpath, x, threads))
        else:
            form, fn, probes["timm"] = pick_fastest(timm_forms(tm, x, amp, s.compile), s.probe_seconds, device,
                                                    **check)
            impls["timm"] = (form, fn)

    timings = alternate({k: fn for k, (_, fn) in impls.items()}, s.seconds, s.rounds, device,
                        warmup=s.warmup, on_round=on_round)
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
            "max_abs_diff": float(f"{max_abs_diff(fn(), ref):.3g}"),
            "ratio_vs_timm": None, "paper_top1": VARIANTS[name].top1,
            "probe_ms": {k: round(v * 1e3, 2) for k, v in probes.get(impl, {}).items()},
        })
    if "timm" in timings:
        out[0]["ratio_vs_timm"] = round(ratio(timings["timm"], timings["effvit"]), 3)
    return out


def bench_deploy_model(name: str, scenario: str, threads: int, settings: BenchSettings, peaks: dict[str, float],
                       workdir: str, on_round: Callable[[], None] | None = None) -> list[dict]:
    """The ``deploy`` (batch 16) and ``latency`` (batch 1) scenarios: every CPU deployment form; the
    exported files in ``workdir`` serve both. ``mobile`` (batch 1): the ExecuTorch programs.
    ``peaks``: {'fp32': FLOP/s, 'int8': op/s}."""
    s = settings
    batch = 1 if scenario in ("latency", "mobile") else (s.batch or 16)
    size = s.img_size
    with torch.random.fork_rng():  # the same weights at every batch size: the exported files are shared
        torch.manual_seed(0)
        model = randomise_norms(create_model(name, img_size=size)).eval()
    params, macs = count_params(model), count_macs(model, size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    peer = _peer(name, model, size) if s.vs == "timm" else None
    with _torch_settings(threads):
        rows = bench_deploy(model, x, threads, s.seconds, s.rounds, s.warmup, peer, s.compile, s.probe_seconds,
                            on_round, workdir=workdir,
                            forms_of=executorch_forms if scenario == "mobile" else deploy_forms)
    for r in rows:
        peak = peaks["int8" if r["precision"] == "int8" else "fp32"]
        r.update(model=name, scenario=scenario, device="cpu", params_m=round(params / 1e6, 3),
                 macs_m=round(macs / 1e6, 1), peak_frac=round(macs * 2 * r["img_s"] / peak, 3),
                 paper_top1=VARIANTS[name].top1)
    return rows


def report_lines(result: BenchResult) -> list[str]:
    """The printed report: machine and peaks, then a table row per result row."""
    rows, meta = result.rows, result.meta
    head = (f"{'model':<16}{'scenario':<10}{'impl':<8}{'form':<22}{'batch':>6}{'thr':>4}{'img/s':>10}"
            f"{'ms/batch':>10}{'p90 ms':>9}{'params':>8}{'MACs':>8}{'peak':>7}{'maxdiff':>10}{'vs timm':>9}")
    lines = [f"{meta['cpu']} ({meta['cpu_count']} CPUs), torch {meta['torch']}, timm {meta.get('timm')}, "
             f"onnxruntime {meta.get('onnxruntime')}; GPU: {meta['gpu'] or 'none'}"]
    if meta["cpu_peak_gflops"]:
        lines.append("CPU peak (2048^3 fp32 matmul): " + ", ".join(
            f"{v} GFLOP/s at {k} thread(s)" for k, v in meta["cpu_peak_gflops"].items()))
    if meta.get("cpu_peak_int8_gops"):
        lines.append(f"CPU peak int8 ({meta['int8_unit']}; 1024^3 u8 x s8 MatMulInteger): " + ", ".join(
            f"{v} Gop/s at {k} thread(s)" for k, v in meta["cpu_peak_int8_gops"].items())
            + "; ONNX Runtime fp32 MatMul: " + ", ".join(
            f"{v} GFLOP/s at {k} thread(s)" for k, v in meta["cpu_peak_ort_fp32_gflops"].items())
            + f"; bf16 unit: {meta['bf16_unit'] or 'none (bf16 forms skipped)'}")
    lines += [head, "-" * len(head)]
    for r in rows:
        peak = f"{100 * r['peak_frac']:.0f}%" if r["peak_frac"] is not None else "-"
        ratio_text = f"{r['ratio_vs_timm']:.2f}x" if r["ratio_vs_timm"] is not None else ""
        p90 = f"{r['p90_ms']:.2f}" if r.get("p90_ms") is not None else "-"
        form = r["form"] + (" *" if r.get("best") else "")
        lines.append(f"{r['model']:<16}{r['scenario']:<10}{r['impl']:<8}{form:<22}{r['batch']:>6}"
                     f"{r['threads'] or '-':>4}{r['img_s']:>10.1f}{r['ms_batch']:>10.2f}{p90:>9}"
                     f"{r['params_m']:>7.2f}M{r['macs_m']:>7.0f}M{peak:>7}{r['max_abs_diff']:>10.1e}{ratio_text:>9}")
    if any(r.get("best") is not None for r in rows):
        lines.append("deploy/latency: * = the fastest form of its side; 'vs timm' = timm's fastest fp32 form's "
                     "time / this form's (median of per-round ratios); peak = fp32 peak, int8 peak for int8 forms")
    return lines


def save_bench(result: BenchResult, out: str | Path, plot: bool = True) -> list[Path]:
    """bench.csv (the table's columns), bench.json (metadata and full rows) and, with ``plot``, bench.png
    in ``out``; the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(result.rows)
    (out / "bench.json").write_text(json.dumps({"meta": result.meta, "rows": result.rows}, indent=2))
    written = [out / "bench.csv", out / "bench.json"]
    if plot:
        _plot(result.rows, out / "bench.png")
        written.append(out / "bench.png")
    return written


def _plot(rows: list[dict], path: Path) -> None:
    """Throughput against the paper's top-1, one panel per scenario (like the paper's figure 1)."""
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
