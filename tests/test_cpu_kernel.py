"""effvit's C++ window attention inside OpenVINO (effvit/kernels/cpu): every attention block of the fused
model against PyTorch, the kernel IR export end to end, the clear error without the extension, and the
build and export on a machine without a C++ compiler."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from effvit.bench.weights import randomise_norms as randomize
from effvit.kernels.cpu import KernelUnavailable, build_extension, extension_path, find_compiler
from effvit.kernels.cpu.graph import DOMAIN, OP, KernelWindowAttention, with_kernel_attention
from effvit.models import create_model, fuse
from effvit.models.fused import FusedLocalWindowAttention

ov = pytest.importorskip("openvino")

VARIANTS = [f"efficientvit_m{i}" for i in range(6)]
OPERANDS = ("qkv_w", "qkv_b", "q_w", "q_b", "table", "proj_w", "proj_b")


@pytest.fixture(scope="module")
def core():
    try:
        library = extension_path()  # built once per cache key; later sessions load it
    except KernelUnavailable as e:
        pytest.skip(f"effvit's OpenVINO extension cannot be built here: {e}")
    c = ov.Core()
    c.add_extension(str(library))
    return c


def node_graph(k: KernelWindowAttention, channels: int, height: int, width: int, path: Path) -> Path:
    """One effvit.WindowAttention node with ``k``'s operands, dynamic batch, as an ONNX file."""
    inits = [numpy_helper.from_array(getattr(k, n).numpy(), n) for n in OPERANDS]
    node = helper.make_node(OP, ["x", *OPERANDS], ["y"], domain=DOMAIN, window=k.window, kernels=list(k.kernels),
                            skip=int(k.skip))
    shape = ["batch", channels, height, width]
    graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    path.write_bytes(model.SerializeToString())
    return path


def block_io(name: str, size: tuple[int, int], batch: int, ltm: float | None = None, every: bool = False):
    """(block, input, output) of the fused model's window attention blocks on a random batch: the first
    block of each stage (every block with ``every``)."""
    torch.manual_seed(0)
    fused = fuse(randomize(create_model(name, img_size=size, ltm=ltm)).eval(), conv_batch=0)
    seen, hooks = [], []
    for stage in fused.stages:
        blocks = [m for m in stage.modules() if isinstance(m, FusedLocalWindowAttention)]
        for block in blocks if every else blocks[:1]:
            hooks.append(block.register_forward_hook(
                lambda m, i, o: seen.append((m, i[0].contiguous(), o.contiguous()))))
    with torch.inference_mode():
        fused(torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    return seen


def check_blocks(core, tmp_path: Path, seen, atol: float = 1e-4, threads: int = 1) -> list[tuple]:
    shapes = []
    for i, (block, x, ref) in enumerate(seen):
        B, C, H, W = x.shape
        path = node_graph(KernelWindowAttention(block), C, H, W, tmp_path / f"node{i}.onnx")
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
        for b in sorted({1, B}):  # the first image alone and the whole batch: one graph, dynamic batch
            out = compiled(x[:b].numpy())[0]
            assert out.shape == (b, C, H, W)
            diff = float(np.abs(out - ref[:b].numpy()).max())
            assert diff <= atol, f"block {i} ({C} channels, {H}x{W} map, batch {b}): max abs diff {diff:.3g}"
        shapes.append((C, H, W))
    return shapes


def test_blocks_match_pytorch_m0(core, tmp_path):
    """M0's stages at 224 (14x14 in four windows, 7x7 one window, 4x4 a map smaller than the window) and at
    190x250 (12x16 padded to 14x21: six windows; 6x8 padded to 7x14; 3x4), batch 1 and 16."""
    shapes = check_blocks(core, tmp_path, block_io("efficientvit_m0", (224, 224), 16))
    assert shapes == [(64, 14, 14), (128, 7, 7), (192, 4, 4)]
    odd = block_io("efficientvit_m0", (190, 250), 16)
    assert check_blocks(core, tmp_path, odd) == [(64, 12, 16), (128, 6, 8), (192, 3, 4)]
    check_blocks(core, tmp_path, odd, threads=2)  # the windows split over two threads


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_blocks_match_pytorch_every_variant(core, tmp_path, name):
    for size in ((224, 224), (190, 250)):
        check_blocks(core, tmp_path, block_io(name, size, 4))


@pytest.mark.slow
def test_blocks_match_pytorch_with_token_merging(core, tmp_path):
    """ltm=0.8: the blocks after the first see merged maps, of sizes the unmerged model never has."""
    size = (190, 250)
    merged = check_blocks(core, tmp_path, block_io("efficientvit_m4", size, 4, ltm=0.8, every=True))
    plain = {s for _, x, _ in block_io("efficientvit_m4", size, 1, every=True) for s in [(x.shape[1:])]}
    assert len(set(merged) - {tuple(s) for s in plain}) >= 2


def test_kernel_wrapper_runs_the_block_and_refuses_unfused_models():
    torch.manual_seed(0)
    model = randomize(create_model("efficientvit_m0", img_size=64)).eval()
    fused = fuse(model, conv_batch=0)
    wrapped = with_kernel_attention(fused)
    assert sum(isinstance(m, KernelWindowAttention) for m in wrapped.modules()) == 6
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(wrapped(x), fused(x))
    with pytest.raises(ValueError, match="fused EfficientViT-M"):
        with_kernel_attention(model)


def test_op_rejects_mismatched_operands(core, tmp_path):
    block = block_io("efficientvit_m0", (64, 64), 1)[0][0]
    k = KernelWindowAttention(block)
    k.kernels = k.kernels[:2]  # two kernel sizes for four heads
    path = node_graph(k, 64, 4, 4, tmp_path / "bad.onnx")
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with pytest.raises(RuntimeError, match="4 heads but 2 kernel sizes"):
        compiled(np.zeros((1, 64, 4, 4), np.float32))


@pytest.mark.slow
def test_kernel_ir_export_matches_pytorch_and_needs_the_extension(core, tmp_path, monkeypatch):
    from effvit.deploy import openvino as ovd

    torch.manual_seed(0)
    size = (190, 250)
    model = randomize(create_model("efficientvit_m0", img_size=size)).eval()
    xml = tmp_path / "m0.kernel.xml"
    assert ovd.export_openvino_kernel(model, xml, size) <= 1e-4  # verified at batch 1 and 3 before renaming
    assert ovd.needs_kernel(xml) and xml.with_suffix(".bin").exists()
    x = torch.randn(16, 3, *size)
    with torch.inference_mode():
        ref = model(x).numpy()
    for batch in (1, 16):
        out = ovd.openvino_predictor(xml, threads=1, batch=batch)(x[:batch].numpy())
        assert np.abs(out - ref[:batch]).max() <= 1e-4
    with pytest.raises(RuntimeError, match="WindowAttention"):  # plain OpenVINO cannot read it
        ov.Core().read_model(str(xml))

    def unavailable():
        raise KernelUnavailable("no C++ compiler")
    monkeypatch.setattr(ovd, "extension_path", unavailable)
    with pytest.raises(KernelUnavailable, match=r"m0.kernel.xml holds effvit's effvit.WindowAttention op.*no C\+\+"):
        ovd.openvino_predictor(xml)


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("EFFVIT_CACHE", str(tmp_path))
    assert find_compiler() is None
    with pytest.raises(KernelUnavailable, match=r"no C\+\+ compiler.*install g\+\+ and cmake"):
        build_extension()
    assert not any(tmp_path.rglob("*.so"))


@pytest.mark.slow
def test_install_without_a_compiler(tmp_path):
    """The install's build step (make kernels) on a machine without a compiler: exit 0, one-line notice."""
    env = {**os.environ, "CXX": "", "EFFVIT_CACHE": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    build = subprocess.run([sys.executable, "-m", "effvit.kernels.cpu"], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert len(build.stdout.splitlines()) == 1 and "not built (" in build.stdout and "no C++ compiler" in build.stdout
    assert not any(tmp_path.rglob("*.so"))


@pytest.mark.slow
def test_export_without_a_compiler_writes_the_standard_ir(tmp_path, monkeypatch):
    """Asked for the kernel IR where the extension cannot be built, the export writes the standard IR and
    says in one line why the kernel IR is missing."""
    from effvit.deploy import openvino as ovd
    from effvit.deploy.exports import export_model

    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("EFFVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ovd, "extension_path", build_extension)  # uncached: sees this environment
    results = export_model(create_model("efficientvit_m0", img_size=64), tmp_path / "out",
                           formats=["openvino-kernel"], verify=False)
    assert [(r.format, r.kept) for r in results] == [("onnx", False), ("openvino", True), ("openvino-kernel", False)]
    line = results[-1].lines[0]
    assert line.startswith("openvino-kernel not written: ") and "no C++ compiler" in line
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert names == ["efficientvit_m0_64x64.bin", "efficientvit_m0_64x64.xml"]
