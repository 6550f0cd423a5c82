"""CPU deployment: int8 quantization of the ONNX export, OpenVINO IR, bf16 detection, the deploy bench.

Small models at 64 px keep these fast; speed is never asserted (it lives in benchmarks/)."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from effvit import create_model, save_checkpoint
from effvit.bench.weights import randomise_norms
from effvit.cli import main
from effvit.deploy import cpuinfo
from effvit.deploy.calibration import batches, image_sets
from effvit.deploy.exports import build_export_model, export_model
from effvit.deploy.graph import export_onnx
from effvit.deploy.openvino import export_openvino, openvino_predictor, verify_openvino
from effvit.deploy.quantize import compare_predictions, ort_predictor, quantize_onnx
from effvit.kernels.cpu import available as kernel_available

SIZE = 64
FASHION = {"dataset": "fashion_mnist", "mean": [0.286], "std": [0.353], "crop_pct": 1.0,
           "interpolation": "bicubic"}


def _grey_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise_norms(create_model("efficientvit_m0", num_classes=10, in_chans=1, img_size=SIZE),
                           seed).eval()


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    model = _grey_model()
    path = tmp_path_factory.mktemp("int8") / "m0.onnx"
    export_onnx(model, path, SIZE)
    return model, path


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, SIZE, SIZE)).astype(np.float32)


def _dequantized_inputs(path) -> dict[str, int]:
    """How many nodes of each op type read a dequantized (int8) tensor in the QDQ file."""
    graph = onnx.load(str(path)).graph
    deq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: dict[str, int] = {}
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in deq for i in n.input):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


@pytest.mark.slow
def test_quantize_conv_gemm_only_and_agreement(fp32_onnx, tmp_path):
    model, fp32 = fp32_onnx
    int8 = tmp_path / "m0.int8.onnx"
    n = quantize_onnx(fp32, int8, [_images(8, 1), _images(8, 2)])
    assert n == 16
    consumers = _dequantized_inputs(int8)
    convs = sum(1 for node in onnx.load(str(fp32)).graph.node if node.op_type == "Conv")
    # every conv and the head's GEMM compute in int8; the attention products and softmax stay fp32
    assert consumers.get("Conv") == convs and consumers.get("Gemm", 0) >= 1
    assert "MatMul" not in consumers and "Softmax" not in consumers
    x = _images(64, 3)
    ref = ort_predictor(fp32)(x)
    with torch.no_grad():
        assert np.abs(ref - model(torch.from_numpy(x)).numpy()).max() <= 1e-4
    labels = ref.argmax(1)  # fp32's answers as labels: accuracy 100% for fp32, the agreement for int8
    a = compare_predictions(ort_predictor(fp32), ort_predictor(int8), [(x[:32], labels[:32]), (x[32:], labels[32:])])
    assert a.images == 64 and a.agreement >= 0.9
    assert a.top1_ref == 100.0 and a.top1 == pytest.approx(100 * a.agreement)
    assert a.delta == pytest.approx(a.top1 - 100.0) and 0 < a.max_abs_diff < 0.5 * np.abs(ref).max()
    assert "agreement" in a.summary() and "points" in a.summary()
    both = compare_predictions(ort_predictor(fp32), {"fp32": ort_predictor(fp32), "int8": ort_predictor(int8)},
                               [(x, None)])
    assert both["fp32"].agreement == 1.0 and both["fp32"].top1 is None
    assert both["int8"].agreement == a.agreement


@pytest.mark.slow
def test_quantize_more_ops_quantizes_the_attention_products(fp32_onnx, tmp_path):
    _, fp32 = fp32_onnx
    path = tmp_path / "mm.onnx"
    quantize_onnx(fp32, path, [_images(4, 1)], ops=["Conv", "Gemm", "MatMul"], method="percentile")
    assert _dequantized_inputs(path).get("MatMul", 0) > 0


@pytest.mark.slow
def test_quantize_errors(fp32_onnx, tmp_path):
    _, fp32 = fp32_onnx
    with pytest.raises(ValueError, match="no LSTM nodes"):
        quantize_onnx(fp32, tmp_path / "x.onnx", [_images(2, 0)], ops=["Conv", "LSTM"])
    with pytest.raises(ValueError, match="unknown calibration method"):
        quantize_onnx(fp32, tmp_path / "x.onnx", [_images(2, 0)], method="median")
    with pytest.raises(ValueError, match="no op types"):
        quantize_onnx(fp32, tmp_path / "x.onnx", [_images(2, 0)], ops=[])
    with pytest.raises(ValueError, match="no calibration images"):
        quantize_onnx(fp32, tmp_path / "x.onnx", iter([]))
    with pytest.raises(ValueError, match="do not combine"):
        quantize_onnx(fp32, tmp_path / "x.onnx", [_images(2, 0)], ops=["all", "Conv"])
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ValueError, match="no held-out images"):
        compare_predictions(ort_predictor(fp32), ort_predictor(fp32), [])


@pytest.mark.slow
def test_openvino_ir_parity(fp32_onnx, tmp_path):
    model, fp32 = fp32_onnx
    xml = tmp_path / "m0.xml"
    assert export_openvino(fp32, xml, model, SIZE) <= 1e-4  # checked before it takes its name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.bin", "m0.xml"]
    assert verify_openvino(xml, model, SIZE) <= 1e-4
    x = _images(3, 5)
    fixed = openvino_predictor(xml, threads=1, batch=3)(x)  # static batch, as the bench runs it
    with torch.no_grad():
        assert np.abs(fixed - model(torch.from_numpy(x)).numpy()).max() <= 1e-4
    with pytest.raises(ValueError, match=r"\.xml"):
        export_openvino(fp32, tmp_path / "m0.ir")
    ir = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="it was not written"):  # atol 0: float rounding fails the check
        export_openvino(fp32, xml, model, SIZE, atol=0)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == ir  # the earlier IR kept, nothing else left
    with pytest.raises(ValueError, match="unknown OpenVINO precision"):
        openvino_predictor(xml, precision="f16")


def test_cpu_flag_detection(monkeypatch):
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n"
    flags = cpuinfo.cpu_flags(text)
    assert {"avx2", "amx_bf16"} <= flags
    assert cpuinfo.bf16_unit(flags) == "amx_bf16" and cpuinfo.int8_unit(flags) == "amx_int8"
    assert cpuinfo.bf16_unit({"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert cpuinfo.bf16_unit({"avx2", "fma"}) is None and cpuinfo.int8_unit({"avx2"}) == "avx2"
    assert cpuinfo.cpu_flags("no flags here") == set()
    # without the units, bf16 is refused with the reason instead of being emulated
    monkeypatch.setattr("effvit.deploy.openvino.bf16_unit", lambda: None)
    with pytest.raises(ValueError, match="AMX or AVX512-BF16"):
        openvino_predictor("unused.xml", precision="bf16")


@pytest.mark.slow
@pytest.mark.skipif(cpuinfo.bf16_unit() is None, reason="this CPU has no AMX/AVX512-BF16 units: bf16 is not run")
def test_openvino_bf16_close_to_fp32(fp32_onnx, tmp_path):
    _, fp32 = fp32_onnx
    xml = tmp_path / "m0.xml"
    assert export_openvino(fp32, xml) is None  # not verified without a model
    x = _images(32, 6)
    a = compare_predictions(ort_predictor(fp32), openvino_predictor(xml, 1, "bf16"), [(x, None)])
    assert a.agreement >= 0.9 and a.max_abs_diff > 0  # really ran in reduced precision


def _folder(path, n: int, corrupt: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(path / f"{i:03d}.png")
    if corrupt:
        (path / "broken.png").write_bytes(b"\x89PNG not really")
    return path


@pytest.mark.slow
def test_export_cli_int8_and_openvino_from_a_folder(tmp_path, capsys):
    ckpt = save_checkpoint(_grey_model(), tmp_path / "grey.pth", meta=FASHION)
    calib = _folder(tmp_path / "calib", 12)
    out = tmp_path / "out"
    stem = "efficientvit_m0_64x64"
    out.mkdir()
    (out / f"{stem}.onnx").write_bytes(b"an earlier export")
    rc = main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "openvino", "--int8",
               "--calib", str(calib), "--check-images", "64", "--min-agreement", "0.8"])
    assert rc == 0
    text = capsys.readouterr().out
    names = {f"{stem}.onnx", f"{stem}.xml", f"{stem}.bin", f"{stem}.int8.onnx", f"{stem}.int8.json",
             f"{stem}.int8.xml", f"{stem}.int8.bin"}
    assert {p.name for p in out.iterdir()} == names  # no temporary files left
    # the conversion's ONNX input (not asked for) was written aside: an earlier export of that name is kept
    assert (out / f"{stem}.onnx").read_bytes() == b"an earlier export"
    assert "skipped 1 unreadable" in text and "calibrated on 12 images" in text
    assert "verified with OpenVINO f32" in text
    # the checkpoint's dataset is labelled: the check runs on its test images and prints the accuracy change
    assert "64 held-out images" in text and "points" in text
    assert text.count("top-1 agreement") >= 2  # ONNX Runtime int8 and OpenVINO int8


@pytest.mark.slow
def test_export_cli_int8_from_the_checkpoint_data_and_rejection(tmp_path, capsys):
    ckpt = save_checkpoint(_grey_model(), tmp_path / "grey.pth", meta=FASHION)
    out = tmp_path / "out"
    args = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "onnx", "--int8",
            "--calib-images", "16", "--check-images", "32"]
    assert main([*args, "--min-agreement", "0"]) == 0
    text = capsys.readouterr().out
    assert "calibration on training images, check on the Fashion-MNIST test set" in text
    assert "32 held-out images" in text
    int8 = out / "efficientvit_m0_64x64.int8.onnx"
    assert int8.is_file()
    kept, files = int8.read_bytes(), sorted(p.name for p in out.iterdir())
    assert main([*args, "--min-agreement", "1.01"]) == 2
    assert "int8 model rejected" in capsys.readouterr().err
    # a rejected file is not left behind, nor does it replace the earlier accepted one
    assert int8.read_bytes() == kept and sorted(p.name for p in out.iterdir()) == files
    assert (out / "efficientvit_m0_64x64.onnx").is_file()  # the fp32 export stays


@pytest.mark.slow
def test_export_model_returns_each_export_as_it_is_done(tmp_path):
    model = _grey_model()
    calib = _folder(tmp_path / "calib", 12, corrupt=False)
    seen = []
    results = export_model(model, tmp_path / "out", formats=["openvino"], int8=True, calib=calib,
                           check_images=32, min_agreement=0.8, on_result=seen.append)
    assert seen == results
    stem = tmp_path / "out" / "efficientvit_m0_64x64"
    assert [r.format for r in results][:3] == ["onnx", "int8", "openvino"]
    assert [r.format for r in results][3:] == ["openvino-check"] * (2 if cpuinfo.bf16_unit() else 1)
    onnx_input, int8, ir = results[:3]
    assert not onnx_input.kept and not onnx_input.path.exists()  # the conversion's input, written aside
    assert onnx_input.max_abs_diff is not None and onnx_input.max_abs_diff <= 1e-4
    assert int8.path == stem.with_suffix(".int8.onnx") and int8.path.is_file()
    assert json.loads(stem.with_suffix(".int8.json").read_text()) == int8.record
    # no dataset in the model's metadata: the folder is split into calibration and held-out images
    assert int8.record["calibration_images"] + int8.agreement.images == 12 == len(list(calib.iterdir()))
    assert ir.path == stem.with_suffix(".xml") and ir.path.is_file() and ir.max_abs_diff <= 1e-4
    assert results[3].path == stem.with_suffix(".int8.xml") and results[3].agreement.agreement >= 0.8
    assert all(r.lines for r in results) and "int8" in int8.lines[0]
    with pytest.raises(ValueError, match="unknown format 'tflite'"):
        export_model(model, tmp_path / "none", formats=["tflite"])
    assert not (tmp_path / "none").exists()


def test_build_export_model_from_a_checkpoint_or_a_name(tmp_path):
    ckpt = save_checkpoint(_grey_model(), tmp_path / "grey.pth", meta=FASHION)
    loaded = build_export_model(checkpoint=ckpt)
    assert loaded.img_size == (SIZE, SIZE) and loaded.in_chans == 1 and loaded.num_classes == 10
    fresh = build_export_model("m1", num_classes=3, img_size=[48, 32])
    assert fresh.variant == "efficientvit_m1" and fresh.img_size == (48, 32) and fresh.num_classes == 3
    assert build_export_model().img_size == (224, 224)
    with pytest.raises(ValueError, match="positive numbers of pixels"):
        build_export_model(img_size=[0])


def test_int8_needs_images(tmp_path, capsys):
    ckpt = save_checkpoint(_grey_model(), tmp_path / "plain.pth")  # no dataset in its metadata
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path), "--int8"]) == 2
    assert "--calib DIR" in capsys.readouterr().err
    one = _folder(tmp_path / "one", 1, corrupt=False)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path), "--int8", "--calib", str(one)]) == 2
    assert "at least two" in capsys.readouterr().err


def test_image_sets_fashion_mnist_split():
    model = _grey_model()
    model.pretrained_cfg["dataset"] = "fashion_mnist"  # as load_model reads it from a training checkpoint
    tf = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32)[None] / 255)
    sets = image_sets(model, tf, calibration_images=8, held_out_images=20)
    assert sets.labelled and len(sets.calibration_idx) == 8 and len(sets.held_out_idx) == 20
    assert len(sets.held_out) == 10000  # the test split; calibration comes from the training split
    x, y = next(batches(sets.held_out, sets.held_out_idx, 20))
    assert x.shape == (20, 1, 28, 28) and x.dtype == np.float32 and y.shape == (20,)
    with pytest.raises(ValueError, match="at least one image"):
        image_sets(model, tf, calibration_images=0)


def test_ort_peak_ops():
    from effvit.bench.runtimes import ort_peak_ops

    assert ort_peak_ops(1, "int8", n=256, seconds=0.05) > 1e8
    assert ort_peak_ops(1, "fp32", n=256, seconds=0.05) > 1e8
    with pytest.raises(ValueError, match="int8 or fp32"):
        ort_peak_ops(1, "fp16")


@pytest.mark.slow
def test_bench_deploy_and_latency_scenarios(tmp_path, capsys):
    fast = ["--seconds", "0.02", "--warmup", "0", "--rounds", "2", "--probe", "0.01", "--img-size", "32",
            "--peak-seconds", "0.05", "--no-plot"]
    assert main(["bench", "--models", "m0", "--scenarios", "deploy,latency", "--vs", "timm", "--batch", "4",
                 "--out", str(tmp_path), *fast]) == 0
    text = capsys.readouterr().out
    assert "CPU peak int8" in text and "p90 ms" in text
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    forms = {"torch fp32", "ort fp32", "ort int8", "openvino fp32", "openvino int8"}
    kernel = {"openvino-kernel fp32"} if kernel_available()[0] else set()  # effvit's C++ attention kernel
    if cpuinfo.bf16_unit():
        forms |= {"torch bf16", "openvino bf16"}
        kernel |= {"openvino-kernel bf16"} if kernel else set()
    for scenario, batch in (("deploy", "4"), ("latency", "1")):
        for impl in ("effvit", "timm"):
            mine = [r for r in rows if r["scenario"] == scenario and r["impl"] == impl]
            assert {r["form"] for r in mine} == (forms | kernel if impl == "effvit" else forms)
            assert sum(r["best"] == "True" for r in mine) == 1
            for r in mine:
                assert r["batch"] == batch and float(r["ms_batch"]) > 0
                assert float(r["p90_ms"]) >= float(r["ms_batch"]) and float(r["ratio_vs_timm"]) > 0
                tol = 1e-4 if r["precision"] == "fp32" else 0.5  # int8/bf16: reduced precision, same model
                assert float(r["max_abs_diff"]) <= tol, r
