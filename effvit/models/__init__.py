"""EfficientViT-M: the network, its inference form, its weights and timm-style construction."""

from .complexity import count_macs, count_params
from .efficientvit import VARIANTS, EfficientVitMsra, fuse, stage_resolutions
from .factory import create_model, list_models, load_model, parse_model_name
from .names import resolve_models, variant_name
from .pretrained import default_cfg
from .weights import checkpoint_filter_fn, load_checkpoint, read_checkpoint, save_checkpoint

__all__ = ["create_model", "load_model", "list_models", "parse_model_name", "variant_name", "resolve_models",
           "default_cfg", "fuse", "EfficientVitMsra", "VARIANTS", "stage_resolutions", "load_checkpoint",
           "read_checkpoint", "save_checkpoint", "checkpoint_filter_fn", "count_params", "count_macs"]
