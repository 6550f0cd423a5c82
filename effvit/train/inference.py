"""Rebuilding a trained classifier and its preprocessing from a checkpoint (eval, predict, export)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .checkpoint import load_weights
from .config import AugConfig


@dataclass
class ClassifierInfo:
    arch: str
    num_classes: int
    img_size: int
    in_chans: int
    class_names: list[str]
    dataset: str  # 'folder', 'fashion_mnist' or 'imagenet' (weights from elsewhere)
    aug: AugConfig  # mean, std, interpolation, crop_pct for the eval transform
    meta: dict

    @property
    def mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"


def load_classifier(path: str | Path, use_ema: bool = False, img_size: int | None = None,
                    model_name: str | None = None) -> tuple[nn.Module, ClassifierInfo]:
    """The model of ``path`` (a training checkpoint or any weights file effvit reads) in eval mode, and
    what is needed to feed it. ``img_size`` rebuilds it at another resolution (bias tables resized)."""
    from effvit.models import create_model
    from effvit.models.pretrained import imagenet_categories
    from effvit.models.weights import detect_variant, fit_state_dict

    sd, meta = load_weights(path, use_ema=use_ema)
    found = detect_variant(sd)
    arch = model_name or meta.get("arch") or found
    if arch is None:
        raise ValueError(f"{path} does not hold EfficientViT-M weights (no variant matches its tensors)")
    arch = arch if arch.startswith("efficientvit_") else f"efficientvit_{arch}"
    if found and found != arch:
        raise ValueError(f"{path} holds {found} weights, not {arch}: drop --model or pass --model {found}")
    if "head.linear.weight" not in sd:
        raise ValueError(f"{path} has no classifier head (head.linear.weight); it cannot classify")
    num_classes = sd["head.linear.weight"].shape[0]
    in_chans = sd["patch_embed.conv1.conv.weight"].shape[1]
    size = img_size or _first(meta.get("img_size")) or 224
    model = create_model(arch, num_classes=num_classes, img_size=size, in_chans=in_chans,
                         distillation="head_dist.linear.weight" in sd)
    model.load_state_dict(fit_state_dict(model, sd, source=str(path)), strict=False)
    model.eval()
    names = meta.get("class_names")
    if not names:
        names = (list(imagenet_categories()) if num_classes == 1000
                 else [f"class_{i}" for i in range(num_classes)])
    aug = AugConfig()
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if meta.get(key) is not None:
            setattr(aug, key, tuple(meta[key]) if isinstance(meta[key], list) else meta[key])
    info = ClassifierInfo(arch=arch, num_classes=num_classes, img_size=size, in_chans=in_chans,
                          class_names=list(names), dataset=meta.get("dataset", "imagenet"), aug=aug,
                          meta=meta)
    return model, info


def _first(v):
    if isinstance(v, (list, tuple)):
        return v[0] if v else None
    return v


def eval_transform(info: ClassifierInfo):
    """The paper's eval transform (resize img_size / crop_pct bicubic, centre crop) with the
    checkpoint's statistics: 256 -> 224 for ImageNet models, a plain resize for Fashion-MNIST ones."""
    from .data import build_transform

    return build_transform(info.aug, info.img_size, info.in_chans, is_training=False)
