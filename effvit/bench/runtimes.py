"""CPU deployment forms of effvit and timm side by side: PyTorch, ONNX Runtime and OpenVINO, each in
fp32, int8 (static QDQ quantization of the ONNX export) and, on CPUs with the units, bf16; and, apart,
ExecuTorch programs with the XNNPACK delegate (fp32 and PT2E int8, batch 1: the on-device runtime).

Both implementations go through the same toolchain from the same weights: timm's model is exported to
ONNX the usual way and quantized with the same settings as ours. All forms of both sides then run in
alternating rounds in one process, so load from other jobs hits them alike. Reported per form: median
and 90th-percentile time per batch, images/s, the output difference to the fp32 PyTorch model, the
fraction of the core's measured fp32 or int8 peak, and the speed ratio against timm's fastest fp32
form. effvit also runs its kernel IR (every window attention one node of effvit's C++ kernel, the rest
OpenVINO's), fp32 and, with the units, the rest in bf16, where the kernel's extension builds. This module
sets no process-wide option (thread counts are the caller's).
"""

from __future__ import annotations

import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from timm.utils import reparameterize_model
from torch import nn

from effvit.deploy.cpuinfo import bf16_unit
from effvit.deploy.graph import export_onnx
from effvit.deploy.mobile import lower_xnnpack, pte_predictor, quantize_pt2e, require_executorch, xnnpack_graph
from effvit.deploy.openvino import export_openvino, export_openvino_kernel, openvino_predictor
from effvit.deploy.quantize import ort_predictor, quantize_onnx
from effvit.kernels.cpu import available as kernel_available
from effvit.models import fuse

from .forms import effvit_forms, export_plain_onnx, timm_forms
from .timing import Forward, Timing, alternate, max_abs_diff, pick_fastest, time_forward

__all__ = ["p90", "ort_peak_ops", "deploy_forms", "executorch_forms", "bench_deploy", "onnx_speed"]

FP32_FORMS = ("torch fp32", "ort fp32", "openvino fp32", "executorch fp32")


def p90(times: list[float]) -> float:
    return float(np.percentile(times, 90))


def ort_peak_ops(threads: int = 1, precision: str = "int8", n: int = 1024, seconds: float = 2.0) -> float:
    """Peak op/s attainable in ONNX Runtime: the best of repeated n x n x n products, uint8 x int8
    (``MatMulInteger``, the kernels its quantized convolutions use) or fp32 (``MatMul``), 2 n^3 ops each."""
    import onnxruntime as ort  # optional (the export extra) and heavy: loaded only where used
    from onnx import TensorProto, helper, numpy_helper

    if precision not in ("int8", "fp32"):
        raise ValueError(f"precision is int8 or fp32, not {precision!r}")
    rng = np.random.default_rng(0)
    int8 = precision == "int8"
    a = rng.integers(0, 255, (n, n), dtype=np.uint8) if int8 else rng.standard_normal((n, n), dtype=np.float32)
    w = rng.integers(-128, 127, (n, n), dtype=np.int8) if int8 else rng.standard_normal((n, n), dtype=np.float32)
    op = "MatMulInteger" if int8 else "MatMul"
    a_type, y_type = (TensorProto.UINT8, TensorProto.INT32) if int8 else (TensorProto.FLOAT, TensorProto.FLOAT)
    graph = helper.make_graph([helper.make_node(op, ["a", "w"], ["y"])], "peak",
                              [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    times = time_forward(lambda: sess.run(None, {"a": a}), seconds, torch.device("cpu"), min_iters=3)
    return 2 * n ** 3 / min(times[1:])


def _random_calibration(x: torch.Tensor, batches: int = 4) -> list[np.ndarray]:
    """Calibration for speed only: random images with the input's shape (ranges do not change the
    kernels that run; accuracy is measured on real data by ``effvit export --int8``)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, *x.shape[1:], generator=g).numpy() for _ in range(batches)]


def _torch_best(forms: dict[str, Callable[[], Forward]], probe: float, ref: torch.Tensor, tol: float,
                ) -> tuple[str, Forward]:
    name, fn, _ = pick_fastest(forms, probe, torch.device("cpu"), reference=ref, tol=tol)
    return name, fn


def deploy_forms(model: nn.Module, x: torch.Tensor, workdir: str | Path, threads: int = 1,
                 peer: nn.Module | None = None, compile: bool = False, probe: float = 1.0,
                 int8_ops: tuple[str, ...] = ("Conv", "Gemm"),
                 ) -> dict[tuple[str, str], tuple[str, Forward]]:
    """{(impl, form): (detail, forward)} for effvit's ``model`` and, when given, timm's ``peer`` (same
    weights). Forms: torch fp32 (each side's fastest PyTorch form), torch bf16, ort fp32, ort int8,
    openvino fp32, openvino int8, openvino bf16; the bf16 ones only on a CPU with bf16 units. effvit's
    side adds openvino-kernel fp32 (and bf16) where effvit's OpenVINO extension builds."""
    workdir = Path(workdir)
    bf16 = bf16_unit() is not None
    with torch.inference_mode():
        ref = model(x).float()
    tol = 1e-3 * max(1.0, ref.abs().max().item())
    batch = x.shape[0]
    xn = x.numpy()
    calib = _random_calibration(x)
    sides: dict[str, tuple[nn.Module, Callable, Callable]] = {
        "effvit": (model, effvit_forms, lambda p: export_onnx(model, p, tuple(x.shape[2:]), verify=False))}
    if peer is not None:
        sides["timm"] = (peer, timm_forms,
                         lambda p: export_plain_onnx(reparameterize_model(peer), x[:2], str(p)))
    forms: dict[tuple[str, str], tuple[str, Forward]] = {}
    for impl, (m, torch_forms, export) in sides.items():
        forms[impl, "torch fp32"] = _torch_best(torch_forms(m, x, None, compile), probe, ref, tol)
        if bf16:
            forms[impl, "torch bf16"] = _torch_best(torch_forms(m, x, torch.bfloat16), probe, ref,
                                                    50 * tol)
        fp32, int8 = workdir / f"{impl}.onnx", workdir / f"{impl}.int8.onnx"
        if not int8.exists():  # files of an earlier batch size are reused (the batch axis is dynamic)
            export(fp32)
            quantize_onnx(fp32, int8, calib, ops=int8_ops)
            for path in (fp32, int8):
                export_openvino(path, path.with_suffix(".xml"))
        for precision, path in (("fp32", fp32), ("int8", int8)):
            run = ort_predictor(path, threads)
            forms[impl, f"ort {precision}"] = (path.name, lambda run=run: run(xn))
            xml = path.with_suffix(".xml")
            ov = openvino_predictor(xml, threads, "f32", batch=batch)
            forms[impl, f"openvino {precision}"] = (xml.name, lambda ov=ov: ov(xn))
        if bf16:
            ov = openvino_predictor(fp32.with_suffix(".xml"), threads, "bf16", batch=batch)
            forms[impl, "openvino bf16"] = (f"{fp32.stem}.xml, bf16 hint", lambda ov=ov: ov(xn))
    forms |= _kernel_forms(model, x, workdir, threads, bf16)
    return forms


def _kernel_forms(model: nn.Module, x: torch.Tensor, workdir: Path, threads: int, bf16: bool,
                  ) -> dict[tuple[str, str], tuple[str, Forward]]:
    """effvit's kernel IR in fp32 and (bf16 units) with the rest of the graph in bf16; none, with a
    warning, where the extension cannot be built."""
    ok, reason = kernel_available()
    if not ok:
        warnings.warn(f"no openvino-kernel forms: {reason.splitlines()[0]}", stacklevel=3)
        return {}
    xml = workdir / "effvit.kernel.xml"
    if not xml.exists():
        export_openvino_kernel(model, xml, tuple(x.shape[2:]), verify=False)  # checked by the bench's diff
    xn = x.numpy()
    forms = {}
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16"))[: 2 if bf16 else 1]:
        ov = openvino_predictor(xml, threads, hint, batch=x.shape[0])
        detail = xml.name + (", bf16 hint (attention fp32)" if precision == "bf16" else "")
        forms["effvit", f"openvino-kernel {precision}"] = (detail, lambda ov=ov: ov(xn))
    return forms


def executorch_forms(model: nn.Module, x: torch.Tensor, workdir: str | Path, threads: int = 1,
                     peer: nn.Module | None = None, compile: bool = False, probe: float = 1.0,
                     ) -> dict[tuple[str, str], tuple[str, Forward]]:
    """{(impl, form): (detail, forward)}: ExecuTorch programs (XNNPACK delegate) at ``x``'s shape, fp32 and
    PT2E int8 (convolutions and linear layers, calibrated on random images: speed only), of effvit's fused
    ``model`` and, when given, timm's reparameterised ``peer``, both through the same capture, rewrite and
    lowering. ``compile`` and ``probe`` are unused (the signature of ``deploy_forms``)."""
    require_executorch()
    workdir = Path(workdir)
    xn = x.numpy()
    sides = {"effvit": fuse(model)}
    if peer is not None:
        sides["timm"] = reparameterize_model(peer)
    forms: dict[tuple[str, str], tuple[str, Forward]] = {}
    for impl, m in sides.items():
        fp32, int8 = workdir / f"{impl}_b{len(x)}.pte", workdir / f"{impl}_b{len(x)}.int8.pte"
        if not int8.exists():
            # timm's graph is lowered as it comes: ops XNNPACK leaves to the portable kernels are timed too
            fp32.write_bytes(lower_xnnpack(xnnpack_graph(m, x), allow_portable=True)[0])
            program, _ = quantize_pt2e(m, x, _random_calibration(x))
            int8.write_bytes(lower_xnnpack(program, allow_portable=True)[0])
        for precision, path in (("fp32", fp32), ("int8", int8)):
            run = pte_predictor(path, threads)
            forms[impl, f"executorch {precision}"] = (path.name, lambda run=run: run(xn))
    return forms


def bench_deploy(model: nn.Module, x: torch.Tensor, threads: int, seconds: float, rounds: int,
                 warmup: float = 1.0, peer: nn.Module | None = None, compile: bool = False,
                 probe: float = 1.0, on_round: Callable[[], None] | None = None,
                 workdir: str | Path | None = None, forms_of: Callable = deploy_forms) -> list[dict]:
    """Every deployment form of both sides timed in alternating rounds (``seconds`` per form in all;
    ``workdir`` keeps the exported files for another batch size of the same model; ``forms_of``:
    ``deploy_forms`` or ``executorch_forms``);
    one dict per form: impl, form, detail, precision, ms_batch, p90_ms, min_ms, img_s, max_abs_diff,
    ratio_vs_timm_fp32 (median over rounds of timm's fastest fp32 form's time / this form's time) and
    best (the fastest form of its side)."""
    with torch.inference_mode():
        ref = model(x).float()
    with tempfile.TemporaryDirectory() as tmp:
        forms = forms_of(model, x, workdir or tmp, threads, peer, compile, probe)
        fns = {k: fn for k, (_, fn) in forms.items()}
        timings = alternate(fns, seconds, rounds, torch.device("cpu"), warmup=warmup,
                              on_round=on_round)
        diffs = {k: max_abs_diff(fn(), ref) for k, fn in fns.items()}
    batch = x.shape[0]
    timm_fp32 = [k for k in timings if k[0] == "timm" and k[1] in FP32_FORMS]
    # per round, the fastest of timm's fp32 forms: the peer's best fp32 deployment of that moment
    base = [min(statistics.median(timings[k].rounds[r]) for k in timm_fp32) for r in range(rounds)] \
        if timm_fp32 else None
    best = {impl: min((k for k in timings if k[0] == impl), key=lambda k: timings[k].median)
            for impl in dict.fromkeys(k[0] for k in timings)}
    rows = []
    for (impl, form), t in timings.items():
        rows.append({
            "impl": impl, "form": form, "detail": forms[impl, form][0], "precision": form.split()[-1],
            "batch": batch, "threads": threads, "img_s": round(t.img_s(batch), 1),
            "ms_batch": round(t.median * 1e3, 3), "p90_ms": round(p90(t.times) * 1e3, 3),
            "min_ms": round(min(t.times) * 1e3, 3),  # the least-disturbed iteration, on a shared machine
            "max_abs_diff": float(f"{diffs[impl, form]:.3g}"),
            "ratio_vs_timm": (round(statistics.median(b / statistics.median(r) for b, r in zip(base, t.rounds)), 3)
                              if base else None),
            "best": best[impl] == (impl, form),
        })
    return rows


def onnx_speed(paths: dict[str, str | Path], input_shape: tuple[int, int, int], threads: int = 1,
               batch_sizes: tuple[int, ...] = (1, 16), seconds: float = 2.0, rounds: int = 4,
               ) -> dict[int, dict[str, Timing]]:
    """ONNX files (e.g. fp32 and int8) timed in ONNX Runtime alternately at each batch size:
    {batch: {name: Timing}}; ``seconds`` per file and batch size."""
    out = {}
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).numpy()
        fns = {}
        for name, path in paths.items():
            run = ort_predictor(path, threads)
            fns[name] = lambda run=run, x=x: run(x)
        out[batch] = alternate(fns, seconds, rounds, torch.device("cpu"), warmup=0.2)
    return out
