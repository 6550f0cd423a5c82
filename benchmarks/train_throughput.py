"""Training throughput: effvit's EfficientViT-M0 against timm's ``efficientvit_m0`` in the same loop.

Both models start from the same weights and run the engine's own ``train_step`` (forward, loss,
backward, AGC clipping, AdamW step) on the same batches, as the engine calls it: the losses are checked
for NaN once per round (``LossWatch``), not with a host sync per step. Rounds alternate between the models
so load changes on a shared machine hit both alike. Reports the median images/s of each and their ratio.

    python benchmarks/train_throughput.py             # the Fashion-MNIST demo setting (64 px, grey)
    python benchmarks/train_throughput.py --img-size 224 --in-chans 3 --batch-size 64 --classes 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (the first is warm-up)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per model per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import timm

    from effvit.models import create_model
    from effvit.train import ClassificationTask
    from effvit.train.engine import LossWatch, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = create_model("efficientvit_m0", num_classes=args.classes, img_size=args.img_size,
                        in_chans=args.in_chans)
    theirs = timm.create_model("efficientvit_m0", num_classes=args.classes, img_size=args.img_size,
                               in_chans=args.in_chans)
    theirs.load_state_dict(ours.state_dict())  # same layout: identical starting weights
    runs = {}
    for name, model in (("effvit", ours), ("timm", theirs)):
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.025)
        task = ClassificationTask(model, None, num_classes=args.classes, smoothing=0.1)
        runs[name] = (model, opt, task, [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for r in range(args.rounds):
        order = ("effvit", "timm") if r % 2 == 0 else ("timm", "effvit")
        for name in order:
            model, opt, task, times = runs[name]
            sync()
            t = time.perf_counter()
            watch = LossWatch()
            for i in range(args.steps):
                watch.record(i, train_step(model, task, x, y, opt, device=device, amp=args.amp, clip_grad=0.02,
                                           clip_mode="agc", check_finite=False))
            if watch.check() is not None:
                raise FloatingPointError(f"{name}: non-finite loss")
            sync()
            if r > 0:
                times.append(args.steps * args.batch_size / (time.perf_counter() - t))
    res = {name: statistics.median(v[3]) for name, v in runs.items()}
    rounds = list(zip(runs["effvit"][3], runs["timm"][3], strict=True))
    out = {
        "setting": {k: getattr(args, k)
                    for k in ("img_size", "in_chans", "classes", "batch_size", "steps", "amp")},
        "device": args.device if device.type != "cpu" else f"cpu ({torch.get_num_threads()} threads, "
                                                          f"{platform.processor() or platform.machine()})",
        "effvit_img_s": round(res["effvit"], 1), "timm_img_s": round(res["timm"], 1),
        "ratio_effvit_over_timm": round(res["effvit"] / res["timm"], 3),
        "per_round_ratio": [round(a / b, 3) for a, b in rounds],
        "torch": torch.__version__, "timm": timm.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"training step, batch {args.batch_size} at {args.img_size}px x{args.in_chans}, {out['device']}")
    print(f"effvit {out['effvit_img_s']:.1f} img/s   timm {out['timm_img_s']:.1f} img/s   "
          f"ratio {out['ratio_effvit_over_timm']:.3f} (median of {args.rounds - 1} alternating rounds; "
          f"per round {out['per_round_ratio']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
