"""``effvit bench`` smoke tests: files, columns, rows. No timing assertions (speed lives in benchmarks/)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from effvit.bench.throughput import COLUMNS
from effvit.bench.timing import alternate, cpu_peak_flops, pick_fastest
from effvit.cli import main

FAST = ["--seconds", "0.05", "--warmup", "0", "--rounds", "2", "--probe", "0.02", "--img-size", "64",
        "--peak-seconds", "0.1"]


@pytest.mark.slow
def test_bench_cli_vs_timm(tmp_path, capsys):
    rc = main(["bench", "--models", "m0", "--scenarios", "cpu1,ort", "--vs", "timm", "--out", str(tmp_path),
               *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert "vs timm" in out and "efficientvit_m0" in out
    with open(tmp_path / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert [(r["scenario"], r["impl"]) for r in rows] == [
        ("cpu1", "effvit"), ("cpu1", "timm"), ("ort", "effvit"), ("ort", "timm")]
    for r in rows:
        assert float(r["img_s"]) > 0 and float(r["ms_batch"]) > 0
        assert float(r["max_abs_diff"]) <= 1e-4  # both implementations, same weights, same outputs
        assert r["batch"] == "16" and r["threads"] == "1"
    assert float(rows[0]["ratio_vs_timm"]) > 0 and rows[1]["ratio_vs_timm"] == ""
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert {"cpu", "torch", "timm", "onnxruntime", "cpu_peak_gflops", "date"} <= set(meta)
    assert (tmp_path / "bench.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_cli_options(tmp_path):
    rc = main(["bench", "--models", "m1", "--scenarios", "cpu1", "--batch", "2", "--threads", "1",
               "--no-plot", "--out", str(tmp_path), *FAST])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert len(rows) == 1 and rows[0]["impl"] == "effvit" and rows[0]["batch"] == "2"
    assert rows[0]["form"] in ("fused", "fused+trace")
    assert not (tmp_path / "bench.png").exists()


def test_bench_cli_errors(tmp_path, capsys):
    assert main(["bench", "--scenarios", "tpu", "--out", str(tmp_path)]) == 2
    assert "unknown scenario 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--scenarios", "gpu", "--out", str(tmp_path)]) == 2
        assert "GPU scenarios need CUDA" in capsys.readouterr().err
    assert main(["bench", "--models", "m0", "--seconds", "0", "--out", str(tmp_path)]) == 2


def test_pick_fastest_skips_broken_forms():
    def broken():
        raise RuntimeError("no such form")

    with pytest.warns(UserWarning, match="'broken' unavailable"):
        name, fn, med = pick_fastest({"ok": lambda: (lambda: 1), "broken": broken}, 0.01, torch.device("cpu"))
    assert name == "ok" and fn() == 1
    timings = alternate({"a": lambda: None, "b": lambda: None}, 0.01, 2, torch.device("cpu"))
    assert set(timings) == {"a", "b"} and all(len(t.times) >= 4 for t in timings.values())


def test_pick_fastest_drops_forms_with_wrong_outputs():
    ref = torch.ones(2, 3)
    forms = {"right": lambda: (lambda: ref + 1e-4), "wrong": lambda: (lambda: ref * 2),
             "nan": lambda: (lambda: ref * float("nan"))}
    with pytest.warns(UserWarning, match="'wrong' dropped: wrong outputs, max abs difference 1 "):
        name, _, med = pick_fastest(forms, 0.01, torch.device("cpu"), reference=ref, tol=1e-3)
    assert name == "right" and set(med) == {"right"}
    with pytest.raises(ValueError, match=r"wrong outputs from wrong \(max abs diff 1 > 0.001\), nan"):
        pick_fastest({k: forms[k] for k in ("wrong", "nan")}, 0.01, torch.device("cpu"), reference=ref,
                     tol=1e-3)


def test_cpu_peak_flops_is_the_best_sgemm_rate_on_the_asked_threads(monkeypatch):
    """2 n^3 FLOPs per n x n product over the fastest timed run (the first is warm-up), measured on the
    asked number of threads, which are restored afterwards."""
    import effvit.bench.timing as bench

    seen = {}

    def fake_times(fn, seconds, device, min_iters=2):
        out = fn()
        seen.update(threads=torch.get_num_threads(), shape=tuple(out.shape), seconds=seconds)
        return [0.001, 0.004, 0.002, 0.003]  # the warm-up would look fastest

    before = torch.get_num_threads()
    threads = 2 if before == 1 else 1
    monkeypatch.setattr(bench, "time_forward", fake_times)
    assert cpu_peak_flops(threads, n=64, seconds=0.5) == pytest.approx(2 * 64 ** 3 / 0.002)
    assert seen == {"threads": threads, "shape": (64, 64), "seconds": 0.5}
    assert torch.get_num_threads() == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forms_match_eager_and_graphs_follow_their_input(tmp_path):
    import timm

    from effvit.bench.forms import effvit_forms, timm_forms
    from effvit.bench.weights import randomise_norms
    from effvit.models import create_model

    model = randomise_norms(create_model("efficientvit_m0")).eval().cuda()
    tm = timm.create_model("efficientvit_m0")
    tm.load_state_dict(model.state_dict())
    tm.eval().cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        ref = model(x)
    scale = ref.abs().max().item()
    forms = {f"effvit {k}": v for k, v in effvit_forms(model, x, torch.float16).items()}
    forms |= {f"timm {k}": v for k, v in timm_forms(tm, x, torch.float16).items()}
    assert "effvit fused+cudagraph" in forms and "timm reparam+cudagraph" in forms
    for name, make in forms.items():
        run = make()
        diff = (run().float() - ref).abs().max().item()
        assert diff <= 0.02 * scale, f"{name}: fp16 output differs by {diff} (logits up to {scale})"
        if name.endswith("cudagraph"):  # a replay reads the captured input buffer's current contents
            x.mul_(-1)
            with torch.inference_mode():
                ref2 = model(x)
            diff2 = (run().float() - ref2).abs().max().item()
            x.mul_(-1)
            assert diff2 <= 0.02 * scale, f"{name}: replay after a new input differs by {diff2}"
    rc = main(["bench", "--device", "cuda", "--models", "m0", "--batch", "8", "--vs", "timm", "--no-plot",
               "--out", str(tmp_path), *FAST])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [(r["scenario"], r["impl"]) for r in rows] == [
        ("gpu", "effvit"), ("gpu", "timm"), ("gpu-bf16", "effvit"), ("gpu-bf16", "timm")]
    assert all(float(r["img_s"]) > 0 for r in rows)


@pytest.mark.slow
def test_bench_model_restores_threads_and_cudnn_and_rows_describe_the_run():
    from effvit.bench.throughput import BenchSettings, bench_model

    before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    threads = 2 if before[0] == 1 else 1
    settings = BenchSettings(seconds=0.02, rounds=2, warmup=0, probe=0.01, img_size=64, batch=2)
    peak = 1e9  # a small peak, so that the fraction is far from 0 when this machine is busy
    rows = bench_model("efficientvit_m0", "cpu1", threads, settings, peak=peak)
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark) == before
    [row] = rows
    assert row["model"] == "efficientvit_m0" and row["impl"] == "effvit" and row["threads"] == threads
    assert row["batch"] == 2 and row["img_s"] > 0 and row["max_abs_diff"] <= 1e-3
    assert row["peak_frac"] == pytest.approx(row["macs_m"] * 1e6 * 2 * row["img_s"] / peak, rel=0.01, abs=1e-3)


@pytest.mark.slow
def test_compiled_forms_leave_inductor_settings_alone():
    """Freezing is the compiled form's own option: nothing else compiled in the process gets it."""
    import torch._inductor.config as inductor_config

    from effvit.bench.forms import _compiled

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    with torch.inference_mode():
        out = _compiled(model)(x)
        assert torch.allclose(out, model(x), atol=1e-5)
    assert inductor_config.freezing is False
