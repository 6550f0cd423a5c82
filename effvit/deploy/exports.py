"""The exports of ``effvit export``: the fused model as ONNX, TorchScript, OpenVINO IR and/or an ExecuTorch
program, verified after writing, and optionally the post-training int8 forms checked against fp32 on
held-out images."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from effvit.data import eval_transform
from effvit.kernels.cpu import KernelUnavailable
from effvit.models import create_model, load_model, resolve_models
from effvit.outputs import atomic_path

from .calibration import ImageSets, batches, image_sets
from .cpuinfo import bf16_unit
from .graph import export_onnx, export_torchscript
from .mobile import export_executorch, export_executorch_int8, require_executorch
from .openvino import export_openvino, export_openvino_kernel, openvino_predictor
from .quantize import Agreement, compare_predictions, export_int8, ort_predictor

FORMATS = {"onnx": ".onnx", "torchscript": ".ts.pt", "openvino": ".xml", "openvino-kernel": ".kernel.xml",
           "executorch": ".pte"}


def check_formats(formats: Sequence[str]) -> list[str]:
    """``formats`` as a list, each one of ``FORMATS``."""
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    return list(formats)


@dataclass
class ExportResult:
    """One file written (or, ``kept`` False, the ONNX input of a conversion written aside and removed)."""

    format: str  # onnx, torchscript, int8, openvino, executorch, executorch-int8; or openvino-check (IR forms)
    path: Path
    lines: list[str]  # what the export reports, as printed by ``effvit export``
    kept: bool = True
    max_abs_diff: float | None = None  # against PyTorch; None when not verified
    agreement: Agreement | None = None
    record: dict = field(default_factory=dict)  # the int8 check, as written to NAME.int8.json


def build_export_model(model_name: str | None = None, checkpoint: str | Path | None = None,
                       num_classes: int | None = None, img_size: Sequence[int] | None = None) -> nn.Module:
    """The model to export: ``checkpoint``'s (classes, channels and size from it), else ``model_name`` (default
    m0) with random weights. ``img_size`` is H or (H, W)."""
    names = resolve_models(model_name or "m0")
    if len(names) != 1:
        raise ValueError(f"--model takes one variant, got {model_name!r}")
    if img_size is not None and (len(img_size) not in (1, 2) or min(img_size) < 1):
        raise ValueError(f"--img-size takes H or H W, positive numbers of pixels, got {list(img_size)}")
    size = None if img_size is None else (img_size[0], img_size[-1])
    if checkpoint:
        return load_model(checkpoint, model_name=model_name and names[0], img_size=size)
    return create_model(names[0], num_classes=num_classes, img_size=size or (224, 224))


def export_model(model: nn.Module, out_dir: str | Path, *, formats: Sequence[str] = ("onnx", "torchscript"),
                 opset: int = 17, dynamo: bool = False, verify: bool = True, atol: float = 1e-4,
                 int8: bool = False, calib: str | Path | None = None, data: str | None = None,
                 calib_images: int = 512, check_images: int = 10000, calib_method: str = "minmax",
                 int8_ops: Sequence[str] = ("Conv", "Gemm"), min_agreement: float = 0.99,
                 allow_portable: bool = False,
                 on_result: Callable[[ExportResult], object] | None = None) -> list[ExportResult]:
    """Export ``model`` into ``out_dir`` as NAME_HxW.<format>; ``on_result`` sees each result as it is done.

    The int8 ONNX form (and the OpenVINO IR) is converted from the ONNX export; when ONNX itself is not
    asked for, that input is written aside and removed, never over an existing export. With ``executorch``
    the int8 form is also an ExecuTorch program (NAME.int8.pte, PT2E); the int8 ONNX file is written only
    when another format is asked for too. ``allow_portable``: write an ExecuTorch program even where
    XNNPACK leaves ops to the portable kernels (named in a warning). ``openvino-kernel`` (the IR with
    effvit's attention kernel) comes with the standard IR beside it; where the kernel's extension cannot be
    built, its result says so in one line and the standard IR is the export.
    """
    formats = check_formats(formats)
    if not atol >= 0:
        raise ValueError(f"atol must be 0 or more (the largest difference from PyTorch accepted), got {atol}")
    if int8 and check_images < 0:
        raise ValueError(f"check_images must be >= 0 (0: every held-out image), got {check_images}")
    if "openvino-kernel" in formats and "openvino" not in formats:
        formats.insert(formats.index("openvino-kernel"), "openvino")
    if "executorch" in formats:
        require_executorch()  # before any work: the extra may be missing
    size = model.img_size
    results: list[ExportResult] = []

    def done(result: ExportResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    # the int8 images are found before anything is written: a missing folder fails fast
    sets = image_sets(model, eval_transform(model), folder=calib, data_root=data, calibration_images=calib_images,
                      held_out_images=check_images) if int8 else None
    out = Path(out_dir)
    stem = f"{model.variant}_{size[0]}x{size[1]}"
    onnx_int8 = int8 and any(f != "executorch" for f in formats)
    needs_onnx = (onnx_int8 or "openvino" in formats) and "onnx" not in formats
    with contextlib.ExitStack() as stack:
        onnx_path = out / f"{stem}.onnx"
        if needs_onnx:  # only the input of the int8 / OpenVINO conversion: written aside, never over an export
            out.mkdir(parents=True, exist_ok=True)
            aside = stack.enter_context(tempfile.TemporaryDirectory(dir=out, prefix=".export"))
            onnx_path = Path(aside) / onnx_path.name
        for f in (["onnx"] if needs_onnx else []) + [f for f in formats
                                                      if not f.startswith("openvino") and f != "executorch"]:
            path = onnx_path if f == "onnx" else out / f"{stem}{FORMATS[f]}"
            if f == "onnx":
                diff = export_onnx(model, path, size, opset=opset, dynamo=dynamo, verify=verify, atol=atol)
                check = "onnxruntime"
            else:
                diff = export_torchscript(model, path, size, verify=verify, atol=atol)
                check = "torch.jit.load"
            note = "not verified" if diff is None else f"verified with {check}: max abs diff {diff:.2e}"
            aside_input = needs_onnx and f == "onnx"
            shown = f"{path.name} (the conversion's input, not kept)" if aside_input else path
            done(ExportResult(f, path, [f"{f:<12} {shown}  ({note}; dynamic batch, {size[0]}x{size[1]})"],
                              kept=not aside_input, max_abs_diff=diff))
        int8_path = out / f"{stem}.int8.onnx"
        if sets is not None and onnx_int8:
            done(_export_int8(model, sets, onnx_path, int8_path, list(int8_ops), calib_method, min_agreement))
        if "openvino" in formats:
            _export_openvino(model, size, onnx_path, out / f"{stem}.xml", int8_path, sets if onnx_int8 else None,
                             verify, atol, done)
        if "openvino-kernel" in formats:
            done(_export_openvino_kernel(model, size, out / f"{stem}{FORMATS['openvino-kernel']}", verify, atol,
                                         opset))
    if "executorch" in formats:
        _export_executorch(model, out / f"{stem}.pte", sets, verify, atol, min_agreement, allow_portable, done)
    return results


def _export_openvino_kernel(model: nn.Module, size: tuple[int, int], xml: Path, verify: bool,
                            atol: float, opset: int) -> ExportResult:
    name = "openvino-kernel"
    try:
        diff = export_openvino_kernel(model, xml, size, verify=verify, atol=atol, opset=opset)
    except KernelUnavailable as e:
        reason = str(e).splitlines()[0]
        return ExportResult(name, xml, [f"{name:<12} not written: {reason}; {xml.name.replace('.kernel', '')} is "
                                        "the standard graph"], kept=False)
    note = "not verified" if diff is None else f"verified with OpenVINO f32: max abs diff {diff:.2e}"
    return ExportResult(name, xml, [f"{name:<12} {xml}  (effvit's attention kernel, fp32; {note}; dynamic batch, "
                                    f"{size[0]}x{size[1]}; runs with effvit's OpenVINO extension)"],
                        max_abs_diff=diff)


def _export_executorch(model: nn.Module, pte: Path, sets: ImageSets | None, verify: bool, atol: float,
                       min_agreement: float, allow_portable: bool, done: Callable[[ExportResult], None]) -> None:
    """fp32 program (parity-checked with ExecuTorch's runtime); with int8 images the PT2E int8 program,
    checked against fp32 on the held-out images (the check in NAME.int8.pte.json)."""
    size = model.img_size
    diff, delegation = export_executorch(model, pte, size, verify=verify, atol=atol, allow_portable=allow_portable)
    note = "not verified" if diff is None else f"verified with ExecuTorch's runtime: max abs diff {diff:.2e}"
    done(ExportResult("executorch", pte, [f"{'executorch':<12} {pte}  ({note}; batch 1, {size[0]}x{size[1]})",
                                          f"{'':<12} XNNPACK delegate: {delegation.summary()}"],
                      max_abs_diff=diff, record={"delegation": vars(delegation)}))
    if sets is None:
        return
    pte8 = pte.with_suffix(".int8.pte")
    n, agreement, delegation, skipped = export_executorch_int8(model, pte8, sets, min_agreement=min_agreement,
                                                               allow_portable=allow_portable)
    record = {"int8": pte8.name, "fp32": pte.name, "input_shape": [1, model.in_chans, *size],
              "quantizer": "XNNPACKQuantizer, symmetric per-channel int8 weights, int8 activations (PT2E)",
              "calibration_images": n, "source": sets.source, **vars(agreement), "delta": agreement.delta,
              "delegation": vars(delegation)}
    json_path = pte8.with_name(pte8.name + ".json")
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    lines = [f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}"] if skipped else []
    lines += [f"{'executorch':<12} {pte8}  (int8 PT2E, XNNPACK quantizer; calibrated on {n} images; {sets.source})",
              f"{'':<12} {agreement.summary()}", f"{'':<12} XNNPACK delegate: {delegation.summary()}"]
    done(ExportResult("executorch-int8", pte8, lines, agreement=agreement, record=record))


def _export_int8(model: nn.Module, sets: ImageSets, onnx_path: Path, int8_path: Path, ops: list[str],
                 method: str, min_agreement: float) -> ExportResult:
    n, agreement, skipped = export_int8(onnx_path, int8_path, sets, ops=ops, method=method,
                                        min_agreement=min_agreement)
    record = {"int8": int8_path.name, "fp32": onnx_path.name, "input_shape": [model.in_chans, *model.img_size],
              "ops": ops, "calibration_images": n,
              "calibration_method": method, "source": sets.source, **vars(agreement),
              "delta": agreement.delta}
    int8_path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}"] if skipped else []
    lines.append(f"{'int8':<12} {int8_path}  (QDQ, per-channel int8 weights, {'+'.join(ops)} in int8; calibrated "
                 f"on {n} images, {method}; {sets.source})")
    lines.append(f"{'':<12} {agreement.summary()}")
    return ExportResult("int8", int8_path, lines, agreement=agreement, record=record)


def _export_openvino(model: nn.Module, size: tuple[int, int], onnx_path: Path, xml: Path, int8_path: Path,
                     sets: ImageSets | None, verify: bool, atol: float,
                     done: Callable[[ExportResult], None]) -> None:
    """fp32 IR (parity-checked); with int8 the int8 IR, and where the CPU has bf16 units the IR run in
    bf16, both checked against fp32 ONNX Runtime on the held-out images."""
    diff = export_openvino(onnx_path, xml, model if verify else None, size, atol)
    note = "not verified" if diff is None else f"verified with OpenVINO f32: max abs diff {diff:.2e}"
    done(ExportResult("openvino", xml, [f"{'openvino':<12} {xml}  ({note}; dynamic batch, {size[0]}x{size[1]})"],
                      max_abs_diff=diff))
    if sets is None:
        return
    xml8 = int8_path.with_suffix(".xml")
    export_openvino(int8_path, xml8)
    forms = {f"{xml8}  (int8)": (xml8, openvino_predictor(xml8, 0))}
    if bf16_unit():
        forms[f"{xml}  (run in bf16, {bf16_unit()})"] = (xml, openvino_predictor(xml, 0, "bf16"))
    held = batches(sets.held_out, sets.held_out_idx, 64, sets.labelled)
    checked = compare_predictions(ort_predictor(onnx_path, 0), {k: p for k, (_, p) in forms.items()}, held)
    for name, agreement in checked.items():
        done(ExportResult("openvino-check", forms[name][0], [f"{'openvino':<12} {name} {agreement.summary()}"],
                          agreement=agreement))
