"""ONNX (opset >= 17, dynamic batch, checked with ONNX Runtime) and TorchScript exports."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from effvit import create_model, fuse
from effvit.bench.weights import randomise_norms
from effvit.cli import main
from effvit.deploy.graph import export_onnx, export_torchscript, verify_onnx


def _model(name: str = "efficientvit_m0", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_norms(create_model(name, **kw)).eval()


@pytest.mark.slow
@torch.no_grad()
def test_onnx_export_verified_dynamic_batch(tmp_path):
    model = _model()
    path = tmp_path / "m0.onnx"
    diff = export_onnx(model, path)
    assert diff is not None and diff <= 1e-4
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert not isinstance(sess.get_inputs()[0].shape[0], int)  # symbolic batch axis
    x = torch.randn(5, 3, 224, 224)
    out = sess.run(None, {"image": x.numpy()})[0]
    assert out.shape == (5, 1000)
    assert (torch.from_numpy(out) - model(x)).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("efficientvit_m2", (320, 192)), ("efficientvit_m1", (96, 80))])
@torch.no_grad()
def test_onnx_non_square_small_maps_and_fused_input(tmp_path, name, size):
    """Padded windows and maps smaller than a window; a fused model exports as it is."""
    model = _model(name)
    path = tmp_path / "m.onnx"
    export_onnx(fuse(model), path, img_size=size, verify=False)
    assert verify_onnx(path, model, size) <= 1e-4  # checked against the unfused model


def test_onnx_rejects_old_opset_and_other_models(tmp_path):
    with pytest.raises(ValueError, match="opset 13 is too old"):
        export_onnx(_model(), tmp_path / "x.onnx", opset=13)
    with pytest.raises(ValueError, match="expected an EfficientViT-M model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


@pytest.mark.slow
@torch.no_grad()
def test_torchscript_export(tmp_path):
    model = _model("efficientvit_m1")
    path = tmp_path / "m1.ts.pt"
    assert export_torchscript(model, path) <= 1e-4
    loaded = torch.jit.load(str(path))
    x = torch.randn(4, 3, 224, 224)
    assert (loaded(x) - model(x)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_export_cli(tmp_path, capsys):
    assert main(["export", "--model", "m0", "--out", str(tmp_path), "--format", "onnx,torchscript"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "efficientvit_m0_224x224.onnx").is_file()
    assert (tmp_path / "efficientvit_m0_224x224.ts.pt").is_file()
    assert out.count("verified with") == 2


def test_export_cli_errors(tmp_path, capsys):
    assert main(["export", "--model", "m0", "--format", "tflite", "--out", str(tmp_path)]) == 2
    assert "unknown format 'tflite'" in capsys.readouterr().err
    assert main(["export", "--model", "m9", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.slow
def test_export_takes_classes_channels_and_size_from_the_checkpoint(tmp_path):
    """What `make demo` does: a grey 64x64 10-class checkpoint exports without restating its shape."""
    from effvit import save_checkpoint

    model = randomise_norms(create_model("efficientvit_m0", num_classes=10, in_chans=1, img_size=64)).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    for suffix in (".pth", ".safetensors"):  # the metadata of either file gives the 64 px grey graph
        ckpt = save_checkpoint(model, tmp_path / f"grey{suffix}")
        out = tmp_path / f"out{suffix}"
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "onnx"]) == 0
        session = ort.InferenceSession(str(out / "efficientvit_m0_64x64.onnx"))
        assert session.get_inputs()[0].shape[1:] == [1, 64, 64]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert abs(got - ref).max() <= 1e-4


@pytest.mark.slow
def test_failed_verification_leaves_no_file(tmp_path, capsys):
    """--atol 0 cannot be met (float rounding): exit 2, and no unverified file at the final name, nor a
    temporary one; an earlier good export at that name is kept."""
    good = tmp_path / "efficientvit_m0_64x64.onnx"
    good.write_bytes(b"an earlier export")
    before = good.read_bytes()
    for fmt in ("onnx", "torchscript"):
        assert main(["export", "--model", "m0", "--img-size", "64", "--format", fmt, "--out", str(tmp_path),
                     "--atol", "0"]) == 2
        assert "it was not written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name] and good.read_bytes() == before


def test_export_refuses_a_size_of_zero(tmp_path, capsys):
    assert main(["export", "--model", "m0", "--img-size", "0", "--out", str(tmp_path)]) == 2
    assert "positive numbers of pixels" in capsys.readouterr().err
