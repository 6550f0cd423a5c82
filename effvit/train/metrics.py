"""Classification metrics as sums (so batches and ranks add up exactly) and their summaries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from effvit.plots import pyplot, save_figure


def classification_stats(logits: torch.Tensor, targets: torch.Tensor,
                         num_classes: int) -> dict[str, torch.Tensor]:
    """Loss sum, count, top-1/top-5 hits and the (true, predicted) confusion counts of one batch."""
    logits = logits.float()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hits = topk.eq(targets[:, None])
    pred = topk[:, 0]
    confusion = torch.bincount(targets * num_classes + pred, minlength=num_classes * num_classes)
    return {
        "loss": F.cross_entropy(logits, targets, reduction="sum").double(),
        "count": torch.tensor(targets.numel(), dtype=torch.float64, device=logits.device),
        "correct1": hits[:, 0].sum().double(),
        "correct5": hits.any(dim=1).sum().double(),
        "confusion": confusion.reshape(num_classes, num_classes),
    }


def summarize_classification(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    n = float(stats["count"].clamp(min=1))
    return {"loss": float(stats["loss"]) / n, "top1": 100.0 * float(stats["correct1"]) / n,
            "top5": 100.0 * float(stats["correct5"]) / n}


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class in percent (NaN for a class with no samples)."""
    c = confusion.double().cpu()
    totals = c.sum(dim=1)
    return [float(100 * c[i, i] / totals[i]) if totals[i] > 0 else float("nan") for i in range(len(c))]


def plot_confusion(confusion: torch.Tensor, class_names: Sequence[str] | None, path: str | Path,
                   title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (counts in the cells for up to 30 classes)."""
    plt = pyplot()

    c = confusion.double().cpu()
    n = c.shape[0]
    norm = c / c.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(4 + 0.45 * n, 40)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 60:
        names = list(class_names) if class_names else [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if c[i, j] > 0:
                    ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, path)
