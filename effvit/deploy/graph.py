"""Deployment exports of the fused model: ONNX (checked with ONNX Runtime) and TorchScript.

Both take an ``EfficientVitMsra`` (fused here) or an already fused model, export with a dynamic batch
dimension at a fixed image size, and verify the file against the PyTorch model on batches of two sizes
before it takes its name: a file that fails the check is never left behind.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from effvit.models.efficientvit import EfficientVitMsra, fuse
from effvit.models.fused import is_fused

__all__ = ["export_onnx", "export_torchscript", "verify_onnx", "verify_torchscript", "MIN_OPSET"]

MIN_OPSET = 17
VERIFY_BATCHES = (1, 3)  # a batch other than the export example's proves the batch axis is dynamic


def _prepare(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(fused model to export, reference to verify against): fp32 CPU copies; the caller's model
    is left as it was. The reference is the unfused model when one is given."""
    if not isinstance(model, EfficientVitMsra):
        raise ValueError(f"expected an EfficientViT-M model (effvit.create_model or effvit.fuse), got "
                         f"{type(model).__name__}")
    ref = copy.deepcopy(model).float().cpu().eval()
    return (ref if is_fused(ref) else fuse(ref)), ref


def _size(img_size: int | tuple[int, int]) -> tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def _write_verified(path: str | Path, write: Callable[[Path], None],
                    verify: Callable[[Path], float] | None, sidecars: tuple[str, ...] = ()) -> float | None:
    """``write`` to a temporary file beside ``path``, ``verify`` it, and only then rename it to ``path``: an
    export that fails its check never takes the final name, nor replaces an earlier good one. ``sidecars``:
    suffixes of files ``write`` puts beside its file (an OpenVINO IR's ``.bin``), renamed with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    moves = [(tmp.with_suffix(s), path.with_suffix(s)) for s in sidecars] + [(tmp, path)]
    try:
        write(tmp)
        try:
            diff = verify(tmp) if verify is not None else None
        except ValueError as e:
            raise ValueError(f"{str(e).replace(str(tmp), str(path))}; it was not written") from None
        for src, dst in moves:
            os.replace(src, dst)
    finally:
        for src, _ in moves:
            src.unlink(missing_ok=True)
    return diff


def _example(model: nn.Module, batch: int, img_size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.in_chans, *img_size, generator=g).to(p.device, p.dtype)


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, img_size: int | tuple[int, int] = 224,
                opset: int = MIN_OPSET, dynamo: bool = False, verify: bool = True,
                atol: float = 1e-4) -> float | None:
    """Export the fused model to ONNX with a dynamic batch axis (input ``image``, output ``logits``).

    The graph is NCHW with its 1x1 convolutions as Conv nodes: the fused model's GEMMs over
    channels-last memory are PyTorch's fast path, ONNX Runtime picks its own layout. ``dynamo=False``
    uses the TorchScript-based exporter
    (seconds); ``dynamo=True`` the torch.export one (~10x slower to export). Returns the max abs
    difference to PyTorch measured with ONNX Runtime when ``verify`` (ValueError above ``atol``).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: use {MIN_OPSET} or newer")
    fused, ref = _prepare(model)
    size = _size(img_size)
    x = _example(fused, 2, size)

    def write(file: Path) -> None:
        with warnings.catch_warnings():
            # the tracer notes that Python-side shape checks become constants: the image size is fixed
            # at export by design, only the batch axis is dynamic
            warnings.simplefilter("ignore")
            if dynamo:
                batch = torch.export.Dim("batch", min=1, max=65536)
                torch.onnx.export(fused, (x,), str(file), dynamo=True, opset_version=opset,
                                  input_names=["image"], output_names=["logits"],
                                  dynamic_shapes={"x": {0: batch}}, external_data=False)
            else:
                torch.onnx.export(fused, (x,), str(file), dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=["logits"],
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})

    return _write_verified(path, write, (lambda file: verify_onnx(file, ref, size, atol)) if verify else None)


@torch.no_grad()
def verify_onnx(path: str | Path, model: nn.Module, img_size: int | tuple[int, int] = 224,
                atol: float = 1e-4) -> float:
    """Max abs difference between ONNX Runtime (CPU) and the PyTorch model (unfused when given);
    ValueError above ``atol``."""
    import onnxruntime as ort  # optional (the export extra) and heavy: loaded only to verify

    _, ref = _prepare(model)
    size = _size(img_size)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    diff = 0.0
    for b in VERIFY_BATCHES:
        x = _example(ref, b, size, seed=b)
        out = sess.run(None, {name: x.numpy()})[0]
        diff = max(diff, float((torch.from_numpy(out) - ref(x)).abs().max()))
    if not diff <= atol:
        raise ValueError(f"ONNX export {path} differs from PyTorch by {diff:.3g} > {atol:g}")
    return diff


@torch.no_grad()
def export_torchscript(model: nn.Module, path: str | Path, img_size: int | tuple[int, int] = 224,
                       verify: bool = True, atol: float = 1e-4) -> float | None:
    """Trace and freeze the fused model, save it with ``torch.jit.save``; load it with
    ``torch.jit.load(path)`` (no effvit needed). Returns the verified max abs difference."""
    fused, ref = _prepare(model)
    size = _size(img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace deprecation and constant-shape notes, as above
        traced = torch.jit.freeze(torch.jit.trace(fused, _example(fused, 2, size)))

    def write(file: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # save deprecation note
            torch.jit.save(traced, str(file))

    return _write_verified(path, write, (lambda file: verify_torchscript(file, ref, size, atol)) if verify else None)


@torch.no_grad()
def verify_torchscript(path: str | Path, model: nn.Module, img_size: int | tuple[int, int] = 224,
                       atol: float = 1e-4) -> float:
    _, ref = _prepare(model)
    size = _size(img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation note
        loaded = torch.jit.load(str(path), map_location="cpu")
    diff = 0.0
    for b in VERIFY_BATCHES:
        x = _example(ref, b, size, seed=b)
        diff = max(diff, float((loaded(x) - ref(x)).abs().max()))
    if not diff <= atol:
        raise ValueError(f"TorchScript export {path} differs from PyTorch by {diff:.3g} > {atol:g}")
    return diff
