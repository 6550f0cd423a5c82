"""The device a run or a prediction uses: ``auto`` is the GPU when there is one."""

from __future__ import annotations

import torch


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; ``cuda`` without an index takes the
    process's local rank (torchrun). Asking for CUDA where there is none is refused with what to use."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} was asked for but CUDA is not available; use run.device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device
