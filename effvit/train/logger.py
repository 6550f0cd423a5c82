"""Run logs: messages on rank 0, a CSV row per epoch, optional TensorBoard, a PNG of the curves."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from effvit.outputs import write_csv
from effvit.plots import pyplot, save_figure


class RunLogger:
    """Writes only where ``enabled`` (rank 0). The CSV is rewritten from the whole history each epoch, so
    after a resume it holds exactly the epochs the checkpoint knows, none from the interrupted tail."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:  # optional (the tensorboard package) and heavy: loaded only when asked for
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ValueError("run.tensorboard=true needs the tensorboard package: "
                                     "pip install tensorboard") from e
                self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(msg, file=sys.stdout)
        with open(self.out_dir / "log.txt", "a") as f:
            f.write(msg + "\n")

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}{k}", v, step)

    def epoch(self, history: Sequence[dict]) -> None:
        if not self.enabled or not history:
            return
        self.scalars(history[-1], history[-1]["epoch"], prefix="epoch/")
        write_csv(history, self.out_dir / "log.csv")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(history: Sequence[dict], path: str | Path, metric: str = "top1") -> Path | None:
    """Loss (train and val) and the selection metric (val, and EMA when present) against the epoch."""
    if not history:
        return None
    plt = pyplot()

    epochs = [h["epoch"] for h in history]

    def series(key):
        return [h.get(key) if isinstance(h.get(key), (int, float)) else math.nan for h in history]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, series("train_loss"), "o-", label="train loss")
    if any(not math.isnan(v) for v in series("val_loss")):
        ax1.plot(epochs, series("val_loss"), "s-", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for key, style in ((f"val_{metric}", "o-"), (f"ema_{metric}", "s--")):
        if any(not math.isnan(v) for v in series(key)):
            ax2.plot(epochs, series(key), style, label=key.replace("_", " "))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(metric)
    if ax2.lines:
        ax2.legend()
    ax2.grid(alpha=0.3)
    return save_figure(fig, path)
