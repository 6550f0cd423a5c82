"""What `effvit straighten` gets right on held-out photos: test-time augmentation, line refinement and
abstention (``--min-confidence``), each measured against the plain estimate, beside "always 0" and
other models.

Samples: every photo of --test rotated by fixed angles uniform in [-45, 45) (seed 0, --repeats per
photo; the same angles as ``effvit rotation eval --seed 0``), max-area crop, kept at a shorter side of
640 px so that the line refinement sees what it sees on a real photo (``straighten`` gives it the photo
at 640 px too). The line thresholds are chosen on --tune photos (training and validation photos,
never the test ones) and then applied to the test photos unchanged.

    python benchmarks/rotation_straighten_eval.py --model effvit/assets/rotation_lite0_photos.safetensors \\
        --test runs/rotation/photos1024/test --tune runs/rotation/photos1024/val runs/rotation/photos1024/train \\
        --baseline old=/tmp/rotation_m0_photos.safetensors --out runs/rotation/straighten-eval
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from effvit.rotation.data import FolderImages, RotatedImages
from effvit.rotation.lines import into_window, orientation_histogram, refine_with_lines
from effvit.rotation.metrics import circular_error, rotation_metrics
from effvit.rotation.model import load_rotation_model
from effvit.rotation.straighten import estimate

WINDOW = (-45.0, 45.0)
TTA = {"plain": dict(flip=False, crops=1), "flip": dict(flip=True, crops=1), "3 crops": dict(flip=False, crops=3),
       "flip + 3 crops": dict(flip=True, crops=3)}
COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)


def samples(roots: list[str], repeats: int, seed: int, short_side: int = 1024):
    src = FolderImages.from_roots(*roots, short_side=short_side)
    ds = RotatedImages(src, 320, (0.0,) * 3, (1.0,) * 3, angle_range=WINDOW, seed=seed, repeats=repeats)
    return [ds.render(i) for i in range(len(ds))], [ds.name(i) for i in range(len(ds))]


def run_model(model, items, **kw) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    out = [estimate(model, [img], WINDOW, **kw)[0] for img, _ in items]
    per_image = (time.perf_counter() - t0) / len(items)
    return np.array([a for a, _ in out]), np.array([c for _, c in out]), per_image


def errors(pred: np.ndarray, items) -> np.ndarray:
    return circular_error(pred, np.array([t for _, t in items]))


def with_lines(pred: np.ndarray, hists: list[np.ndarray], search: float, strength: float) -> np.ndarray:
    """What ``estimate(lines=True)`` does to each answer, from precomputed orientation histograms."""
    return np.array([into_window(refine_with_lines(None, float(p), search, strength, hist=h).angle, WINDOW)
                     for p, h in zip(pred, hists)])


def selective(err: np.ndarray, conf: np.ndarray) -> list[dict]:
    order = np.argsort(-conf, kind="stable")
    rows = []
    for cov in COVERAGES:
        keep = order[:max(1, round(cov * len(order)))]
        rows.append({"coverage": cov, "min_confidence": float(conf[keep].min()), **rotation_metrics(err[keep])})
    return rows


def row(name: str, m: dict, extra: str = "") -> str:
    return (f"| {name} | {m['mae']:.2f} | {m['median']:.2f} | {m['p95']:.2f} | {m['acc@2']:.1f}% | "
            f"{m['acc@5']:.1f}% | {m['acc@10']:.1f}% |{extra}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the rotation model under test (.safetensors)")
    ap.add_argument("--test", nargs="+", required=True, help="held-out upright photos (files or folders)")
    ap.add_argument("--tune", nargs="+", help="photos to choose the line thresholds on (never test photos)")
    ap.add_argument("--baseline", nargs="*", default=[], metavar="NAME=MODEL", help="other models, plain")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--tune-repeats", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_rotation_model(args.model)
    test, names = samples(args.test, args.repeats, seed=0)
    result: dict = {"model": args.model, "test": args.test, "samples": len(test), "photos": sorted(set(names))}
    lines = ["| estimate | MAE | median | P95 | acc@2 | acc@5 | acc@10 | time / image |", "|" + "---|" * 8]
    zero = errors(np.zeros(len(test)), test)
    result["always 0"] = rotation_metrics(zero)
    lines.append(row("always 0", result["always 0"], " - |"))
    for spec in args.baseline:
        name, path = spec.split("=", 1)
        pred, _, t = run_model(load_rotation_model(path), test)
        result[name] = {**rotation_metrics(errors(pred, test)), "s_per_image": t}
        lines.append(row(name, result[name], f" {t * 1000:.0f} ms |"))

    tta = {}
    for name, kw in TTA.items():
        pred, conf, t = run_model(model, test, **kw)
        tta[name] = (pred, conf)
        result[name] = {**rotation_metrics(errors(pred, test)), "s_per_image": t}
        lines.append(row(name, result[name], f" {t * 1000:.0f} ms |"))
        print(lines[-1], flush=True)

    if args.tune:
        # line thresholds: chosen on the tuning photos (the network trained on most of them, so its errors
        # there are smaller than on unseen photos: this favours a narrow search, the cautious choice)
        tune, _ = samples(args.tune, args.tune_repeats, seed=1)
        t_pred, _, _ = run_model(model, tune)
        t_hists = [orientation_histogram(img) for img, _ in tune]
        grid = {}
        for search, strength in itertools.product((1.5, 3.0, 5.0, 10.0, 45.0), (2.0, 3.0, 4.0, 6.0, 10.0)):
            refined = with_lines(t_pred, t_hists, search, strength)
            grid[f"{search},{strength}"] = rotation_metrics(errors(refined, tune))["mae"]
        best = min(grid, key=grid.get)
        search, strength = (float(v) for v in best.split(","))
        base = rotation_metrics(errors(t_pred, tune))["mae"]
        result["line_tuning"] = {"grid_mae": grid, "plain_mae": base, "search": search, "strength": strength,
                                 "samples": len(tune)}
        print(f"lines tuned on {len(tune)} samples: search {search}, strength {strength}: MAE {base:.2f} -> "
              f"{grid[best]:.2f}", flush=True)
        t0 = time.perf_counter()
        hists = [orientation_histogram(img) for img, _ in test]
        t_lines = (time.perf_counter() - t0) / len(test)
        for name in TTA:
            pred, _ = tta[name]
            refined = with_lines(pred, hists, search, strength)
            key = f"{name} + lines"
            result[key] = {**rotation_metrics(errors(refined, test)),
                           "s_per_image": result[name]["s_per_image"] + t_lines,
                           "lines_used": float((np.abs(refined - pred) > 1e-9).mean())}
            lines.append(row(key, result[key], f" {result[key]['s_per_image'] * 1000:.0f} ms |"))
            print(lines[-1], flush=True)

    sel_lines = ["| kept (most confident) | min confidence | MAE | median | acc@5 |", "|---|---|---|---|---|"]
    for name in ("plain", "flip + 3 crops"):
        pred, conf = tta[name]
        result[f"selective {name}"] = sel = selective(errors(pred, test), conf)
        for r in sel:
            sel_lines.append(f"| {name}: {r['coverage'] * 100:.0f}% | {r['min_confidence']:.3f} | {r['mae']:.2f} | "
                             f"{r['median']:.2f} | {r['acc@5']:.1f}% |")
    if args.tune:  # --min-confidence thresholds chosen on the tuning photos, applied to the test photos
        sel_lines += ["", "| --min-confidence (chosen on tuning photos) | test photos kept | MAE kept | acc@5 kept |"
                      " MAE all |", "|---|---|---|---|---|"]
        for name in ("plain", "flip + 3 crops"):
            _, t_conf, _ = run_model(model, tune, **TTA[name])
            pred, conf = tta[name]
            err = np.abs(errors(pred, test))
            for cov in (0.9, 0.8, 0.5):
                thr = float(np.quantile(t_conf, 1 - cov))
                kept = conf >= thr
                m = rotation_metrics(err[kept]) if kept.any() else {"mae": float("nan"), "acc@5": float("nan")}
                result.setdefault("min_confidence", {})[f"{name} tune{round(cov * 100)}"] = {
                    "threshold": thr, "kept": float(kept.mean()), "mae_kept": m["mae"], "acc@5_kept": m["acc@5"],
                    "mae_all": float(err.mean())}
                sel_lines.append(f"| {name}: {thr:.3f} (keeps {cov * 100:.0f}% of tuning samples) | "
                                 f"{kept.mean() * 100:.0f}% | {m['mae']:.2f} | {m['acc@5']:.1f}% | {err.mean():.2f} |")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = "\n".join(lines) + "\n\n" + "\n".join(sel_lines) + "\n"
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
