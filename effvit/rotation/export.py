"""A finished rotation run's best weights as one self-describing file: what ``effvit straighten --model``
and ``effvit rotation eval`` load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from effvit.models.weights import read_checkpoint
from effvit.train import TrainResult

from .model import save_rotation_model
from .task import RotationTask


def export_best(result: TrainResult, task: RotationTask, log: Callable[[str], object] = print) -> Path | None:
    """best.safetensors beside the run's best.pth (the model with its settings and best metrics); None
    when the run saved no best checkpoint. Moves ``task.model`` to the CPU."""
    if not Path(result.best_checkpoint).is_file():
        return None
    sd, meta = read_checkpoint(result.best_checkpoint)
    model = task.model.cpu()
    model.load_state_dict(sd)
    path = save_rotation_model(model, Path(result.output_dir) / "best.safetensors",
                               extra={"settings": meta.get("settings"), "best": result.best})
    log(f"exported {path}")
    return path
