"""effvit: EfficientViT-M (CVPR 2023) exact to the paper, fast, trainable and deployable."""

from .fast import fuse
from .models import VARIANTS, create_model, list_models, load_checkpoint, pretrained_cfg
from .models.weights import save_checkpoint

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "pretrained_cfg", "load_checkpoint", "save_checkpoint", "VARIANTS",
           "fuse"]
