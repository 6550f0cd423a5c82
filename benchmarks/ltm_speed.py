"""Token merging: MACs, parameters and deployed CPU throughput against the unmerged model and the two
equal-MAC baselines (lower input resolution; fixed area-pool merge).

    OMP_NUM_THREADS=1 python benchmarks/ltm_speed.py --variants efficientvit_m0 --sizes 112 224
    python benchmarks/ltm_speed.py --macs-only            # the MACs table alone (seconds)

Every form is the fused model (``effvit.fuse``); ONNX Runtime runs its export. Forms are timed in
alternating rounds (one form after the other, ``--rounds`` times) and the median per form is reported,
with its ratio to the unmerged model of the same round set. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import torch

import effvit
from effvit.models.complexity import count_macs


def equal_mac_size(variant: str, macs: float, size: int) -> int:
    """The input side (at most ``size``) whose unmerged MACs are closest to ``macs``."""
    best, best_err = size, float("inf")
    for s in range(16, size + 1, 2):
        err = abs(count_macs(effvit.create_model(variant), s) - macs)
        if err < best_err:
            best, best_err = s, err
    return best


def forms(variant: str, size: int, keeps: list[float]) -> list[tuple[str, dict, int]]:
    """(label, create_model kwargs, input side) of each form compared."""
    out = [("unmerged", {}, size)]
    out += [(f"ltm {k}", dict(ltm=k), size) for k in keeps]
    out.append(("pool 0.8", dict(ltm=0.8, ltm_mode="pool"), size))
    target = count_macs(effvit.create_model(variant, ltm=0.8), size)
    low = equal_mac_size(variant, target, size)
    out.append((f"unmerged {low} px", {}, low))
    return out


def time_call(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def runners(model: torch.nn.Module, size: int, batch: int):
    """Callables of the fused model (PyTorch, batch ``batch`` and 1) and its ONNX Runtime export (batch 1)."""
    import onnxruntime as ort

    fused = effvit.fuse(model.eval())
    xb = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    x1 = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(fused, x1, buf, input_names=["x"], output_names=["y"], dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    x1n = np.ascontiguousarray(x1.numpy())

    def torch_run(x):
        def run():
            with torch.inference_mode():
                fused(x)
        return run

    return {f"torch b{batch}": (torch_run(xb), batch), "torch b1": (torch_run(x1), 1),
            "ort b1": (lambda: sess.run(None, {"x": x1n}), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["efficientvit_m0", "efficientvit_m4"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[112, 224])
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.9, 0.8, 0.7])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--macs-only", action="store_true")
    ap.add_argument("--json", help="also write the rows here (for benchmarks/ltm_plot.py)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; medians of {args.rounds} alternating rounds x {args.reps} calls")
    table = []
    for variant in args.variants:
        for size in args.sizes:
            rows = forms(variant, size, args.keeps)
            base_macs = count_macs(effvit.create_model(variant), size)
            models = {label: effvit.create_model(variant, **kw) for label, kw, _ in rows}
            results: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in rows}
            if not args.macs_only:
                calls = {label: runners(models[label], s, args.batch) for label, _, s in rows}
                for _ in range(args.rounds):
                    for label, _, _ in rows:
                        for name, (fn, n) in calls[label].items():
                            results[label].setdefault(name, []).append(n / time_call(fn, args.reps))
            cols = list(next(iter(results.values())).keys())
            print(f"\n{variant} at {size} px (throughput: images/s, ratio to unmerged)\n")
            print("| form | input | params | MMACs | MACs vs unmerged | " + " | ".join(cols) + " |")
            print("|---" * (5 + len(cols)) + "|")
            for label, _, s in rows:
                m = models[label]
                macs = count_macs(m, s)
                cells = []
                for c in cols:
                    med = statistics.median(results[label][c])
                    ref = statistics.median(results["unmerged"][c])
                    cells.append(f"{med:.0f} ({med / ref:.2f}x)")
                params = sum(p.numel() for p in m.parameters())
                table.append(dict(variant=variant, size=size, form=label, input=s, params=params, macs=macs,
                                  **{c: statistics.median(results[label][c]) for c in cols}))
                print(f"| {label} | {s} | {params / 1e6:.4f} M | {macs / 1e6:.1f} | {macs / base_macs:.3f} | "
                      + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
