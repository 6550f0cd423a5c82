"""Adaptive gradient clipping (Brock et al., 2021) over all parameters at once.

Each unit of a parameter (an output row of a weight; a whole bias or norm vector) has its gradient
rescaled to at most ``clip_factor * max(||unit||, eps)``. The result equals timm's
``timm.utils.adaptive_clip_grad`` bit for bit on every device: the norms use the same reduction, and an
unclipped unit is multiplied by exactly 1. timm runs ten ops per parameter (3,540 for M0's 354, each a
kernel launch on a GPU, where a training step of EfficientViT-M is launch-bound); here only the two norms
stay per parameter, and the clip factors and the rescale are a handful of ops over all parameters together
(718 for M0). On CUDA the rescale's ``torch._foreach_mul_`` broadcasts per-unit factors, which PyTorch runs
as one multiply per tensor from C++ (its multi-tensor kernels need equal shapes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["adaptive_clip_grad_"]


def _unit_norms(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The norm of each output unit (over every dim but the first), kept broadcastable against ``t``."""
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t, norm_type)
    return torch.linalg.vector_norm(t, norm_type, dim=tuple(range(1, t.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[torch.Tensor] | torch.Tensor, clip_factor: float = 0.01,
                        eps: float = 1e-3, norm_type: float = 2.0) -> None:
    """Clip the ``.grad`` of ``parameters`` in place, unit-wise (timm's ``adaptive_clip_grad`` arguments)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    groups: dict[tuple, list[torch.Tensor]] = {}  # tensor-list ops need one device and dtype per list
    for p in parameters:
        if p.grad is not None:
            groups.setdefault((p.device, p.dtype, p.grad.dtype), []).append(p)
    for params in groups.values():
        grads = [p.grad for p in params]
        p_norms = [_unit_norms(p, norm_type) for p in params]
        max_norm = torch.cat([n.reshape(-1) for n in p_norms]).clamp_(min=eps).mul_(clip_factor)
        grad_norm = torch.cat([_unit_norms(g, norm_type).reshape(-1) for g in grads])
        scale = torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=1e-6))
        scales = [s.view(n.shape) for s, n in zip(scale.split([n.numel() for n in p_norms]), p_norms)]
        torch._foreach_mul_(grads, scales)
