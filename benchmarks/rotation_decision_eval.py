"""What `effvit straighten` does to photos with its decision rule: the threshold chosen on validation
photos, then the harm and the good it does on unseen photos.

Each photo of a set gives upright samples (the photo itself and ``--upright-crops`` random crops of
40-100% of its area, angle 0) and tilted samples (``--tilts`` fixed angles uniform in [-45, 45), seed 0,
max-area crop), all at a shorter side of at most 640 px. Every sample is estimated exactly as
``straighten`` does (``estimate`` with the test-time augmentation of ``--tta`` and the line refinement
unless ``--no-lines``: straighten's defaults; answers within +-45) and
judged by ``DecisionRule(min_confidence=C)`` (a tilt below the crop's one-pixel change is kept too).

The rates, per set and threshold C:
- upright turned: the share of upright samples rotated by more than 1 degree;
- tilted worse: the share of tilted samples that come out worse than they went in (rotated and
  |error after| > |tilt before|; a kept photo keeps its tilt);
- tilted fixed: the share of tilted samples within 2 degrees after the decision; and the MAE after it.
The default C is the smallest threshold at which both rates are at most ``--max-rate`` on the
``--val`` photos (never the test photos); the test and independent sets are then measured at that C.
``--save DIR`` writes each model again (fp16) as DIR/NAME.safetensors with that C in its metadata
(``min_confidence``: the default threshold ``straighten`` then applies).

    python benchmarks/rotation_decision_eval.py --model new=runs/rotation/full/cgd.safetensors \\
        --model bundled=effvit/assets/rotation_lite0_photos.safetensors --val runs/rotation/pool/val \\
        --test runs/rotation/pool/test --independent runs/rotation/independent/test --out runs/rotation/decision
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effvit.data import resize_short
from effvit.rotation.data import FolderImages, RotatedImages
from effvit.rotation.decision import MODEL_KEY, DecisionRule, choose_min_confidence, rule_outcome
from effvit.rotation.metrics import circular_error, rotation_metrics
from effvit.rotation.model import load_rotation_model, save_rotation_model
from effvit.rotation.straighten import TTA, estimate

WINDOW = (-45.0, 45.0)
RENDER = 320  # RotatedImages renders at up to twice this shorter side: 640 px, as straighten's working copy
FIXED = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)  # thresholds shown beside the chosen one


def upright_samples(img: Image.Image, crops: int, rng: np.random.Generator) -> list[Image.Image]:
    """The photo and ``crops`` random crops of 40-100% of its area (aspect 3:4..4:3), shorter side <= 640."""
    out = [img]
    w, h = img.size
    for _ in range(crops):
        area = w * h * rng.uniform(0.4, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(img.crop((left, top, left + cw, top + ch)))
    return [resize_short(im, 2 * RENDER) if min(im.size) > 2 * RENDER else im for im in out]


def make_set(folder: str, tilts: int, crops: int, seed: int = 0) -> dict:
    """{'upright': [images], 'tilted': [images], 'tilt': angles (signed), 'photo': names} of a folder."""
    src = FolderImages.from_roots(folder, short_side=1024)
    ds = RotatedImages(src, RENDER, (0.0,) * 3, (1.0,) * 3, angle_range=WINDOW, seed=seed, repeats=tilts)
    tilted, tilt = [], []
    for i in range(len(ds)):
        img, theta = ds.render(i)
        tilted.append(img)
        tilt.append(float(circular_error(theta, 0.0)))
    rng = np.random.default_rng(seed)
    upright = [im for k in range(len(src)) for im in upright_samples(src[k], crops, rng)]
    return {"upright": upright, "tilted": tilted, "tilt": np.array(tilt), "photos": len(src),
            "names": src.names}


def run_estimates(model, images: list[Image.Image], tta: str, lines: bool) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    out = [estimate(model, [im], WINDOW, lines=lines, **TTA[tta])[0] for im in images]
    return np.array([a for a, _ in out]), np.array([c for _, c in out]), (time.perf_counter() - t0) / len(images)


def pairs(est: dict, sizes_up: list, sizes_tilt: list, tilt: np.ndarray) -> tuple[list, list]:
    """The (angle, confidence, size[, true tilt]) tuples ``rule_outcome`` takes."""
    return (list(zip(est["up_angle"], est["up_conf"], sizes_up)),
            list(zip(est["ti_angle"], est["ti_conf"], sizes_tilt, tilt)))


def outcome(est: dict, sizes_up: list, sizes_tilt: list, tilt: np.ndarray, c: float) -> dict:
    """The rates and errors of one set at threshold ``c``."""
    return rule_outcome(DecisionRule(min_confidence=c), *pairs(est, sizes_up, sizes_tilt, tilt))


def choose(est: dict, sizes_up, sizes_tilt, tilt, max_rate: float) -> tuple[float, list[dict]]:
    """The smallest threshold with both rates <= max_rate (``choose_min_confidence``)."""
    return choose_min_confidence(*pairs(est, sizes_up, sizes_tilt, tilt), max_rate=max_rate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=MODEL", help="models to measure")
    ap.add_argument("--val", required=True, help="validation photos: the threshold is chosen on them")
    ap.add_argument("--test", required=True, help="the pool's test photos")
    ap.add_argument("--independent", default=None, help="photos never trained or tuned on")
    ap.add_argument("--tilts", type=int, default=6, help="tilted samples per photo")
    ap.add_argument("--upright-crops", type=int, default=1, help="upright crops per photo besides the photo")
    ap.add_argument("--tta", default="full", choices=list(TTA), help="test-time augmentation (straighten's)")
    ap.add_argument("--lines", action=argparse.BooleanOptionalAction, default=True,
                    help="the line refinement (straighten's default: on)")
    ap.add_argument("--max-rate", type=float, default=5.0, help="percent: the most harm the threshold allows")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", default=None, metavar="DIR", help="write each model with its chosen threshold")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = {"val": args.val, "test": args.test}
    if args.independent:
        folders["independent"] = args.independent
    sets = {name: make_set(f, args.tilts, args.upright_crops) for name, f in folders.items()}
    for name, s in sets.items():
        print(f"{name}: {s['photos']} photos, {len(s['upright'])} upright and {len(s['tilted'])} tilted samples",
              flush=True)
    results: dict = {"args": vars(args), "sets": {n: {"photos": s["photos"], "upright": len(s["upright"]),
                                                     "tilted": len(s["tilted"])} for n, s in sets.items()}}
    for spec in args.model:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).stem
        model = load_rotation_model(path)
        per = {}
        for set_name, s in sets.items():
            ua, uc, t1 = run_estimates(model, s["upright"], args.tta, args.lines)
            ta, tc, t2 = run_estimates(model, s["tilted"], args.tta, args.lines)
            est = {"up_angle": ua, "up_conf": uc, "ti_angle": ta, "ti_conf": tc}
            per[set_name] = (est, [im.size for im in s["upright"]], [im.size for im in s["tilted"]], s["tilt"])
            print(f"  {name} on {set_name}: {(t1 + t2) * 500:.0f} ms per sample", flush=True)
        chosen, sweep = choose(*per["val"], args.max_rate)
        r = {"path": path, "recorded_min_confidence": model.config.get("min_confidence"),
             "chosen_min_confidence": chosen, "val_sweep": sweep}
        for set_name, (est, su, st, tilt) in per.items():
            m = rotation_metrics(circular_error(est["ti_angle"], tilt))  # the estimate itself, always acting
            r[set_name] = {"estimate": m, "at_chosen": outcome(est, su, st, tilt, chosen),
                           "fixed": [outcome(est, su, st, tilt, c) for c in FIXED],
                           "upright_abs_angle_median": float(np.median(np.abs(est["up_angle"]))),
                           "predictions": {k: v.round(4).tolist() for k, v in est.items()}}
        results.setdefault("models", {})[name] = r
        if args.save:
            saved = save_rotation_model(model, Path(args.save) / f"{name}.safetensors", half=True,
                                        extra={MODEL_KEY: round(chosen, 4)})
            r["saved"] = str(saved)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: min confidence chosen on val {chosen:.3f}", flush=True)
        for set_name in per:
            a, m = r[set_name]["at_chosen"], r[set_name]["estimate"]
            print(f"  {set_name}: estimate MAE {m['mae']:.2f} median {m['median']:.2f} acc@2 {m['acc@2']:.1f}% "
                  f"acc@5 {m['acc@5']:.1f}% | at C: upright turned {a['upright_turned']:.1f}%, tilted worse "
                  f"{a['tilted_worse']:.1f}%, fixed to 2 deg {a['tilted_fixed2']:.1f}%, rotated "
                  f"{a['tilted_rotated']:.1f}%, MAE after {a['mae_after']:.2f} (before {a['mae_before']:.2f})",
                  flush=True)
    (out / "results.md").write_text(tables(results))
    print(tables(results))
    return 0


def tables(results: dict) -> str:
    head = ("| model | set | estimate MAE | median | acc@2 | acc@5 | C | upright turned > 1 deg | tilted made worse "
            "| tilted rotated | tilted within 2 deg after | MAE after (before) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.get("models", {}).items():
        for set_name in ("val", "test", "independent"):
            if set_name not in r:
                continue
            m = r[set_name]["estimate"]
            for a in [r[set_name]["at_chosen"]] + [f for f in r[set_name]["fixed"] if f["min_confidence"] == 0.0]:
                lines.append(f"| {name} | {set_name} | {m['mae']:.2f} | {m['median']:.2f} | {m['acc@2']:.1f}% | "
                             f"{m['acc@5']:.1f}% | {a['min_confidence']:.3f} | {a['upright_turned']:.1f}% | "
                             f"{a['tilted_worse']:.1f}% | {a['tilted_rotated']:.1f}% | {a['tilted_fixed2']:.1f}% | "
                             f"{a['mae_after']:.2f} ({a['mae_before']:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
