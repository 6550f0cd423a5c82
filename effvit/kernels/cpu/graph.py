"""The fused model with each window attention as one ``effvit.WindowAttention`` node in exported ONNX graphs.

``with_kernel_attention(fused)`` swaps every ``FusedLocalWindowAttention`` of a fused model (a copy) for
``KernelWindowAttention``: in PyTorch it runs the module it wraps, unchanged; under ``torch.onnx.export``
(the TorchScript-based exporter) it is written as one node of domain ``effvit`` whose inputs are the
block's input and its folded weights, the operands of ``window_attention.cpp``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from effvit.kernels.cascaded_attention import stack_q_kernels
from effvit.models.fused import FusedLocalWindowAttention

__all__ = ["DOMAIN", "OP", "KernelWindowAttention", "with_kernel_attention"]

DOMAIN = "effvit"
OP = "WindowAttention"


class _WindowAttentionNode(torch.autograd.Function):
    """Forward: ``y``, the wrapped module's output; exported: the custom node, whose value is ``y`` (the
    ops that computed ``y`` are then unused, and the exporter drops them)."""

    @staticmethod
    def forward(ctx, y, x, qkv_w, qkv_b, q_w, q_b, table, proj_w, proj_b, window, kernels, skip):
        return y.clone()

    @staticmethod
    def symbolic(g, y, x, qkv_w, qkv_b, q_w, q_b, table, proj_w, proj_b, window, kernels, skip):
        y = g.op(f"{DOMAIN}::{OP}", x, qkv_w, qkv_b, q_w, q_b, table, proj_w, proj_b, window_i=window,
                 kernels_i=list(kernels), skip_i=int(skip))
        y.setType(x.type())
        return y


class KernelWindowAttention(nn.Module):
    """A ``FusedLocalWindowAttention`` that exports as one ``effvit.WindowAttention`` node; its operands:
    qkv_w (h, d, 2kd+d), qkv_b (h, 2kd+d), q_w (h, K, K, kd) centred, q_b (h, kd), the bias table (h, r*r),
    proj_w (h*d, C), proj_b (C); attributes window (r), kernels (per head), skip."""

    def __init__(self, block: FusedLocalWindowAttention):
        super().__init__()
        attn = block.attn
        self.block = block
        q_w, self.kernels = stack_q_kernels([dw.weight for dw in attn.dws])
        proj = attn.proj["1"]
        channels = proj.weight.shape[1]
        proj_b = proj.bias if proj.bias is not None else proj.weight.new_zeros(channels)
        for name, value in (("qkv_w", attn.qkv_stack), ("qkv_b", attn.qkv_bias[:, 0]), ("q_w", q_w),
                            ("q_b", torch.stack([dw.bias for dw in attn.dws])), ("table", attn.attention_biases),
                            ("proj_w", proj.weight), ("proj_b", proj_b)):
            self.register_buffer(name, value.detach().float().contiguous().clone(), persistent=False)
        self.window = attn.window
        self.skip = block.skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WindowAttentionNode.apply(self.block(x), x, self.qkv_w, self.qkv_b, self.q_w, self.q_b, self.table,
                                          self.proj_w, self.proj_b, self.window, list(self.kernels), self.skip)


def with_kernel_attention(fused: nn.Module) -> nn.Module:
    """A copy of the fused model ``fused`` with every window attention a ``KernelWindowAttention``."""
    if not any(isinstance(m, FusedLocalWindowAttention) for m in fused.modules()):
        raise ValueError("expected a fused EfficientViT-M model (effvit.fuse) with window attention blocks")
    out = copy.deepcopy(fused)
    for parent in list(out.modules()):
        for name, child in parent.named_children():
            if isinstance(child, FusedLocalWindowAttention):
                setattr(parent, name, KernelWindowAttention(child))
    return out
