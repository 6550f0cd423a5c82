"""The task contract between the training engine and what is being learned.

The engine (``effvit.train.engine``) owns the loop: devices, DDP, mixed precision, the optimizer and
schedule, gradient clipping, EMA, NaN checks, evaluation, checkpoints, resume and logs. A ``Task``
owns everything problem-specific: the model, the datasets, how a batch becomes a loss, how outputs
become metrics, and which metric picks the best checkpoint. Classification is ``ClassificationTask``;
other problems (rotation-angle regression, ...) subclass ``Task`` and reuse the same loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from effvit.data import skip_collate


def batch_size_of(targets: Any) -> int:
    """Number of samples in ``targets`` (a tensor, or a tuple/list/dict whose first entry is one)."""
    if isinstance(targets, torch.Tensor):
        return targets.shape[0]
    if isinstance(targets, dict):
        return batch_size_of(next(iter(targets.values())))
    if isinstance(targets, (list, tuple)):
        return batch_size_of(targets[0])
    raise TypeError(f"cannot tell the batch size of targets of type {type(targets).__name__}")


def to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Tensors, and tensors nested in tuples, lists and dicts, moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


class Task:
    """What the engine trains. Subclass it and override ``loss`` (and usually the metrics).

    Contract (all hooks receive tensors already on the training device):

    - ``model``: any ``nn.Module``; ``model(inputs)`` gives the ``outputs`` the hooks receive. If it has
      ``no_weight_decay()``, those parameters (and every 1-D one) get no weight decay.
    - ``train_dataset`` / ``val_dataset``: items ``(input, target)``; the engine builds the loaders
      (batching, epoch-seeded shuffling, DDP sharding, repeated augmentation). ``collate_fn`` must give
      ``(inputs, targets)`` or ``(inputs, targets, skipped_names)``; targets may be a tensor or a
      tuple/list/dict of tensors. The default drops samples a dataset returned as ``Unreadable``.
    - ``prepare(device)``: move auxiliary modules (a teacher...) to the training device.
    - ``train_batch(inputs, targets)``: per-step transform in training only (mixup, teacher outputs...).
    - ``loss(outputs, targets) -> scalar tensor``: the training criterion.
    - ``eval_stats(outputs, targets) -> dict[str, Tensor]``: SUMS over the batch (e.g. loss sum, count,
      number correct, a confusion matrix). The engine adds them over batches and ranks, then calls
    - ``summarize(stats) -> dict[str, float]``: the metrics (e.g. mean loss, top-1) logged per epoch.
    - ``best_metric`` / ``best_mode`` ('max' or 'min'): the summarized metric that selects best.pth.
    - ``meta``: plain data stored in every checkpoint (class names, preprocessing, the task's name).
    - ``start_epoch(epoch)`` / ``end_epoch(epoch)``: called around each epoch's training steps (a loss
      plug-in refreshes what it gathered, e.g. ``effvit.train.ib_loss``).
    - ``name``: names the run folder (after the start time) when the config names none.
    - ``channels_last``: inputs (and the model) in channels-last memory format; ``freeze_bn``: BatchNorm
      statistics stay fixed in training; ``strict``: an unreadable sample stops the run instead of being
      skipped and counted.
    """

    best_metric: str = "loss"
    best_mode: str = "min"
    name: str = "run"
    channels_last: bool = False
    freeze_bn: bool = False
    strict: bool = False

    def __init__(self, model: nn.Module, train_dataset: Dataset, val_dataset: Dataset | None = None, *,
                 collate_fn: Callable = skip_collate, meta: dict | None = None):
        self.model = model
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.collate_fn = collate_fn
        self.meta = dict(meta or {})

    def prepare(self, device: torch.device) -> None:
        """Called once by the engine after the model is on ``device``: move helpers (teachers...) too."""

    def start_epoch(self, epoch: int) -> None:
        """Called before the training steps of ``epoch`` (0-based)."""

    def end_epoch(self, epoch: int) -> None:
        """Called after the training steps of ``epoch``, before its evaluation."""

    def train_batch(self, inputs: torch.Tensor, targets: Any) -> tuple[torch.Tensor, Any]:
        return inputs, targets

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define loss(outputs, targets)")

    def eval_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The loss reported in evaluation (default: the training loss)."""
        return self.loss(outputs, targets)

    def eval_stats(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        n = batch_size_of(targets)
        return {"loss": self.eval_loss(outputs, targets).detach().double() * n,
                "count": torch.tensor(n, dtype=torch.float64)}

    def summarize(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"loss": float(stats["loss"] / stats["count"].clamp(min=1))}
