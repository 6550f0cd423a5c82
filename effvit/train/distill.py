"""DeiT-style knowledge distillation: a teacher network and the combined loss.

The student is built with a second head (``distillation=True``): in training it returns
``(class_logits, dist_logits)``; the class head learns from the labels, the distillation head from the
teacher (its soft distribution at temperature tau, or its arg-max as a hard label); in eval the two
heads are averaged.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from effvit.models import create_model, variant_name
from effvit.models.weights import fit_state_dict, read_checkpoint

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
    variant = variant_name(name.split(".")[0])
    if variant is not None:
        teacher = create_model(variant, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    else:
        try:
            teacher = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
        except RuntimeError as e:
            raise ValueError(f"unknown teacher {name!r}: neither an effvit model nor a timm one ({e})") from e
    sd, _ = read_checkpoint(checkpoint)  # weights only, with errors that say what the file is
    head = _classifier_weight(teacher)
    if head in sd and sd[head].shape[0] != num_classes:
        raise ValueError(f"teacher checkpoint {checkpoint} predicts {sd[head].shape[0]} classes but the student "
                         f"learns {num_classes}: a teacher must predict the student's classes (fine-tune it on "
                         "this data first)")
    source = f"teacher checkpoint {checkpoint}"
    if variant is not None:
        teacher.load_state_dict(fit_state_dict(teacher, sd, source=source), strict=False)
    else:
        try:
            teacher.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"{source} does not fit {name}: {str(e).splitlines()[-1].strip()}") from None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _classifier_weight(model: nn.Module) -> str:
    """The state-dict key of the classifier's weight ('head.linear.weight', 'fc.weight', ...)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = head[0] if isinstance(head, (tuple, list)) else head
    linear = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))] if head is not None else []
    return next((f"{n}.weight" for n, m in model.named_modules() if linear and m is linear[-1]), "")
