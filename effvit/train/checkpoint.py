"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A training checkpoint is an effvit checkpoint (``{'format', 'state_dict', 'meta'}``, readable by
``effvit.models.weights.read_checkpoint`` and ``create_model(pretrained=path)``) with more keys: ``ema``,
``optimizer``, ``scheduler``, ``scaler``, ``epoch``, ``rng`` (one entry per rank), ``config``,
``history`` and ``best``. Only plain containers, numbers, strings and tensors go in, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from effvit.models.weights import FORMAT_TAG, describe_load_error, model_meta


# -- random number generators ----------------------------------------------------------------------
def capture_rng() -> dict:
    """This process's torch, CUDA, numpy and Python RNG states, as plain data and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing ---------------------------------------------------------------------------------------
def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _replace_synced(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` (already flushed to disk) over ``path`` and make the rename itself durable."""
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _save_synced(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    a crash leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        _save_synced(obj, tmp)
        _replace_synced(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` over ``dst`` as ``save_atomic`` writes: temporary file, flushed, renamed."""
    dst = Path(dst)
    tmp = _temporary(dst)
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        _replace_synced(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def save_epoch(state: dict, last: str | Path, best: str | Path | None = None) -> None:
    """Write the state of an epoch as ``last`` and, when it is the best so far, as ``best`` too.

    best.pth is in place before the last.pth that records it as best: a crash or a full disk at any point
    leaves the previous last.pth and a best.pth at least as recent as the best epoch it records (the
    interrupted epoch is trained again on resume and rewrites both)."""
    last = Path(last)
    tmp = _temporary(last)
    try:
        _save_synced(state, tmp)
        if best is not None:
            copy_atomic(tmp, best)
        _replace_synced(tmp, last)
    finally:
        tmp.unlink(missing_ok=True)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def training_state(*, model: nn.Module, optimizer, scheduler, scaler, ema, epoch: int, rng: list[dict],
                   config: dict, meta: dict, history: list[dict], best: dict | None) -> dict:
    return {
        "format": FORMAT_TAG,
        "state_dict": cpu_state(model),
        "meta": model_meta(model, meta),
        "ema": cpu_state(ema.module) if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "rng": rng,
        "config": config,
        "history": history,
        "best": best,
    }


# -- reading ---------------------------------------------------------------------------------------
def load_training_state(path: str | Path) -> dict:
    """A checkpoint written by ``effvit train`` (weights_only), with errors that say what to do."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint: give the file, e.g. {path / 'last.pth'}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise describe_load_error(path, e, "resume from the run's best.pth or an older copy") from None
    if not isinstance(state, dict) or "optimizer" not in state or "epoch" not in state:
        raise ValueError(f"{path} holds weights only, not a training state (optimizer, epoch...); "
                         "use it with --finetune or model.pretrained instead of --resume")
    return state
