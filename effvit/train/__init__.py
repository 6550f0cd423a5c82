"""Training, evaluation and fine-tuning of EfficientViT-M (and of other tasks on the same engine).

Public API (stable; see docs/training.md):

- ``Task``: the contract between a problem and the engine; ``ClassificationTask`` the default.
- ``train(task, cfg, output_dir=None, resume=None, ctx=None) -> TrainResult``: the loop.
- ``launch(build_task, cfg, resume=None, on_done=None)``: what ``effvit train`` runs (torchrun-aware).
- ``evaluate(model, loader, task, ...) -> EvalResult``: metrics summed over batches and ranks.
- ``Config`` / ``load_config(path, overrides)``: the YAML configuration with section.key=value overrides.
- ``build_classification_task(cfg)``: data, model, criterion and metrics of an image classifier.
"""

from .checkpoint import load_training_state
from .classification import ClassificationTask, build_classification_task
from .config import Config, load_config, packaged_configs
from .data import FashionMNIST, ImageFolder, Unreadable, build_loader, build_transform, skip_collate
from .distributed import DistContext, init_distributed
from .engine import (
    EvalResult,
    NonFiniteLossError,
    TrainResult,
    evaluate,
    launch,
    seed_everything,
    train,
    train_step,
)
from .task import Task

__all__ = ["Task", "ClassificationTask", "build_classification_task", "train", "launch", "train_step", "evaluate",
           "TrainResult", "EvalResult", "NonFiniteLossError", "Config", "load_config", "packaged_configs",
           "FashionMNIST", "ImageFolder", "Unreadable", "build_loader", "build_transform", "skip_collate",
           "DistContext", "init_distributed", "seed_everything", "load_training_state"]
