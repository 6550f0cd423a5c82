"""Building models in timm's conventions: ``create_model`` (timm's arguments, timm's builder for configs
and feature extractors) and ``load_model`` (the model a checkpoint describes)."""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

import timm
from timm.layers import set_layer_config
from timm.models import PretrainedCfg, build_model_with_cfg
from timm.models._input import update_model_input_size
from torch import nn

from .efficientvit import VARIANTS, EfficientVitMsra
from .names import variant_name
from .pretrained import TAG, cfg_for_model, cfg_from_meta, default_cfg
from .weights import detect_variant, fit_state_dict, read_checkpoint


def parse_model_name(name: str) -> tuple[str, str | None]:
    """(variant, pretrained tag) of any accepted spelling: ``m0``, ``efficientvit_m0``,
    ``efficientvit_m0.r224_in1k``, ``timm/efficientvit_m0.r224_in1k``, ``hf-hub:timm/...``."""
    base = name.split(":")[-1].split("/")[-1]
    spelled, _, tag = base.partition(".")
    variant = variant_name(spelled)
    if variant is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())} "
                         "(or m0..m5, or with the .r224_in1k tag)")
    if tag and tag != TAG:
        raise ValueError(f"unknown pretrained tag {tag!r} for {variant}; the released weights are {TAG!r}")
    return variant, tag or None


def list_models(filter: str = "*", pretrained: bool = False) -> list[str]:
    """Model names matching ``filter``, e.g. ``list_models('*m4')``; with ``pretrained=True`` the tagged
    names of the released weights (``efficientvit_m4.r224_in1k``), as timm lists them."""
    names = [f"{n}.{TAG}" for n in VARIANTS] if pretrained else list(VARIANTS)
    return sorted(n for n in names if fnmatch.fnmatch(n, filter) or fnmatch.fnmatch(n.split(".")[0], filter))


def create_model(model_name: str, pretrained: bool | str | Path = False,
                 pretrained_cfg: str | dict | PretrainedCfg | None = None,
                 pretrained_cfg_overlay: dict | None = None, checkpoint_path: str | Path | None = None,
                 cache_dir: str | Path | None = None, scriptable: bool | None = None,
                 exportable: bool | None = None, no_jit: bool | None = None,
                 pretrained_sha256: str | None = None, use_ema: bool = False, **kwargs) -> nn.Module:
    """Build an EfficientViT-M model, taking ``timm.create_model``'s arguments.

    ``pretrained``: False, True (the config's ``file`` or ``url``: the official release unless
    ``pretrained_cfg_overlay=dict(file=...)`` says otherwise), or a path or URL of any layout effvit reads
    (official, timm .pth/.safetensors, effvit and training checkpoints). A checkpoint's classes, channels,
    input size, class names and normalisation become the model's unless given here: ``num_classes``
    other than the checkpoint's starts a fresh head, another ``in_chans`` adapts the stem, another
    ``img_size`` resizes the bias tables. ``checkpoint_path`` loads weights that must fit the model as
    built. Model arguments: ``num_classes``, ``in_chans``, ``img_size``, ``global_pool``, ``drop_rate``,
    ``distillation``, ``device``, ``dtype``; ``features_only`` with ``out_indices`` and ``feature_cls``
    wraps it in timm's feature extractor. ``scriptable``/``exportable``/``no_jit`` and ``cache_dir`` are
    accepted for timm's interface: the model always scripts and exports, and downloads go to the torch hub
    cache.
    """
    variant, _ = parse_model_name(model_name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # as timm: None means the default
    if isinstance(pretrained_cfg, dict):
        cfg = PretrainedCfg(**pretrained_cfg)
    elif isinstance(pretrained_cfg, PretrainedCfg):
        cfg = pretrained_cfg
    else:
        if pretrained_cfg is not None:  # a tag, as timm takes it
            parse_model_name(f"{variant}.{pretrained_cfg}")
        cfg = default_cfg(variant)
    cfg = dataclasses.replace(cfg, **(pretrained_cfg_overlay or {}))
    source = (cfg.file or cfg.url) if pretrained is True else (pretrained or None)
    weights = read_checkpoint(source, pretrained_sha256, use_ema=use_ema) if source else None
    return _build(variant, cfg, weights, str(source), checkpoint_path,
                  dict(scriptable=scriptable, exportable=exportable, no_jit=no_jit), kwargs)


def load_model(source: str | Path, model_name: str | None = None, use_ema: bool = False,
               sha256: str | None = None, **kwargs) -> nn.Module:
    """The model a checkpoint describes (variant, classes, channels, input size, class names and
    normalisation from the file), in eval mode; ``kwargs`` as for ``create_model`` override them (None
    leaves the file's value)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    weights = read_checkpoint(source, sha256, use_ema=use_ema)
    found = detect_variant(weights[0])
    if model_name is None and found is None:
        arch = weights[1].get("arch")
        if isinstance(arch, str) and timm.is_model(arch):  # a timm backbone trained by effvit train
            return _build_timm(arch, weights, str(source)).eval()
        raise ValueError(f"{source} does not hold EfficientViT-M weights (no variant matches its tensors)")
    variant = parse_model_name(model_name)[0] if model_name else found
    return _build(variant, default_cfg(variant), weights, str(source), None, {}, kwargs).eval()


def _build_timm(arch: str, weights: tuple[dict, dict], source: str) -> nn.Module:
    """timm's ``arch`` with the checkpoint's classes, channels and weights; its config takes the file's
    input size, normalisation, class names and dataset, as for our own models."""
    sd, meta = weights
    num_classes, in_chans = meta.get("num_classes"), meta.get("in_chans") or 3
    model = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{source} does not fit timm's {arch} with {num_classes} classes and {in_chans} "
                         f"input channels: {e}") from None
    cfg = cfg_from_meta(PretrainedCfg(**model.pretrained_cfg), meta, num_classes, in_chans)
    model.pretrained_cfg = model.default_cfg = cfg_for_model(cfg.to_dict(), num_classes, in_chans,
                                                             cfg.input_size[1:])
    if meta.get("dataset"):
        model.pretrained_cfg["dataset"] = meta["dataset"]
    return model


def _build(variant: str, cfg: PretrainedCfg, weights: tuple[dict, dict] | None, source: str,
           checkpoint_path: str | Path | None, layer_config: dict, kwargs: dict) -> nn.Module:
    """The model with ``weights`` (state dict, metadata) loaded, through timm's builder (config,
    feature extractors); its ``pretrained_cfg`` adjusted to it."""
    if weights is not None:
        sd, meta = weights
        found = detect_variant(sd)
        if found and found != variant:
            raise ValueError(f"{source} holds {found} weights, not {variant}: use create_model('{found}', ...) "
                             "or effvit.load_model, which reads the variant from the file")
        if "head.linear.weight" in sd:
            cfg = cfg_from_meta(cfg, meta, sd["head.linear.weight"].shape[0],
                                sd["patch_embed.conv1.conv.weight"].shape[1])
            kwargs.setdefault("img_size", cfg.input_size[1:])
            # a whole second head (BN + linear); a lone head_dist linear is dropped
            kwargs.setdefault("distillation", {"head_dist.bn.weight", "head_dist.linear.weight"} <= sd.keys())
        if meta.get("ltm") is not None:  # token merging changes no weight shapes: only the file says it
            kwargs.setdefault("ltm", meta["ltm"])
            kwargs.setdefault("ltm_mode", meta.get("ltm_mode", "learned"))
    if kwargs.get("features_only"):
        bad = [i for i in kwargs.get("out_indices", ()) if not -3 <= i < 3]
        if bad:
            raise ValueError(f"out_indices {bad} out of range: the model has 3 stages (0, 1, 2; or -3..-1)")
    strict_head = kwargs.get("num_classes", cfg.num_classes) == cfg.num_classes
    built: list[EfficientVitMsra] = []

    def build(**model_args) -> EfficientVitMsra:
        model = EfficientVitMsra(variant, **model_args)
        if weights is not None:
            model.load_state_dict(fit_state_dict(model, weights[0], strict_head=strict_head, source=source),
                                  strict=False)
        if checkpoint_path:
            model.load_state_dict(fit_state_dict(model, read_checkpoint(checkpoint_path)[0],
                                                 source=str(checkpoint_path)), strict=False)
        built.append(model)
        return model

    with set_layer_config(**layer_config):
        model = build_model_with_cfg(build, variant, pretrained=False, pretrained_cfg=cfg.to_dict(),
                                     feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)),
                                     **kwargs)
    net = built[0]
    cfg = cfg_for_model(model.pretrained_cfg, net.num_classes, net.in_chans, net.img_size)
    if weights is not None and weights[1].get("dataset"):
        cfg["dataset"] = weights[1]["dataset"]  # what eval defaults to (e.g. Fashion-MNIST's test set)
    model.pretrained_cfg = model.default_cfg = cfg
    update_model_input_size(model, net.img_size)  # timm's record of the size built for (save_for_hf)
    return model
