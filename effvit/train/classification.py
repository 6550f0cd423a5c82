"""Image classification: its settings, the task, and how a config turns into one (data, model, criterion).

Everything label-specific lives here: the ``model``, ``data`` (where the images are), ``aug`` and
``distill`` sections of ``ClassificationConfig``, timm's transforms, mixup / cutmix, label smoothing,
distillation, top-k metrics and the confusion matrix. The engine only sees the ``Task`` contract and the
engine sections of the config. The section defaults are neutral (no RandAugment, erasing, mixup or
smoothing); the official ImageNet recipe is data: effvit/configs/imagenet.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from effvit.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    ImageFolder,
    build_transform,
    check_same_classes,
    find_classes,
    image_mode,
)
from effvit.models.backbone import create_backbone
from effvit.models.token_merging import MERGE_MODES
from effvit.models.weights import INTERPOLATIONS

from .config import (
    Config,
    EmaConfig,
    LoaderConfig,
    OptimConfig,
    RunConfig,
    SchedConfig,
    check_range,
    is_fraction,
    load_config,
    require,
)
from .distill import DistillationLoss, build_teacher
from .ib_loss import IBLoss, PreLogits
from .metrics import classification_stats, summarize_classification
from .task import Task


# -- settings --------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "efficientvit_m0"
    num_classes: int | None = None  # None: the number of class folders in the training data
    img_size: int = 224
    in_chans: int = 3
    pretrained: str | None = None  # weights to start from, same classes and size (any layout)
    finetune: str | None = None  # weights to fine-tune: head re-created, bias tables resized
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (small data sets)
    channels_last: bool = False
    ltm: float | tuple[float, ...] | None = None  # token merging: keep ratio per block (one or each)
    ltm_mode: str = "learned"  # learned | pool (fixed area-pool merge, the baseline)

    def check(self) -> None:
        require(self.num_classes is None or self.num_classes >= 1, "model.num_classes", self.num_classes,
                "a whole number >= 1, or null (the class folders)")
        require(self.img_size >= 1, "model.img_size", self.img_size, "a size in pixels >= 1")
        require(self.in_chans >= 1, "model.in_chans", self.in_chans, "1 (grey) or 3 (RGB)")
        keeps = self.ltm if isinstance(self.ltm, (list, tuple)) else [self.ltm]
        require(self.ltm is None or all(0 < k <= 1 for k in keeps), "model.ltm", self.ltm,
                "a keep ratio in (0, 1] or one per block, or null (no merging)")
        require(self.ltm_mode in MERGE_MODES, "model.ltm_mode", self.ltm_mode, "one of " + ", ".join(MERGE_MODES))


@dataclass
class DataConfig(LoaderConfig):
    """Where the labelled images are; the loader settings (batch size...) come from ``LoaderConfig``."""

    dataset: str = "folder"  # folder (ImageNet layout: root/train/<class>/*.jpg) | fashion_mnist
    root: str | None = None  # folder: the data root; fashion_mnist: the IDX files (None: Debian path)
    train_split: str = "train"
    val_split: str = "val"
    strict: bool = False  # stop at the first image that cannot be decoded instead of skipping it


@dataclass
class AugConfig:
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    auto_augment: str | None = None  # e.g. rand-m9-mstd0.5-inc1 (RandAugment)
    color_jitter: float = 0.4  # timm ignores it while auto_augment is set
    interpolation: str = "bicubic"
    re_prob: float = 0.0  # random erasing
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0
    crop_pct: float = 0.875  # eval: resize img_size / crop_pct, centre crop img_size (256 -> 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def check(self) -> None:
        check_range("aug.scale", self.scale, 0, 1)
        check_range("aug.ratio", self.ratio, 0)
        for key in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            require(is_fraction(getattr(self, key)), f"aug.{key}", getattr(self, key), "a probability in [0, 1]")
        for key in ("mixup", "cutmix", "color_jitter"):
            require(getattr(self, key) >= 0, f"aug.{key}", getattr(self, key), "0 (off) or more")
        require(0 <= self.smoothing < 1, "aug.smoothing", self.smoothing, "in [0, 1)")
        require(is_fraction(self.crop_pct, open_low=True), "aug.crop_pct", self.crop_pct, "a fraction in (0, 1]")
        require(self.interpolation in (*INTERPOLATIONS, "random"), "aug.interpolation", self.interpolation,
                "one of " + ", ".join((*INTERPOLATIONS, "random")))
        require(len(self.std) > 0 and all(v > 0 for v in self.std), "aug.std", self.std, "positive numbers")
        require(len(self.mean) == len(self.std), "aug.mean", self.mean, f"{len(self.std)} numbers, as aug.std")


@dataclass
class DistillConfig:
    teacher: str | None = None  # an effvit name (efficientvit_m5) or a timm one (regnety_160)
    teacher_checkpoint: str | None = None
    teacher_img_size: int | None = None  # None: the student's
    type: str = "hard"  # none | soft | hard (DeiT)
    alpha: float = 0.5
    tau: float = 1.0

    def check(self) -> None:
        require(self.type in ("none", "soft", "hard"), "distill.type", self.type, "none, soft or hard")
        require(is_fraction(self.alpha), "distill.alpha", self.alpha, "in [0, 1]")
        require(self.tau > 0, "distill.tau", self.tau, "a temperature above 0")


@dataclass
class IBConfig:
    """The information-bottleneck bound of learnable token merging (``effvit.train.ib_loss``), added to the
    criterion as a plug-in: off at weight 0; works with any classifier that has ``get_classifier()``."""

    weight: float = 0.0  # 0: off (the LTM paper: 0.1)
    start_epoch: int = 0  # epochs of the criterion alone first (the LTM paper: 30% of the run)
    num_clusters: int = 100  # k-means centroids of the inputs and of the pre-logit features
    beta: float = 1.0  # sharpness of the soft cluster assignments
    input_size: int | None = 32  # images are area-resized to this before clustering (None: full size)

    def check(self) -> None:
        require(self.weight >= 0, "ib.weight", self.weight, "0 (off) or more")
        require(self.start_epoch >= 0, "ib.start_epoch", self.start_epoch, "0 or more")
        require(self.num_clusters >= 2, "ib.num_clusters", self.num_clusters, "a whole number >= 2")
        require(self.beta > 0, "ib.beta", self.beta, "above 0")
        require(self.input_size is None or self.input_size >= 1, "ib.input_size", self.input_size,
                "a size in pixels >= 1, or null")


@dataclass
class ClassificationConfig(Config):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ib: IBConfig = field(default_factory=IBConfig)


def load_classification_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                               base: ClassificationConfig | dict | None = None,
                               values: dict | None = None) -> ClassificationConfig:
    """``load_config`` for classification: a recipe ('efficientvit_m0', a YAML file) with overrides."""
    return load_config(ClassificationConfig, path, overrides, base=base, values=values)


# -- the task --------------------------------------------------------------------------------------
class ClassificationTask(Task):
    """Cross-entropy classification with optional mixup/cutmix, label smoothing, a teacher and the IB loss
    plug-in (``ib``: an ``IBLoss`` fed the training images and the pre-logit features, its banks refitted
    at the end of each epoch)."""

    best_metric = "top1"
    best_mode = "max"

    def __init__(self, model: nn.Module, train_dataset, val_dataset=None, *, num_classes: int,
                 class_names: list[str] | None = None, mixup=None, smoothing: float = 0.0,
                 teacher: nn.Module | None = None, distill_kind: str = "hard", distill_alpha: float = 0.5,
                 distill_tau: float = 1.0, teacher_img_size: int | None = None, ib: IBLoss | None = None,
                 meta: dict | None = None):
        meta = {"task": "classification", "num_classes": num_classes, "class_names": class_names,
                **(meta or {})}
        super().__init__(model, train_dataset, val_dataset, meta=meta)
        self.num_classes = num_classes
        self.class_names = class_names
        self.mixup = mixup
        self.teacher = teacher
        self.teacher_img_size = teacher_img_size
        if mixup is not None:
            criterion: nn.Module = SoftTargetCrossEntropy()  # mixup already smoothed the targets
        elif smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        self.criterion = (DistillationLoss(criterion, distill_kind, distill_alpha, distill_tau)
                          if teacher is not None else criterion)
        self.ib = ib
        self.features = PreLogits(model) if ib is not None else None
        self.epoch = 0
        self.ib_inputs: torch.Tensor | None = None  # the training batch the next loss() belongs to

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def end_epoch(self, epoch: int) -> None:
        if self.ib is not None:
            self.ib.refresh()

    def prepare(self, device: torch.device) -> None:
        if self.teacher is not None:
            self.teacher.to(device)
        if self.ib is not None:
            self.ib.to(device)

    def train_batch(self, inputs: torch.Tensor, targets: Any):
        if self.mixup is not None:
            if inputs.shape[0] % 2:  # timm's batch mixup pairs samples; a skipped image made it odd
                inputs, targets = inputs[:-1], targets[:-1]
            inputs, targets = self.mixup(inputs, targets)
        if self.teacher is not None:
            with torch.no_grad():
                t_in = inputs
                if self.teacher_img_size and self.teacher_img_size != inputs.shape[-1]:
                    t_in = F.interpolate(inputs, size=self.teacher_img_size, mode="bicubic",
                                         align_corners=False)
                targets = (targets, self.teacher(t_in))
        if self.ib is not None:
            self.ib_inputs = inputs
        return inputs, targets

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        # logits to fp32: the criteria's log-softmax under fp16/bf16 autocast would lose precision
        outputs = tuple(o.float() for o in outputs) if isinstance(outputs, (tuple, list)) else outputs.float()
        if self.teacher is None and isinstance(outputs, tuple):
            outputs = (outputs[0] + outputs[1]) / 2  # a distillation head trained without a teacher
        loss = self.criterion(outputs, targets)
        if self.ib_inputs is not None:  # a training step with the IB plug-in on
            labels = targets[0] if self.teacher is not None else targets
            loss = loss + self.ib(self.ib_inputs, self.features.value, labels, self.epoch)
            self.ib_inputs = None
        return loss

    def eval_stats(self, outputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(outputs, (tuple, list)):
            outputs = (outputs[0] + outputs[1]) / 2
        return classification_stats(outputs, targets, self.num_classes)

    def summarize(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        return summarize_classification(stats)


# -- from a config ---------------------------------------------------------------------------------
def build_datasets(cfg: ClassificationConfig, train: bool = True, val: bool = True):
    """(train_dataset, val_dataset, class_names) for ``cfg.data``, with the transforms of ``cfg.aug``."""
    d, m = cfg.data, cfg.model
    mode = image_mode(m.in_chans)
    train_tf = build_transform(cfg.aug, m.img_size, m.in_chans, is_training=True)
    eval_tf = build_transform(cfg.aug, m.img_size, m.in_chans, is_training=False)
    if d.dataset == "fashion_mnist":
        tr = FashionMNIST(d.root, train=True, transform=train_tf, mode=mode) if train else None
        va = FashionMNIST(d.root, train=False, transform=eval_tf, mode=mode) if val else None
        return tr, va, list(FashionMNIST.classes)
    if d.dataset != "folder":
        raise ValueError(f"data.dataset must be 'folder' or 'fashion_mnist', got {d.dataset!r}")
    if not d.root:
        raise ValueError("no data folder given: pass --data DIR (ImageNet layout: DIR/train/<class>/*.jpg, "
                         "DIR/val/<class>/*.jpg) or use data.dataset=fashion_mnist")
    root = Path(d.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (or is not a folder); expected the "
                                f"ImageNet layout {root}/{d.train_split}/<class>/*.jpg and "
                                f"{root}/{d.val_split}/<class>/*.jpg")
    train_dir, val_dir = root / d.train_split, root / d.val_split
    classes = find_classes(train_dir if train else val_dir)
    if train and val:
        check_same_classes(classes, find_classes(val_dir), train_dir, val_dir)
    tr = ImageFolder(train_dir, classes, transform=train_tf, mode=mode) if train else None
    va = ImageFolder(val_dir, classes, transform=eval_tf, mode=mode) if val else None
    return tr, va, classes


def data_defaults(cfg: ClassificationConfig) -> None:
    """Fashion-MNIST's own statistics unless the config gave others than ImageNet's."""
    if cfg.data.dataset == "fashion_mnist" and tuple(cfg.aug.mean) == (0.485, 0.456, 0.406):
        cfg.aug.mean, cfg.aug.std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)


def build_model(cfg: ClassificationConfig, num_classes: int, log=print) -> nn.Module:
    """The student: fresh, from ``pretrained`` (same head and size) or ``finetune`` (head re-created,
    bias tables resized, first conv adapted to other input channels)."""
    m = cfg.model
    distill = cfg.distill.teacher is not None and cfg.distill.type != "none"
    return create_backbone(m.name, num_classes, img_size=m.img_size, in_chans=m.in_chans, pretrained=m.pretrained,
                           finetune=m.finetune, distillation=distill, log=log, **ltm_args(m))


def ltm_args(m: ModelConfig) -> dict:
    """Token merging's constructor arguments, only where asked for (timm backbones take none)."""
    return {"ltm": m.ltm, "ltm_mode": m.ltm_mode} if m.ltm is not None else {}


def build_classification_task(cfg: ClassificationConfig, log=print) -> ClassificationTask:
    """Datasets, model, criterion and metrics for ``cfg`` (see configs/*.yaml)."""
    data_defaults(cfg)
    train_ds, val_ds, classes = build_datasets(cfg)
    num_classes = cfg.model.num_classes or len(classes)
    if num_classes != len(classes):
        raise ValueError(f"model.num_classes={num_classes} but the data has {len(classes)} classes "
                         f"({', '.join(classes[:5])}...); drop the setting to follow the data")
    model = build_model(cfg, num_classes, log)
    a = cfg.aug
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                      switch_prob=a.mixup_switch_prob, mode=a.mixup_mode, label_smoothing=a.smoothing,
                      num_classes=num_classes)
    teacher = None
    dc = cfg.distill
    if dc.teacher and dc.type != "none":
        teacher = build_teacher(dc.teacher, dc.teacher_checkpoint, num_classes, cfg.model.in_chans,
                                dc.teacher_img_size or cfg.model.img_size)
    ib = None
    if cfg.ib.weight > 0:
        ib = IBLoss(num_classes, num_clusters=cfg.ib.num_clusters, beta=cfg.ib.beta, weight=cfg.ib.weight,
                    start_epoch=cfg.ib.start_epoch, input_size=cfg.ib.input_size, seed=cfg.run.seed)
    meta = {"dataset": cfg.data.dataset, "img_size": cfg.model.img_size, "in_chans": cfg.model.in_chans,
            "mean": list(a.mean), "std": list(a.std), "interpolation": a.interpolation,
            "crop_pct": a.crop_pct}
    task = ClassificationTask(model, train_ds, val_ds, num_classes=num_classes, class_names=list(classes),
                              mixup=mixup, smoothing=a.smoothing, teacher=teacher, distill_kind=dc.type,
                              distill_alpha=dc.alpha, distill_tau=dc.tau,
                              teacher_img_size=dc.teacher_img_size, ib=ib, meta=meta)
    task.name = f"{cfg.model.name.removeprefix('efficientvit_')}-{cfg.data.dataset}"
    task.channels_last, task.freeze_bn = cfg.model.channels_last, cfg.model.freeze_bn
    task.strict = cfg.data.strict
    return task
