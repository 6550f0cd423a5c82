"""OpenVINO: the ONNX export (fp32 or int8 QDQ) converted to OpenVINO IR (.xml + .bin), and run.

OpenVINO's CPU plugin picks bf16 by itself on CPUs with AVX512-BF16 or AMX unless told otherwise, so
every compiled model here states its precision: ``f32`` for parity checks and fp32 timing, ``bf16``
only where the CPU has the units (``effvit.deploy.cpuinfo.bf16_unit``). An int8 IR comes from the QDQ
ONNX file; OpenVINO turns its quantize/dequantize pairs into FakeQuantize and integer kernels.

The kernel IR (``export_openvino_kernel``) holds each window attention as one ``effvit.WindowAttention``
node, run by effvit's own C++ kernel (``effvit.kernels.cpu``: an OpenVINO extension built from source on
first use); ``openvino_predictor`` loads the extension for a graph that needs it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from effvit.kernels.cpu import KernelUnavailable, extension_path
from effvit.kernels.cpu.graph import DOMAIN, OP, with_kernel_attention

from .cpuinfo import bf16_unit
from .graph import MIN_OPSET, VERIFY_BATCHES, _example, _prepare, _size, _write_verified

__all__ = ["PRECISIONS", "export_openvino", "export_openvino_kernel", "needs_kernel", "openvino_predictor",
           "verify_openvino"]

EXTENSION_NOTE = ("needs effvit's OpenVINO extension: core.add_extension(str(effvit.kernels.cpu.extension_path())) "
                  "before read_model, or effvit.deploy.openvino.openvino_predictor")

PRECISIONS = ("f32", "bf16")


def export_openvino(onnx_path: str | Path, xml_path: str | Path, model=None, img_size: int | tuple[int, int] = 224,
                    atol: float = 1e-4) -> float | None:
    """Convert an ONNX file to OpenVINO IR at ``xml_path`` (weights in the .bin beside it), keeping
    fp32 weights (no fp16 compression: the parity check compares against fp32). With ``model`` the IR is
    checked against it (``verify_openvino``) before it takes its name: a failed check leaves no file and
    keeps an earlier IR. Returns the verified max abs difference (None without ``model``)."""
    import openvino as ov  # optional (the export extra) and heavy: loaded only where it is used
    xml_path = Path(xml_path)
    if xml_path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR path ends in .xml, got {xml_path}")
    write = lambda file: ov.save_model(ov.convert_model(str(onnx_path)), str(file), compress_to_fp16=False)
    verify = None if model is None else (lambda file: verify_openvino(file, model, img_size, atol))
    return _write_verified(xml_path, write, verify, sidecars=(".bin",))


@torch.no_grad()
def export_openvino_kernel(model, xml_path: str | Path, img_size: int | tuple[int, int] = 224, verify: bool = True,
                           atol: float = 1e-4, opset: int = MIN_OPSET) -> float | None:
    """The fused model as OpenVINO IR with every window attention one ``effvit.WindowAttention`` node (effvit's
    C++ kernel, fp32), at ``xml_path`` (weights in the .bin beside it), dynamic batch. Checked against the
    PyTorch model like ``export_openvino`` when ``verify``; returns that max abs difference.
    ``KernelUnavailable`` when the extension cannot be built here (then the standard IR is the one to use)."""
    import openvino as ov

    library = extension_path()
    xml_path = Path(xml_path)
    if xml_path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR path ends in .xml, got {xml_path}")
    fused, ref = _prepare(model)
    size = _size(img_size)
    kernel_model = with_kernel_attention(fused)
    x = _example(fused, 2, size)

    def write(file: Path) -> None:
        onnx_file = file.with_suffix(".onnx")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's constant-shape notes, as in export_onnx
                torch.onnx.export(kernel_model, (x,), str(onnx_file), dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=["logits"],
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                                  custom_opsets={DOMAIN: 1})
            converted = ov.convert_model(str(onnx_file), extension=str(library))
        finally:
            onnx_file.unlink(missing_ok=True)
        converted.set_rt_info(f"this graph {EXTENSION_NOTE}", ["effvit", "extension"])
        ov.save_model(converted, str(file), compress_to_fp16=False)

    verify_fn = (lambda file: verify_openvino(file, ref, size, atol)) if verify else None
    return _write_verified(xml_path, write, verify_fn, sidecars=(".bin",))


def needs_kernel(path: str | Path) -> bool:
    """Whether the IR or ONNX file at ``path`` holds effvit's ``WindowAttention`` op."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        graph = onnx.load(str(path), load_external_data=False)
        return any(n.domain == DOMAIN and n.op_type == OP for n in graph.graph.node)
    with open(path, "rb") as f:  # IR: the op's layer is typed with its opset's name
        return f'type="{OP}" version="{DOMAIN}"'.encode() in f.read()


def _load_kernel(core, path: str | Path) -> None:
    try:
        core.add_extension(str(extension_path()))
    except KernelUnavailable as e:
        raise KernelUnavailable(f"{path} holds effvit's {DOMAIN}.{OP} op, which runs only in effvit's OpenVINO "
                                f"extension, and that is not available here: {e}") from None


def openvino_predictor(path: str | Path, threads: int = 1, precision: str = "f32",
                       batch: int | None = None):
    """A compiled OpenVINO CPU model (IR or ONNX file) as images -> logits: ``threads`` threads (0: all
    cores), one stream, latency hint; effvit's extension loaded for a kernel graph (``needs_kernel``).
    ``batch`` fixes the batch axis (static shapes let OpenVINO fold the
    shape arithmetic of the window partition); None keeps it dynamic."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"unknown OpenVINO precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "bf16" and bf16_unit() is None:
        raise ValueError("bf16 needs a CPU with AMX or AVX512-BF16; this one has neither (OpenVINO would "
                         "emulate it, slower than f32)")
    core = ov.Core()
    if needs_kernel(path):
        _load_kernel(core, path)
    model = core.read_model(str(path))
    if batch is not None:
        shape = list(model.input(0).get_partial_shape())
        shape[0] = batch
        model.reshape({model.input(0): ov.PartialShape(shape)})
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()

    def predict(x: np.ndarray) -> np.ndarray:
        return request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return predict


def verify_openvino(path: str | Path, model, img_size: int | tuple[int, int] = 224, atol: float = 1e-4) -> float:
    """Max abs difference between the IR run by OpenVINO (f32) and the PyTorch model (unfused when
    given) on batches of two sizes; ValueError above ``atol``."""
    _, ref = _prepare(model)
    size = _size(img_size)
    predict = openvino_predictor(path, threads=0, precision="f32")
    diff = 0.0
    with torch.no_grad():
        for b in VERIFY_BATCHES:
            x = _example(ref, b, size, seed=b)
            diff = max(diff, float(np.abs(predict(x.numpy()) - ref(x).numpy()).max()))
    if not diff <= atol:
        raise ValueError(f"OpenVINO IR {path} differs from PyTorch by {diff:.3g} > {atol:g}")
    return diff
