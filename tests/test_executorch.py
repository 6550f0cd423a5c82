"""ExecuTorch export (XNNPACK delegate): the graph rewrite, fp32 and int8 programs checked with ExecuTorch's
runtime, the delegation report, the missing extra, the CLI and atomic writes.

Lowering a whole EfficientViT-M graph to XNNPACK takes ExecuTorch about a minute on two cores whatever the
image size (the cost is per graph node), so the full-model tests are few and marked slow; the rewrite and
the error paths are checked on small modules."""

from __future__ import annotations

import builtins
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from effvit import create_model, load_model
from effvit.bench.weights import randomise_norms
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
@torch.no_grad()
def test_m0_at_224_fp32_verified(tmp_path):
    torch.manual_seed(0)
    model = randomise_norms(create_model("efficientvit_m0")).eval()
    results = export_model(model, tmp_path, formats=["executorch"])
    assert [r.format for r in results] == ["executorch"]
    pte = tmp_path / "efficientvit_m0_224x224.pte"
    assert results[0].path == pte and results[0].max_abs_diff <= 1e-4
    assert results[0].record["delegation"]["subgraphs"] == 1 and results[0].record["delegation"]["portable"] == {}
    assert [p.name for p in tmp_path.iterdir()] == [pte.name]
    x = torch.randn(2, 3, 224, 224)
    got = mobile.pte_predictor(pte)(x.numpy())  # two calls of the batch-1 program
    assert got.shape == (2, 1000) and np.abs(got - model(x).numpy()).max() <= 1e-4


def _folder(path, n: int):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


@needs_executorch
@pytest.mark.slow
def test_cli_fp32_and_int8(tmp_path, classifier, capsys):
    """`effvit export --format executorch --int8` on a small classifier: both programs, the int8 one checked
    against fp32 on the images of the folder not used to calibrate."""
    calib = _folder(tmp_path / "calib", 24)
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(classifier), "--format", "executorch", "--int8", "--calib",
                 str(calib), "--out", str(out), "--min-agreement", "0.9"]) == 0
    text = capsys.readouterr().out
    stem = "efficientvit_m0_32x32"
    # only the ExecuTorch forms: no ONNX int8 when ONNX is not asked for
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.int8.pte", f"{stem}.int8.pte.json", f"{stem}.pte"]
    assert "verified with ExecuTorch's runtime" in text and "XNNPACK delegate: all" in text
    assert "top-1 agreement with fp32" in text and "12 held-out images" in text
    record = json.loads((out / f"{stem}.int8.pte.json").read_text())
    assert record["calibration_images"] == 12 and record["agreement"] >= 0.9
    assert record["delegation"]["portable"] == {}
    model = load_model(classifier).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    fp32 = mobile.pte_predictor(out / f"{stem}.pte")(x.numpy())
    int8 = mobile.pte_predictor(out / f"{stem}.int8.pte")(x.numpy())
    assert np.abs(fp32 - ref).max() <= 1e-4
    assert 0 < np.abs(int8 - ref).max() <= 0.2 * np.abs(ref).max() + 0.05
