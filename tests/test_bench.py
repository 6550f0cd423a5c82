"""``effvit bench`` smoke tests: files, columns, rows. No timing assertions (speed lives in benchmarks/)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from effvit.cli import main
from effvit.cli.bench import COLUMNS
from effvit.fast.benchmark import alternate, cpu_peak_flops, pick_fastest

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


def test_cpu_peak_flops_positive():
    assert cpu_peak_flops(1, n=128, seconds=0.05) > 1e8
