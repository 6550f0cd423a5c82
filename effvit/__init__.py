"""effvit: EfficientViT-M (CVPR 2023) exact to the paper, fast, trainable and deployable."""

from .models import VARIANTS, create_model, fuse, list_models, load_checkpoint, load_model, save_checkpoint

__version__ = "0.1.0"
__all__ = ["create_model", "load_model", "list_models", "load_checkpoint", "save_checkpoint", "fuse", "VARIANTS"]
