"""Per-model metadata, torchvision-style: what a checkpoint expects at its input and what it outputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

from torch import nn

from .efficientvit import IMAGENET_MEAN, IMAGENET_STD, VARIANTS

# Official release (microsoft/Cream EfficientViT, MIT licence); timm mirrors the same tensors as
# timm/efficientvit_m{0..5}.r224_in1k. The SHA-256 of the files is not pinned yet: they could not be
# fetched where this table was written. Until it is, pass pretrained_sha256= to have downloads checked.
RELEASE_URL = "https://github.com/xinyuliu-jeffrey/EfficientViT_Model_Zoo/releases/download/v1.0/{}.pth"


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in index order (torchvision ships them with its weights)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@dataclass(frozen=True)
class PretrainedCfg:
    architecture: str
    url: str
    sha256: str | None
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # resize 256, centre crop 224
    num_classes: int = 1000
    top1: float = 0.0
    top5: float = 0.0
    license: str = "mit"
    class_names: tuple[str, ...] | None = field(default=None, repr=False)

    def for_model(self, model: nn.Module) -> PretrainedCfg:
        """This config adjusted to a model built with other classes, channels or input size."""
        h, w = model.img_size
        names = self.class_names if model.num_classes == self.num_classes else None
        return dataclasses.replace(self, input_size=(model.in_chans, h, w), num_classes=model.num_classes,
                                   class_names=names)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pretrained_cfg(name: str) -> PretrainedCfg:
    v = VARIANTS[name]
    try:
        names = imagenet_categories()
    except Exception:  # torchvision missing or changed: names are a convenience, not a requirement
        names = None
    return PretrainedCfg(architecture=name, url=RELEASE_URL.format(name), sha256=None, top1=v.top1,
                         top5=v.top5, class_names=names)
