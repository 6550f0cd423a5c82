"""Timing the paper's way, with a peer run alternately in the same process.

The protocol (paper section 5): BN fused, traced model, random input, warm-up, then a timed window;
throughput = batch / iteration time. Here each implementation's *best form* is picked first (every
candidate form timed briefly, fastest kept), then the chosen forms run in alternating rounds so that
load from other processes hits both alike; medians over all timed iterations are reported.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Forward", "Timing", "ratio", "time_forward", "alternate", "max_abs_diff", "pick_fastest",
           "cpu_peak_flops"]

Forward = Callable[[], object]  # one batch through one form; inputs are bound inside


@dataclass
class Timing:
    rounds: list[list[float]] = field(default_factory=list)  # seconds per batch, one list per round

    @property
    def times(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.rounds else float("nan")

    def img_s(self, batch: int) -> float:
        return batch / self.median


def ratio(slow: Timing, fast: Timing) -> float:
    """Median over rounds of slow/fast per-round median times: each round's two measurements ran
    back to back, so load that changes between rounds cancels out."""
    return statistics.median(statistics.median(a) / statistics.median(b)
                             for a, b in zip(slow.rounds, fast.rounds, strict=True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn: Forward, seconds: float, device: torch.device, min_iters: int = 2) -> list[float]:
    """Per-iteration wall times for ``seconds`` (at least ``min_iters`` iterations)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def alternate(fns: dict[str, Forward], seconds: float, rounds: int, device: torch.device,
              warmup: float = 0.0, on_round: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Run each form for ``seconds / rounds`` in turn, ``rounds`` times; warm-up untimed first."""
    for fn in fns.values():
        time_forward(fn, warmup, device, min_iters=1)
    out = {k: Timing() for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].rounds.append(time_forward(fn, seconds / rounds, device))
        if on_round is not None:
            on_round()
    return out


def max_abs_diff(out: object, reference: torch.Tensor) -> float:
    """Largest absolute difference of a form's output (a tensor or an ONNX Runtime array, any dtype or
    device) to the fp32 reference; NaN if the output has any."""
    return (torch.as_tensor(out).to(reference.device).float() - reference).abs().max().item()


def pick_fastest(candidates: dict[str, Callable[[], Forward]], probe: float, device: torch.device,
                 reference: torch.Tensor | None = None, tol: float = 0.0,
                 ) -> tuple[str, Forward, dict[str, float]]:
    """Build every candidate, time each for ``probe`` seconds in two alternating rounds, return
    (name, forward, {name: median seconds}). A candidate that fails to build, or whose output differs
    from ``reference`` by more than ``tol``, is dropped with a warning: a fast wrong form must never be
    the one timed."""
    built: dict[str, Forward] = {}
    wrong: list[str] = []
    for name, make in candidates.items():
        try:
            fn = make()
            out = fn()  # first call: compilation, tracing caches, allocator warm-up
            _sync(device)
        except Exception as e:  # a form this torch/timm cannot produce is skipped, not fatal
            warnings.warn(f"benchmark form {name!r} unavailable: {type(e).__name__}: {e}", stacklevel=2)
            continue
        if reference is not None:
            diff = max_abs_diff(out, reference)
            if not diff <= tol:  # also catches NaN
                wrong.append(f"{name} (max abs diff {diff:.3g} > {tol:.3g})")
                warnings.warn(f"benchmark form {name!r} dropped: wrong outputs, max abs difference {diff:.3g} "
                              f"to the reference (tolerance {tol:.3g})", stacklevel=2)
                continue
        built[name] = fn
    if not built:
        raise ValueError("no benchmark form could be built" + (": wrong outputs from " + ", ".join(wrong)
                                                              if wrong else ": " + ", ".join(candidates)))
    if len(built) == 1:
        name, fn = next(iter(built.items()))
        return name, fn, {name: float("nan")}
    med = {k: t.median for k, t in alternate(built, probe, 2, device, warmup=0).items()}
    best = min(med, key=med.get)
    return best, built[best], med


def cpu_peak_flops(threads: int = 1, n: int = 2048, seconds: float = 2.0) -> float:
    """Peak fp32 FLOP/s attainable: the best of repeated n x n x n matrix products (MKL/oneDNN sgemm),
    2 n^3 FLOPs each, on ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        with torch.inference_mode():
            times = time_forward(lambda: a @ b, seconds, torch.device("cpu"), min_iters=3)
    finally:
        torch.set_num_threads(old)
    return 2 * n ** 3 / min(times[1:])
