"""The fused model of this tree against another checkout's, both in ONE process, timed alternately.

    git worktree add /tmp/ref 9fce5b3
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/same_process_ab.py --ref-tree /tmp/ref --rounds 20

``against_ref.py`` runs each tree in its own worker process; on a noisy host a whole process can run a few
percent slow or fast for its lifetime, which shows as a row that moves between runs of the same code. Here
both trees' models live in one process (the reference tree is imported first, its ``effvit`` modules are
dropped from ``sys.modules``, then this tree is imported), with the same weights and input, and each round
times both, in alternating order. Batch 1: eager, traced (frozen TorchScript) and each tree's ONNX export in
ONNX Runtime (1 thread); prints a markdown table of medians and the median of the per-round ratios (> 1:
this tree is faster).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]


def build(tree: Path, variant: str, x: torch.Tensor) -> tuple:
    """The fused model, its traced form and its ONNX Runtime session, from the ``effvit`` of ``tree``."""
    for name in [k for k in sys.modules if k == "effvit" or k.startswith("effvit.")]:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        effvit = importlib.import_module("effvit")
        try:
            randomise_norms = importlib.import_module("effvit.bench.weights").randomise_norms
        except ImportError:  # a revision from before the harness left effvit.fast
            randomise_norms = importlib.import_module("effvit.fast.benchmark").randomise_norms
        export_onnx = importlib.import_module("effvit.fast.export").export_onnx
    finally:
        sys.path.remove(str(tree))
    torch.manual_seed(0)
    model = randomise_norms(effvit.create_model(variant)).eval()
    fused = effvit.fuse(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode():
            traced = torch.jit.freeze(torch.jit.trace(fused, x))
        path = str(Path(tempfile.mkdtemp()) / f"{variant}.onnx")
        try:
            export_onnx(model, path, img_size=tuple(x.shape[-2:]), verify=False, layout="nchw")
        except TypeError:  # this tree: one graph, no layout choice
            export_onnx(model, path, img_size=tuple(x.shape[-2:]), verify=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.contiguous().numpy()}
    return fused, traced, lambda _: session.run(None, feed)


def seconds_per_call(fn, x: torch.Tensor, seconds: float) -> float:
    fn(x)
    fn(x)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn(x)
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-tree", required=True, type=Path, help="a checkout of the revision to compare with")
    p.add_argument("--variants", default="m0,m1,m2,m3,m4,m5")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seconds", type=float, default=0.2, help="per model per round")
    args = p.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    print("| variant | form | ref ms | this ms | this / ref |")
    print("|---|---|---|---|---|")
    for short in args.variants.split(","):
        variant = f"efficientvit_{short}"
        ref = build(args.ref_tree.resolve(), variant, x)
        ours = build(REPO, variant, x)
        with torch.inference_mode():
            diff = (ours[0](x) - ref[0](x)).abs().max().item()
            if diff > 1e-3:
                raise SystemExit(f"{variant}: the two trees disagree (max abs diff {diff:.2g}); not comparable")
            for form, label in enumerate(("eager", "traced", "onnx")):
                times: dict[str, list[float]] = {"this": [], "ref": []}
                for i in range(args.rounds):
                    order = (("this", ours), ("ref", ref)) if i % 2 == 0 else (("ref", ref), ("this", ours))
                    for name, models in order:
                        times[name].append(seconds_per_call(models[form], x, args.seconds))
                ratio = statistics.median(r / t for r, t in zip(times["ref"], times["this"]))
                print(f"| {short} | {label} | {statistics.median(times['ref']) * 1e3:.2f} | "
                      f"{statistics.median(times['this']) * 1e3:.2f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
