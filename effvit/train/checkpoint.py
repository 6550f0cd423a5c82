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

from effvit.models.weights import FORMAT_TAG


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
def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    a crash leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def model_meta(model: nn.Module, extra: dict | None = None) -> dict:
    """What a reader needs to rebuild the network and its preprocessing."""
    meta = {"arch": getattr(model, "variant", type(model).__name__),
            "num_classes": getattr(model, "num_classes", None),
            "img_size": list(getattr(model, "img_size", ())) or None,
            "in_chans": getattr(model, "in_chans", None),
            "distillation": getattr(model, "distillation", False)}
    meta.update(extra or {})
    return meta


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
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it may be "
                         "truncated: resume from the run's best.pth or an older copy") from e
    if not isinstance(state, dict) or "optimizer" not in state or "epoch" not in state:
        raise ValueError(f"{path} holds weights only, not a training state (optimizer, epoch...); "
                         "use it with --finetune or model.pretrained instead of --resume")
    return state


def check_same_arch(meta: dict, model: nn.Module, source: str) -> None:
    want, found = getattr(model, "variant", None), meta.get("arch")
    if want and found and want != found:
        raise ValueError(f"{source} holds {found} weights but the model being built is {want}: use "
                         f"model.name={found} (or --model {found}), or start a new run")
