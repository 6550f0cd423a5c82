"""OpenVINO: the ONNX export (fp32 or int8 QDQ) converted to OpenVINO IR (.xml + .bin), and run.

OpenVINO's CPU plugin picks bf16 by itself on CPUs with AVX512-BF16 or AMX unless told otherwise, so
every compiled model here states its precision: ``f32`` for parity checks and fp32 timing, ``bf16``
only where the CPU has the units (``effvit.deploy.cpuinfo.bf16_unit``). An int8 IR comes from the QDQ
ONNX file; OpenVINO turns its quantize/dequantize pairs into FakeQuantize and integer kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .cpuinfo import bf16_unit
from .graph import VERIFY_BATCHES, _example, _prepare, _size, _write_verified

__all__ = ["PRECISIONS", "export_openvino", "openvino_predictor", "verify_openvino"]

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


def openvino_predictor(path: str | Path, threads: int = 1, precision: str = "f32",
                       batch: int | None = None):
    """A compiled OpenVINO CPU model (IR or ONNX file) as images -> logits: ``threads`` threads (0: all
    cores), one stream, latency hint. ``batch`` fixes the batch axis (static shapes let OpenVINO fold the
    shape arithmetic of the window partition); None keeps it dynamic."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"unknown OpenVINO precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "bf16" and bf16_unit() is None:
        raise ValueError("bf16 needs a CPU with AMX or AVX512-BF16; this one has neither (OpenVINO would "
                         "emulate it, slower than f32)")
    core = ov.Core()
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
