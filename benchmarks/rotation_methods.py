"""The five rotation heads side by side, as the paper compares them: train each, test each, one table.

Runs ``effvit rotation train`` then ``effvit rotation eval`` per method (same config, same seed, same
data) and writes ``results.json`` and ``results.md`` under --out. Every command it runs is printed, so
any row can be reproduced alone.

    # Fashion-MNIST, full circle, M0 (BENCHMARKS.md)
    python benchmarks/rotation_methods.py --out runs/rotation/bench-fmnist -c rotation_fashion_mnist_m0 \
        --eval "--dataset fashion_mnist" -- sched.epochs=3 data.train_fraction=0.3
    # photos, +-45 degrees (after benchmarks/rotation_photo_pool.py)
    python benchmarks/rotation_methods.py --out runs/rotation/bench-photos -c rotation_photos_m0 \
        --data runs/rotation/photos --eval "--data runs/rotation/photos/test --repeats 25"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("da", "cls", "uv", "psc", "cgd")


def run(cmd: list[str], env: dict) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the runs and the results table")
    ap.add_argument("-c", "--config", required=True, help="rotation config (shipped name or YAML)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--data", help="--data of the training runs")
    ap.add_argument("--eval", default="", help="extra arguments of `effvit rotation eval` (the test data)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every training run")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    py = [sys.executable, "-m", "effvit", "rotation"]
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    for method in args.methods.split(","):
        run_dir = out / method
        train = py + ["train", "-c", args.config, "--method", method, "--output", str(out), "--name", method,
                      "--overwrite", "--threads", str(args.threads), "--no-progress"]
        train += (["--data", args.data] if args.data else []) + args.overrides
        t_train = run(train, env)
        ev = py + ["eval", "--checkpoint", str(run_dir / "best.pth"), "--out", str(run_dir / "test"),
                   "--no-progress"] + shlex.split(args.eval)
        t_eval = run(ev, env)
        metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
        results[method] = {"train_s": round(t_train, 1), "eval_s": round(t_eval, 1), "train": train,
                           "eval": ev,
                           **{k: metrics[k] for k in ("paper", "subdegree", "selective", "samples")}}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))
    print(table(results))
    return 0


def table(results: dict) -> str:
    """One row per method: paper decoder; binned heads also with the sub-degree decoder."""
    head = ("| method | decoder | MAE | median | RMSE | P95 | acc@2 | acc@5 | acc@10 | AUC@5 | "
            "MAE top-80% conf. | train time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method in METHODS:
        if method not in results:
            continue
        r = results[method]
        decoders = [("argmax", r["paper"]), ("sub-degree", r["subdegree"])] if method in ("cls", "cgd") \
            else [("direct", r["subdegree"])]
        for name, m in decoders:
            sel = r["selective"]["top80%"]["mae"]
            lines.append(f"| {method.upper()} | {name} | {m['mae']:.2f} | {m['median']:.2f} | "
                         f"{m['rmse']:.2f} | "
                         f"{m['p95']:.2f} | {m['acc@2']:.1f}% | {m['acc@5']:.1f}% | {m['acc@10']:.1f}% | "
                         f"{m['auc@5']:.3f} | {sel:.2f} | {r['train_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
