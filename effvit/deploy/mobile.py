"""ExecuTorch (PyTorch's on-device runtime) with the XNNPACK delegate: the fused model as a ``.pte`` program,
fp32 or int8 (PT2E static quantization with the XNNPACK quantizer), verified with ExecuTorch's runtime.

The graph is ``torch.export``'s capture of the model (the fused modules take their NCHW export form), made
fit for XNNPACK by a rewrite that changes no value:

- the copy's weights go back to contiguous (NCHW) memory: ``effvit.fuse`` keeps them channels-last for
  PyTorch's kernels, and XNNPACK's layout pass expects a conv's weight in NCHW order;
- ``split``/``chunk`` become slices, 3-D ``matmul`` a ``bmm``, and a spatial ``mean`` without ``keepdim`` a
  kept-dim mean and a reshape: XNNPACK takes slices, ``bmm`` and 4-D kept-dim means, not the originals;
- constant subgraphs (a 1x1 conv's weight reshaped from its GEMM layout, a head's slice of the window
  bias) are folded into constants, so every conv sees a static weight.

The whole network then lowers into one XNNPACK subgraph; any op left to ExecuTorch's portable kernels is
named (and is an error unless allowed). The program has a fixed input shape (batch 1 by default): XNNPACK
only slices static shapes. ExecuTorch is optional (``pip install 'effvit[mobile]'``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .calibration import ImageSets, batches
from .graph import VERIFY_BATCHES, _example, _prepare, _size, _write_verified
from .quantize import Agreement, compare_predictions

__all__ = ["MOBILE_EXTRA", "require_executorch", "xnnpack_graph", "lower_xnnpack", "Delegation",
           "export_executorch", "verify_executorch", "pte_predictor", "export_executorch_int8",
           "quantize_pt2e"]

MOBILE_EXTRA = "pip install 'effvit[mobile]'"
aten = torch.ops.aten


def require_executorch() -> None:
    """ImportError saying how to install ExecuTorch where it is missing."""
    try:
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the ExecuTorch export needs the executorch package ({e}): {MOBILE_EXTRA}") from None


# -- the rewrite: value-preserving decompositions into ops XNNPACK takes ------------------------------

def _slices(x: torch.Tensor, sizes: Iterable[int], dim: int = 0) -> list[torch.Tensor]:
    out, start = [], 0
    for n in sizes:
        out.append(aten.slice.Tensor(x, dim, start, start + n))
        start += n
    return out


def _split(x: torch.Tensor, size: int, dim: int = 0) -> list[torch.Tensor]:
    n = x.shape[dim]
    return _slices(x, [min(size, n - s) for s in range(0, n, size)], dim)


def _chunk(x: torch.Tensor, chunks: int, dim: int = 0) -> list[torch.Tensor]:
    return _split(x, -(-x.shape[dim] // chunks), dim)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        return aten.bmm.default(a, b)  # matmul's own decomposition adds expands XNNPACK does not take
    return aten.matmul.default.decompose(a, b)


def _mean(x: torch.Tensor, dim, keepdim: bool = False, dtype=None):
    if keepdim or x.dim() != 4 or sorted(d % 4 for d in dim) != [2, 3]:
        return NotImplemented  # left as it is
    return aten.mean.dim(x, dim, True, dtype=dtype).flatten(1)


REWRITES = {aten.split_with_sizes.default: _slices, aten.split.Tensor: _split, aten.chunk.default: _chunk,
            aten.matmul.default: _matmul, aten.mean.dim: _mean,
            aten.alias.default: lambda x: aten.clone.default(x)}  # an alias is not an op XNNPACK runs


def xnnpack_graph(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` (any module: effvit's fused model, timm's) captured by ``torch.export`` at ``example``'s
    shape and rewritten for XNNPACK (module docstring); ``model`` itself is left as it is."""
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    model = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        program = torch.export.export(model, (example,))
    return constant_prop_pass(program.run_decompositions(REWRITES))


@dataclass
class Delegation:
    """What the XNNPACK delegate took of a lowered program."""

    subgraphs: int
    delegated_ops: int
    portable: dict[str, int] = field(default_factory=dict)  # op -> count of those left to portable kernels

    def summary(self) -> str:
        if not self.portable:
            return f"all {self.delegated_ops} ops in {self.subgraphs} XNNPACK subgraph(s)"
        left = ", ".join(f"{op} x{n}" for op, n in sorted(self.portable.items()))
        return (f"{self.delegated_ops} ops in {self.subgraphs} XNNPACK subgraph(s); left to ExecuTorch's "
                f"portable kernels: {left}")


def _delegation(graph_module: torch.fx.GraphModule) -> Delegation:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    # a getitem only unpacks a delegate's outputs: not an op that runs
    portable = {op: b.non_delegated for op, b in info.delegation_by_operator.items()
                if b.non_delegated and op != "getitem"}
    return Delegation(info.num_delegated_subgraphs, info.num_delegated_nodes, portable)


def lower_xnnpack(program: torch.export.ExportedProgram, allow_portable: bool = False) -> tuple[bytes, Delegation]:
    """The ``.pte`` bytes of ``program`` lowered to XNNPACK, and what was delegated. Ops left to the
    portable kernels (slow, and a sign the graph changed) are a ValueError naming them unless
    ``allow_portable`` (then a warning)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    delegation = _delegation(edge.exported_program().graph_module)
    if delegation.portable:
        message = f"the XNNPACK delegate did not take the whole graph: {delegation.summary()}"
        if not allow_portable:
            raise ValueError(f"{message}; pass allow_portable=True (--allow-portable) to write it anyway")
        warnings.warn(message, stacklevel=2)
    return edge.to_executorch().buffer, delegation


# -- running a .pte ------------------------------------------------------------------------------------

def _method(path: str | Path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(Path(path)).load_method("forward")


def _input_shape(method) -> tuple[int, ...]:
    return tuple(method.metadata.input_tensor_meta(0).sizes())


def pte_predictor(path: str | Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The ``.pte`` at ``path`` in ExecuTorch's runtime as images (N, C, H, W) float32 -> logits: N calls
    of its fixed batch (N a multiple of it). ``threads`` sets the runtime's (process-wide) thread pool."""
    if threads is not None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
    method = _method(path)
    batch = _input_shape(method)[0]

    def predict(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if len(x) % batch:
            raise ValueError(f"{path} takes batches of {batch} images, got {len(x)}")
        # each output is cloned: the runtime writes every call's output into the same planned buffer
        return torch.cat([method.execute([part])[0].clone() for part in x.split(batch)]).numpy()

    return predict


@torch.no_grad()
def verify_executorch(path: str | Path, model: nn.Module, img_size: int | tuple[int, int] = 224,
                      atol: float = 1e-4) -> float:
    """Max abs difference between the ``.pte`` run by ExecuTorch's runtime and the PyTorch model (unfused
    when given), on two inputs of the program's shape; ValueError above ``atol``."""
    _, ref = _prepare(model)
    method = _method(path)
    shape = _input_shape(method)
    if tuple(shape[2:]) != _size(img_size) or shape[1] != ref.in_chans:
        raise ValueError(f"{path} takes inputs {list(shape)}, not {ref.in_chans} channels of {_size(img_size)}")
    diff = 0.0
    for seed in VERIFY_BATCHES:
        x = _example(ref, shape[0], _size(img_size), seed=seed)
        diff = max(diff, float((method.execute([x])[0] - ref(x)).abs().max()))
    if not diff <= atol:
        raise ValueError(f"ExecuTorch program {path} differs from PyTorch by {diff:.3g} > {atol:g}")
    return diff


def export_executorch(model: nn.Module, path: str | Path, img_size: int | tuple[int, int] = 224, *,
                      batch: int = 1, verify: bool = True, atol: float = 1e-4,
                      allow_portable: bool = False) -> tuple[float | None, Delegation]:
    """The fused model as an fp32 ExecuTorch program with the XNNPACK delegate at ``path`` (``.pte``), input
    (``batch``, C, H, W). Verified with ExecuTorch's runtime against the PyTorch model before it takes its
    name. Returns (max abs difference or None, delegation)."""
    require_executorch()
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    fused, ref = _prepare(model)
    size = _size(img_size)
    data, delegation = lower_xnnpack(xnnpack_graph(fused, _example(fused, batch, size)), allow_portable)
    check = (lambda file: verify_executorch(file, ref, size, atol)) if verify else None
    return _write_verified(path, lambda file: file.write_bytes(data), check), delegation


# -- int8 ----------------------------------------------------------------------------------------------

@torch.no_grad()
def quantize_pt2e(model: nn.Module, example: torch.Tensor, calibration: Iterable[np.ndarray]) -> tuple[
        torch.export.ExportedProgram, int]:
    """``model`` captured and rewritten as ``xnnpack_graph``, its convolutions and linear layers quantized by
    PT2E with the XNNPACK quantizer (int8 per-channel symmetric weights, int8 activations with calibrated
    ranges): (the int8 program at
    ``example``'s shape, calibration images seen). ``calibration`` yields float32 batches (N, C, H, W)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config as config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # the convolutions (1x1 and spatial) and the head's linear, as the ONNX int8 default (Conv, Gemm): the
    # attention products, softmax, residual adds and the squeeze-excite gate stay fp32
    quantizer = XNNPACKQuantizer()
    for op in (aten.conv2d.default, aten.linear.default):
        quantizer.set_operator_type(op, config(is_per_channel=True))
    prepared = prepare_pt2e(xnnpack_graph(model, example).module(), quantizer)
    seen, batch = 0, example.shape[0]
    for images in calibration:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        for part in x.split(batch):
            if len(part) == batch:  # the captured graph's fixed batch; a ragged tail is left out
                prepared(part)
                seen += batch
    if not seen:
        raise ValueError("no calibration images: pass a folder of images or a checkpoint trained on a dataset")
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (example,)), seen


def export_executorch_int8(model: nn.Module, path: str | Path, sets: ImageSets, *, min_agreement: float = 0.99,
                           max_drop: float = 0.3, allow_portable: bool = False,
                           ) -> tuple[int, Agreement, Delegation, list[str]]:
    """The int8 ExecuTorch program (XNNPACK) of the fused model at ``path``, batch 1, calibrated on ``sets``'
    calibration images and checked against the fp32 PyTorch model on its held-out images: top-1 agreement
    at least ``min_agreement`` and, with labels, accuracy at most ``max_drop`` points lower, else
    ValueError and no file. Returns (calibration images, agreement, delegation, skipped unreadable files)."""
    require_executorch()
    fused, _ = _prepare(model)
    size = tuple(model.img_size)
    skipped: list[str] = []
    calibration = (x for x, _ in batches(sets.calibration, sets.calibration_idx, 64, False, skipped))
    program, n = quantize_pt2e(fused, _example(fused, 1, size), calibration)
    data, delegation = lower_xnnpack(program, allow_portable)

    def reference(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return fused(torch.from_numpy(images)).numpy()

    result: dict = {}

    def check(file: Path) -> float:
        held = batches(sets.held_out, sets.held_out_idx, 64, sets.labelled, skipped)
        agreement = result["agreement"] = compare_predictions(reference, pte_predictor(file), held)
        worse = agreement.delta is not None and agreement.delta < -max_drop
        if agreement.agreement < min_agreement or worse:
            raise ValueError(f"int8 ExecuTorch program rejected: {agreement.summary()}; required: agreement >= "
                             f"{100 * min_agreement:.1f}%" + (f" and at most {max_drop:g} points lower accuracy"
                                                              if sets.labelled else "")
                             + ". Try more calibration images (--calib-images)")
        return agreement.max_abs_diff

    _write_verified(path, lambda file: file.write_bytes(data), check)
    return n, result["agreement"], delegation, skipped
