"""``effvit bench``: inference throughput by the paper's protocol, optionally against timm (scenarios and
protocol: effvit.bench.throughput)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from effvit.bench.throughput import ALL_SCENARIOS, BenchSettings, report_lines, run_bench, save_bench


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference throughput (paper protocol), optionally vs timm")
    p.add_argument("--models", default="all", help="comma-separated variants (m0,m4) or 'all'")
    p.add_argument("--scenarios", default=None,
                   help=f"comma-separated among {', '.join(ALL_SCENARIOS)} "
                        "(default: the CPU ones, plus the GPU ones when CUDA is used)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CPU scenarios, and GPU ones when CUDA is present")
    p.add_argument("--batch", type=int, default=None, help="batch size for every scenario "
                   "(default: 16 on CPU, 2048 on GPU)")
    p.add_argument("--threads", type=int, default=1, help="threads of the cpu1 and ort scenarios")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per implementation "
                   "and scenario, split over --rounds alternating rounds")
    p.add_argument("--rounds", type=int, default=10,
                   help="alternating rounds; the ratio is the median of the per-round ratios")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before timing")
    p.add_argument("--probe", type=float, default=None,
                   help="seconds per candidate form when picking each side's fastest (default seconds/5)")
    p.add_argument("--peak-seconds", type=float, default=2.0,
                   help="seconds of 2048^3 matmuls measuring the CPU's peak FLOP/s")
    p.add_argument("--vs", default=None, choices=["timm"], help="also run timm's implementation")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile forms (inductor; minutes of compilation per model)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.csv, bench.json, bench.png")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = BenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSettings)})
    result = run_bench(settings, argv=sys.argv[1:])
    print("\n".join(report_lines(result)))
    written = save_bench(result, args.out, plot=not args.no_plot)
    print(f"wrote {', '.join(str(w) for w in written)}")
    return 0
