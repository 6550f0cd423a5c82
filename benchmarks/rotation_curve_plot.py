"""The learning curve of ``rotation_finetune.py``: training photos -> MAE on the pool's test photos and on
the independent photos, beside answering 0, and the table of it in Markdown.

    python benchmarks/rotation_curve_plot.py runs/rotation/full/results.json \\
        --out benchmarks/results/rotation/learning_curve.png

Points: the ``curve`` runs and the head's run on every training photo; several result files (other seeds)
add their points to the same sizes, drawn as their mean with each run as a dot.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from effvit.plots import pyplot, save_figure

SETS = (("val", "validation photos (best epoch)"), ("test", "pool test photos"),
        ("independent", "independent photos"))


def points(results: dict) -> dict[int, dict[str, float]]:
    """{training photos: {set: MAE}} of one results file."""
    out = {}
    curve = results.get("curve", {})
    # the curve's head, or the one head of a run without a curve (another seed)
    method = next(iter(curve.values()))["method"] if curve else next(iter(results.get("methods", {})), None)
    runs = list(curve.values())
    if method and method in results.get("methods", {}):
        runs.append({"photos": len(results["photos"]["train"]), **results["methods"][method]})
    for r in runs:
        out[int(r["photos"])] = {"val": min(h["val_mae"] for h in r["history"]), "test": r["subdegree"]["mae"],
                                 **({"independent": r["independent"]["subdegree"]["mae"]}
                                    if "independent" in r else {})}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json files of rotation_finetune.py (one per seed)")
    ap.add_argument("--zero", nargs=2, type=float, metavar=("TEST", "INDEPENDENT"), default=None,
                    help="MAE of answering 0 on the two sets (drawn as lines)")
    ap.add_argument("--out", required=True, help="the PNG")
    args = ap.parse_args()
    runs: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    method = None
    for path in args.results:
        results = json.loads(Path(path).read_text())
        method = method or next(iter(results.get("curve", {}).values()), {}).get("method") or \
            next(iter(results.get("methods", {})), None)
        for n, maes in points(results).items():
            for k, v in maes.items():
                runs[n][k].append(v)
    sizes = sorted(runs)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = ["| training photos | runs | " + " | ".join(f"MAE, {label}" for _, label in SETS) + " |",
             "|" + "---|" * (len(SETS) + 2)]
    zero = dict(zip(("test", "independent"), args.zero)) if args.zero else {}
    for (key, label), colour in zip(SETS, ("C2", "C0", "C1")):
        xs = [n for n in sizes if runs[n].get(key)]
        if not xs:
            continue
        ax.plot(xs, [np.mean(runs[n][key]) for n in xs], "o-", color=colour, label=label)
        for n in xs:
            ax.plot([n] * len(runs[n][key]), runs[n][key], ".", color=colour, alpha=0.5)
        if key in zero:
            ax.axhline(zero[key], color=colour, ls=":", lw=1, label=f"answering 0, {label}")
    for n in sizes:
        cells = [f"{np.mean(runs[n][k]):.2f}" + (f" ({min(runs[n][k]):.2f}-{max(runs[n][k]):.2f})"
                                                 if len(runs[n][k]) > 1 else "") if runs[n].get(k) else "-"
                 for k, _ in SETS]
        lines.append(f"| {n} | {max(len(v) for v in runs[n].values())} | " + " | ".join(cells) + " |")
    ax.axhline(3.0, color="grey", ls="--", lw=1, label="3 degrees")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("training photos")
    ax.set_ylabel("MAE, degrees (tilts within +-45)")
    ax.set_title(f"EfficientNet-Lite0 fine-tuned, {(method or '').upper()} head")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
