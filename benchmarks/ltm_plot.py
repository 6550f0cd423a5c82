"""Test top-1 against MACs and against measured CPU throughput, for the token-merging runs.

    python benchmarks/ltm_plot.py --speed ltm_speed.json --out ltm.png \\
        --run "unmerged=runs/unmerged" --run "ltm 0.8=runs/ltm08" --run "pool 0.8=runs/pool08" \\
        --run "unmerged 96 px=runs/res96"

Each ``--run FORM=DIR`` pairs a form of ``benchmarks/ltm_speed.py --json`` (same variant and size) with a
training run directory; its last epoch's ``val_top1`` (log.csv) is plotted.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from effvit.plots import pyplot, save_figure


def last_top1(run: Path) -> float:
    with open(run / "log.csv") as f:
        return float(list(csv.DictReader(f))[-1]["val_top1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", required=True, help="JSON written by ltm_speed.py --json")
    ap.add_argument("--run", action="append", required=True, help="FORM=RUN_DIR")
    ap.add_argument("--variant", default="efficientvit_m0")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--out", default="ltm.png")
    args = ap.parse_args()
    rows = {r["form"]: r for r in json.loads(Path(args.speed).read_text())
            if r["variant"] == args.variant and r["size"] == args.size}
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for spec in args.run:
        form, _, run = spec.partition("=")
        if form not in rows:
            raise SystemExit(f"form {form!r} is not in {args.speed}; forms there: {sorted(rows)}")
        r, top1 = rows[form], last_top1(Path(run))
        for ax, x in zip(axes, (r["macs"] / 1e6, r["torch b16"], r["ort b1"])):
            ax.scatter(x, top1)
            ax.annotate(form, (x, top1), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, label in zip(axes, ("MMACs", "images/s, PyTorch fused, 1 thread, batch 16",
                                "images/s, ONNX Runtime, 1 thread, batch 1")):
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{args.variant} at {args.size} px, Fashion-MNIST: token merging and its baselines")
    print(save_figure(fig, args.out))


if __name__ == "__main__":
    main()
