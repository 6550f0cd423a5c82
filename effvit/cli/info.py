"""``effvit info``: every variant's size, cost, feature maps and the paper's accuracy."""

from __future__ import annotations

import argparse
import json

from effvit.models import resolve_models
from effvit.models.summary import variant_summaries


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="params, MACs, feature strides/widths and paper top-1 per variant")
    p.add_argument("--models", default="all", help="comma-separated variants (m0,m4 or full names)")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], help="H [W] to count MACs at")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    size = tuple(args.img_size) if len(args.img_size) == 2 else (args.img_size[0],) * 2
    rows = variant_summaries(resolve_models(args.models), size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"EfficientViT-M at {size[0]}x{size[1]} (MACs exclude BN; paper FLOPs column for reference)")
    header = f"{'model':<16}{'params':>9}{'MACs':>9}{'paper':>7}  {'strides':<11}{'widths':<14}{'maps':<16}{'top-1':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<16}{r['params_m']:>8.3f}M{r['macs_m']:>8.1f}M{r['paper_mflops']:>6}M  "
              f"{'/'.join(map(str, r['strides'])):<11}{'/'.join(map(str, r['widths'])):<14}"
              f"{' '.join(r['maps']):<16}{r['paper_top1']:>6.1f}")
    return 0
