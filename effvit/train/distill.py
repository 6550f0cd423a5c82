"""DeiT-style knowledge distillation: a teacher network and the combined loss.

The student is built with a second head (``distillation=True``): in training it returns
``(class_logits, dist_logits)``; the class head learns from the labels, the distillation head from the
teacher (its soft distribution at temperature tau, or its arg-max as a hard label); in eval the two
heads are averaged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effvit.models.backbone import create_backbone

KINDS = ("none", "soft", "hard")


class DistillationLoss(nn.Module):
    """``(1 - alpha) * base(class_out, labels) + alpha * distill(dist_out, teacher_logits)``.

    Targets are ``(labels, teacher_logits)``, as produced by ``ClassificationTask.train_batch``."""

    def __init__(self, base: nn.Module, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"distill.type must be one of {KINDS}, got {kind!r}")
        self.base, self.kind, self.alpha, self.tau = base, kind, alpha, tau

    def forward(self, outputs: Any, targets: Any) -> torch.Tensor:
        labels, teacher_logits = targets
        cls_out, dist_out = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        base = self.base(cls_out, labels)
        if self.kind == "none":
            return base
        teacher_logits = teacher_logits.float()
        if self.kind == "soft":
            t = self.tau
            kd = F.kl_div(F.log_softmax(dist_out.float() / t, dim=1),
                          F.log_softmax(teacher_logits / t, dim=1), reduction="sum", log_target=True)
            kd = kd * (t * t) / dist_out.numel()
        else:
            kd = F.cross_entropy(dist_out.float(), teacher_logits.argmax(dim=1))
        return base * (1 - self.alpha) + kd * self.alpha


def build_teacher(name: str, checkpoint: str | None, num_classes: int, in_chans: int,
                  img_size: int) -> nn.Module:
    """An effvit model (name starting with efficientvit_) or any timm model, all of its weights (head
    included: a teacher must predict the student's classes) from ``checkpoint``, frozen in eval mode."""
    if not checkpoint:
        raise ValueError(f"distill.teacher={name} needs distill.teacher_checkpoint: an untrained teacher "
                         "teaches nothing (no weights can be downloaded here)")
    teacher = create_backbone(name, num_classes, img_size=img_size, in_chans=in_chans, finetune=checkpoint,
                              strict_head=True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
