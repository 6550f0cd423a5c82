"""``effvit info``: every variant's size, cost, feature maps and the paper's accuracy."""

from __future__ import annotations

import argparse
import json

from effvit.models import resolve_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="params, MACs, feature strides/widths and paper top-1 per variant")
    p.add_argument("--models", default="all", help="comma-separated variants (m0,m4 or full names)")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], help="H [W] to count MACs at")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def variant_rows(names: list[str], img_size: tuple[int, int]) -> list[dict]:
    from effvit.models import VARIANTS, create_model
    from effvit.models.complexity import count_macs, count_params
    from effvit.models.efficientvit import stage_resolutions

    rows = []
    for name in names:
        model = create_model(name, img_size=img_size)
        v = VARIANTS[name]
        rows.append({
            "model": name,
            "params_m": round(count_params(model) / 1e6, 3),
            "macs_m": round(count_macs(model, img_size) / 1e6, 1),
            "paper_mflops": v.paper_mflops,
            "strides": [f["reduction"] for f in model.feature_info],
            "widths": list(v.widths),
            "maps": [f"{h}x{w}" for h, w in stage_resolutions(img_size)],
            "paper_top1": v.top1,
        })
    return rows


def run(args: argparse.Namespace) -> int:
    size = tuple(args.img_size) if len(args.img_size) == 2 else (args.img_size[0],) * 2
    rows = variant_rows(resolve_models(args.models), size)
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
