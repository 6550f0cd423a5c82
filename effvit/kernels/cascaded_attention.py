"""Cascaded group attention (paper section 3) as one Triton kernel: all heads of a window in one program.

For each window of N tokens and each head i, with every BatchNorm already folded into the weights:

    t_i     = chunk_i(x) + o_{i-1}            the cascade (o_{-1} = 0; chunk_i: channels i*d .. i*d+d-1)
    q, k, v = t_i W_i + b_i                   the head's 1x1 conv: (N, d) x (d, 2 kd + d)
    q       = dwconv_{k_i}(q) + c_i           depthwise k_i x k_i, zero padding at the window's edges; the
                                              attention scale 16^-0.5 is folded into its weights and bias
    o_i     = softmax(q k^T + B_i) v          B_i: the relative-position bias of the window's token grid

and the result is ``relu(concat_i o_i)``: the input of the attention's output projection (the ReLU is
included; the projection and the residual add are not).

Windows are those of ``LocalWindowAttention``: a map no larger than the window (H <= r and W <= r) is one
window of its own size (its bias is the matching sub-grid of the r x r table; the conv pads at the map's
edges); a larger map is padded bottom/right with zeros to multiples of r and cut into r x r windows whose
padded tokens take part, as in the paper. The kernel reads windows straight from the (B, H, W, C) map and
writes its result in the same layout: partition, padding, reverse and crop cost no copies. A batch of
windows given as (Bw, r, r, C) is simply a batch of maps that are one window each.

Arguments (h heads, value width d = C / h, key width kd, K the largest q kernel, r the window):

    x           (B, H, W, C)        channels-last tokens, channel stride 1; fp32, fp16 or bf16
    qkv_w       (h, d, 2 kd + d)    head i's folded qkv conv, input-major (columns: q, then k, then v)
    qkv_b       (h, 2 kd + d)
    q_w         (h, K, K, kd)       head i's folded q depthwise kernel, centred (zeros around a kernel
                                    smaller than K), channels last; ``stack_q_kernels`` builds it
    q_b         (h, kd)
    bias        (h, P, P)           the windows' relative-position bias, padded to P = a power of two
                                    >= N; ``window_bias(table, H, W)`` builds it from the (h, r * r) table
    kernel_sizes                    head i's q kernel size (odd, <= min(K, 15))
    window                          r (7 in every variant; the table's side)

Returns a new contiguous (B, H, W, C) tensor of x's dtype. Weights of any float dtype are rounded to x's
dtype on load (as autocast does for the PyTorch form); the GEMMs accumulate in fp32 and the q conv, the
scores and the softmax run in fp32. fp32 GEMMs use IEEE fp32 products (no TF32). Inference only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference needs no Triton
    triton = None

__all__ = ["available", "cascaded_attention", "cascaded_attention_reference", "operands", "stack_q_kernels",
           "window_bias"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreted() -> bool:
    """Whether the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and not isinstance(_cga_kernel, triton.JITFunction)


def available(device: torch.device | str) -> bool:
    """Whether the kernel runs on ``device``: a CUDA GPU of compute capability >= 8.0 with Triton, or the
    CPU when Triton's interpreter is on (``TRITON_INTERPRET=1`` before this module is imported; tests)."""
    device = torch.device(device)
    if triton is None:
        return False
    if _interpreted():
        return device.type == "cpu"
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def stack_q_kernels(kernels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Per-head depthwise q kernels, each (kd, 1, k, k) as in ``nn.Conv2d``, -> ``q_w`` (h, K, K, kd) with
    each kernel centred in K x K (K the largest k) and the heads' kernel sizes."""
    sizes = tuple(int(w.shape[-1]) for w in kernels)
    for w, k in zip(kernels, sizes):
        if w.dim() != 4 or w.shape[1] != 1 or w.shape[2] != k or k % 2 == 0:
            raise ValueError(f"expected depthwise kernels (kd, 1, k, k) with k odd, got {tuple(w.shape)}")
    kmax = max(sizes)
    out = kernels[0].new_zeros(len(kernels), kmax, kmax, kernels[0].shape[0])
    for i, (w, k) in enumerate(zip(kernels, sizes)):
        o = (kmax - k) // 2
        out[i, o:o + k, o:o + k] = w[:, 0].permute(1, 2, 0)
    return out, sizes


def _window_grid(H: int, W: int, window: int) -> tuple[int, int, int, int]:
    """(window height, window width, windows down, windows across) for an H x W map."""
    if H <= window and W <= window:
        return H, W, 1, 1
    return window, window, -(-H // window), -(-W // window)


def _block(n: int) -> int:
    """The power of two >= max(n, 16) that holds n in a Triton block (tl.dot's smallest side is 16)."""
    return max(16, 1 << (n - 1).bit_length())


def window_bias(bias_table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The ``bias`` operand for height x width maps: (h, P, P), the relative-position bias of their windows'
    token grid (entry |dy| * r + |dx| of each head's (h, r * r) table) in the top-left (N, N) block, P the
    window's token count N rounded up to a power of two (>= 16); padding key columns hold -inf (the
    kernel's key mask), padding query rows 0. It depends only on the table and the map size: build it once
    per map size and keep it."""
    heads, r2 = bias_table.shape
    r = math.isqrt(r2)
    if r * r != r2:
        raise ValueError(f"bias_table must be (heads, r * r), got {tuple(bias_table.shape)}")
    wh, ww, _, _ = _window_grid(height, width, r)
    n, p = wh * ww, _block(wh * ww)
    y = torch.arange(wh, device=bias_table.device).repeat_interleave(ww)
    x = torch.arange(ww, device=bias_table.device).repeat(wh)
    idx = (y[:, None] - y[None, :]).abs() * r + (x[:, None] - x[None, :]).abs()
    out = bias_table.new_zeros(heads, p, p)
    out[:, :, n:] = float("-inf")
    out[:, :n, :n] = bias_table[:, idx]
    return out


@torch.no_grad()
def operands(attn: nn.Module, height: int, width: int) -> tuple:
    """The kernel's arguments after x, from a model's ``CascadedGroupAttention`` folded by its own
    ``fuse()`` (BN, and the scale into q), for height x width maps:
    ``(qkv_w, qkv_b, q_w, q_b, bias, kernel_sizes, window)``."""
    fused = copy.deepcopy(attn).fuse()
    q_w, sizes = stack_q_kernels([dw.weight for dw in fused.dws])
    return (fused.qkv_stack, fused.qkv_bias[:, 0], q_w, torch.stack([dw.bias for dw in fused.dws]),
            window_bias(attn.attention_biases.detach(), height, width), sizes, attn.window)


def _check(x, qkv_w, qkv_b, q_w, q_b, bias, kernel_sizes, window) -> tuple[int, int, int, int, int, int]:
    """Validate the arguments; returns (d, kd, window height, window width, windows down, windows across)."""
    if x.dim() != 4 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be (B, H, W, C) tokens of fp32/fp16/bf16, got {tuple(x.shape)} {x.dtype}")
    B, H, W, C = x.shape
    if B < 1 or H < 1 or W < 1:
        raise ValueError(f"x has no tokens: shape {tuple(x.shape)}")
    if qkv_w.dim() != 3:
        raise ValueError(f"qkv_w must be (heads, d, 2 * key_dim + d), got {tuple(qkv_w.shape)}")
    heads, d, e = qkv_w.shape
    kd = (e - d) // 2
    if heads * d != C or kd < 1 or 2 * kd + d != e:
        raise ValueError(f"qkv_w {tuple(qkv_w.shape)} does not fit x with {C} channels: expected "
                         "(heads, C / heads, 2 * key_dim + C / heads)")
    if tuple(qkv_b.shape) != (heads, e):
        raise ValueError(f"qkv_b must be ({heads}, {e}), got {tuple(qkv_b.shape)}")
    if q_w.dim() != 4 or q_w.shape[0] != heads or q_w.shape[1] != q_w.shape[2] or q_w.shape[3] != kd:
        raise ValueError(f"q_w must be ({heads}, K, K, {kd}) (stack_q_kernels builds it), got {tuple(q_w.shape)}")
    if tuple(q_b.shape) != (heads, kd):
        raise ValueError(f"q_b must be ({heads}, {kd}), got {tuple(q_b.shape)}")
    kmax = min(q_w.shape[1], 15)
    if len(kernel_sizes) != heads or any(k % 2 == 0 or not 0 < k <= kmax for k in kernel_sizes):
        raise ValueError(f"kernel_sizes must give {heads} odd sizes <= {kmax}, got {tuple(kernel_sizes)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    wh, ww, nh, nw = _window_grid(H, W, window)
    p = _block(wh * ww)
    if tuple(bias.shape) != (heads, p, p):
        raise ValueError(f"bias must be ({heads}, {p}, {p}) for {H}x{W} maps in {window}x{window} windows, got "
                         f"{tuple(bias.shape)}: build it with window_bias(bias_table, {H}, {W})")
    for name, t in (("qkv_w", qkv_w), ("qkv_b", qkv_b), ("q_w", q_w), ("q_b", q_b), ("bias", bias)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return d, kd, wh, ww, nh, nw


def cascaded_attention_reference(x: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor, q_w: torch.Tensor,
                                 q_b: torch.Tensor, bias: torch.Tensor, kernel_sizes: Sequence[int],
                                 window: int) -> torch.Tensor:
    """The kernel's function in plain PyTorch, head by head as the paper defines it (module docstring),
    computed in x's dtype with the softmax in fp32 (as under autocast)."""
    d, kd, wh, ww, nh, nw = _check(x, qkv_w, qkv_b, q_w, q_b, bias, kernel_sizes, window)
    B, H, W, C = x.shape
    dt = x.dtype
    n = wh * ww
    # NCHW windows, zero-padded bottom/right where the map is not a multiple of the window
    win = F.pad(x, (0, 0, 0, nw * ww - W, 0, nh * wh - H))
    win = win.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 5, 2, 4).reshape(B * nh * nw, C, wh, ww)
    kmax = q_w.shape[1]
    outs = []
    for i, k in enumerate(kernel_sizes):
        t = win[:, i * d:(i + 1) * d]
        if outs:
            t = t + outs[-1]
        qkv = F.conv2d(t, qkv_w[i].t().to(dt)[:, :, None, None], qkv_b[i].to(dt))
        q, key, v = qkv.split([kd, kd, d], dim=1)
        c = (kmax - k) // 2  # the head's kernel sits centred in the K x K block
        q = F.conv2d(q, q_w[i, c:c + k, c:c + k].permute(2, 0, 1)[:, None].to(dt), q_b[i].to(dt),
                     padding=k // 2, groups=kd)
        scores = q.flatten(2).transpose(1, 2) @ key.flatten(2) + bias[i, :n, :n].to(dt)
        attn = scores.float().softmax(dim=-1).to(dt)
        outs.append((v.flatten(2) @ attn.transpose(1, 2)).view(-1, d, wh, ww))
    y = torch.cat(outs, dim=1).relu()
    y = y.view(B, nh, nw, C, wh, ww).permute(0, 1, 4, 2, 5, 3).reshape(B, nh * wh, nw * ww, C)
    return y[:, :H, :W].contiguous()


def cascaded_attention(x: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor, q_w: torch.Tensor,
                       q_b: torch.Tensor, bias: torch.Tensor, kernel_sizes: Sequence[int], window: int, *,
                       programs: int | None = None, num_warps: int | None = None,
                       maxnreg: int | None = None) -> torch.Tensor:
    """The Triton kernel (module docstring); ``available(x.device)`` must hold.

    Tuning (speed only, never the result): ``programs`` caps the number of programs, each looping over
    windows (default: 8 per multiprocessor on CUDA, one per window under the interpreter); ``num_warps``
    defaults to 4, or 8 for d > 32; ``maxnreg`` caps registers per thread (more programs resident per
    multiprocessor, at the price of spills).
    """
    d, kd, wh, ww, nh, nw = _check(x, qkv_w, qkv_b, q_w, q_b, bias, kernel_sizes, window)
    if not available(x.device):
        raise RuntimeError(f"the Triton cascaded-attention kernel does not run on {x.device}: it needs Triton and "
                           "a CUDA GPU of compute capability >= 8.0 (or TRITON_INTERPRET=1 on the CPU); use "
                           "cascaded_attention_reference instead")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, qkv_w, qkv_b, q_w, q_b, bias)):
        raise RuntimeError("the cascaded-attention kernel has no backward: call it under torch.no_grad() or "
                           "torch.inference_mode(), or train with the PyTorch form")
    B, H, W, C = x.shape
    if x.stride(3) != 1:
        x = x.contiguous()
    n_windows = B * nh * nw
    if programs is None:
        programs = n_windows
        if x.device.type == "cuda":
            programs = 8 * torch.cuda.get_device_properties(x.device).multi_processor_count
    programs = max(1, min(programs, n_windows))
    p, dp, kdp = _block(wh * ww), _block(d), _block(kd)
    out = torch.empty(B, H, W, C, device=x.device, dtype=x.dtype)
    scratch = torch.empty(programs, p, kdp, device=x.device, dtype=torch.float32)
    # Triton's interpreter gets bf16 wrong (its dot multiplies the raw 16-bit patterns, its casts truncate):
    # there values are rounded to bf16 by hand and multiplied in fp32, which gives the same products
    mm = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[x.dtype]
    if _interpreted() and mm == tl.bfloat16:
        mm = tl.float32
    _cga_kernel[(programs,)](
        x, out, qkv_w.contiguous(), qkv_b.contiguous(), q_w.contiguous(), q_b.contiguous(), bias.contiguous(),
        scratch, x.stride(0), x.stride(1), x.stride(2), H, W, wh, ww, nh, nw, n_windows,
        sum(k << (4 * i) for i, k in enumerate(kernel_sizes)),
        C=C, D=d, KD=kd, HEADS=len(kernel_sizes), KMAX=q_w.shape[1], NP=p, DP=dp, KDP=kdp,
        MM=mm, PRECISION="ieee" if mm == tl.float32 else "tf32",
        num_warps=num_warps or (8 if dp > 32 else 4), **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    return out


if triton is not None:

    @triton.jit
    def _rounded(v, dt: tl.constexpr, MM: tl.constexpr):
        """``v`` rounded to ``dt`` (to nearest, ties to even), as a tensor of MM, the GEMMs' operand dtype.
        MM differs from dt only for bf16 under the interpreter: there the rounding is done on the bits."""
        if MM == dt:
            return v.to(dt)
        else:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _cga_kernel(x_ptr, out_ptr, qkv_w_ptr, qkv_b_ptr, q_w_ptr, q_b_ptr, bias_ptr, scratch_ptr,
                    stride_b, stride_h, stride_w, H, W, WH, WW, n_wh, n_ww, n_windows, kernel_sizes,
                    C: tl.constexpr, D: tl.constexpr, KD: tl.constexpr, HEADS: tl.constexpr, KMAX: tl.constexpr,
                    NP: tl.constexpr, DP: tl.constexpr, KDP: tl.constexpr, MM: tl.constexpr,
                    PRECISION: tl.constexpr):
        """Each program loops over windows. Blocks: NP tokens (the window's WH * WW padded to a power of
        two), DP value channels, KDP key channels; padding rows and columns are masked to zero, padding keys
        to -inf (by the bias operand). ``kernel_sizes`` packs head i's q kernel size in bits 4i..4i+3. Values
        are rounded to x's dtype where the PyTorch form rounds them; MM is the dtype the GEMMs multiply in
        (x's, except bf16 under the interpreter)."""
        dt = x_ptr.dtype.element_ty
        f32 = tl.float32
        E = 2 * KD + D
        tok = tl.arange(0, NP)
        dcol = tl.arange(0, DP)
        kcol = tl.arange(0, KDP)
        ty = tok // WW
        tx = tok % WW
        is_tok = tok < WH * WW
        dmask = dcol < D
        kmask = kcol < KD
        # q of the current head goes through this program's scratch: the depthwise conv needs each token's
        # neighbours, and registers cannot be exchanged between threads
        scratch = scratch_ptr + tl.program_id(0) * (NP * KDP)
        per_image = n_wh * n_ww
        for win in range(tl.program_id(0), n_windows, tl.num_programs(0)):
            b = (win // per_image).to(tl.int64)
            wy = (win % per_image) // n_ww
            wx = win % n_ww
            my = wy * WH + ty
            mx = wx * WW + tx
            in_map = is_tok & (my < H) & (mx < W)  # padded tokens read as zeros and are not written
            x_tok = x_ptr + b * stride_b + my * stride_h + mx * stride_w
            out_tok = out_ptr + ((b * H + my) * W + mx) * C
            o = tl.zeros((NP, DP), dtype=f32)
            for i in range(HEADS):
                chunk = tl.load(x_tok[:, None] + (i * D + dcol)[None, :], mask=in_map[:, None] & dmask[None, :],
                                other=0.0)
                t = _rounded(chunk.to(f32) + o, dt, MM)
                # the head's qkv conv: three GEMMs (q, k, v column blocks of its weight) plus bias
                w_rows = qkv_w_ptr + i * D * E + dcol[:, None] * E
                qk_mask = dmask[:, None] & kmask[None, :]
                wq = _rounded(tl.load(w_rows + kcol[None, :], mask=qk_mask, other=0.0), dt, MM)
                wk = _rounded(tl.load(w_rows + KD + kcol[None, :], mask=qk_mask, other=0.0), dt, MM)
                wv = _rounded(tl.load(w_rows + 2 * KD + dcol[None, :], mask=dmask[:, None] & dmask[None, :],
                                      other=0.0), dt, MM)
                b_row = qkv_b_ptr + i * E
                bq = _rounded(tl.load(b_row + kcol, mask=kmask, other=0.0), dt, MM).to(f32)
                bk = _rounded(tl.load(b_row + KD + kcol, mask=kmask, other=0.0), dt, MM).to(f32)
                bv = _rounded(tl.load(b_row + 2 * KD + dcol, mask=dmask, other=0.0), dt, MM).to(f32)
                q = tl.dot(t, wq, input_precision=PRECISION) + bq[None, :]
                k = tl.dot(t, wk, input_precision=PRECISION) + bk[None, :]
                v = tl.dot(t, wv, input_precision=PRECISION) + bv[None, :]
                # q depthwise conv, zero padding at the window's edges
                tl.debug_barrier()  # every thread is done reading the previous head's q
                tl.store(scratch + tok[:, None] * KDP + kcol[None, :], _rounded(q, dt, MM).to(f32))
                tl.debug_barrier()
                ks = (kernel_sizes >> (4 * i)) & 15
                half = ks // 2
                corner = KMAX // 2 - half  # where this head's kernel starts inside the centred K x K block
                qc = tl.zeros((NP, KDP), dtype=f32)
                qc += _rounded(tl.load(q_b_ptr + i * KD + kcol, mask=kmask, other=0.0), dt, MM).to(f32)[None, :]
                for tap in range(ks * ks):
                    ky = tap // ks
                    kx = tap % ks
                    sy = ty + ky - half
                    sx = tx + kx - half
                    ok = is_tok & (sy >= 0) & (sy < WH) & (sx >= 0) & (sx < WW)
                    qn = tl.load(scratch + (sy * WW + sx)[:, None] * KDP + kcol[None, :], mask=ok[:, None],
                                 other=0.0)
                    wt = tl.load(q_w_ptr + ((i * KMAX + corner + ky) * KMAX + corner + kx) * KD + kcol, mask=kmask,
                                 other=0.0)
                    qc += qn * _rounded(wt, dt, MM).to(f32)[None, :]
                # scores + bias, softmax over the window's real tokens, times v
                s = tl.dot(_rounded(qc, dt, MM), tl.trans(_rounded(k, dt, MM)), input_precision=PRECISION)
                s += _rounded(tl.load(bias_ptr + i * NP * NP + tok[:, None] * NP + tok[None, :]), dt, MM).to(f32)
                p = tl.exp2((s - tl.max(s, axis=1)[:, None]) * 1.4426950408889634)
                o = tl.dot(_rounded(p, dt, MM), _rounded(v, dt, MM), input_precision=PRECISION)
                # the head's output in x's dtype, as the next head reads it; stored after the ReLU
                o = _rounded(o / tl.sum(p, axis=1)[:, None], dt, MM).to(f32)
                tl.store(out_tok[:, None] + (i * D + dcol)[None, :], tl.maximum(o, 0.0).to(dt),
                         mask=in_map[:, None] & dmask[None, :])
