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
