"""Fine-tune the ImageNet-trained EfficientNet-Lite0 for tilt estimation on the photo pool, on 2 CPU cores.

What makes it affordable on a CPU: the training samples are rendered once into a bank (every training
photo ``--per-photo`` times as a random crop of 10-100% of its area, mirrored or not, rotated by an angle
uniform in [-45, 45), max-area crop, sometimes colour-changed, noised, re-compressed and blurred:
``effvit.rotation.data.RotatedImages``, the same code as ``effvit rotation train``). With ``--frozen 0``
the bank holds the network's inputs and the whole backbone is fine-tuned (each batch also mirrored at
random, the angle negated); with ``--frozen K`` the first K stages stay frozen and the bank holds their
output, so only the later stages and the head train (cheaper, weaker). Each result is a plain rotation
model (.safetensors) that ``effvit straighten --model`` and ``effvit rotation eval`` load; test metrics
come from the library's ``evaluate_rotation`` on the held-out photos at fixed angles (seed 0), answers
restricted to +-45 degrees.

    python benchmarks/rotation_photo_pool.py --out runs/rotation/photos1024
    python benchmarks/rotation_finetune.py --pool runs/rotation/photos1024 --out runs/rotation/lite0 \\
        --methods cgd,cls,uv,psc,da --curve 6,12,18
    python benchmarks/rotation_finetune.py --pool runs/rotation/pool --out runs/rotation/full --frozen 0 \\
        --methods cgd,psc --curve 0.25,0.5 --independent runs/rotation/independent/test

Writes per method ``<out>/<method>.safetensors`` and ``<out>/<method>-test/`` (metrics, predictions,
plot), the learning curve (``curve-<n>``: the same schedule on the first n training photos of a fixed
shuffle; a value below 1 is a share of the training photos) and ``results.json``; ``--independent``: the
models are also tested on those photos.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effvit.rotation.data import FolderImages, RotatedImages, list_images
from effvit.rotation.evaluation import evaluate_rotation, write_report
from effvit.rotation.model import RotationModel, save_rotation_model

WINDOW = (-45.0, 45.0)
BACKBONE = "timm/efficientnet_lite0"


def front_and_back(model: RotationModel, frozen: int):
    """(frozen front, trainable back) of a timm EfficientNet backbone + head: back(front(x)) == model(x);
    ``frozen`` 0: no front, the whole network trains."""
    if frozen == 0:
        return nn.Identity(), model
    bb = model.backbone
    front = nn.Sequential(bb.conv_stem, bb.bn1, *bb.blocks[:frozen])

    def back(f: torch.Tensor) -> torch.Tensor:
        return model.head(bb.forward_head(bb.bn2(bb.conv_head(bb.blocks[frozen:](f)))))

    for p in front.parameters():
        p.requires_grad_(False)
    return front, back


@torch.no_grad()
def build_bank(dataset: RotatedImages, front: nn.Module, path: Path, batch: int = 64) -> dict:
    """Front features (fp16), angles and photo index of every sample of ``dataset``; cached at ``path``."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=1)
    front.eval()
    feats, angles = [], []
    t0 = time.perf_counter()
    for x, theta in loader:
        feats.append(front(x).half())
        angles.append(theta)
        print(f"  bank {path.name}: {sum(len(a) for a in angles)}/{len(dataset)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    n = len(dataset.source)
    bank = {"feats": torch.cat(feats), "angles": torch.cat(angles),
            "photo": torch.arange(len(dataset)) % n}
    torch.save(bank, path)
    return bank


def new_model(method: str, size: int) -> RotationModel:
    return RotationModel(BACKBONE, method, img_size=size, pretrained="imagenet", angle_range=WINDOW)


def bank_mae(model: RotationModel, back, bank: dict) -> float:
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model.method.decode(back(f.float()), WINDOW, True)
                           for f in bank["feats"].split(256)])
    e = torch.remainder(preds.double() - bank["angles"].double() + 180, 360) - 180
    return float(e.abs().mean())


def finetune(method: str, args, train: dict, val: dict, photos: list[int] | None = None,
             log=print) -> tuple[RotationModel, list[dict]]:
    """Fine-tune the back and the head on the cached bank; keep the epoch with the lowest val MAE."""
    torch.manual_seed(args.seed)
    model = new_model(method, args.size)
    _, back = front_and_back(model, args.frozen)
    keep = torch.ones(len(train["angles"]), dtype=torch.bool)
    if photos is not None:
        keep = torch.isin(train["photo"], torch.tensor(photos))
    feats, angles = train["feats"][keep], train["angles"][keep]
    steps_per_epoch = math.ceil(args.samples_per_epoch / args.batch)
    total = steps_per_epoch * args.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1,
                                                anneal_strategy="cos")
    gen = torch.Generator().manual_seed(args.seed)
    history, best, best_state = [], math.inf, None
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        if args.frozen:
            model.backbone.conv_stem.eval(), model.backbone.bn1.eval()
            for block in model.backbone.blocks[:args.frozen]:
                block.eval()
        running = 0.0
        for step in range(steps_per_epoch):
            idx = torch.randint(len(angles), (args.batch,), generator=gen)
            x, theta = feats[idx].float(), angles[idx]
            if args.frozen == 0:  # a mirrored input carries the negated tilt: a second sample for free
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
                theta = torch.where(flip, torch.remainder(-theta, 360.0), theta)
            loss = model.method.criterion(back(x), theta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            running += loss.item()
            if step % 20 == 19:
                log(f"    step {epoch * steps_per_epoch + step + 1}/{total}: loss {loss.item():.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
        val_mae = bank_mae(model, back, val)
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "val_mae": val_mae,
                        "time_s": round(time.perf_counter() - t0, 1)})
        log(f"  {method} epoch {epoch + 1}: loss {running / steps_per_epoch:.4f}  val MAE {val_mae:.2f}  "
            f"({time.perf_counter() - t0:.0f} s)")
        if val_mae < best:
            best, best_state = val_mae, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), history


def test_set(args, folder: Path, repeats: int) -> RotatedImages:
    src = FolderImages.from_roots(folder, short_side=1024)
    m = new_model("cgd", args.size)
    return RotatedImages(src, args.size, m.config["mean"], m.config["std"], angle_range=WINDOW, seed=0,
                         repeats=repeats)


def test_model(model: RotationModel, ds: RotatedImages, out: Path, title: str) -> dict:
    res = evaluate_rotation(model, ds, window=WINDOW, batch_size=50, progress=False)
    write_report(res, out, title=title)
    return res.metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True, help="train/ val/ test/ folders of upright photos")
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="cgd,cls,uv,psc,da")
    ap.add_argument("--curve", default="", help="photo counts of the learning curve, e.g. 6,12,18, or "
                                                "shares of the training photos, e.g. 0.25,0.5")
    ap.add_argument("--curve-method", default=None, help="head of the learning curve (default: the "
                                                                  "lowest validation MAE)")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--frozen", type=int, default=5, help="frozen stages (of 7); 0: the whole backbone trains")
    ap.add_argument("--per-photo", type=int, default=240, help="bank samples per training photo")
    ap.add_argument("--val-per-photo", type=int, default=40)
    ap.add_argument("--short-side", type=int, default=1024, help="training photos are decoded at this "
                                                                 "shorter side (held in memory)")
    ap.add_argument("--colour", type=float, nargs=2, default=(0.8, 0.3), metavar=("P", "STRENGTH"),
                    help="colour change: probability, strength (see RotatedImages); 0 0: off")
    ap.add_argument("--noise", type=float, nargs=2, default=(0.5, 6.0), metavar=("P", "SIGMA"),
                    help="Gaussian noise: probability, max sigma (0..255 at the input size); 0 0: off")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--samples-per-epoch", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--test-repeats", type=int, default=25)
    ap.add_argument("--independent", default=None, help="a folder of photos never trained or tuned on: "
                                                       "every model is tested on them too")
    ap.add_argument("--independent-repeats", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["args"] = vars(args)

    probe = new_model("cgd", args.size)
    front, _ = front_and_back(probe, args.frozen)
    mean, std = probe.config["mean"], probe.config["std"]
    pool = Path(args.pool)
    train_src = FolderImages(list_images(pool / "train"), short_side=args.short_side)
    val_src = FolderImages(list_images(pool / "val"), short_side=args.short_side)
    aug = dict(crop_scale=(0.1, 1.0), hflip=True, colour=tuple(args.colour) if args.colour[0] else None,
               noise=tuple(args.noise) if args.noise[0] else None, jpeg=(0.3, 50, 95), blur=(0.3, 1.0))
    results["augmentation"] = aug
    train_ds = RotatedImages(train_src, args.size, mean, std, angle_range=WINDOW, seed=1000 + args.seed,
                             repeats=args.per_photo, **aug)
    val_ds = RotatedImages(val_src, args.size, mean, std, angle_range=WINDOW, seed=7,
                           repeats=args.val_per_photo)
    tag = f"{args.size}px-f{args.frozen}"
    train = build_bank(train_ds, front, out / f"bank-train-{tag}-{args.per_photo}.pt")
    val = build_bank(val_ds, front, out / f"bank-val-{tag}-{args.val_per_photo}.pt")
    results["photos"] = {"train": train_src.names, "val": val_src.names}
    print(f"bank: {len(train['angles'])} training samples of {len(train_src)} photos, "
          f"{len(val['angles'])} validation samples of {len(val_src)} photos", flush=True)
    tests = {"test": test_set(args, pool / "test", args.test_repeats)}
    if args.independent:
        tests["independent"] = test_set(args, Path(args.independent), args.independent_repeats)

    def measure(model: RotationModel, label: str, title: str) -> dict:
        """Metrics on every test set: the pool's test photos at the top level, the others by name."""
        metrics = {}
        for name, ds in tests.items():
            m = test_model(model, ds, out / f"{label}-{name}", f"{title} ({name} photos)")
            metrics.update(m) if name == "test" else metrics.__setitem__(name, m)
        return metrics

    for method in [m for m in args.methods.split(",") if m]:
        t0 = time.perf_counter()
        model, history = finetune(method, args, train, val)
        train_s = time.perf_counter() - t0
        save_rotation_model(model, out / f"{method}.safetensors", half=True,
                            extra={"settings": {"recipe": "benchmarks/rotation_finetune.py", **vars(args),
                                                "augmentation": aug}})
        metrics = measure(model, method, f"Lite0 / {method}")
        results.setdefault("methods", {})[method] = {"train_s": round(train_s, 1), "history": history,
                                                     **metrics}
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{method}: test MAE {metrics['subdegree']['mae']:.2f}  median {metrics['subdegree']['median']:.2f}"
              f"  acc@5 {metrics['subdegree']['acc@5']:.1f}%  ({train_s:.0f} s)" + independent_line(metrics),
              flush=True)

    if args.curve:
        done = results.get("methods", {})
        # the head with the lowest validation MAE (never chosen on the test photos)
        method = args.curve_method or min(done, key=lambda m: min(h["val_mae"] for h in done[m]["history"]))
        order = np.random.default_rng(args.seed).permutation(len(train_src)).tolist()
        for v in args.curve.split(","):
            n = round(float(v) * len(train_src)) if float(v) < 1 else int(v)
            t0 = time.perf_counter()
            model, history = finetune(method, args, train, val, photos=order[:n])
            train_s = time.perf_counter() - t0
            save_rotation_model(model, out / f"curve-{n}-{method}.safetensors", half=True,
                                extra={"settings": {"recipe": "benchmarks/rotation_finetune.py", **vars(args),
                                                    "augmentation": aug, "photos": n}})
            metrics = measure(model, f"curve-{n}", f"Lite0 / {method}, {n} photos")
            results.setdefault("curve", {})[str(n)] = {"method": method, "photos": n, "history": history,
                                                       "train_s": round(train_s, 1), **metrics}
            results_path.write_text(json.dumps(results, indent=2))
            print(f"curve {n} photos ({method}): test MAE {metrics['subdegree']['mae']:.2f}  "
                  f"acc@5 {metrics['subdegree']['acc@5']:.1f}%" + independent_line(metrics), flush=True)
    (out / "results.md").write_text(tables(results))
    print(tables(results))
    return 0


def independent_line(metrics: dict) -> str:
    m = metrics.get("independent")
    return f"; independent MAE {m['subdegree']['mae']:.2f}  acc@5 {m['subdegree']['acc@5']:.1f}%" if m else ""


def tables(results: dict) -> str:
    """The per-head table (argmax and sub-degree decoders) and the learning curve, in Markdown."""
    head = "| head | decoder | MAE | median | P95 | acc@2 | acc@5 | acc@10 | fine-tuning time |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def cells(m: dict) -> str:
        return (f"{m['mae']:.2f} | {m['median']:.2f} | {m['p95']:.2f} | {m['acc@2']:.1f}% | {m['acc@5']:.1f}% | "
                f"{m['acc@10']:.1f}% |")

    for method, r in results.get("methods", {}).items():
        decoders = [("argmax", "paper"), ("sub-degree", "subdegree")] if method in ("cls", "cgd") else \
            [("direct", "subdegree")]
        for label, key in decoders:
            lines.append(f"| {method.upper()} | {label} | {cells(r[key])} {r['train_s'] / 60:.1f} min |")
    if results.get("curve"):
        lines += ["", "| training photos | head | MAE | median | P95 | acc@2 | acc@5 | acc@10 |",
                  "|---|---|---|---|---|---|---|---|"]
        curve = dict(results["curve"])
        method = next(iter(curve.values()))["method"]
        if method in results.get("methods", {}):  # the full pool: the head's main run
            curve[str(len(results["photos"]["train"]))] = {"method": method, **results["methods"][method]}
        for n, r in sorted(curve.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {n} | {r['method'].upper()} | {cells(r['subdegree'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
