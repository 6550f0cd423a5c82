"""Training, evaluation and fine-tuning of EfficientViT-M (and of other tasks on the same engine).

Public API (stable; see docs/training.md):

- ``Task``: the contract between a problem and the engine; ``ClassificationTask`` the default.
- ``train(task, cfg, output_dir=None, resume=None, ctx=None) -> TrainResult``: the loop.
- ``launch(build_task, cfg, resume=None, on_done=None)``: what ``effvit train`` runs (torchrun-aware).
- ``evaluate(model, loader, task, ...) -> EvalResult``: metrics summed over batches and ranks.
- ``Config``: the engine's sections (data loader, optim, sched, ema, run); ``EngineConfig`` those alone,
  ``ClassificationConfig`` with classification's own (model, data source, aug, distill).
- ``load_config(kind, path, overrides)``: a config of class ``kind`` from a YAML recipe (``base:`` chains)
  and section.key=value overrides; ``load_classification_config(path, overrides)`` for classification.
- ``build_classification_task(cfg)``: data, model, criterion and metrics of an image classifier.
"""

from .checkpoint import load_training_state
from .classification import (
    ClassificationConfig,
    ClassificationTask,
    build_classification_task,
    load_classification_config,
)
from .config import Config, EngineConfig, load_config, packaged_configs
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
           "TrainResult", "EvalResult", "NonFiniteLossError", "Config", "EngineConfig", "ClassificationConfig",
           "load_config", "load_classification_config", "packaged_configs",
           "DistContext", "init_distributed", "seed_everything", "load_training_state"]
