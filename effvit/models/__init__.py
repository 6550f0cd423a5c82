"""Model factory in timm's conventions: ``create_model``, ``list_models``, pretrained configs."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from torch import nn

from .efficientvit import VARIANTS, EfficientVitMsra, FeatureExtractor, stage_resolutions
from .pretrained import PretrainedCfg, pretrained_cfg
from .weights import load_checkpoint

__all__ = ["create_model", "list_models", "pretrained_cfg", "PretrainedCfg", "EfficientVitMsra",
           "FeatureExtractor", "VARIANTS", "stage_resolutions", "load_checkpoint"]


def list_models(pattern: str = "*") -> list[str]:
    """Model names, e.g. ``list_models('*m4')`` -> ``['efficientvit_m4']``."""
    return sorted(n for n in VARIANTS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: bool | str | Path = False, num_classes: int | None = None,
                 img_size: int | tuple[int, int] = 224, in_chans: int = 3, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2), distillation: bool = False,
                 pretrained_sha256: str | None = None) -> nn.Module:
    """Build an EfficientViT-M model.

    ``pretrained``: False, True (the official release, when reachable), or a path or URL to an
    official, timm-layout (.pth or .safetensors) or effvit checkpoint; the layout is detected. A
    checkpoint trained at another resolution has its bias tables resized; with another number of
    classes (``num_classes`` given) the head is left freshly initialised.
    """
    name = name.split("/")[-1].split(".")[0]  # accept timm-style 'timm/efficientvit_m0.r224_in1k'
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cfg = pretrained_cfg(name)
    model = EfficientVitMsra(name, num_classes=cfg.num_classes if num_classes is None else num_classes,
                             in_chans=in_chans, img_size=img_size, distillation=distillation)
    model.pretrained_cfg = cfg.for_model(model)
    if pretrained:
        source = cfg.url if pretrained is True else pretrained
        load_checkpoint(model, source, sha256=pretrained_sha256 or (cfg.sha256 if pretrained is True else None),
                        strict_head=num_classes is None)
    if features_only:
        return FeatureExtractor(model, tuple(out_indices))
    return model
