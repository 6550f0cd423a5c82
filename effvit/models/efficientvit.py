"""EfficientViT-M (Liu et al., CVPR 2023): memory-efficient ViT with cascaded group attention.

One family per file, timm style: building blocks, the network, then the variant table. Parameter and
buffer names follow timm's port (``timm.models.efficientvit_msra``) so state dicts move both ways
unchanged; the official layout is converted in ``effvit.models.weights``.

Each module here has one path, for training and evaluation. ``fuse(model)`` turns a trained model into its
inference form, on a copy: every module that folds says how in its ``fuse()``, next to its forward, and
returns the folded module of ``effvit.models.fused`` (or a plain conv / linear), bottom-up.

Differences from the official code and timm, all output-preserving where those work:
- the eval-mode attention bias is gathered from the live table on every call, so it never goes stale;
- any input size, square or not: a map smaller than its window attends over its real tokens with the
  matching sub-grid of the bias table (the official code crashes there);
- bad inputs raise ``ValueError`` that says what to do.
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models._features import feature_take_indices
from timm.models._input import update_model_input_size
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.checkpoint import checkpoint

from .attention import HeadCascade, bias_index, grid_bias, resize_bias_table, window_partition, window_reverse
from .fused import (
    FusedCascadedGroupAttention,
    FusedConvMlp,
    FusedLocalWindowAttention,
    FusedSqueezeExcite,
    PointwiseConv,
    conv_batch_for_cpu,
    fold_ffn_bias,
)
from .token_merging import TokenMerge, block_keeps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 16  # the stem's total stride; the smallest input side that still makes one token
KEY_DIM = 16
WINDOW = 7


# kept whole by torch.fx's symbolic tracing (they branch on shapes)
torch.fx.wrap("grid_bias")
torch.fx.wrap("window_partition")
torch.fx.wrap("window_reverse")

def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _make_divisible(v: float, divisor: int = 8) -> int:
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


@torch.jit.unused
def _graph_capture() -> bool:
    # torch.jit.trace or torch.fx (timm's and torchvision's feature extractors): a Python-side check
    # would either become a constant or a node that TorchScript cannot compile from an FX graph
    return torch.jit.is_tracing() or is_fx_symbolic_tracing()


@torch.no_grad()
def bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``x * scale + shift``, in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def fuse_children(module: nn.Module) -> None:
    """Replace every child that folds by its ``fuse()`` and walk into the others. A module's own
    ``fuse()`` calls this first, so it folds whole whoever walks the tree (timm's
    ``reparameterize_model`` goes top-down), and folding twice changes nothing."""
    for name, child in module.named_children():
        fold = getattr(child, "fuse", None)
        if callable(fold):
            setattr(module, name, fold())
        else:
            fuse_children(child)


class ConvNorm(nn.Sequential):
    """Conv without bias followed by BatchNorm: one conv with bias once fused."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def takes_skip(self) -> bool:
        """Whether ``x + self(x)`` folds into the conv: a stride-1 depthwise conv whose padding keeps
        the output aligned with the input absorbs the identity as +1 on its centre tap (exact whatever
        the zero padding)."""
        c = self.conv
        return (c.groups == c.in_channels == c.out_channels and c.stride == (1, 1)
                and c.padding == (c.kernel_size[0] // 2, c.kernel_size[1] // 2))

    @torch.no_grad()
    def fuse(self, skip: bool = False) -> nn.Module:
        """One conv with bias (a ``PointwiseConv`` GEMM for a 1x1); with ``skip``, ``x + self(x)``."""
        if skip and not self.takes_skip():
            raise ValueError("only a stride-1 depthwise conv with centred padding absorbs its skip connection")
        c = self.conv
        scale, shift = bn_affine(self.bn)
        weight = c.weight.double() * scale[:, None, None, None]
        if c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0) and c.groups == 1:
            return PointwiseConv(weight.to(c.weight.dtype), shift.to(c.weight.dtype))
        out = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups,
                        bias=True, device=c.weight.device, dtype=c.weight.dtype)
        out.weight.copy_(weight)
        out.bias.copy_(shift)
        if skip:
            out.weight[:, 0, c.kernel_size[0] // 2, c.kernel_size[1] // 2] += 1.0
        return out


class NormLinear(nn.Sequential):
    """BatchNorm1d, dropout, then Linear: the classifier head."""

    def __init__(self, cin: int, cout: int, drop: float = 0.0, std: float = 0.02):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(cin, cout)
        nn.init.trunc_normal_(self.linear.weight, std=std)
        nn.init.zeros_(self.linear.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """``W (x s + t) + c = (W diag(s)) x + (W t + c)``."""
        scale, shift = bn_affine(self.bn)
        w = self.linear.weight.double()
        out = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=self.linear.weight.dtype)
        out.weight.copy_(w * scale[None, :])
        out.bias.copy_(w @ shift + self.linear.bias.double())
        return out


class Residual(nn.Module):
    """``x + m(x)``."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The skip connection folds into the module: a depthwise conv's centre tap, or the FFN and the
        window attention adding their own input (which saves a call and an add per block)."""
        m = self.m
        if isinstance(m, (ConvMlp, LocalWindowAttention)) or (isinstance(m, ConvNorm) and m.takes_skip()):
            return m.fuse(skip=True)
        fuse_children(self)
        return self


class ConvMlp(nn.Module):
    """The FFN: 1x1 expand, ReLU, 1x1 project (zero-gamma, so a fresh block is the identity)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden)
        self.pw2 = ConvNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(F.relu(self.pw1(x), inplace=True))

    def fuse(self, skip: bool = False) -> FusedConvMlp:
        return FusedConvMlp(self.pw1.fuse(), self.pw2.fuse(), skip)


def _residual_dw(dim: int) -> Residual:
    return Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))


def _residual_ffn(dim: int) -> Residual:
    return Residual(ConvMlp(dim, 2 * dim))


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = _make_divisible(dim * ratio, 8)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)), inplace=True))
        return x * s.sigmoid()

    @torch.no_grad()
    def fuse(self) -> FusedSqueezeExcite:
        return FusedSqueezeExcite(PointwiseConv(self.fc1.weight, self.fc1.bias),
                                  PointwiseConv(self.fc2.weight, self.fc2.bias))


class PatchMerging(nn.Module):
    """Stride-2 downsampling: 1x1 expand to 4*C_in, depthwise 3x3 s2, squeeze-excite, 1x1 to C_out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hidden = 4 * dim
        self.conv1 = ConvNorm(dim, hidden)
        self.conv2 = ConvNorm(hidden, hidden, 3, 2, 1, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = ConvNorm(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x), inplace=True)), inplace=True)
        return self.conv3(self.se(x))


def check_input(x: torch.Tensor, in_chans: int, dtype: torch.dtype) -> torch.Tensor:
    """``x``, or ValueError for a batch the network cannot take, saying what to do instead."""
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
    return x


class CascadedGroupAttention(HeadCascade):
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
        # timm's proj is Sequential(ReLU, Conv+BN); the ReLU has no weights, so "1" alone keeps its key names
        self.proj = nn.ModuleDict({"1": ConvNorm(self.val_dim * num_heads, dim, bn_weight_init=0.0)})
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", bias_index(window), persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}  # timm's name; never filled (get_attention_biases)

    def set_window(self, window: int) -> None:
        """Rebuild for another window size, resizing the bias table (bicubic) when it changes."""
        if window == self.window:
            return
        with torch.no_grad():
            table = resize_bias_table(self.attention_biases.data, window)
        self.window = window
        self.attention_biases = nn.Parameter(table, requires_grad=self.attention_biases.requires_grad)
        self.attention_bias_idxs = bias_index(window).to(self.attention_biases.device)

    @torch.jit.ignore
    def get_attention_biases(self, device: torch.device | None = None) -> torch.Tensor:
        """timm's accessor: the live window bias (nothing is cached, so ``attention_bias_cache`` stays
        empty; it exists for code written against timm's module)."""
        return self.window_bias()

    def window_bias(self) -> torch.Tensor:
        """(heads, r*r, r*r) bias of a full window, gathered from the live table (never stale)."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = grid_bias(self.window_bias(), self.window, x)
        return self.proj["1"](self.cascade(x, bias, self.scale))

    @torch.no_grad()
    def fuse(self) -> FusedCascadedGroupAttention:
        """BN into every conv, the scale into q's depthwise convs (0.25: a power of two, so exact), the
        window bias gathered into a buffer."""
        dws = []
        for dw in self.dws:
            conv = dw.fuse()
            conv.weight.mul_(self.scale)
            conv.bias.mul_(self.scale)
            dws.append(conv)
        return FusedCascadedGroupAttention([qkv.fuse() for qkv in self.qkvs], dws, self.proj["1"].fuse(),
                                           self.attention_biases, self.window_bias(), self.window, self.key_dim)


class LocalWindowAttention(nn.Module):
    """Cascaded group attention in non-overlapping windows. Maps larger than the window are padded
    bottom/right with zeros (padded tokens are not masked, as in the paper) and partitioned."""

    def __init__(self, dim: int, num_heads: int, resolution: int, kernels: tuple[int, ...],
                 window: int = WINDOW):
        super().__init__()
        self.window_size = window
        self.window = min(window, resolution)
        self.attn = CascadedGroupAttention(dim, num_heads, self.window, kernels)

    def set_resolution(self, resolution: int) -> None:
        self.window = min(self.window_size, resolution)
        self.attn.set_window(self.window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = window_partition(x, self.window)
        if windows is x:
            return self.attn(x)
        return window_reverse(self.attn(windows), x, self.window)

    def fuse(self, skip: bool = False) -> FusedLocalWindowAttention:
        return FusedLocalWindowAttention(self.attn.fuse(), self.window_size, skip)


class EfficientVitBlock(nn.Module):
    """The sandwich: DW -> FFN -> window attention -> DW -> FFN, each residual. With ``merge`` (token
    merging, ``effvit.models.token_merging``) the attention's output grid shrinks before the second half."""

    def __init__(self, dim: int, num_heads: int, resolution: int, kernels: tuple[int, ...],
                 merge: nn.Module | None = None):
        super().__init__()
        self.dw0 = _residual_dw(dim)
        self.ffn0 = _residual_ffn(dim)
        self.mixer = Residual(LocalWindowAttention(dim, num_heads, resolution, kernels))
        self.merge = merge
        self.dw1 = _residual_dw(dim)
        self.ffn1 = _residual_ffn(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_merging(x, None)[0]

    def forward_merging(self, x: torch.Tensor, prior: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block, taking and returning the token-merging state (the previous mask's logits)."""
        x = self.mixer(self.ffn0(self.dw0(x)))
        if self.merge is not None:
            x, prior = self.merge(x, prior)
        return self.ffn1(self.dw1(x)), prior

    def fuse(self) -> "EfficientVitBlock":
        fuse_children(self)
        fold_ffn_bias(self.dw0, self.ffn0)
        fold_ffn_bias(self.dw1, self.ffn1)
        return self


class Downsample(nn.Module):
    """In front of stages 2 and 3: [DW, FFN] at the old width, PatchMerging, [DW, FFN] at the new."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.res1 = nn.Sequential(_residual_dw(dim), _residual_ffn(dim))
        self.patchmerge = PatchMerging(dim, out_dim)
        self.res2 = nn.Sequential(_residual_dw(out_dim), _residual_ffn(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.patchmerge(self.res1(x)))

    def fuse(self) -> "Downsample":
        fuse_children(self)
        fold_ffn_bias(self.res1[0], self.res1[1])
        fold_ffn_bias(self.res2[0], self.res2[1])
        return self


class EfficientVitStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, resolution: int,
                 kernels: tuple[int, ...], downsample: bool, keeps: Sequence[float] | None = None,
                 merge_mode: str = "learned"):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        merges = [None] * depth if keeps is None else [TokenMerge(dim, k, merge_mode) for k in keeps]
        self.blocks = nn.Sequential(*(EfficientVitBlock(dim, num_heads, resolution, kernels, merge)
                                      for merge in merges))
        self.grad_checkpointing = False

    def set_resolution(self, resolution: int) -> None:
        for block in self.blocks:
            mixer = block.mixer  # Residual(LocalWindowAttention), or the attention itself once fused
            (mixer.m if isinstance(mixer, Residual) else mixer).set_resolution(resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        prior: torch.Tensor | None = None  # token merging's state; a downsampling starts a new chain
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                if block.merge is None:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x, prior = checkpoint(block.forward_merging, x, prior, use_reentrant=False)
            elif block.merge is None:  # called as a module: its hooks run, exports name its scope
                x = block(x)
            else:
                x, prior = block.forward_merging(x, prior)
        return x


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: four 3x3 stride-2 Conv+BN, ReLU between them. Checks the input,
    since every way into the network (classifier, feature extractors) starts here."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, 2, 1)
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, 2, 1)
        self.conv3 = ConvNorm(dim // 4, dim // 2, 3, 2, 1)
        self.conv4 = ConvNorm(dim // 2, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not _graph_capture():  # captured graphs: checked when captured
            x = check_input(x, self.in_chans, next(self.conv1.parameters()).dtype)
        x = F.relu(self.conv1(x), inplace=True)
        x = F.relu(self.conv2(x), inplace=True)
        x = F.relu(self.conv3(x), inplace=True)
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
    if h < PATCH_SIZE or w < PATCH_SIZE:
        raise ValueError(f"img_size {h}x{w} is smaller than one {PATCH_SIZE}x{PATCH_SIZE} patch of the stem; "
                         f"use at least {PATCH_SIZE} px a side (224 for the released weights)")
    res = [(math.ceil(h / PATCH_SIZE), math.ceil(w / PATCH_SIZE))]
    for _ in range(2):
        res.append(((res[-1][0] + 1) // 2, (res[-1][1] + 1) // 2))
    return res


def check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a whole number >= 1 (0: no classifier, the pooled features), "
                         f"got {num_classes!r}")


class EfficientVitMsra(nn.Module):
    """EfficientViT-M classifier with timm's model interface: ``forward_features`` gives the stride-64
    map, ``forward_head`` the logits, ``forward_intermediates`` the stage maps."""

    def __init__(self, variant: str = "efficientvit_m0", num_classes: int = 1000, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 224, global_pool: str = "avg", drop_rate: float = 0.0,
                 distillation: bool = False, ltm: float | Sequence[float] | None = None,
                 ltm_mode: str = "learned", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        """``ltm``: token merging after each block's attention (``effvit.models.token_merging``), a keep
        ratio for every block or one per block (None: off); ``ltm_mode`` 'learned' or 'pool' (fixed)."""
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        check_num_classes(num_classes)
        if num_classes > 0 and not global_pool:
            raise ValueError("a classifier needs pooled features: pass global_pool='avg' or num_classes=0")
        cfg = VARIANTS[variant]
        self.variant = variant
        self.cfg = cfg
        self.in_chans = in_chans
        self.img_size = _pair(img_size)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = cfg.widths[-1]
        self.distillation = distillation
        self.ltm = None if ltm is None else block_keeps(ltm, sum(cfg.depths))
        self.ltm_mode = ltm_mode
        resolutions = stage_resolutions(self.img_size)
        self.patch_embed = PatchEmbed(in_chans, cfg.widths[0])
        stages = []
        in_dim = cfg.widths[0]
        for i, (dim, depth, heads) in enumerate(zip(cfg.widths, cfg.depths, cfg.heads)):
            first = sum(cfg.depths[:i])
            keeps = None if self.ltm is None else self.ltm[first:first + depth]
            stages.append(EfficientVitStage(in_dim, dim, depth, heads, max(resolutions[i]), cfg.kernels,
                                            downsample=i > 0, keeps=keeps, merge_mode=ltm_mode))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.feature_info = [dict(num_chs=dim, reduction=PATCH_SIZE * 2 ** i, module=f"stages.{i}")
                             for i, dim in enumerate(cfg.widths)]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = self._make_head(num_classes)
        self.head_dist = self._make_head(num_classes) if distillation else None
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return NormLinear(self.head_hidden_size, num_classes, drop=self.drop_rate)

    # -- timm's model interface ------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides 1-D ones: the relative-position tables."""
        return {n for n, _ in self.named_parameters() if n.endswith("attention_biases")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise lr decay (``timm.optim``): stem, then stages or blocks."""
        return dict(stem=r"^patch_embed",
                    blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.downsample", (0,)),
                                                             (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm's convention), or the identity of a headless model."""
        head = self.head
        return head.linear if isinstance(head, NormLinear) else head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head (and optionally pooling), on the model's device and dtype and in its mode."""
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        check_num_classes(num_classes)
        if num_classes > 0 and not self.global_pool.pool_type:
            raise ValueError("a classifier needs pooled features: pass global_pool='avg' or num_classes=0")
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.num_classes = num_classes
        ref = self.patch_embed.conv4
        p = next(ref.parameters())
        self.head = self._make_head(num_classes).to(p.device, p.dtype).train(self.training)
        if self.head_dist is not None:
            self.head_dist = self._make_head(num_classes).to(p.device, p.dtype).train(self.training)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, **kwargs) -> None:
        """Rebuild the windows for another input size; bias tables are resized (bicubic) where a
        window changes. Other sizes run without this too: it sets the windows a size is trained with.
        ``None`` keeps the size; timm's other arguments (patch size...) do not apply and are ignored."""
        self.img_size = _pair(img_size) if img_size is not None else self.img_size
        update_model_input_size(self, self.img_size)  # what timm's input config and save_for_hf read
        for stage, res in zip(self.stages, stage_resolutions(self.img_size)):
            stage.set_resolution(max(res))
        cfg = getattr(self, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg["input_size"] = (self.in_chans, *self.img_size)

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one ``indices`` asks for (and the head)."""
        take, last = feature_take_indices(len(self.stages), indices)
        if last < len(self.stages) - 1:
            self.stages = self.stages[: last + 1]
            self.num_features = self.feature_info[last]["num_chs"]
            prune_head = True
        if prune_head:
            self.head_dist = None
            self.reset_classifier(0, "")
        return take

    # -- forward ---------------------------------------------------------------------------------------
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage maps selected by ``indices`` (the last n for an int, all for None), and unless
        ``intermediates_only`` the final features as well. ``norm`` is accepted for timm's interface:
        the network has no final norm."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.stages), indices)
        x = self.patch_embed(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: last + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = self.global_pool(x)
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

    @torch.no_grad()
    def fuse(self) -> "EfficientVitMsra":
        """Every module folded; the distillation heads average into one linear (eval returns their mean);
        the average pool a plain mean (in ONNX a ReduceMean, which needs no layout reorder)."""
        fuse_children(self)
        if self.global_pool.pool_type == "avg":
            self.global_pool = SelectAdaptivePool2d(pool_type="fast", flatten=True)
        if isinstance(self.head, nn.Linear) and isinstance(self.head_dist, nn.Linear):
            self.head.weight.copy_((self.head.weight.double() + self.head_dist.weight.double()) / 2)
            self.head.bias.copy_((self.head.bias.double() + self.head_dist.bias.double()) / 2)
            self.head_dist = None
        return self


def fuse(model: nn.Module, conv_batch: int | str = "auto") -> nn.Module:
    """The inference form of ``model`` (a classifier or a ``features_only`` extractor): a folded copy
    with the same outputs (fp32 differences are rounding only), in eval mode, without gradients, in
    channels-last memory. The source model is read, never modified.

    ``conv_batch``: on the CPU, batches of this many images or more run their 1x1 convs as oneDNN
    convolutions rather than GEMMs over tokens; "auto" measures which is faster on this CPU
    (``conv_batch_for_cpu``), 0 keeps the GEMMs at every batch."""
    if not any(isinstance(m, (ConvNorm, PointwiseConv)) for m in model.modules()):
        raise ValueError(f"fuse expects an EfficientViT-M model (effvit.create_model), got "
                         f"{type(model).__name__}")
    fused = copy.deepcopy(model).eval()
    fold = getattr(fused, "fuse", None)
    if callable(fold):
        fused = fold()
    else:
        fuse_children(fused)
    fused.to(memory_format=torch.channels_last)
    for p in fused.parameters():
        p.requires_grad_(False)
    if conv_batch != "auto" and not (isinstance(conv_batch, int) and conv_batch >= 0):
        raise ValueError(f"conv_batch must be 'auto' or a batch size >= 0 (0: never), got {conv_batch!r}")
    batch = conv_batch_for_cpu() if conv_batch == "auto" else conv_batch
    for m in fused.modules():
        if isinstance(m, PointwiseConv):
            m.set_conv_batch(batch)
    return fused
