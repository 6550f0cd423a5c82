"""EfficientViT-M (Liu et al., CVPR 2023): memory-efficient ViT with cascaded group attention.

One family per file, timm style: building blocks, the network, then the variant table. Parameter and
buffer names follow timm's port (``timm.models.efficientvit_msra``) so state dicts move both ways
unchanged; the official layout is converted in ``effvit.models.weights``.

Differences from the official code and timm, all output-preserving where those work:
- the eval-mode attention bias is gathered from the live table on every call, so it never goes stale
  (``effvit.fuse`` bakes it into a buffer for deployment);
- any input size, square or not: a map smaller than its window attends over its real tokens with the
  matching sub-grid of the bias table (the official code crashes there);
- bad inputs raise ``ValueError`` that says what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 16  # the stem's total stride; the smallest input side that still makes one token
KEY_DIM = 16
WINDOW = 7


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _make_divisible(v: float, divisor: int = 8) -> int:
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class ConvNorm(nn.Sequential):
    """Conv without bias followed by BatchNorm: one conv with bias once fused."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class NormLinear(nn.Sequential):
    """BatchNorm1d then Linear: the classifier head."""

    def __init__(self, cin: int, cout: int, std: float = 0.02):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.linear = nn.Linear(cin, cout)
        nn.init.trunc_normal_(self.linear.weight, std=std)
        nn.init.zeros_(self.linear.bias)


class Residual(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class ConvMlp(nn.Module):
    """The FFN: 1x1 expand, ReLU, 1x1 project (zero-gamma, so a fresh block is the identity)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


def _residual_dw(dim: int) -> Residual:
    return Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))


def _residual_ffn(dim: int) -> Residual:
    return Residual(ConvMlp(dim, 2 * dim))


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = _make_divisible(dim * ratio, 8)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.fc2(self.act(self.fc1(s))).sigmoid()


class PatchMerging(nn.Module):
    """Stride-2 downsampling: 1x1 expand to 4*C_in, depthwise 3x3 s2, squeeze-excite, 1x1 to C_out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hidden = 4 * dim
        self.conv1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.conv2 = ConvNorm(hidden, hidden, 3, 2, 1, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = ConvNorm(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.conv3(self.se(x))


def check_input(x: torch.Tensor, in_chans: int, dtype: torch.dtype) -> None:
    """Raise ValueError for a batch the network cannot take, saying what to do instead."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0)")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
                         f"build the model with in_chans={x.shape[1]} or convert the images")
    if x.shape[2] < PATCH_SIZE or x.shape[3] < PATCH_SIZE:
        raise ValueError(f"images of {x.shape[2]}x{x.shape[3]} are smaller than one {PATCH_SIZE}x{PATCH_SIZE} "
                         f"patch of the stem; resize them to at least {PATCH_SIZE} px a side")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images, got {x.dtype}; convert with x.float() / 255 "
                         "and normalise with the model's mean and std")
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"images are {x.dtype} but the model's weights are {dtype}; use x.to({dtype}) "
                         "or run under torch.autocast")


def bias_index(window: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """(N, N) index into a LeViT bias table of ``window**2`` offsets, for an height x width token grid.

    Offsets are absolute (|dy|, |dx|) and indexed ``|dy| * window + |dx|``: the same order as the
    official code's first-appearance enumeration, so tables are interchangeable.
    """
    height = window if height is None else height
    width = window if width is None else width
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack((ys.flatten(), xs.flatten()))  # 2, N
    rel = (pos[:, :, None] - pos[:, None, :]).abs()
    return rel[0] * window + rel[1]


class CascadedGroupAttention(nn.Module):
    """Attention over one window with heads fed different channel chunks, each head adding the
    previous head's output to its input (the cascade); q gets a depthwise conv per head."""

    def __init__(self, dim: int, num_heads: int, window: int, kernels: tuple[int, ...],
                 key_dim: int = KEY_DIM):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if len(kernels) < num_heads:
            raise ValueError(f"need a q kernel per head: got {len(kernels)} kernels for {num_heads} heads")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = dim // num_heads
        self.window = window
        self.scale = key_dim ** -0.5
        self.qkvs = nn.ModuleList(
            ConvNorm(self.val_dim, 2 * key_dim + self.val_dim) for _ in range(num_heads))
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, k, 1, k // 2, groups=key_dim) for k in kernels[:num_heads])
        self.proj = nn.Sequential(nn.ReLU(), ConvNorm(self.val_dim * num_heads, dim, bn_weight_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", bias_index(window), persistent=False)

    def attention_bias(self, height: int, width: int) -> torch.Tensor:
        """(heads, N, N) bias for a height x width grid, gathered from the live table (never stale)."""
        if height == self.window and width == self.window:
            idx = self.attention_bias_idxs
        else:  # a map smaller than the window: its tokens' sub-grid of offsets
            idx = bias_index(self.window, height, width).to(self.attention_biases.device)
        return self.attention_biases[:, idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        bias = self.attention_bias(H, W)
        chunks = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = chunks[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + bias[i]
            feat = (v @ attn.softmax(dim=-1).transpose(-2, -1)).view(B, self.val_dim, H, W)
            outs.append(feat)
        return self.proj(torch.cat(outs, dim=1))


class LocalWindowAttention(nn.Module):
    """Cascaded group attention in non-overlapping windows. Maps larger than the window are padded
    bottom/right with zeros (padded tokens are not masked, as in the paper) and partitioned."""

    def __init__(self, dim: int, num_heads: int, resolution: int, kernels: tuple[int, ...],
                 window: int = WINDOW):
        super().__init__()
        self.window = min(window, resolution)
        self.attn = CascadedGroupAttention(dim, num_heads, self.window, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        r = self.window
        if H <= r and W <= r:
            return self.attn(x)
        pad_b, pad_r = (r - H % r) % r, (r - W % r) % r
        nh, nw = (H + pad_b) // r, (W + pad_r) // r
        # Partition in (B, H, W, C): the windows reach the attention with channels-last strides, the
        # layout timm uses too, so train-mode BN statistics reduce in the same order (parity to 1e-5).
        x = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pad_r, 0, pad_b))
        x = x.reshape(B, nh, r, nw, r, C).transpose(2, 3).reshape(B * nh * nw, r, r, C).permute(0, 3, 1, 2)
        x = self.attn(x).permute(0, 2, 3, 1)
        x = x.reshape(B, nh, nw, r, r, C).transpose(2, 3).reshape(B, nh * r, nw * r, C)
        return x[:, :H, :W].permute(0, 3, 1, 2)


class EfficientVitBlock(nn.Module):
    """The sandwich: DW -> FFN -> window attention -> DW -> FFN, each residual."""

    def __init__(self, dim: int, num_heads: int, resolution: int, kernels: tuple[int, ...]):
        super().__init__()
        self.dw0 = _residual_dw(dim)
        self.ffn0 = _residual_ffn(dim)
        self.mixer = Residual(LocalWindowAttention(dim, num_heads, resolution, kernels))
        self.dw1 = _residual_dw(dim)
        self.ffn1 = _residual_ffn(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class Downsample(nn.Module):
    """In front of stages 2 and 3: [DW, FFN] at the old width, PatchMerging, [DW, FFN] at the new."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.res1 = nn.Sequential(_residual_dw(dim), _residual_ffn(dim))
        self.patchmerge = PatchMerging(dim, out_dim)
        self.res2 = nn.Sequential(_residual_dw(out_dim), _residual_ffn(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.patchmerge(self.res1(x)))


class EfficientVitStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, resolution: int,
                 kernels: tuple[int, ...], downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(EfficientVitBlock(dim, num_heads, resolution, kernels)
                                      for _ in range(depth)))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: four 3x3 stride-2 Conv+BN, ReLU between them."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, 2, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, 2, 1)
        self.relu2 = nn.ReLU()
        self.conv3 = ConvNorm(dim // 4, dim // 2, 3, 2, 1)
        self.relu3 = nn.ReLU()
        self.conv4 = ConvNorm(dim // 2, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.conv4(x)


@dataclass(frozen=True)
class VariantConfig:
    """One row of the paper's table 1 (all variants: key_dim 16, window 7, FFN ratio 2)."""

    widths: tuple[int, int, int]
    depths: tuple[int, int, int]
    heads: tuple[int, int, int]
    kernels: tuple[int, int, int, int]
    top1: float  # ImageNet-1k top-1 / top-5 reported by the paper at 224
    top5: float
    params_m: float  # exact parameter count of the released classifier, millions
    paper_mflops: int  # the paper's FLOPs column: MACs without BN, millions


VARIANTS: dict[str, VariantConfig] = {
    "efficientvit_m0": VariantConfig((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5), 63.2, 85.2, 2.349, 79),
    "efficientvit_m1": VariantConfig((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3), 68.4, 88.7, 2.981, 167),
    "efficientvit_m2": VariantConfig((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3), 70.8, 90.2, 4.188, 201),
    "efficientvit_m3": VariantConfig((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5), 73.4, 91.4, 6.901, 263),
    "efficientvit_m4": VariantConfig((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3), 74.3, 91.8, 8.804, 299),
    "efficientvit_m5": VariantConfig((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3), 77.1, 93.4, 12.474, 522),
}


def stage_resolutions(img_size: int | tuple[int, int]) -> list[tuple[int, int]]:
    """Feature-map sizes of the three stages: ceil(side / 16), then halved (rounding up) twice."""
    h, w = _pair(img_size)
    res = [(math.ceil(h / PATCH_SIZE), math.ceil(w / PATCH_SIZE))]
    for _ in range(2):
        res.append(((res[-1][0] + 1) // 2, (res[-1][1] + 1) // 2))
    return res


class EfficientVitMsra(nn.Module):
    """EfficientViT-M classifier; ``forward_features`` gives the stride-64 map, ``forward_head`` the logits."""

    def __init__(self, variant: str = "efficientvit_m0", num_classes: int = 1000, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 224, distillation: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        cfg = VARIANTS[variant]
        self.variant = variant
        self.cfg = cfg
        self.in_chans = in_chans
        self.img_size = _pair(img_size)
        self.num_classes = num_classes
        self.num_features = cfg.widths[-1]
        self.distillation = distillation
        resolutions = stage_resolutions(self.img_size)
        self.patch_embed = PatchEmbed(in_chans, cfg.widths[0])
        stages = []
        in_dim = cfg.widths[0]
        for i, (dim, depth, heads) in enumerate(zip(cfg.widths, cfg.depths, cfg.heads)):
            stages.append(EfficientVitStage(in_dim, dim, depth, heads, max(resolutions[i]), cfg.kernels,
                                            downsample=i > 0))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.feature_info = [dict(num_chs=dim, reduction=PATCH_SIZE * 2 ** i, module=f"stages.{i}")
                             for i, dim in enumerate(cfg.widths)]
        self.head = self._make_head(num_classes)
        self.head_dist = self._make_head(num_classes) if distillation else None

    def _make_head(self, num_classes: int) -> nn.Module:
        return NormLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- timm conventions --------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides 1-D ones: the relative-position tables."""
        return {n for n, _ in self.named_parameters() if n.endswith("attention_biases")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        if self.head_dist is not None:
            self.head_dist = self._make_head(num_classes)

    # -- forward -----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():  # traced: checked once
            check_input(x, self.in_chans, self.patch_embed.conv1.conv.weight.dtype)
        return self.stages(self.patch_embed(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The three stage maps (strides 16, 32, 64) for dense tasks."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():  # traced: checked once
            check_input(x, self.in_chans, self.patch_embed.conv1.conv.weight.dtype)
        x = self.patch_embed(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = x.mean((2, 3))
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        x, x_dist = self.head(x), self.head_dist(x)
        if self.training and not torch.jit.is_scripting():
            return x, x_dist  # DeiT-style distillation trains both heads
        return (x + x_dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


class FeatureExtractor(nn.Module):
    """``features_only=True``: the stage maps selected by ``out_indices``, no head."""

    def __init__(self, model: EfficientVitMsra, out_indices: tuple[int, ...] = (0, 1, 2)):
        super().__init__()
        for i in out_indices:
            if i not in (0, 1, 2):
                raise ValueError(f"out_indices must be among (0, 1, 2) (strides 16, 32, 64), got {out_indices}")
        last = max(out_indices)
        self.out_indices = tuple(out_indices)
        self.in_chans = model.in_chans
        self.patch_embed = model.patch_embed
        self.stages = nn.Sequential(*list(model.stages)[: last + 1])
        self.feature_info = [model.feature_info[i] for i in out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():  # traced: checked once
            check_input(x, self.in_chans, self.patch_embed.conv1.conv.weight.dtype)
        x = self.patch_embed(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                feats.append(x)
        return feats
