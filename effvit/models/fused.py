"""The inference form's modules: what the network's modules become when ``fuse()`` folds them.

Each module of ``effvit.models.efficientvit`` that folds returns one of these from its ``fuse()``; each
runs one path on tokens and, where the graph is exported (ONNX, ``torch.export``), its plain NCHW form:

- Conv+BN -> one conv with bias; a 1x1 one computed as a GEMM over tokens (``PointwiseConv``).
- ``x + DW(x)`` -> one depthwise conv with +1 on its centre tap; the FFN and the window attention take
  their skip connection themselves (``skip``): the last GEMM accumulates it.
- The FFN's output bias moves into the preceding depthwise conv (``fold_ffn_bias``), so the FFN's last
  GEMM has no bias pass.
- The attention scale (16^-0.5 = 0.25, a power of two: exact) is inside q's depthwise conv and the
  relative-position bias is gathered once into a buffer; the heads' projections of their own channel
  chunks run as one batched GEMM, leaving only the cascade term per head.
- Memory is channels-last: a 1x1 conv is then a plain GEMM over (B*H*W, C) tokens, the windows and the
  heads' q/k/v are views, and the spatial convs run in their fast layout.
- On a CPU whose oneDNN convolution outruns its BLAS GEMM at large batches (``conv_batch_for_cpu``),
  the 1x1 convs of a batch that large run as oneDNN convolutions on the same channels-last memory.

Parameter names are those of the modules they fold, so a fused model's state dict has the same keys
whichever way it was folded (``effvit.fuse`` or timm's ``reparameterize_model``).
"""

import functools
import math
import time
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .attention import HeadCascade, grid_bias, window_partition, window_reverse

# kept whole by torch.fx's symbolic tracing (they branch on shapes)
torch.fx.wrap("grid_bias")
torch.fx.wrap("window_partition")
torch.fx.wrap("window_reverse")


@torch.jit.unused
def exporting_graph() -> bool:
    """Whether an ONNX export or ``torch.export`` is capturing the model: those graphs get the NCHW form,
    whose convolutions the runtime lays out itself."""
    # both ONNX exporters trace or compile: the cheap test first, is_in_onnx_export costs imports per call
    if torch.compiler.is_exporting():
        return True
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): a view when ``x`` is in channels-last memory."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B * H * W, C)


def from_tokens(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Tokens (B*H*W, C') of map ``x`` (B, C, H, W) back to a (B, C', H, W) channels-last view."""
    B, _, H, W = x.shape
    return t.view(B, H, W, t.shape[1]).permute(0, 3, 1, 2)  # explicit sizes: an empty batch has no -1


class PointwiseConv(nn.Module):
    """A folded 1x1 conv: one GEMM over the tokens of channels-last memory, ``(B*H*W, C_in) @ W^T + b``.
    The weight is stored transposed, (C_in, C_out): the GEMM's right operand as MKL reads it fastest (a
    transposed view costs twice the time on small maps). A ``residual`` is added to the output; without a
    bias it is the GEMM's accumulator (no extra pass)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.flatten(1).t().contiguous(), requires_grad=False)  # (C_in, C_out)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.conv_batch = 0  # from this batch on a oneDNN conv instead of the GEMM; 0: never (set_conv_batch)
        self.register_buffer("conv_weight", torch.zeros(0), persistent=False)  # (C_out, C_in, 1, 1)

    @torch.no_grad()
    def set_conv_batch(self, batch: int) -> None:
        """Run batches of ``batch`` images or more as a convolution (0: never); the conv's weight layout
        is kept beside the GEMM's only when it is used."""
        self.conv_batch = batch
        self.conv_weight = self.weight.t()[:, :, None, None].contiguous() if batch else self.weight.new_zeros(0)

    def runs_as_conv(self, x: torch.Tensor) -> bool:
        """Whether batch ``x`` runs as a convolution: in an exported graph (a Conv node: the runtime picks
        its layout), or from ``conv_batch`` images on the CPU."""
        if not torch.jit.is_scripting() and exporting_graph():
            return True
        return 0 < self.conv_batch <= x.shape[0] and x.device.type == "cpu"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) in channels-last memory, or already tokens (B*H*W, C) (then so are the residual
        and the output: a chain of GEMMs stays in tokens)."""
        if x.dim() == 2:
            return self.tokens(x, residual)
        if self.runs_as_conv(x):
            weight = self.conv_weight if self.conv_batch else self.weight.t()[:, :, None, None]  # kept only when used
            y = F.conv2d(x, weight, self.bias)
            return y if residual is None else y.add_(residual)
        res = None if residual is None else to_tokens(residual)
        return from_tokens(self.tokens(to_tokens(x), res), x)

    def tokens(self, t: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # parameters come through nn.Module.__getattr__: read once
        if residual is not None and bias is None:
            return torch.addmm(residual, t, weight)
        y = torch.mm(t, weight) if bias is None else torch.addmm(bias, t, weight)
        return y if residual is None else y + residual


@functools.cache
def conv_batch_for_cpu() -> int:
    """16 where a 1x1 convolution of 16 channels-last images runs at least 10% faster as oneDNN's
    convolution than as the BLAS GEMM over its tokens, else 0. Measured once per process: on AVX-512 CPUs
    whose MKL takes a slower code path the convolution is about twice as fast; below a batch of about 16
    oneDNN picks a kernel no faster than the GEMM."""
    x = torch.randn(16, 128, 14, 14).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 128, 1, 1)
    tokens, w_gemm = to_tokens(x), w.flatten(1).t().contiguous()
    return 16 if faster_by(lambda: F.conv2d(x, w), lambda: torch.mm(tokens, w_gemm), 0.9) else 0


def faster_by(candidate, baseline, factor: float, rounds: int = 7, warmup: int = 2) -> bool:
    """Whether ``candidate()``'s best time is below ``factor`` times ``baseline()``'s, in alternating
    rounds after ``warmup`` (oneDNN builds its kernel on the first call)."""
    best = [math.inf, math.inf]
    with torch.inference_mode():
        for i in range(rounds):
            for j, run in enumerate((candidate, baseline)):
                start = time.perf_counter()
                run()
                if i >= warmup:
                    best[j] = min(best[j], time.perf_counter() - start)
    return best[0] < factor * best[1]


class FusedConvMlp(nn.Module):
    """The folded FFN: 1x1 expand, ReLU, 1x1 project; with ``skip`` it adds its own input."""

    __constants__ = ["skip"]

    def __init__(self, pw1: PointwiseConv, pw2: PointwiseConv, skip: bool):
        super().__init__()
        self.pw1 = pw1
        self.pw2 = pw2
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.skip else None
        if self.pw1.runs_as_conv(x):
            return self.pw2(F.relu(self.pw1(x), inplace=True), residual)
        # both GEMMs on tokens: one layout change in and one out instead of one per GEMM
        res = None if residual is None else to_tokens(residual)
        return from_tokens(self.pw2.tokens(self.pw1.tokens(to_tokens(x)).relu_(), res), x)


@torch.no_grad()
def fold_ffn_bias(dw: nn.Module, ffn: nn.Module) -> None:
    """Move a fused residual FFN's output bias b2 into the depthwise conv before it, in place.

    ``x' = dw(x) + b2`` and ``pw1.bias -= W1 b2`` leave ``x' + W2 relu(W1 x' + b1')`` equal to the
    original; the FFN's last GEMM then has no bias and accumulates the skip connection directly. Anything
    else (not both fused, the bias already moved) is left as it is.
    """
    if not (isinstance(dw, nn.Conv2d) and isinstance(ffn, FusedConvMlp) and ffn.skip and dw.bias is not None
            and ffn.pw2.bias is not None):
        return
    b2 = ffn.pw2.bias.double()
    dw.bias.add_(b2.to(dw.bias.dtype))
    ffn.pw1.bias.sub_((b2 @ ffn.pw1.weight.double()).to(ffn.pw1.bias.dtype))
    ffn.pw2.bias = None


class FusedSqueezeExcite(nn.Module):
    """Squeeze-excite with its two 1x1 convs as GEMMs on the pooled (B, C) vector (in ONNX too: a Gemm,
    no layout reorder around a 1x1 map)."""

    def __init__(self, fc1: PointwiseConv, fc2: PointwiseConv):
        super().__init__()
        self.fc1 = fc1
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2.tokens(self.fc1.tokens(x.mean((2, 3))).relu_())[:, :, None, None]
        return x * s.sigmoid()


class FusedCascadedGroupAttention(HeadCascade):
    """Cascaded group attention over one window, folded: BN in every conv, the scale in q's depthwise
    convs, the window bias a buffer and the heads' projections stacked (heads, d, e) for one batched
    GEMM of every chunk; each head's own weight then serves its cascade term."""

    def __init__(self, qkvs: Sequence[PointwiseConv], dws: Sequence[nn.Conv2d], proj: PointwiseConv,
                 attention_biases: torch.Tensor, window_bias: torch.Tensor, window: int, key_dim: int):
        super().__init__()
        self.num_heads = len(qkvs)
        self.key_dim = key_dim
        self.val_dim = qkvs[0].weight.shape[0]
        self.window = window
        self.qkvs = nn.ModuleList(qkvs)
        self.dws = nn.ModuleList(dws)
        self.proj = nn.ModuleDict({"1": proj})  # the trained module's key names
        self.attention_biases = nn.Parameter(attention_biases.detach().clone(), requires_grad=False)
        self.register_buffer("eval_bias", window_bias.detach().clone(), persistent=False)
        self.register_buffer("qkv_stack", torch.stack([qkv.weight for qkv in qkvs]), persistent=False)
        self.register_buffer("qkv_bias", torch.stack([qkv.bias[None] for qkv in qkvs]), persistent=False)

    @torch.jit.ignore
    def get_attention_biases(self, device: torch.device | None = None) -> torch.Tensor:
        """timm's accessor: the (heads, r*r, r*r) window bias."""
        return self.eval_bias

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bias = grid_bias(self.eval_bias, self.window, x)
        proj = self.proj["1"]
        if not torch.jit.is_scripting() and exporting_graph():  # NCHW convs, as the trained module runs
            return proj(self.cascade(x, bias, 1.0), residual)
        B, C, H, W = x.shape
        kd, d, N = self.key_dim, self.val_dim, H * W
        qkv_stack = self.qkv_stack  # every head's projection of its own chunk at once, (heads, B*N, e)
        chunks = torch.baddbmm(self.qkv_bias, _head_tokens(x, self.num_heads), qkv_stack).unbind(0)
        weights, biases = qkv_stack.unbind(0), bias.unbind(0)  # one call each, not one index per head
        outs = []
        feat = chunks[0]
        for i, dw in enumerate(self.dws):
            # qkv_i(chunk_i + out_{i-1}) = [W_i chunk_i + b_i] + W_i out_{i-1}: bracket batched above
            t = chunks[i] if i == 0 else torch.addmm(chunks[i], feat, weights[i])
            q, k, v = t.view(B, N, 2 * kd + d).split_with_sizes([kd, kd, d], dim=2)
            q = dw(q.view(B, H, W, kd).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, N, kd)
            attn = torch.baddbmm(biases[i], q, k.transpose(1, 2)).softmax(dim=-1)
            feat = torch.bmm(attn, v).view(B * N, d)
            outs.append(feat)
        y = F.relu(torch.cat(outs, dim=1), inplace=True)
        if proj.runs_as_conv(x):
            return proj(from_tokens(y, x), residual)
        res = None if residual is None else to_tokens(residual)  # on tokens: one layout change, at the end
        return from_tokens(proj(y, res), x)


def _head_tokens(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads, B*H*W, C/heads) token view of channels-last ``x``, each head's chunk a batch entry. The
    batch stride (C/heads) is smaller than the rows' stride (C); off the CPU the chunks are made dense,
    since BLAS libraries treat such interleaved batches unevenly."""
    B, C, H, W = x.shape
    t = x.permute(0, 2, 3, 1).reshape(B * H * W, heads, C // heads).transpose(0, 1)
    return t if x.device.type == "cpu" else t.contiguous()


class FusedLocalWindowAttention(nn.Module):
    """The folded window attention; with ``skip`` it adds its own input (a single window's output
    projection accumulates it)."""

    __constants__ = ["skip"]

    def __init__(self, attn: FusedCascadedGroupAttention, window_size: int, skip: bool):
        super().__init__()
        self.window_size = window_size
        self.window = attn.window
        self.attn = attn
        self.skip = skip

    def set_resolution(self, resolution: int) -> None:
        if min(self.window_size, resolution) != self.window:
            raise ValueError("a fused model's windows are fixed: call set_input_size on the model before "
                             "effvit.fuse, then fuse it again")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.skip else None
        windows = window_partition(x, self.window)
        if windows is x:
            return self.attn(x, residual)
        y = window_reverse(self.attn(windows), x, self.window)
        return y if residual is None else residual + y


def is_fused(model: nn.Module) -> bool:
    """Whether ``model`` is (or holds) an inference form made by ``fuse``."""
    return any(isinstance(m, PointwiseConv) for m in model.modules())
