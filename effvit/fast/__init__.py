"""Fast inference: fused modules (``fuse``) and deployment exports."""

from .fuse import FusedEfficientVit, fuse

__all__ = ["fuse", "FusedEfficientVit"]
