"""Post-training static int8 quantization of the fp32 ONNX export, and its check against fp32.

The input is the file ``export_onnx`` writes, whatever graph form it holds: ops are chosen by type,
never by node name. onnxruntime.quantization inserts QuantizeLinear/DequantizeLinear pairs (QDQ) with
per-channel int8 weights and uint8 activations whose ranges come from calibration images; ONNX
Runtime and OpenVINO fold the pairs into integer kernels. Which op types are quantized is a choice
made by measurement (BENCHMARKS.md, "Which ops to quantize"): by default the convolutions and the head's
GEMM, while the attention products (MatMul), softmax, residual adds and the squeeze-excite gate stay
in fp32.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import batches
from .graph import _write_verified

# onnx and onnxruntime are optional (the export extra) and heavy: each function imports what it uses

__all__ = ["DEFAULT_INT8_OPS", "CALIBRATION_METHODS", "quantize_onnx", "export_int8", "Agreement",
           "compare_predictions", "ort_predictor", "graph_op_types"]

DEFAULT_INT8_OPS = ("Conv", "Gemm")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")

Predictor = Callable[[np.ndarray], np.ndarray]  # images (N, C, H, W) float32 -> logits (N, classes)


def graph_op_types(path: str | Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def _calibration_reader(batches: Iterable[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches: Iterator[np.ndarray] = iter(batches)
            self.seen = 0

        def get_next(self) -> dict | None:
            b = next(self.batches, None)
            if b is None:
                return None
            self.seen += len(b)
            return {input_name: np.ascontiguousarray(b, dtype=np.float32)}

    return Reader()


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calibration: Iterable[np.ndarray],
                  ops: Iterable[str] = DEFAULT_INT8_OPS, per_channel: bool = True,
                  method: str = "minmax") -> int:
    """Write the int8 (QDQ) form of the fp32 ONNX model at ``fp32_path`` to ``out_path``.

    ``calibration`` yields float32 batches (N, C, H, W) preprocessed exactly as the model's inputs;
    ``ops`` are the op types to quantize (others stay fp32; ``["all"]``: every op type onnxruntime can
    quantize, softmax and the attention products included); ``method`` sets the activation ranges
    (minmax, or percentile/entropy to clip outliers). Returns the number of calibration images.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ops = [o.strip() for o in ops if o.strip()]
    if not ops:
        raise ValueError("no op types to quantize: name at least one, e.g. Conv,Gemm")
    present = graph_op_types(fp32_path)
    missing = [o for o in ops if o not in present and o != "all"]
    if "all" in ops and len(ops) > 1:
        raise ValueError(f"'all' quantizes every op type onnxruntime can; do not combine it with {ops}")
    if missing:
        raise ValueError(f"{fp32_path} has no {', '.join(missing)} nodes to quantize; its op types are "
                         f"{', '.join(sorted(present))}")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(methods)}")
    images = iter(calibration)
    first = next(images, None)
    if first is None:
        raise ValueError("no calibration images: pass a folder of images or a checkpoint trained on a dataset")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    reader = _calibration_reader(itertools.chain([first], images), input_name)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        # shape inference and constant folding first, as onnxruntime recommends; the symbolic pass
        # cannot follow the window reshapes and adds nothing the ONNX one misses here
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=None if ops == ["all"] else ops, calibrate_method=methods[method],
                        # uint8 activations x int8 weights is the pair the x86 VNNI kernels take
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return reader.seen


def ort_predictor(path: str | Path, threads: int = 1) -> Predictor:
    """An ONNX Runtime CPU session on ``path`` (all graph optimisations) as images -> logits."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


@dataclass
class Agreement:
    """A reduced-precision form against its fp32 reference on held-out images."""

    images: int
    agreement: float  # fraction of images whose top-1 class is the reference's
    top1_ref: float | None = None  # accuracy in percent, with labels
    top1: float | None = None
    max_abs_diff: float = 0.0  # largest logit difference

    @property
    def delta(self) -> float | None:
        """Accuracy change in points (negative: the reduced form is worse)."""
        return None if self.top1 is None else self.top1 - self.top1_ref

    def summary(self) -> str:
        s = f"top-1 agreement with fp32 {100 * self.agreement:.2f}% on {self.images} held-out images"
        if self.top1 is not None:
            s += f"; accuracy {self.top1:.2f}% vs fp32 {self.top1_ref:.2f}% ({self.delta:+.2f} points)"
        return s


def compare_predictions(reference: Predictor, candidate: Predictor | dict[str, Predictor],
                        batches: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> Agreement | dict[str, Agreement]:
    """Top-1 agreement (and accuracies where labels are given) of ``candidate`` with ``reference``
    over ``batches`` of (images, labels or None). Several candidates (a dict) share one pass over the
    images and one reference run per batch."""
    many = isinstance(candidate, dict)
    cands = candidate if many else {"": candidate}
    n = hits_ref = 0
    same = dict.fromkeys(cands, 0)
    hits = dict.fromkeys(cands, 0)
    diff = dict.fromkeys(cands, 0.0)
    labelled = True
    for images, labels in batches:
        a = reference(images)
        pa = a.argmax(1)
        n += len(images)
        labelled = labelled and labels is not None
        if labelled:
            labels = np.asarray(labels)
            hits_ref += int((pa == labels).sum())
        for k, predict in cands.items():
            b = predict(images)
            pb = b.argmax(1)
            same[k] += int((pa == pb).sum())
            diff[k] = max(diff[k], float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()))
            if labelled:
                hits[k] += int((pb == labels).sum())
    if n == 0:
        raise ValueError("no held-out images to compare on")
    out = {k: Agreement(n, same[k] / n, 100 * hits_ref / n, 100 * hits[k] / n, diff[k]) if labelled
           else Agreement(n, same[k] / n, max_abs_diff=diff[k]) for k in cands}
    return out if many else out[""]


def export_int8(fp32_path: str | Path, out_path: str | Path, sets, ops: Iterable[str] = DEFAULT_INT8_OPS,
                method: str = "minmax", min_agreement: float = 0.99, batch_size: int = 64,
                ) -> tuple[int, Agreement, list[str]]:
    """Quantize the fp32 ONNX file with the calibration images of ``sets`` (an
    ``effvit.deploy.calibration.ImageSets``) and check the int8 file against the fp32 one on its
    held-out images. Returns (calibration images, agreement, skipped unreadable files). The int8 file is
    written aside and takes its name only when the check passes: below ``min_agreement`` nothing is left
    (an earlier file at ``out_path`` is kept) and ValueError says by how much it missed."""
    skipped: list[str] = []
    result: dict = {}

    def write(file: Path) -> None:
        calibration = (x for x, _ in batches(sets.calibration, sets.calibration_idx, batch_size, False, skipped))
        result["n"] = quantize_onnx(fp32_path, file, calibration, ops=ops, method=method)

    def check(file: Path) -> float:
        held = batches(sets.held_out, sets.held_out_idx, batch_size, sets.labelled, skipped)
        agreement = result["agreement"] = compare_predictions(ort_predictor(fp32_path, 0), ort_predictor(file, 0),
                                                              held)
        if agreement.agreement < min_agreement:
            raise ValueError(f"int8 model rejected: {agreement.summary()}, below the required "
                             f"{100 * min_agreement:.1f}%. Try more calibration images, --calib-method percentile, "
                             f"or fewer --int8-ops")
        return agreement.max_abs_diff

    _write_verified(out_path, write, check)
    return result["n"], result["agreement"], skipped
