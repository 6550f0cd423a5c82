"""The forms a model can be timed in: ours (fused; traced, CUDA graph, compiled) and a peer's (timm's:
eager, reparameterised, channels-last, traced, CUDA graph, compiled), ONNX Runtime on an export.
Building or running a form sets no process-wide option."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from timm.utils import reparameterize_model
from torch import nn

from effvit.models import fuse

from .timing import Forward

__all__ = ["effvit_forms", "timm_forms", "onnx_forward", "export_plain_onnx"]


def _quiet_trace(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and constant-shape notes from the tracer
        return torch.jit.freeze(torch.jit.trace(model, x))


def _compiled(model: nn.Module) -> Callable:
    # inductor's freezing folds weights as constants (prepacked GEMM/conv on CPU); given as this
    # compilation's option, it reaches no other compilation in the process
    return torch.compile(model, options={"freezing": True})


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
    # timm (1.0.29 to 1.0.31) builds the folded convs on the CPU whatever the model's device: moved back
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
    import onnxruntime as ort  # optional (the export extra) and heavy: loaded only for this form

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
