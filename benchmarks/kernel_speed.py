"""Speed of the Triton cascaded-attention kernel against the PyTorch forms of the same function.

For each variant's stages at 224 px (maps 14x14, 7x7, 4x4) it builds the stage's window attention with
random BN statistics and bias, folds it (``effvit.kernels.cascaded_attention.operands``), and times on one
(B, H, W, C) token map, in alternating rounds, median wall time per call with a sync after each:

- ``kernel``: the Triton kernel (windows read from the map in place; ``wN``: num_warps N, ``rN``: at most N
  registers per thread);
- ``torch-ref``: the plain PyTorch reference (the paper's head loop);
- ``+graph``: the same replayed from a CUDA graph (batch 1: what a latency-bound user would run).

Every form's output is first checked against the fp32 reference: a form whose error exceeds twice the
PyTorch reference's own error in the same dtype (plus 1e-5 of the output's scale) is marked MISMATCH and
its time does not count. The table ends with the speedup of the best kernel form over the best PyTorch
form and the kernel's memory traffic rate (tokens read once and written once, GB/s).

    python benchmarks/kernel_speed.py --device cuda --batch 2048,1 --dtype fp16,bf16 --json out.json
    python benchmarks/kernel_speed.py --device cpu --variants m0 --stages 3 --batch 1   # interpreter smoke
    python benchmarks/kernel_speed.py --compile-only      # no GPU needed: registers/spills for sm_90
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

SIDES_AT_224 = (14, 7, 4)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--variants", default="m0,m1,m2,m3,m4,m5")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--batch", default="2048,1", help="batches (images), comma-separated")
    ap.add_argument("--dtype", default="fp16,bf16", help="comma-separated among fp32, fp16, bf16")
    ap.add_argument("--num-warps", default="", help="kernel forms to time, e.g. 4,8 (default: the kernel's own)")
    ap.add_argument("--maxnreg", default="0", help="register caps per thread to time, e.g. 0,128 (0: none)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per form per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph forms at batch 1")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the kernel for --arch without a GPU and print registers and spills")
    ap.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (90: H100/H200)")
    return ap.parse_args()


def cases(args):
    """(variant, stage index, width, heads, q kernels, map side, window) for the selected stages."""
    from effvit.models import VARIANTS, resolve_models

    for v in args.variants.split(","):
        cfg = VARIANTS[resolve_models(v)[0]]
        for s in (int(s) - 1 for s in args.stages.split(",")):
            side = SIDES_AT_224[s]
            yield v, s, cfg.widths[s], cfg.heads[s], cfg.kernels[:cfg.heads[s]], side, min(7, side)


def kernel_configs(args, default_warps=None) -> list[tuple]:
    """(num_warps, maxnreg) pairs to try; None/0 leave the kernel's default."""
    warps = [int(w) for w in args.num_warps.split(",") if w] or [default_warps]
    return [(w, int(r)) for w in warps for r in args.maxnreg.split(",")]


def compile_only(args) -> None:
    """Registers and spills of the kernel per stage shape, from Triton's compiler and ptxas (no GPU)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from effvit.kernels.cascaded_attention import _block, _cga_kernel, _window_grid

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    ints = ("stride_b stride_h stride_w H W WH WW n_wh n_ww n_windows kernel_sizes").split()
    print("| variant | stage | dtype | d | warps | maxnreg | registers | spill stack (B) | shared (B) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v, s, C, heads, kernels, side, window in cases(args):
        d = C // heads
        for name in args.dtype.split(","):
            mm = getattr(tl, DTYPES[name])
            for warps, maxnreg in kernel_configs(args, default_warps=8 if _block(d) > 32 else 4):
                sig = {n: f"*{'fp32' if i > 1 else name}" for i, n in enumerate(
                    "x_ptr out_ptr qkv_w_ptr qkv_b_ptr q_w_ptr q_b_ptr bias_ptr scratch_ptr".split())}
                sig.update({n: "i32" for n in ints})
                wh, ww, _, _ = _window_grid(side, side, window)
                const = dict(C=C, D=d, KD=16, HEADS=heads, KMAX=max(kernels), NP=_block(wh * ww), DP=_block(d),
                             KDP=16, MM=mm, PRECISION="ieee" if name == "fp32" else "tf32")
                sig.update({k: "constexpr" for k in const})
                t0 = time.perf_counter()
                options = {"num_warps": warps} | ({"maxnreg": maxnreg} if maxnreg else {})
                k = triton.compile(ASTSource(_cga_kernel, sig, const), target=GPUTarget("cuda", args.arch, 32),
                                   options=options)
                dt = time.perf_counter() - t0
                cubin = Path(f"/tmp/effvit_cga_{os.getpid()}.cubin")
                cubin.write_bytes(k.asm["cubin"])
                usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                       text=True).stdout
                cubin.unlink()
                got = dict(re.findall(r"(REG|STACK):(\d+)", usage))
                print(f"| {v} | {s + 1} | {name} | {d} | {warps} | {maxnreg or '-'} | {got.get('REG')} | "
                      f"{got.get('STACK')} | {k.metadata.shared} | {dt:.1f} |")


def measure(args, forms: dict, truth, graphs: bool, sync) -> tuple[dict, dict]:
    """Check every form against the fp32 truth, add CUDA-graph replays if asked, time in alternating rounds.
    Returns (median ms, max abs error) per form."""
    import torch

    errs = {f: (fn()[1] - truth).abs().max().item() for f, fn in forms.items()}
    calls = {f: (lambda fn=fn: fn()[0]) for f, fn in forms.items()}
    if graphs:
        for f in list(calls):
            side_stream = torch.cuda.Stream()  # capture wants its warm-up on a side stream
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                for _ in range(2):
                    calls[f]()
            torch.cuda.current_stream().wait_stream(side_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                calls[f]()
            calls[f + "+graph"], errs[f + "+graph"] = graph.replay, errs[f]
    times = {f: [] for f in calls}
    for r in range(args.rounds):
        for f in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            for _ in range(args.iters):
                sync()
                t = time.perf_counter()
                calls[f]()
                sync()
                times[f].append((time.perf_counter() - t) * 1e3)
    return {f: statistics.median(t) for f, t in times.items()}, errs


def main() -> None:
    args = parse()
    if args.device == "cpu":  # Triton's interpreter; read when the kernel module is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.compile_only:
        compile_only(args)
        return
    import torch

    from effvit.bench.weights import randomise_norms
    from effvit.kernels import cascaded_attention as ca
    from effvit.models.efficientvit import LocalWindowAttention

    device = torch.device(args.device)
    if not ca.available(device):
        raise SystemExit(f"the kernel does not run on {device} here (Triton, CUDA capability >= 8.0)")
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.set_grad_enabled(False)
    # the fp32 truth must be fp32 (cuDNN convs default to TF32); the timed forms are 16-bit
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for v, s, C, heads, kernels, side, _window in cases(args):
        torch.manual_seed(0)
        lwa = randomise_norms(LocalWindowAttention(C, heads, side, kernels)).eval().to(device)
        ops32 = ca.operands(lwa.attn, side, side)
        for name in args.dtype.split(","):
            dtype = getattr(torch, DTYPES[name])
            ops = [o.to(dtype) if torch.is_tensor(o) else o for o in ops32]
            for batch in (int(b) for b in args.batch.split(",")):
                x = torch.randn(batch, side, side, C, generator=torch.Generator().manual_seed(1)).to(device, dtype)
                # each form returns (its output, that output as a float (B, S, S, C) map for the check)
                forms = {}
                for w, r in kernel_configs(args):
                    def kernel(w=w, r=r, x=x, ops=ops):
                        y = ca.cascaded_attention(x, *ops, num_warps=w, maxnreg=r or None)
                        return y, y.float()
                    forms[" ".join(["kernel"] + [f"w{w}"] * bool(w) + [f"r{r}"] * bool(r))] = kernel

                def torch_ref(x=x, ops=ops):
                    y = ca.cascaded_attention_reference(x, *ops)
                    return y, y.float()
                forms["torch-ref"] = torch_ref
                truth = ca.cascaded_attention_reference(x.float(), *[o.float() if torch.is_tensor(o) else o
                                                                    for o in ops])
                torch_err = (torch_ref()[1] - truth).abs().max().item()
                med, errs = measure(args, forms, truth, gpu and batch == 1 and not args.no_graphs, sync)
                ok = {f: errs[f] <= 2 * torch_err + 1e-5 * truth.abs().max().item() for f in med}
                best_k = min((f for f in med if f.startswith("kernel") and ok[f]), key=med.get, default=None)
                best_t = min((f for f in med if f.startswith("torch") and ok[f]), key=med.get, default=None)
                moved = 2 * x.numel() * x.element_size()  # tokens read once, result written once
                row = dict(variant=v, stage=s + 1, batch=batch, dtype=name, map=f"{side}x{side}", C=C, heads=heads,
                           ms={f: round(m, 4) for f, m in med.items()}, err=errs,
                           mismatch=[f for f in med if not ok[f]], best_kernel=best_k, best_torch=best_t,
                           speedup=round(med[best_t] / med[best_k], 3) if best_k and best_t else None,
                           kernel_gb_s=round(moved / med[best_k] / 1e6, 1) if best_k else None)
                rows.append(row)
                print(f"{v} s{s + 1} b{batch} {name}: " + ", ".join(f"{f} {m:.3f} ms" for f, m in med.items())
                      + (f"  MISMATCH {row['mismatch']}" if row["mismatch"] else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter)", torch=torch.__version__,
            triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"), rows=rows), indent=1))
    print("\n| variant | stage | map | batch | dtype | best torch (ms) | best kernel (ms) | speedup | kernel GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bt, bk = r["best_torch"], r["best_kernel"]
        torch_ms = f"{bt} {r['ms'][bt]:.3f}" if bt else "none"
        kernel_ms = f"{bk} {r['ms'][bk]:.3f}" if bk else "MISMATCH"
        print(f"| {r['variant']} | {r['stage']} | {r['map']} | {r['batch']} | {r['dtype']} | {torch_ms} | "
              f"{kernel_ms} | {r['speedup']} | {r['kernel_gb_s']} |")


if __name__ == "__main__":
    main()
