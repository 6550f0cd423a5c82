"""Transforms: the eval transform a loaded model asks for (its ``pretrained_cfg``), and timm's training
and evaluation pipelines for a recipe's augmentation settings."""

from __future__ import annotations

from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config
from torch import nn

from effvit.models.pretrained import fit_channels


def eval_transform(model: nn.Module):
    """timm's eval transform from the model's config: resize img_size / crop_pct (bicubic for the
    paper's ImageNet models, 256 -> 224), centre crop, the checkpoint's normalisation."""
    return create_transform(**resolve_data_config(model=model))


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits giving an all-black image.

    RandAugment's 'inc1' posterize asks for 0 bits at magnitude 10, which rand-m9-mstd0.5 reaches for
    ~2% of its draws; Pillow 11 and later raise on 0 bits, which would kill the loader worker mid-epoch.
    Set on timm's RandAugment ops by ``build_transform``, its only user."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> None:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize


def build_transform(aug, img_size: int, in_chans: int, is_training: bool):
    """timm's pipeline: train = RandomResizedCrop, flip, RandAugment, erasing; eval = resize + centre crop."""
    mean, std = fit_channels(aug.mean, in_chans), fit_channels(aug.std, in_chans)
    if not is_training:
        return create_transform(img_size, is_training=False, interpolation=aug.interpolation, mean=mean,
                                std=std, crop_pct=aug.crop_pct)
    tf = create_transform(
        img_size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
        color_jitter=aug.color_jitter, auto_augment=aug.auto_augment, interpolation=aug.interpolation,
        mean=mean, std=std, re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=aug.re_count)
    _patch_posterize(tf)
    return tf
