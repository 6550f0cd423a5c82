"""NCHW form of the fused model, for graph runtimes (the ONNX export).

ONNX Runtime rewrites a graph of NCHW convolutions into its own blocked layout and fuses bias,
activation and residual adds into them; the token layout that is fastest in PyTorch reaches it as
transposes around every spatial conv, and its batched per-head GEMM as one grouped conv, both slower
there (about 3% on M0). This module reads the same folded parameters as ``FusedEfficientVit`` and
computes the same function with 1x1 convolutions, per-head projections fed ``chunk_i + out_{i-1}`` as
in the paper, and NCHW windows. It exists to be exported, not to be run in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fuse import FusedDownsample, FusedDwFFN, FusedEfficientVit, FusedPatchMerging, FusedWindowAttention

__all__ = ["NCHWForm"]


def _pw(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 conv from a stored (C_in, C_out) GEMM operand (exporters fold the reshape)."""
    return F.conv2d(x, w_t.t()[:, :, None, None], b)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class NCHWForm(nn.Module):
    """Same outputs as the ``FusedEfficientVit`` it wraps (logits only), NCHW throughout."""

    def __init__(self, fused: FusedEfficientVit):
        super().__init__()
        self.fused = fused.eval()
        self.in_chans = fused.in_chans

    def _dwffn(self, m: FusedDwFFN, x: torch.Tensor) -> torch.Tensor:
        x = _conv(m.dw, x)  # its bias already carries the FFN's output bias
        return x + _pw(F.relu(_pw(x, m.w1_t, m.b1)), m.w2_t)

    def _patchmerge(self, m: FusedPatchMerging, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(_conv(m.conv2, F.relu(_pw(x, m.w1_t, m.b1))))
        s = F.linear(F.relu(F.linear(h.mean((2, 3)), m.fc1_w, m.fc1_b)), m.fc2_w, m.fc2_b)
        return _pw(h * torch.sigmoid(s)[:, :, None, None], m.w3_t, m.b3)

    def _attention(self, m: FusedWindowAttention, x: torch.Tensor) -> torch.Tensor:
        a = m.attn
        B, C, H, W = x.shape
        r = m.window
        kd, d = a.key_dim, a.val_dim
        windowed = not (H <= r and W <= r)
        if windowed:
            pad_b, pad_r = (r - H % r) % r, (r - W % r) % r
            nh, nw = (H + pad_b) // r, (W + pad_r) // r
            xw = F.pad(x, (0, pad_r, 0, pad_b)) if pad_b or pad_r else x
            xw = xw.view(B, C, nh, r, nw, r).permute(0, 2, 4, 1, 3, 5).reshape(B * nh * nw, C, r, r)
            h_, w_ = r, r
        else:
            nh = nw = pad_b = pad_r = 0
            xw, h_, w_ = x, H, W
        bw = xw.shape[0]
        bias = a._bias(h_, w_)
        chunks = xw.chunk(a.num_heads, dim=1)
        outs = []
        feat = chunks[0]
        for i, dw in enumerate(a.dws):
            if i > 0:
                feat = feat + chunks[i]
            q, k, v = _pw(feat, a.qkv_w[i], a.qkv_b[i, 0]).split([kd, kd, d], dim=1)
            q = _conv(dw, q)  # scale folded in
            attn = (q.flatten(2).transpose(1, 2) @ k.flatten(2) + bias[i]).softmax(dim=-1)
            feat = (v.flatten(2) @ attn.transpose(1, 2)).view(bw, d, h_, w_)
            outs.append(feat)
        y = _pw(F.relu(torch.cat(outs, dim=1)), m.proj_w_t, m.proj_b)
        if windowed:
            y = y.view(B, nh, nw, C, r, r).permute(0, 3, 1, 4, 2, 5).reshape(B, C, nh * r, nw * r)
            if pad_b or pad_r:
                y = y[:, :, :H, :W]
        return x + y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fused
        for i, conv in enumerate(f.patch_embed.convs):
            x = conv(x)
            if i < 3:
                x = F.relu(x)
        for stage in f.stages:
            for block in stage:
                x = self._dwffn(block.dwffn0, x)
                if isinstance(block, FusedDownsample):
                    x = self._patchmerge(block.patchmerge, x)
                else:
                    x = self._attention(block.mixer, x)
                x = self._dwffn(block.dwffn1, x)
        return f.head(x.mean((2, 3)))
