"""Image rotation estimation with five circular-aware heads (Woehrer 2026), and photo straightening.

- ``methods``: DA, CLS, UV, PSC, CGD: target encoding, loss, decoder (+ sub-degree, windows), confidence
- ``geometry``: rotation on an expanded canvas; max-area, keep-aspect and no crop
- ``metrics``: circular error, MAE / median / RMSE / P90 / P95 / acc@k / AUC@k
- ``data``: upright image sources (folders with EXIF, Fashion-MNIST) -> rotated training/test samples
- ``model``: backbone (effvit or timm) + head, ``predict``, self-describing .safetensors files
- ``evaluation``: a rotation model on rotated test images, the report and its plots
- ``straighten``: estimate and undo the tilt of photo files

Training a rotation model is a task of the training engine: ``effvit.train.rotation``.
"""

from .geometry import keep_aspect_rect, max_area_rect, rotate_crop
from .methods import METHODS, RotationMethod, get_method
from .metrics import circular_error, rotation_metrics
from .model import RotationModel, load_rotation_model, save_rotation_model

__all__ = ["METHODS", "RotationMethod", "get_method", "max_area_rect", "keep_aspect_rect", "rotate_crop",
           "circular_error", "rotation_metrics", "RotationModel", "load_rotation_model",
           "save_rotation_model"]
