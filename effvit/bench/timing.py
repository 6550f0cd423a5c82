"""Throughput measurement the paper's way, with a peer run alternately in the same process.

The protocol (paper section 5): BN fused, traced model, random input, warm-up, then a timed window;
throughput = batch / iteration time. Here each implementation's *best form* is picked first (every
candidate form timed briefly, fastest kept), then the chosen forms run in alternating rounds so that
load from other processes hits both alike; medians over all timed iterations are reported.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Forward", "Timing", "ratio", "time_forward", "alternate", "max_abs_diff", "pick_fastest",
           "effvit_forms", "timm_forms", "onnx_forward", "export_plain_onnx", "cpu_peak_flops", "randomise_norms"]

Forward = Callable[[], object]  # one batch through one form; inputs are bound inside


@dataclass
class Timing:
    rounds: list[list[float]] = field(default_factory=list)  # seconds per batch, one list per round

    @property
    def times(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.rounds else float("nan")

    def img_s(self, batch: int) -> float:
        return batch / self.median


def ratio(slow: Timing, fast: Timing) -> float:
    """Median over rounds of slow/fast per-round median times: each round's two measurements ran
    back to back, so load that changes between rounds cancels out."""
    return statistics.median(statistics.median(a) / statistics.median(b)
                             for a, b in zip(slow.rounds, fast.rounds, strict=True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn: Forward, seconds: float, device: torch.device, min_iters: int = 2) -> list[float]:
    """Per-iteration wall times for ``seconds`` (at least ``min_iters`` iterations)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def alternate(fns: dict[str, Forward], seconds: float, rounds: int, device: torch.device,
              warmup: float = 0.0, on_round: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Run each form for ``seconds / rounds`` in turn, ``rounds`` times; warm-up untimed first."""
    for fn in fns.values():
        time_forward(fn, warmup, device, min_iters=1)
    out = {k: Timing() for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].rounds.append(time_forward(fn, seconds / rounds, device))
        if on_round is not None:
            on_round()
    return out


def max_abs_diff(out: object, reference: torch.Tensor) -> float:
    """Largest absolute difference of a form's output (a tensor or an ONNX Runtime array, any dtype or
    device) to the fp32 reference; NaN if the output has any."""
    return (torch.as_tensor(out).to(reference.device).float() - reference).abs().max().item()


def pick_fastest(candidates: dict[str, Callable[[], Forward]], probe: float, device: torch.device,
                 reference: torch.Tensor | None = None, tol: float = 0.0,
                 ) -> tuple[str, Forward, dict[str, float]]:
    """Build every candidate, time each for ``probe`` seconds in two alternating rounds, return
    (name, forward, {name: median seconds}). A candidate that fails to build, or whose output differs
    from ``reference`` by more than ``tol``, is dropped with a warning: a fast wrong form must never be
    the one timed."""
    built: dict[str, Forward] = {}
    wrong: list[str] = []
    for name, make in candidates.items():
        try:
            fn = make()
            out = fn()  # first call: compilation, tracing caches, allocator warm-up
            _sync(device)
        except Exception as e:  # a form this torch/timm cannot produce is skipped, not fatal
            warnings.warn(f"benchmark form {name!r} unavailable: {type(e).__name__}: {e}", stacklevel=2)
            continue
        if reference is not None:
            diff = max_abs_diff(out, reference)
            if not diff <= tol:  # also catches NaN
                wrong.append(f"{name} (max abs diff {diff:.3g} > {tol:.3g})")
                warnings.warn(f"benchmark form {name!r} dropped: wrong outputs, max abs difference {diff:.3g} "
                              f"to the reference (tolerance {tol:.3g})", stacklevel=2)
                continue
        built[name] = fn
    if not built:
        raise ValueError("no benchmark form could be built" + (": wrong outputs from " + ", ".join(wrong)
                                                              if wrong else ": " + ", ".join(candidates)))
    if len(built) == 1:
        name, fn = next(iter(built.items()))
        return name, fn, {name: float("nan")}
    med = {k: t.median for k, t in alternate(built, probe, 2, device, warmup=0).items()}
    best = min(med, key=med.get)
    return best, built[best], med


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random statistics and affine and every attention-bias table random values.

    A fresh model has zero BN gammas at the end of each residual branch, so comparisons on it only
    test the stem and the head; this makes every branch contribute. In place; returns the model.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(rand(n, 0.5, 1.5))
                m.bias.copy_(rand(n, -0.3, 0.3))
                m.running_mean.copy_(rand(n, -0.3, 0.3))
                m.running_var.copy_(rand(n, 0.5, 1.5))
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


# -- forms -------------------------------------------------------------------------------------------
def _quiet_trace(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and constant-shape notes from the tracer
        return torch.jit.freeze(torch.jit.trace(model, x))


def _compiled(model: nn.Module) -> nn.Module:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # fold weights as constants (prepacked GEMM/conv on CPU)
    return torch.compile(model)


def _runner(fn: Callable, x: torch.Tensor, amp: torch.dtype | None, cast_cache: bool = True) -> Forward:
    def run():
        with torch.inference_mode(), (torch.autocast(x.device.type, dtype=amp, cache_enabled=cast_cache)
                                      if amp is not None else contextlib.nullcontext()):
            return fn(x)
    return run


def _cuda_graphed(fn: Callable, x: torch.Tensor, amp: torch.dtype | None) -> Forward:
    """One forward captured as a CUDA graph: each replay launches the whole network at once, so the
    Python and launch cost of a few hundred small kernels leaves the timed path. Same input buffer."""
    run = _runner(fn, x, amp, cast_cache=False)  # autocast's cast cache must stay out of a captured graph
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):  # capture wants its warm-up (cuDNN/cuBLAS choices) off the main stream
        for _ in range(3):
            run()
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()

    def replay():
        graph.replay()
        return out
    return replay


def effvit_forms(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None = None,
                 compile: bool = False) -> dict[str, Callable[[], Forward]]:
    """Candidate forms of our implementation: the fused model eager and traced, on CUDA also
    captured as a CUDA graph (+ compiled)."""
    from effvit.models import fuse

    fused = fuse(model)
    forms: dict[str, Callable[[], Forward]] = {"fused": lambda: _runner(fused, x, amp)}
    if x.device.type == "cuda":
        forms["fused+cudagraph"] = lambda: _cuda_graphed(fused, x, amp)
    if amp is None:  # a trace under autocast would bake the casts in; eager covers that case
        def traced():
            with torch.inference_mode():
                return _runner(_quiet_trace(fused, x), x, None)
        forms["fused+trace"] = traced
    if compile:
        forms["fused+compile"] = lambda: _runner(_compiled(fused), x, amp)
    return forms


def timm_forms(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None = None,
               compile: bool = False) -> dict[str, Callable[[], Forward]]:
    """timm's candidate forms for the same weights: eager, reparameterised (BN folded by
    ``timm.utils.reparameterize_model``), traced, channels-last, on CUDA a CUDA graph (+ compiled)."""
    from timm.utils import reparameterize_model

    # timm 1.0.29 builds the folded convs on the CPU whatever the model's device: move them back
    rep = reparameterize_model(model.eval()).to(x.device)
    rep_cl = reparameterize_model(model.eval()).to(x.device, memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    forms: dict[str, Callable[[], Forward]] = {
        "eager": lambda: _runner(model, x, amp),
        "reparam": lambda: _runner(rep, x, amp),
        "reparam+cl": lambda: _runner(rep_cl, x_cl, amp),
    }
    if amp is None:
        def traced(m, inp):
            with torch.inference_mode():
                return _runner(_quiet_trace(m, inp), inp, None)
        forms["reparam+trace"] = lambda: traced(rep, x)
        forms["reparam+cl+trace"] = lambda: traced(rep_cl, x_cl)
    if x.device.type == "cuda":  # the same graph capture ours gets, so the comparison stays like for like
        forms["reparam+cudagraph"] = lambda: _cuda_graphed(rep, x, amp)
    if compile:  # inductor picks channels-last for convolutions by itself
        forms["reparam+compile"] = lambda: _runner(_compiled(rep), x, amp)
    return forms


def onnx_forward(path: str, x: torch.Tensor, threads: int) -> Forward:
    """ONNX Runtime CPU session on ``path`` with all graph optimisations, ``threads`` intra-op."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: sess.run(None, feed)[0]


def export_plain_onnx(model: nn.Module, x: torch.Tensor, path: str) -> None:
    """A peer's model (timm's) to ONNX the usual way: TorchScript-based exporter, opset 17, dynamic
    batch, input ``image``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


def cpu_peak_flops(threads: int = 1, n: int = 2048, seconds: float = 2.0) -> float:
    """Peak fp32 FLOP/s attainable: the best of repeated n x n x n matrix products (MKL/oneDNN sgemm),
    2 n^3 FLOPs each, on ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        with torch.inference_mode():
            times = time_forward(lambda: a @ b, seconds, torch.device("cpu"), min_iters=3)
    finally:
        torch.set_num_threads(old)
    return 2 * n ** 3 / min(times[1:])
