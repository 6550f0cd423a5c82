"""Time `effvit straighten` on a 12-megapixel JPEG, one core, end to end: decode, estimate, rotate, crop,
encode. Per stage and in total, median of --repeats runs, for each test-time augmentation setting.

    taskset -c 0 python benchmarks/straighten_speed.py --photo /usr/share/backgrounds/mate/nature/Storm.jpg

The photo is resized to 4000 x 3000 (12.0 MP), tilted by 7 degrees and saved as a quality-90 JPEG, the
kind of file a phone writes. The process start (Python, torch and the model loading) is timed apart:
it is paid once per command, not per photo.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from effvit.rotation.model import load_rotation_model
from effvit.rotation.straighten import TTA, estimate, open_upright, save_like, straighten_image


def make_photo(src: str, path: Path) -> Path:
    with Image.open(src) as im:
        im = im.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    im.rotate(7.0, resample=Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
    return path


def time_one(model, path: Path, out: Path, tta: str, lines: bool) -> dict:
    """Seconds per stage, wall clock and CPU time of this process (on a busy machine the CPU time is
    what the work costs one core; the wall clock also counts the waits for it)."""
    marks = [("start", time.perf_counter(), time.process_time())]
    src, upright = open_upright(path)
    marks.append(("decode", time.perf_counter(), time.process_time()))
    ((angle, _),) = estimate(model, [upright], model.trained_range, lines=lines, **TTA[tta])
    marks.append(("estimate", time.perf_counter(), time.process_time()))
    fixed = straighten_image(upright, angle)
    marks.append(("rotate + crop", time.perf_counter(), time.process_time()))
    save_like(fixed, src, out)
    marks.append(("encode", time.perf_counter(), time.process_time()))
    out_d = {}
    for (_, w0, c0), (name, w1, c1) in zip(marks, marks[1:]):
        out_d[name], out_d[f"{name} cpu"] = w1 - w0, c1 - c0
    out_d["total"], out_d["total cpu"] = marks[-1][1] - marks[0][1], marks[-1][2] - marks[0][2]
    return out_d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", default="/usr/share/backgrounds/mate/nature/Storm.jpg")
    ap.add_argument("--model", default=None, help="rotation model (default: the bundled one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write results.json here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    photo = make_photo(args.photo, tmp / "tilted-12mp.jpg")
    w, h = Image.open(photo).size
    model = load_rotation_model(args.model)
    results = {"photo": f"{w}x{h} ({w * h / 1e6:.1f} MP) JPEG q90", "threads": torch.get_num_threads()}
    for tta, lines in (("none", False), ("flip", False), ("full", False), ("full", True)):
        runs = [time_one(model, photo, tmp / "out.jpg", tta, lines) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        name = f"tta {tta}" + (" + lines" if lines else "")
        results[name] = med
        print(f"{name:<20} " + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()), flush=True)
    cmd = [sys.executable, "-m", "effvit", "straighten", str(photo), "--out", str(tmp / "cli"), "--tta", "full",
           "--lines"] + (["--model", args.model] if args.model else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    results["command, one photo"] = time.perf_counter() - t0
    print(f"whole command for one photo (tta full + lines), process start included: "
          f"{results['command, one photo']:.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
