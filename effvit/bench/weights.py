"""Benchmark and test weights: a fresh model with realistic BN statistics and attention biases."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomise_norms"]


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random statistics and affine and every attention-bias table random values.

    A fresh model has zero BN gammas at the end of each residual branch, so comparisons on it only
    test the stem and the head; this makes every branch contribute. In place; returns the model.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(rand(n, 0.5, 1.5))
                m.bias.copy_(rand(n, -0.3, 0.3))
                m.running_mean.copy_(rand(n, -0.3, 0.3))
                m.running_var.copy_(rand(n, 0.5, 1.5))
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model
