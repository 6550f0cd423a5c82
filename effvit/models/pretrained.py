"""Per-model metadata in timm's form (``timm.models.PretrainedCfg``): where the weights are, how to feed
the network (input size, normalisation, interpolation, crop) and what it outputs (classes, names).

A model's ``pretrained_cfg`` describes that model as built: a checkpoint's own metadata (a Fashion-MNIST
run's grey 112 px input and ten names, say) replaces the ImageNet defaults, and building with other
classes, channels or size adjusts the config, so ``timm.data.resolve_model_data_config(model)`` always
gives the transform the model wants.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from timm.models import PretrainedCfg
from torch import nn
from torchvision.models import ResNet18_Weights

from .efficientvit import IMAGENET_MEAN, IMAGENET_STD, VARIANTS

TAG = "r224_in1k"
# Official release (microsoft/Cream EfficientViT, MIT licence); timm mirrors the same tensors as
# timm/efficientvit_m{0..5}.r224_in1k. Their SHA-256 are not pinned: pass pretrained_sha256= to have a
# download checked.
RELEASE_URL = "https://github.com/xinyuliu-jeffrey/EfficientViT_Model_Zoo/releases/download/v1.0/{}.pth"
PAPER = "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention"


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in index order (torchvision ships them with its weights)."""
    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def default_cfg(variant: str) -> PretrainedCfg:
    """The released ImageNet-1k weights of ``variant`` and the paper's evaluation transform."""
    try:
        names = imagenet_categories()
    except Exception:  # a torchvision without this metadata: names are a convenience, not a requirement
        names = None
    v = VARIANTS[variant]
    return PretrainedCfg(
        architecture=variant, tag=TAG, url=RELEASE_URL.format(variant), hf_hub_id=f"timm/{variant}.{TAG}",
        input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000, label_names=names,
        first_conv="patch_embed.conv1.conv", classifier="head.linear", pool_size=(4, 4), license="mit",
        paper_name=PAPER, paper_ids="arXiv:2305.07027",
        origin_url="https://github.com/microsoft/Cream/tree/main/EfficientViT",
        notes=(f"ImageNet-1k top-1 {v.top1}, top-5 {v.top5} (paper)",))


# checkpoint metadata key -> PretrainedCfg field
_META_FIELDS = {"mean": "mean", "std": "std", "interpolation": "interpolation", "crop_pct": "crop_pct",
                "class_names": "label_names"}


def cfg_from_meta(cfg: PretrainedCfg, meta: dict, num_classes: int, in_chans: int) -> PretrainedCfg:
    """``cfg`` for a checkpoint with ``num_classes`` outputs and ``in_chans`` inputs, its metadata (written
    by effvit's training and ``save_checkpoint``) taking precedence."""
    changes: dict = {"num_classes": num_classes}
    if num_classes != cfg.num_classes:
        changes["label_names"] = None
    size = meta.get("img_size")
    h, w = (size, size) if isinstance(size, int) else (tuple(size) if size else cfg.input_size[1:])
    changes["input_size"] = (in_chans, int(h), int(w))
    for key, field in _META_FIELDS.items():
        if meta.get(key) is not None:
            value = meta[key]
            changes[field] = tuple(value) if isinstance(value, list) else value
    if meta.get("arch") and meta["arch"] != cfg.architecture:
        changes["tag"] = None  # weights of our own training, not the release
    return dataclasses.replace(cfg, **changes)


def cfg_for_model(cfg: dict, num_classes: int, in_chans: int, img_size: tuple[int, int]) -> dict:
    """A copy of the ``cfg`` dict adjusted to a model built with other classes, channels or size."""
    cfg = dict(cfg)
    if num_classes != cfg.get("num_classes"):
        cfg["label_names"] = None
    cfg["num_classes"] = num_classes
    cfg["input_size"] = (in_chans, *img_size)
    for key in ("mean", "std"):
        cfg[key] = fit_channels(cfg[key], in_chans)
    return {k: v for k, v in cfg.items() if v is not None}


def fit_channels(stats, in_chans: int) -> tuple[float, ...]:
    """One normalisation statistic per input channel: grey from RGB statistics is their mean, RGB (or N
    channels) from one grey statistic repeats it."""
    stats = tuple(float(v) for v in stats)
    if len(stats) == in_chans:
        return stats
    return stats * in_chans if len(stats) == 1 else (sum(stats) / len(stats),) * in_chans


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


def arch_name(model: nn.Module) -> str:
    """``efficientvit_m0``, or a timm backbone's architecture (``efficientnet_lite0``)."""
    return getattr(model, "variant", None) or model.pretrained_cfg.get("architecture") or type(model).__name__


def input_channels(model: nn.Module) -> int:
    """The channels the model reads, from its config (1 for a grey checkpoint, 3 for RGB)."""
    return int(model.pretrained_cfg["input_size"][0])
