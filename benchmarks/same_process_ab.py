"""The fused model of this tree against another checkout's, both in ONE process, timed alternately.

    git worktree add /tmp/ref 9fce5b3
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/same_process_ab.py --ref-tree /tmp/ref --rounds 50

``against_ref.py`` runs each tree in its own worker process; on a noisy host a whole process can run a few
percent slow or fast for its lifetime, which shows as a row that moves between runs of the same code. Here
both trees' models live in one process (the reference tree is imported first, its ``effvit`` modules are
dropped from ``sys.modules``, then this tree is imported), built by ``against_ref.effvit_forward`` with
the same weights and input, and each round times both, in alternating order. Batch 1: eager, traced
(frozen TorchScript) and ONNX Runtime (1 thread); prints a markdown table of medians and the median of
the per-round ratios (> 1: this tree is faster).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from against_ref import FORMS, effvit_forward

REPO = Path(__file__).resolve().parents[1]


def build(tree: Path, variant: str, x: torch.Tensor) -> dict:
    """Each form's zero-argument forward, from the ``effvit`` package of ``tree``."""
    for name in [k for k in sys.modules if k == "effvit" or k.startswith("effvit.")]:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        found = Path(importlib.import_module("effvit").__file__).resolve()
        if not found.is_relative_to(tree):  # e.g. an installed effvit answered instead
            raise SystemExit(f"effvit imported from {found}, not from {tree}; is {tree} a checkout?")
        return {form: effvit_forward(variant, x, form, tempfile.mkdtemp()) for form in FORMS}
    finally:
        sys.path.remove(str(tree))


def seconds_per_call(fn, seconds: float) -> float:
    fn()
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-tree", required=True, type=Path, help="a checkout of the revision to compare with")
    p.add_argument("--variants", default="m0,m1,m2,m3,m4,m5")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--seconds", type=float, default=0.2, help="per model per round")
    args = p.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    print("| variant | form | ref ms | this ms | this / ref |")
    print("|---|---|---|---|---|")
    for short in args.variants.split(","):
        variant = f"efficientvit_{short}"
        ref, ours = build(args.ref_tree.resolve(), variant, x), build(REPO.resolve(), variant, x)
        with torch.inference_mode():
            diff = (ours["eager"]() - ref["eager"]()).abs().max().item()
            if diff > 1e-3:
                raise SystemExit(f"{variant}: the two trees disagree (max abs diff {diff:.2g}); not comparable")
            for form in FORMS:
                times: dict[str, list[float]] = {"this": [], "ref": []}
                for i in range(args.rounds):
                    order = (("this", ours), ("ref", ref)) if i % 2 == 0 else (("ref", ref), ("this", ours))
                    for name, forwards in order:
                        times[name].append(seconds_per_call(forwards[form], args.seconds))
                ratio = statistics.median(r / t for r, t in zip(times["ref"], times["this"]))
                print(f"| {short} | {form} | {statistics.median(times['ref']) * 1e3:.2f} | "
                      f"{statistics.median(times['this']) * 1e3:.2f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
