"""benchmarks/gpu_session.sh, the script a lent GPU runs, checked here without one: its syntax, its parts'
selection and time budget, and what it hands back (two files: the packed logs and the summary)."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/gpu_session.sh"


def test_scripts_parse():
    for script in (SCRIPT, ROOT / "benchmarks/gpu_bisect/gpu_sweep.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def _dry_run(tmp_path: Path, parts: str, budget: int) -> tuple[str, Path]:
    """The script with ``echo`` for python: every command line is logged instead of run."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON="echo", PARTS=parts, BUDGET=str(budget))
    run = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout, out


def test_dry_run_runs_the_chosen_parts_and_hands_back_two_files(tmp_path):
    stdout, out = _dry_run(tmp_path, "tests kernel train", 400)
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "summary.txt"]
    for name in ("tests", "kernel", "train"):
        assert f"{name}: exit 0" in stdout
    assert "bisect" not in stdout and "bench_fp16" not in stdout
    with tarfile.open(out / "logs.tgz") as tar:
        kernel = tar.extractfile("logs/kernel.log").read().decode()
        tests = tar.extractfile("logs/tests.log").read().decode()
    assert "kernel_speed.py --device cuda" in kernel and "--batch 2048,1 --dtype fp16" in kernel
    assert "--batch 2048 --dtype bf16" in kernel
    assert "-m pytest" in tests and "cuda or kernels" in tests


def test_parts_that_no_longer_fit_are_skipped(tmp_path):
    stdout, _ = _dry_run(tmp_path, "tests kernel", 10)
    assert "tests: skipped" in stdout and "kernel: skipped" in stdout


def test_bisect_sweep_keeps_to_its_budget(tmp_path):
    """Each run's own timeout is cut to the sweep's budget and runs that no longer fit are skipped (an
    outer timeout would not reach them)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho \"$@\"\n")
    (fake / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    sweep = ["bash", str(ROOT / "benchmarks/gpu_bisect/gpu_sweep.sh")]
    subprocess.run(sweep + [str(tmp_path / "all")], cwd=ROOT, env=env, check=True, capture_output=True)
    ran = (tmp_path / "all/parts.txt").read_text().splitlines()
    assert len(ran) == 12 and all(line.endswith("rc=0") for line in ran)
    assert "efficientvit_m0 2048 fp16" in (tmp_path / "all/m0_fp16_ops.log").read_text()
    subprocess.run(sweep + [str(tmp_path / "none")], cwd=ROOT, env=dict(env, SWEEP_BUDGET="10"), check=True,
                   capture_output=True)
    assert all("skipped" in line for line in (tmp_path / "none/parts.txt").read_text().splitlines())
