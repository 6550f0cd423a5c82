"""``effvit demo``: train EfficientViT-M0 from scratch on Fashion-MNIST, evaluate it on the 10k test images,
predict a few of them, export it to ONNX, int8 ONNX and TorchScript, time fp32 against int8 and print a
summary. ``make demo`` runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from effvit.bench.runtimes import onnx_speed, p90
from effvit.cli import main as cli_main
from effvit.data import FashionMNIST

# The recipe of configs/fashion_mnist_m0.yaml at 64 px (a third of the compute of its 112 px) for 3 epochs,
# each on a fresh random half of the training set, keeps the demo within 10 minutes.
DEMO_OVERRIDES = ["model.img_size=64", "data.train_fraction=0.5"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="Fashion-MNIST end to end: train M0, evaluate, predict, export",
                       description=__doc__)
    p.add_argument("--output", default="runs/demo", help="folder for the run (default runs/demo)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument("--data", metavar="DIR", help="folder with the Fashion-MNIST IDX files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--samples", type=int, default=6, help="test images to predict")
    p.add_argument("-s", "--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="section.key=value", help="extra training overrides")
    p.set_defaults(func=run)


def _save_samples(root: str | None, out: Path, n: int) -> list[Path]:
    """A few Fashion-MNIST test images as PNG files, plus one corrupt file to show it being skipped."""
    ds = FashionMNIST(root, train=False)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        img, label = ds[i * 997 % len(ds)]
        f = out / f"test{i * 997 % len(ds):05d}_{ds.classes[label].replace('/', '-').replace(' ', '_')}.png"
        img.resize((112, 112), Image.Resampling.BICUBIC).save(f)
        files.append(f)
    broken = out / "corrupt.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    files.append(broken)
    return files


def _int8_speed(folder: Path) -> str:
    """int8 against fp32: accuracy from the export's check, ONNX Runtime speed on one thread."""
    record = json.loads(next(folder.glob("*.int8.json")).read_text())
    paths = {"fp32": folder / record["fp32"], "int8": folder / record["int8"]}
    timings = onnx_speed(paths, tuple(record["input_shape"]), threads=1)
    lines = [f"int8       test top-1 {record['top1']:.2f}% vs fp32 {record['top1_ref']:.2f}% "
             f"({record['delta']:+.2f} points), top-1 agreement {100 * record['agreement']:.2f}% "
             f"({record['images']} images)"]
    for batch, t in timings.items():
        f, i = t["fp32"], t["int8"]
        lines.append(f"speed      batch {batch}, ONNX Runtime, 1 thread: fp32 {f.median * 1e3:.2f} ms "
                     f"(p90 {p90(f.times) * 1e3:.2f}), int8 {i.median * 1e3:.2f} ms (p90 {p90(i.times) * 1e3:.2f}): "
                     f"int8 {f.median / i.median:.2f}x")
    return "\n".join(lines)


def _timed_command(argv: list[str], times: dict[str, float], step: str) -> int:
    """``effvit ARGV``'s exit status; its seconds recorded as ``times[step]``."""
    t = time.perf_counter()
    rc = cli_main(argv)
    times[step] = time.perf_counter() - t
    return rc


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"== 1/4 train EfficientViT-M0 from scratch on Fashion-MNIST ({args.epochs} epochs) ==", flush=True)
    train_args = ["train", "--config", "fashion_mnist_m0", "--epochs", str(args.epochs), "--output",
                  str(out.parent), "--name", out.name, "--overwrite", "--set", "run.eval_every=0",
                  *DEMO_OVERRIDES, *args.overrides]  # --overwrite: a fresh run each time
    if args.data:
        train_args += ["--data", args.data]
    rc = _timed_command(train_args, times, "train")
    if rc:
        return rc
    ckpt = out / "last.pth"

    print("\n== 2/4 evaluate on the 10,000 test images ==", flush=True)
    eval_args = ["eval", "--checkpoint", str(ckpt), "--output", str(out / "eval-test")]
    if args.data:
        eval_args += ["--data", args.data]
    rc = _timed_command(eval_args, times, "eval")
    if rc:
        return rc
    metrics = json.loads((out / "eval-test" / "metrics.json").read_text())

    print("\n== 3/4 predict a few test images (one file is deliberately corrupt) ==", flush=True)
    t = time.perf_counter()
    samples = _save_samples(args.data, out / "samples", args.samples)
    cli_main(["predict", str(out / "samples"), "--checkpoint", str(ckpt), "--topk", "3"])
    times["predict"] = time.perf_counter() - t

    print("\n== 4/4 export ==", flush=True)
    t = time.perf_counter()
    # int8: calibrated on 512 training images, checked on the 10k test images (accuracy change printed)
    exp_args = ["export", "--checkpoint", str(ckpt), "--out", str(out / "export"), "--int8", "--min-agreement", "0"]
    if args.data:
        exp_args += ["--data", args.data]
    print("effvit " + " ".join(exp_args), flush=True)
    rc = cli_main(exp_args)
    exported = f"{out / 'export'}" if rc == 0 else f"failed (exit {rc}); see above"
    print(exported)
    times["export"] = time.perf_counter() - t
    t = time.perf_counter()
    speed = _int8_speed(out / "export") if rc == 0 else None
    times["int8 speed"] = time.perf_counter() - t

    total = time.perf_counter() - t0
    print("\n== summary ==")
    print(f"model      EfficientViT-M0, {args.epochs} epochs from scratch, 64x64 grey input")
    print(f"test top-1 {metrics['top1']:.2f}%   top-5 {metrics['top5']:.2f}%   loss {metrics['loss']:.4f} "
          f"({metrics['samples']} images)")
    print(f"files      {ckpt}, {out / 'log.csv'}, {out / 'curves.png'}, "
          f"{out / 'eval-test' / 'confusion.png'}")
    print(f"predicted  {len(samples) - 1} images from {out / 'samples'} (+1 corrupt file, skipped)")
    print(f"export     {exported}")
    if speed:
        print(speed)
    print("time       " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {total:.0f}s")
    return 0
