"""ExecuTorch export (XNNPACK delegate): the graph rewrite, fp32 and int8 programs checked with ExecuTorch's
runtime, the delegation report, the missing extra, the CLI and atomic writes.

Lowering a whole EfficientViT-M graph to XNNPACK takes ExecuTorch about a minute on two cores whatever the
image size (the cost is per graph node), so the full-model tests are few and marked slow; the rewrite and
the error paths are checked on small modules."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effvit import create_model, load_model
from effvit.cli import main
from effvit.deploy import mobile
from effvit.deploy.exports import export_model

# every test but the missing-extra one (which simulates the absence) needs ExecuTorch
needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                      reason="ExecuTorch is not installed (the mobile extra: pip install "
                                      "'effvit[mobile]')")


class Toy(nn.Module):
    """The op patterns of the fused model's export form that XNNPACK does not take as they are: a conv
    with channels-last weights, chunk and split, 3-D matmul, a spatial mean without keepdim."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1).to(memory_format=torch.channels_last)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y = self.conv(x)
        a, b = y.chunk(2, dim=1)
        q, k = b.split([2, 2], dim=1)
        attn = (q.flatten(2).transpose(1, 2) @ k.flatten(2)).softmax(-1)  # (B, N, N)
        z = (a.flatten(2) @ attn).view_as(a)
        return self.head(z.mean((2, 3)))


class Cumsum(nn.Module):
    def forward(self, x):
        return F.relu(x).cumsum(1)  # no XNNPACK kernel: left to the portable ones


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return Toy().eval(), torch.randn(1, 3, 8, 8)


def _runtime(data: bytes, x: torch.Tensor) -> torch.Tensor:
    from executorch.runtime import Runtime

    return Runtime.get().load_program(data).load_method("forward").execute([x])[0]


@needs_executorch
@pytest.mark.slow
@torch.no_grad()
def test_rewrite_keeps_values_and_lowers_whole(toy):
    model, x = toy
    program = mobile.xnnpack_graph(model, x)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not ops & {"aten.split_with_sizes.default", "aten.split.Tensor", "aten.chunk.default",
                      "aten.matmul.default"}
    assert {"aten.slice.Tensor", "aten.bmm.default"} <= ops
    assert (program.module()(x) - model(x)).abs().max() <= 1e-6
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)  # the caller's model untouched
    data, delegation = mobile.lower_xnnpack(program)
    assert delegation.subgraphs == 1 and delegation.portable == {} and delegation.delegated_ops > 10
    x2 = torch.randn(1, 3, 8, 8)
    assert (_runtime(data, x2) - model(x2)).abs().max() <= 1e-5


@needs_executorch
@pytest.mark.slow
@torch.no_grad()
def test_ops_left_to_portable_kernels_are_named():
    program = mobile.xnnpack_graph(Cumsum(), torch.randn(1, 6))
    with pytest.raises(ValueError, match=r"did not take the whole graph.*cumsum.*--allow-portable"):
        mobile.lower_xnnpack(program)
    with pytest.warns(UserWarning, match="portable kernels: aten_cumsum"):
        data, delegation = mobile.lower_xnnpack(program, allow_portable=True)
    assert any("cumsum" in op for op in delegation.portable) and "cumsum" in delegation.summary()
    x = torch.randn(1, 6)
    assert (_runtime(data, x) - Cumsum()(x)).abs().max() <= 1e-5


@needs_executorch
@pytest.mark.slow
@torch.no_grad()
def test_int8_pt2e_on_a_small_module(toy):
    model, x = toy
    calibration = [np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32) for i in range(2)]
    program, seen = mobile.quantize_pt2e(model, x, calibration)
    assert seen == 8
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_channel" in op for op in ops)  # int8 weights
    data, delegation = mobile.lower_xnnpack(program)
    assert delegation.portable == {}
    out, ref = _runtime(data, x), model(x)
    assert not torch.equal(out, ref) and (out - ref).abs().max() <= 0.1 * ref.abs().max()
    with pytest.raises(ValueError, match="no calibration images"):
        mobile.quantize_pt2e(model, x, [])


def test_missing_extra_is_a_clear_error(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name == "executorch" or name.startswith("executorch."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    out = tmp_path / "out"
    with pytest.raises(ImportError, match=r"pip install 'effvit\[mobile\]'"):
        export_model(create_model("efficientvit_m0", img_size=32), out, formats=["executorch"])
    assert not out.exists()  # refused before any work
    assert main(["export", "--model", "m0", "--format", "onnx,executorch", "--out", str(out)]) == 2
    assert "pip install 'effvit[mobile]'" in capsys.readouterr().err and not out.exists()


@needs_executorch
@pytest.mark.slow
def test_a_failed_check_leaves_no_file(tmp_path, toy, monkeypatch):
    """The program is written under a temporary name and checked before it takes its name: a program that
    does not fit the model (here the small module's) leaves nothing, and an earlier file stays."""
    model, x = toy
    data, _ = mobile.lower_xnnpack(mobile.xnnpack_graph(model, x))
    monkeypatch.setattr(mobile, "xnnpack_graph", lambda *a: None)
    monkeypatch.setattr(mobile, "lower_xnnpack", lambda program, allow: (data, mobile.Delegation(1, 1)))
    path = tmp_path / "m0.pte"
    path.write_bytes(b"an earlier export")
    with pytest.raises(ValueError, match=r"m0.pte takes inputs \[1, 3, 8, 8\].*it was not written"):
        mobile.export_executorch(create_model("efficientvit_m0", img_size=32), path, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["m0.pte"] and path.read_bytes() == b"an earlier export"


@needs_executorch
@pytest.mark.slow
def test_cli_m0_at_224_fp32_verified(tmp_path, classifier, capsys):
    """`effvit export --format executorch` on a classifier at 224 px (windows, padding and the cascade as
    deployed): one XNNPACK subgraph, nothing left to the portable kernels, within 1e-4 of PyTorch. The int8
    program is checked on a small module above and on the make-demo model in BENCHMARKS.md: each whole-model
    lowering costs a minute of the suite."""
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(classifier), "--img-size", "224", "--format", "executorch",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    pte = out / "efficientvit_m0_224x224.pte"
    assert [p.name for p in out.iterdir()] == [pte.name]
    assert "verified with ExecuTorch's runtime" in text and "XNNPACK delegate: all" in text
    model = load_model(classifier, img_size=(224, 224)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x).numpy()
    got = mobile.pte_predictor(pte)(x.numpy())  # two calls of the batch-1 program
    assert got.shape == (2, 4) and np.abs(got - ref).max() <= 1e-4
