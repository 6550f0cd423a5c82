"""What the network's window attention and its fused form share: the windows, the relative-position bias
and the cascade over heads on NCHW windows (the trained module's forward, and the fused module's form for
exported graphs).

Shape-dependent steps are plain functions that the modules calling them keep whole under torch.fx
(``torch.fx.wrap`` in each calling module: symbolic tracing cannot branch on a traced shape), so the model
traces for feature extraction as it is.
"""

import torch
import torch.nn.functional as F
from torch import nn


def bias_index(window: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """(N, N) index into a LeViT bias table of ``window**2`` offsets, for an height x width token grid.

    Offsets are absolute (|dy|, |dx|) and indexed ``|dy| * window + |dx|``: the same order as the
    official code's first-appearance enumeration, so tables are interchangeable.
    """
    height = window if height is None else height
    width = window if width is None else width
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack((ys.flatten(), xs.flatten()))  # 2, N
    rel = (pos[:, :, None] - pos[:, None, :]).abs()
    return rel[0] * window + rel[1]


def resize_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """Bicubic resize of a (heads, r*r) relative-position table to (heads, window*window)."""
    heads, n = table.shape
    r = int(round(n ** 0.5))
    if r * r != n:
        raise ValueError(f"bias table of {n} entries is not square")
    if r == window:
        return table
    grid = table.detach().float().reshape(1, heads, r, r)
    out = F.interpolate(grid, size=(window, window), mode="bicubic", align_corners=False)
    return out.reshape(heads, window * window).to(table.dtype)


def grid_bias(bias: torch.Tensor, window: int, x: torch.Tensor) -> torch.Tensor:
    """The (heads, N, N) window bias restricted to the tokens of ``x``'s grid: the whole of it for a
    full window, the sub-grid of offsets for a map smaller than the window."""
    height, width = x.shape[-2], x.shape[-1]
    if height == window and width == window:
        return bias
    heads = bias.shape[0]
    sub = bias.view(heads, window, window, window, window)[:, :height, :width, :height, :width]
    return sub.reshape(heads, height * width, height * width)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * nh * nw, C, window, window), padding bottom/right with zeros; a map that
    fits one window is returned as it is. Windows are cut in (B, H, W, C) order: they reach the
    attention with channels-last strides, as timm's do, so train-mode BN statistics reduce alike."""
    B, C, H, W = x.shape
    if H <= window and W <= window:
        return x
    pad_b, pad_r = (window - H % window) % window, (window - W % window) % window
    t = x.permute(0, 2, 3, 1)
    if pad_b or pad_r:
        t = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
    nh, nw = (H + pad_b) // window, (W + pad_r) // window
    t = t.reshape(B, nh, window, nw, window, C).transpose(2, 3).reshape(B * nh * nw, window, window, C)
    return t.permute(0, 3, 1, 2)


def window_reverse(y: torch.Tensor, x: torch.Tensor, window: int) -> torch.Tensor:
    """Inverse of ``window_partition(x, window)`` for the attention output ``y``, cropped to x's map."""
    B, C, H, W = x.shape
    if H <= window and W <= window:
        return y
    nh, nw = (H + window - 1) // window, (W + window - 1) // window  # ONNX's Div truncates: no -(-H // w)
    t = y.permute(0, 2, 3, 1).reshape(B, nh, nw, window, window, C).transpose(2, 3)
    t = t.reshape(B, nh * window, nw * window, C)[:, :H, :W]
    return t.permute(0, 3, 1, 2)


class HeadCascade(nn.Module):
    """The cascade over heads, for modules with ``qkvs`` (each head's 1x1 q/k/v projection), ``dws``
    (q's depthwise convs), ``num_heads``, ``key_dim`` and ``val_dim``. Head i's input is channel chunk i
    plus the previous head's output; q gets its depthwise conv; scores are ``(q^T k) * scale + bias``."""

    def cascade(self, x: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        """ReLU of the heads' outputs, concatenated: (B, C, H, W) for windows ``x`` (B, C, H, W)."""
        B, C, H, W = x.shape
        kd, d = self.key_dim, self.val_dim
        chunks = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = chunks[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]
            q, k, v = qkv(feat).split([kd, kd, d], dim=1)
            q, k, v = dw(q).flatten(2), k.flatten(2), v.flatten(2)  # (B, kd | d, N)
            attn = q.transpose(-2, -1) @ k
            if scale != 1.0:  # a fused module has the scale inside q's depthwise conv
                attn = attn * scale
            attn = attn + bias[i]
            feat = (v @ attn.softmax(dim=-1).transpose(-2, -1)).view(B, d, H, W)
            outs.append(feat)
        return F.relu(torch.cat(outs, dim=1), inplace=True)
