"""The fused model of this tree against the same of another git revision, and timm's best form.

    python benchmarks/against_ref.py --ref main --variants m0,m1,m2,m3,m4,m5 --batches 1,16

Each implementation runs in its own worker process (the revision from ``git archive``), all pinned to
the same single thread; the parent times them in alternating rounds of ``--seconds`` each and reports
medians and the ratios (>1: this tree is faster). Forms: eager PyTorch, traced + frozen TorchScript,
and ONNX Runtime (1 thread). timm's entry is its fastest non-compiled form of the same runtime
(reparameterised; eager or channels-last; traced).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMS = ("eager", "traced", "onnx")


# -- worker side -----------------------------------------------------------------------------------
def effvit_forward(variant: str, x, form: str, tmp: str):
    """A zero-argument call of the importable ``effvit``'s model in ``form`` (eager, traced, onnx) on ``x``."""
    import warnings

    import torch

    import effvit
    try:  # in both trees: the same BN statistics
        from effvit.bench.weights import randomise_norms
    except ImportError:  # a revision from before the harness left effvit.fast
        from effvit.fast.benchmark import randomise_norms

    torch.manual_seed(0)
    model = randomise_norms(effvit.create_model(variant)).eval()
    if form == "onnx":
        try:
            from effvit.deploy.graph import export_onnx
        except ImportError:  # a revision from before the deployment package was named effvit.deploy
            from effvit.fast.export import export_onnx

        path = os.path.join(tmp, f"{variant}.onnx")
        try:
            export_onnx(model, path, img_size=tuple(x.shape[-2:]), verify=False, layout="nchw")
        except TypeError:  # this tree: one graph, no layout choice
            export_onnx(model, path, img_size=tuple(x.shape[-2:]), verify=False)
        return _ort(path, x)
    fused = effvit.fuse(model)
    if form == "traced":
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            fused = torch.jit.freeze(torch.jit.trace(fused, x))
    return lambda: fused(x)


def _timm_forward(variant: str, x, form: str, tmp: str):
    import timm
    import torch
    from timm.utils import reparameterize_model

    from effvit.bench.forms import export_plain_onnx, timm_forms
    from effvit.bench.timing import pick_fastest
    from effvit.bench.weights import randomise_norms

    torch.manual_seed(0)
    model = randomise_norms(timm.create_model(variant)).eval()
    if form == "onnx":
        path = os.path.join(tmp, f"timm_{variant}.onnx")
        export_plain_onnx(reparameterize_model(model), x, path)
        return _ort(path, x)
    forms = timm_forms(model, x)
    keep = [k for k in forms if k.startswith("reparam") and (("trace" in k) == (form == "traced"))]
    _, fn, _ = pick_fastest({k: forms[k] for k in keep}, 0.5, x.device)
    return fn


def _ort(path: str, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name, feed = sess.get_inputs()[0].name, x.numpy()
    return lambda: sess.run(None, {name: feed})


def worker(impl: str) -> None:
    """Read {"setup"} / {"time"} requests as JSON lines on stdin, answer on stdout."""
    import torch

    torch.set_num_threads(1)
    fns, tmp = {}, tempfile.mkdtemp()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "setup":
            x = torch.randn(req["batch"], 3, 224, 224, generator=torch.Generator().manual_seed(1))
            make = _timm_forward if impl == "timm" else effvit_forward
            fn = make(req["variant"], x, req["form"], tmp)
            with torch.inference_mode():
                for _ in range(3):
                    fn()
            fns[req["key"]] = fn
            reply: dict = {"ok": True}
        else:
            fn, times = fns[req["key"]], []
            with torch.inference_mode():
                end = time.perf_counter() + req["seconds"]
                while time.perf_counter() < end or len(times) < 3:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
            reply = {"median": statistics.median(times)}
        print(json.dumps(reply), flush=True)


# -- parent side -----------------------------------------------------------------------------------
class Worker:
    def __init__(self, impl: str, root: Path):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", impl], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=root)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker died on {req}")
        return json.loads(line)


def checkout(ref: str, dest: Path) -> Path:
    """The effvit package of git revision ``ref`` under ``dest``."""
    archive = dest / "ref.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), ref, "effvit"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="main", help="git revision to compare with")
    p.add_argument("--variants", default="m0,m1,m2,m3,m4,m5")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.4, help="per implementation per round")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    from effvit.models import resolve_models  # this tree's names; each worker imports its own tree

    with tempfile.TemporaryDirectory() as tmp:
        impls = {"ref": Worker("effvit", checkout(args.ref, Path(tmp))), "new": Worker("effvit", REPO),
                 "timm": Worker("timm", REPO)}
        print(f"| variant | batch | form | {args.ref} ms | this ms | timm best ms | this / {args.ref} | "
              "this / timm |")
        print("|---|---|---|---|---|---|---|---|")
        for v in args.variants.split(","):
            variant = resolve_models(v)[0]
            for batch in map(int, args.batches.split(",")):
                for form in args.forms.split(","):
                    key = f"{variant}/{batch}/{form}"
                    for w in impls.values():
                        w.ask(op="setup", key=key, variant=variant, batch=batch, form=form)
                    runs: dict[str, list[float]] = {k: [] for k in impls}
                    for r in range(args.rounds):
                        order = list(impls) if r % 2 == 0 else list(reversed(impls))
                        for k in order:
                            runs[k].append(impls[k].ask(op="time", key=key, seconds=args.seconds)["median"])
                    med = {k: statistics.median(t) for k, t in runs.items()}
                    vs_ref = statistics.median(a / b for a, b in zip(runs["ref"], runs["new"]))
                    vs_timm = statistics.median(a / b for a, b in zip(runs["timm"], runs["new"]))
                    print(f"| {v} | {batch} | {form} | {1e3 * med['ref']:.2f} | {1e3 * med['new']:.2f} | "
                          f"{1e3 * med['timm']:.2f} | {vs_ref:.3f} | {vs_timm:.2f} |", flush=True)
        for w in impls.values():
            w.proc.stdin.close()
            w.proc.wait()


if __name__ == "__main__":
    main()
