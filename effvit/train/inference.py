"""What a loaded classifier needs around it (eval, predict): its class names, image mode and eval
transform, all read from the model's ``pretrained_cfg`` (``effvit.load_model`` fills it from the file)."""

from __future__ import annotations

from timm.data import create_transform, resolve_data_config
from torch import nn

from effvit.models.pretrained import imagenet_categories


def class_names(model: nn.Module) -> list[str]:
    """The checkpoint's class names; ImageNet's for an unnamed 1000-class model, else ``class_<i>``."""
    names = model.pretrained_cfg.get("label_names")
    if names:
        return list(names)
    n = model.num_classes
    return list(imagenet_categories()) if n == 1000 else [f"class_{i}" for i in range(n)]


def has_own_class_names(model: nn.Module) -> bool:
    """Whether the names came from the checkpoint (not the ImageNet defaults, which folders name by synset)."""
    names = model.pretrained_cfg.get("label_names")
    return bool(names) and tuple(names) != imagenet_categories()


def image_mode(model: nn.Module) -> str:
    return "L" if model.pretrained_cfg["input_size"][0] == 1 else "RGB"


def arch_name(model: nn.Module) -> str:
    """``efficientvit_m0``, or a timm backbone's architecture (``efficientnet_lite0``)."""
    return getattr(model, "variant", None) or model.pretrained_cfg.get("architecture") or type(model).__name__


def eval_transform(model: nn.Module):
    """timm's eval transform from the model's config: resize img_size / crop_pct (bicubic for the
    paper's ImageNet models, 256 -> 224), centre crop, the checkpoint's normalisation."""
    return create_transform(**resolve_data_config(model=model))
