"""Inference form of EfficientViT-M: every exact rewrite that makes the network cheaper to run.

``fuse(model)`` turns a trained ``EfficientVitMsra`` into ``FusedEfficientVit`` with the same outputs
(fp32 differences are rounding only, ~1e-6). The rewrites, all exact algebra:

- Conv+BN -> one conv (or matrix product) with bias; BN+Linear (head) -> one linear; the two
  distillation heads -> their mean.
- ``x + DW(x)`` -> one depthwise conv with +1 on the centre tap (the identity is a 1 at the centre).
- Every FFN follows a residual depthwise conv, so the FFN's output bias moves into that conv's bias and
  ``pw1``'s bias is compensated (``b1 - W1 b2``): the FFN is then ``x += relu(x W1^T + b1') W2^T``, two
  GEMMs whose epilogues do the bias and the residual add.
- Cascaded group attention: head i reads ``chunk_i + out_{i-1}``, and a 1x1 conv is linear, so
  ``qkv_i = W_i chunk_i + b_i + W_i out_{i-1}``. The chunk part of every head is one batched GEMM
  before the loop; only the small cascade term ``out_{i-1} W_i^T`` stays sequential.
- The attention scale (16^-0.5 = 0.25, a power of two, so folding is bit-exact) goes into the q
  depthwise conv; the relative-position bias is gathered once into a buffer.
- Windows: a map that is one window is attended in place; a map the windows tile exactly is gathered
  once (no padding) and scattered back by the residual add itself; other maps are padded as in the paper.

Layout: activations live as (B, H, W, C) token matrices. Every 1x1 conv is then a plain GEMM (MKL /
cuBLAS at near peak, where oneDNN's 1x1 convs reach ~70-85% on these small maps), q/k/v are strided
views, and the spatial convs see the same memory as channels-last NCHW (a free permute). Updates of the
residual stream are in place: fresh large buffers cost page faults on every call.

Only standard ops: the module runs eagerly, under ``torch.jit.trace``/``script``, ``torch.compile`` and
``torch.onnx.export``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effvit.models.efficientvit import (
    CascadedGroupAttention,
    ConvMlp,
    ConvNorm,
    Downsample,
    EfficientVitBlock,
    EfficientVitMsra,
    NormLinear,
    PatchEmbed,
    PatchMerging,
    Residual,
    check_input,
)

__all__ = ["fuse", "FusedEfficientVit", "fuse_conv_bn", "fuse_bn_linear"]


# -- folding helpers (float64 arithmetic, stored in the source dtype) --------------------------------
@torch.no_grad()
def _bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``x * scale + shift``."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


@torch.no_grad()
def _folded(m: ConvNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv+BN as (weight, bias) in float64."""
    s, t = _bn_affine(m.bn)
    return m.conv.weight.double() * s[:, None, None, None], t


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.to(like.dtype).contiguous(), requires_grad=False)


@torch.no_grad()
def fuse_conv_bn(m: ConvNorm, scale: float = 1.0, residual: bool = False,
                 cls: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    """Conv+BN -> Conv2d with bias; ``scale`` multiplies the output, ``residual`` adds the identity
    (stride-1 depthwise only: +1 on the centre tap, exact whatever the padding); ``cls`` picks the
    module class (``TokenConv2d`` for token inputs)."""
    conv = m.conv
    w, b = _folded(m)
    if residual:
        if conv.groups != conv.in_channels or conv.in_channels != conv.out_channels or conv.stride != (1, 1):
            raise ValueError("only a stride-1 depthwise conv can absorb its residual")
        kh, kw = conv.kernel_size
        w[:, 0, kh // 2, kw // 2] += 1.0
    out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    groups=conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    out.weight.copy_(w * scale)
    out.bias.copy_(b * scale)
    return out


@torch.no_grad()
def fuse_bn_linear(m: NormLinear) -> nn.Linear:
    """BatchNorm1d+Linear -> Linear: ``W (x s + t) + c = (W diag(s)) x + (W t + c)``."""
    s, t = _bn_affine(m.bn)
    w = m.linear.weight.double()
    out = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=m.linear.weight.dtype)
    out.weight.copy_(w * s[None, :])
    out.bias.copy_(w @ t + m.linear.bias.double())
    return out


# -- layout helpers ------------------------------------------------------------------------------------
class TokenConv2d(nn.Conv2d):
    """A spatial conv on (B, H, W, C) tokens. The permutes are free views of the same memory as
    channels-last NCHW, which oneDNN and cuDNN take natively and answer in kind."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x.permute(0, 3, 1, 2), self.weight, self.bias)
        return y.permute(0, 2, 3, 1).contiguous()


def _acc_gemm(acc: torch.Tensor, a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """``acc + a @ w_t``, written into ``acc`` (a buffer this module owns) in eager mode. Out of place
    under autocast (the in-place form would mix dtypes), for scripting and for graph capture
    (exporters turn an in-place update of a slice into a scatter)."""
    if torch.jit.is_scripting():
        return torch.addmm(acc, a, w_t)
    if _in_place_ok(a):
        return acc.addmm_(a, w_t)
    return torch.addmm(acc, a, w_t)


@torch.jit.unused
def _in_place_ok(a: torch.Tensor) -> bool:
    return not (torch.is_autocast_enabled(a.device.type) or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling())


# -- fused modules -----------------------------------------------------------------------------------
class FusedDwFFN(nn.Module):
    """``x = x + DW(x)`` then ``x = x + FFN(x)``: one depthwise conv and two GEMMs.

    The FFN's output bias is carried by the conv's bias; ``pw1``'s bias compensates (see module doc).
    """

    def __init__(self, dw: ConvNorm, ffn: ConvMlp):
        super().__init__()
        self.dw = fuse_conv_bn(dw, residual=True, cls=TokenConv2d)
        w1, b1 = _folded(ffn.pw1)
        w2, b2 = _folded(ffn.pw2)
        w1, w2 = w1.flatten(1), w2.flatten(1)
        ref = ffn.pw1.conv.weight
        with torch.no_grad():
            self.dw.bias.add_(b2.to(ref.dtype))
        self.w1_t = _param(w1.t(), ref)  # (C, 2C): stored transposed, the GEMM's right operand
        self.b1 = _param(b1 - w1 @ b2, ref)
        self.w2_t = _param(w2.t(), ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(x)
        B, H, W, C = x.shape
        x2 = x.view(B * H * W, C)
        h = torch.addmm(self.b1, x2, self.w1_t).relu_()
        return _acc_gemm(x2, h, self.w2_t).view(B, H, W, C)


class FusedPatchMerging(nn.Module):
    """1x1 expand + ReLU, depthwise 3x3 s2 + ReLU, squeeze-excite, 1x1 project; tokens in and out."""

    def __init__(self, m: PatchMerging):
        super().__init__()
        ref = m.conv1.conv.weight
        w1, b1 = _folded(m.conv1)
        self.w1_t, self.b1 = _param(w1.flatten(1).t(), ref), _param(b1, ref)
        self.conv2 = fuse_conv_bn(m.conv2, cls=TokenConv2d)
        se = m.se
        self.fc1_w, self.fc1_b = _param(se.fc1.weight.flatten(1), ref), _param(se.fc1.bias, ref)
        self.fc2_w, self.fc2_b = _param(se.fc2.weight.flatten(1), ref), _param(se.fc2.bias, ref)
        w3, b3 = _folded(m.conv3)
        self.w3_t, self.b3 = _param(w3.flatten(1).t(), ref), _param(b3, ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h = torch.addmm(self.b1, x.reshape(B * H * W, C), self.w1_t).relu_().view(B, H, W, -1)
        h = self.conv2(h).relu_()
        s = F.linear(F.relu(F.linear(h.mean((1, 2)), self.fc1_w, self.fc1_b)), self.fc2_w, self.fc2_b)
        h = h * torch.sigmoid(s)[:, None, None, :]
        B, H, W, C4 = h.shape
        return torch.addmm(self.b3, h.view(B * H * W, C4), self.w3_t).view(B, H, W, -1)


class FusedCascadedAttention(nn.Module):
    """Cascaded group attention on windows given as (Bw, r, r, C) tokens; returns the ReLU'd,
    concatenated head outputs (Bw * r * r, C), ready for the output projection."""

    def __init__(self, m: CascadedGroupAttention):
        super().__init__()
        h, kd, d = m.num_heads, m.key_dim, m.val_dim
        self.num_heads, self.key_dim, self.val_dim, self.window = h, kd, d, m.window
        ref = m.attention_biases
        heads = [_folded(qkv) for qkv in m.qkvs]
        # one batched GEMM over heads: (h, M, d) @ (h, d, e) + (h, 1, e)
        self.qkv_w = _param(torch.stack([w.flatten(1).t() for w, _ in heads]), ref)
        self.qkv_b = _param(torch.stack([b[None, :] for _, b in heads]), ref)
        # the same matrices for the sequential cascade term of heads 1..h-1
        self.cascade_w = _param(torch.stack([w.flatten(1).t() for w, _ in heads[1:]]) if h > 1
                                else ref.new_zeros(0, d, 2 * kd + d), ref)
        # key_dim ** -0.5 == 0.25 exactly: folded into the q conv
        self.dws = nn.ModuleList(fuse_conv_bn(dw, scale=m.scale, cls=TokenConv2d) for dw in m.dws)
        with torch.no_grad():
            self.register_buffer("bias", m.attention_bias(m.window, m.window).detach().clone())

    def _bias(self, H: int, W: int) -> torch.Tensor:
        """(h, N, N); a map smaller than the window uses its tokens' sub-block of the full bias."""
        r = self.window
        if H == r and W == r:
            return self.bias
        b = self.bias.view(self.num_heads, r, r, r, r)[:, :H, :W, :H, :W]
        return b.reshape(self.num_heads, H * W, H * W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bw, H, W, C = x.shape
        N, M = H * W, Bw * H * W
        kd, d = self.key_dim, self.val_dim
        bias = self._bias(H, W)
        xh = x.reshape(M, self.num_heads, d).transpose(0, 1)  # (h, M, d): a strided view
        qkv = torch.baddbmm(self.qkv_b, xh, self.qkv_w)  # (h, M, e), each head contiguous
        outs: list[torch.Tensor] = []
        feat = xh[0]  # placeholder for TorchScript's type inference; replaced on head 0
        for i, dw in enumerate(self.dws):
            t = qkv[i]
            if i > 0:
                t = _acc_gemm(t, feat, self.cascade_w[i - 1])
            # the q slice is a strided view of qkv: hand the conv libraries a dense copy (free on CPU:
            # oneDNN copies it anyway; on CUDA a suspect in the open batch-2048 fault, BENCHMARKS.md "GPU")
            q = dw(t[:, :kd].reshape(Bw, H, W, kd).contiguous()).view(Bw, N, kd)
            k = t[:, kd:2 * kd].view(Bw, N, kd)
            v = t[:, 2 * kd:].view(Bw, N, d)
            attn = torch.baddbmm(bias[i], q, k.transpose(1, 2)).softmax(dim=-1)
            feat = torch.bmm(attn, v).view(M, d)
            outs.append(feat)
        return torch.cat(outs, dim=1).relu_()


class FusedWindowAttention(nn.Module):
    """``x + proj(attention(x))`` over r x r windows; partition only where the map needs it."""

    def __init__(self, m: Residual):
        super().__init__()
        lwa = m.m
        self.window = lwa.window
        self.attn = FusedCascadedAttention(lwa.attn)
        w, b = _folded(lwa.attn.proj[1])
        ref = lwa.attn.attention_biases
        self.proj_w_t, self.proj_b = _param(w.flatten(1).t(), ref), _param(b, ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        r = self.window
        if H <= r and W <= r:  # one window: attend in place, project into the stream
            y = self.attn(x)
            x2 = _acc_gemm(x.view(B * H * W, C), y, self.proj_w_t)
            return x2.add_(self.proj_b).view(B, H, W, C)
        pad_b, pad_r = (r - H % r) % r, (r - W % r) % r
        nh, nw = (H + pad_b) // r, (W + pad_r) // r
        xp = x if pad_b == 0 and pad_r == 0 else F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        # gather the windows: one copy (B*nh*nw, r, r, C)
        win = xp.view(B, nh, r, nw, r, C).transpose(2, 3).reshape(B * nh * nw, r, r, C)
        y = torch.addmm(self.proj_b, self.attn(win), self.proj_w_t)
        # scatter back as a strided view, read by the residual add itself
        y = y.view(B, nh, nw, r, r, C).transpose(2, 3).reshape(B, nh * r, nw * r, C)
        if pad_b or pad_r:
            y = y[:, :H, :W]
        return x.add_(y)


class FusedBlock(nn.Module):
    """The sandwich: [DW, FFN], window attention, [DW, FFN]."""

    def __init__(self, m: EfficientVitBlock):
        super().__init__()
        self.dwffn0 = FusedDwFFN(m.dw0.m, m.ffn0.m)
        self.mixer = FusedWindowAttention(m.mixer)
        self.dwffn1 = FusedDwFFN(m.dw1.m, m.ffn1.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwffn1(self.mixer(self.dwffn0(x)))


class FusedDownsample(nn.Module):
    def __init__(self, m: Downsample):
        super().__init__()
        self.dwffn0 = FusedDwFFN(m.res1[0].m, m.res1[1].m)
        self.patchmerge = FusedPatchMerging(m.patchmerge)
        self.dwffn1 = FusedDwFFN(m.res2[0].m, m.res2[1].m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwffn1(self.patchmerge(self.dwffn0(x)))


class FusedStem(nn.Module):
    """Four 3x3 s2 convs in channels-last (6x faster than NCHW for the 3-channel one on CPU)."""

    def __init__(self, m: PatchEmbed):
        super().__init__()
        self.convs = nn.ModuleList(fuse_conv_bn(c) for c in (m.conv1, m.conv2, m.conv3, m.conv4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < 3:
                x = x.relu_()
        return x.permute(0, 2, 3, 1).contiguous()  # a view: oneDNN answers channels-last


class FusedEfficientVit(nn.Module):
    """Inference-only EfficientViT-M with the outputs of the model it was fused from (in eval mode).

    ``forward_features`` gives the stride-64 map (NCHW shape, channels-last memory), ``forward_stages``
    the three stage maps, ``forward`` the logits (the mean of both heads for a distilled model).
    """

    def __init__(self, model: EfficientVitMsra):
        super().__init__()
        self.variant = model.variant
        self.in_chans = model.in_chans
        self.num_classes = model.num_classes
        self.num_features = model.num_features
        self.img_size = model.img_size
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)
        self.patch_embed = FusedStem(model.patch_embed)
        stages = []
        for stage in model.stages:
            mods = [] if isinstance(stage.downsample, nn.Identity) else [FusedDownsample(stage.downsample)]
            mods += [FusedBlock(b) for b in stage.blocks]
            stages.append(nn.Sequential(*mods))
        self.stages = nn.Sequential(*stages)
        self.head = self._fuse_head(model)

    @staticmethod
    @torch.no_grad()
    def _fuse_head(model: EfficientVitMsra) -> nn.Module:
        if isinstance(model.head, nn.Identity):
            return nn.Identity()
        head = fuse_bn_linear(model.head)
        if model.head_dist is not None:  # eval returns (head + head_dist) / 2: one linear
            dist = fuse_bn_linear(model.head_dist)
            head.weight.copy_((head.weight.double() + dist.weight.double()) / 2)
            head.bias.copy_((head.bias.double() + dist.bias.double()) / 2)
        return head

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            check_input(x, self.in_chans, self.patch_embed.convs[0].weight.dtype)
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self._tokens(x)).permute(0, 3, 1, 2)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self._tokens(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x.permute(0, 3, 1, 2))
        return feats

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@torch.no_grad()
def fuse(model: EfficientVitMsra) -> FusedEfficientVit:
    """Fold a trained model into its inference form; the source model is read, never modified.

    The result is in eval mode, has no gradients and lives on the source's device and dtype.
    """
    if not isinstance(model, EfficientVitMsra):
        raise ValueError(f"fuse expects an EfficientVitMsra classifier (effvit.create_model), got "
                         f"{type(model).__name__}; for features_only models fuse the classifier and "
                         "use forward_stages")
    fused = FusedEfficientVit(model).eval()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused
