"""The training engine: one loop for every task (see ``effvit.train.task.Task``).

``train(task, cfg)`` runs epochs of ``train_one_epoch`` + ``evaluate`` with the optimizer, schedule,
clipping, EMA and mixed precision of ``cfg`` (timm's factories), under DDP when launched by torchrun,
writing ``last.pth`` / ``best.pth`` atomically every epoch into a run folder it holds alone
(``effvit.train.rundir``), and resumes from ``last.pth`` exactly. A non-finite loss (checked every log
interval, without a host-device sync per step) stops the run on every rank with the last good checkpoint
intact; a batch that unreadable files left too small is dropped by every rank together.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn
from torch import nn
from tqdm.auto import tqdm

from effvit.data import build_loader
from effvit.models.weights import check_same_arch

from . import distributed as du
from .agc import adaptive_clip_grad_
from .checkpoint import (
    capture_rng,
    copy_atomic,
    load_training_state,
    restore_rng,
    save_epoch,
    training_state,
)
from .config import Config
from .distributed import DistContext
from .logger import RunLogger, plot_curves
from .rundir import RunFolder
from .samplers import build_train_sampler
from .task import Task, batch_size_of, to_device

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint for that epoch."""


@dataclass
class EvalResult:
    metrics: dict[str, float]
    stats: dict[str, torch.Tensor]  # the summed statistics (on CPU), e.g. a confusion matrix
    skipped: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict]
    best: dict | None
    last_checkpoint: Path
    best_checkpoint: Path


# -- set-up helpers --------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(enabled: bool) -> None:
    """Deterministic kernels where PyTorch has them (bit-exact resume tests; slower on GPU)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def idle_threads(ctx: DistContext) -> int:
    """CPU threads for this process: the cores not already busy (1-minute load average), shared among
    the processes of this node. On a shared machine, OpenMP threads that wait on a preempted sibling
    make a step several times slower than one thread would; but speed and floating-point results then
    depend on other processes, so this is opt-in (run.threads=idle)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    free = cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else cores
    return max(1, min(cores // local, int(free + 0.5) // local))


def configure_threads(threads: int | str | None, ctx: DistContext) -> None:
    """run.threads: None keeps torch's default (one per physical core, or OMP_NUM_THREADS), N sets N,
    'idle' counts the idle cores at start (``idle_threads``)."""
    if threads is None:
        return
    if threads == "idle":
        threads = idle_threads(ctx)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"run.threads must be a positive number, null (torch's default: one thread per "
                         f"physical core) or 'idle' (the cores idle at start), got {threads!r}")
    torch.set_num_threads(threads)


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES.get(amp, "bad")
    if dtype == "bad":
        raise ValueError(f"run.amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def freeze_bn_stats(model: nn.Module) -> None:
    """BatchNorm layers to eval mode: running statistics are used and left untouched (small data)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def unpack_batch(batch: Any) -> tuple[Any, Any, list[str]]:
    if len(batch) == 3:
        return batch[0], batch[1], list(batch[2])
    return batch[0], batch[1], []


MIN_TRAIN_BATCH = 2  # BatchNorm in training needs two values per channel; batch mixup pairs samples


def report_skipped(names: list[str], strict: bool, ctx: DistContext) -> None:
    if not names:
        return
    if strict:
        raise ValueError(f"cannot decode image {names[0]}; fix or remove the file, or drop --strict "
                         "(data.strict=false) to skip unreadable images and count them")
    rank = f"[rank {ctx.rank}] " if ctx.distributed else ""
    for n in names:
        tqdm.write(f"{rank}warning: skipped unreadable image {n}")


def build_optimizer(model: nn.Module, cfg: Config, global_batch: int):
    """AdamW (or any timm optimizer) at lr = base_lr * global_batch / lr_base_size unless optim.lr is
    set; no weight decay on 1-D parameters and on ``model.no_weight_decay()`` (the bias tables)."""
    o = cfg.optim
    lr = o.lr if o.lr is not None else o.base_lr * global_batch / o.lr_base_size
    kwargs: dict[str, Any] = {"eps": o.eps, "betas": tuple(o.betas)} if "adam" in o.opt.lower() else {}
    return create_optimizer_v2(model, opt=o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                               **kwargs)


def build_scheduler(optimizer, cfg: Config, updates_per_epoch: int):
    s = cfg.sched
    return create_scheduler_v2(optimizer, sched=s.sched, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                               warmup_lr=s.warmup_lr, min_lr=s.min_lr, cooldown_epochs=s.cooldown_epochs,
                               step_on_epochs=s.step_on_epochs, updates_per_epoch=updates_per_epoch)


# -- one optimisation step -------------------------------------------------------------------------
def train_step(model: nn.Module, task: Task, inputs: torch.Tensor, targets: Any, optimizer, *,
               device: torch.device, amp: str = "none", scaler=None, clip_grad: float | None = None,
               clip_mode: str = "agc", clip_params=None, check_finite: bool = True) -> torch.Tensor:
    """Forward (task.train_batch, model, task.loss), backward, clip, step. Returns the loss (detached).

    ``check_finite``: raise NonFiniteLossError before the update when the loss is NaN or inf on any rank
    (all ranks stop at the same step). It costs a host-device sync per step; the engine passes False and
    checks the returned losses every few steps with ``LossWatch`` instead."""
    with autocast(device, amp):
        inputs, targets = task.train_batch(inputs, targets)
        outputs = model(inputs)
        loss = task.loss(outputs, targets)
    if check_finite and du.any_rank(not bool(torch.isfinite(loss.detach()).all()), device):
        raise NonFiniteLossError(f"the loss is {loss.item()} on this rank" if not torch.isfinite(loss).all()
                                 else "the loss is not finite on another rank")
    optimizer.zero_grad(set_to_none=True)
    params = clip_params if clip_params is not None else [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            clip_gradients_(params, clip_grad, clip_mode)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad:
            clip_gradients_(params, clip_grad, clip_mode)
        optimizer.step()
    return loss.detach()


def clip_gradients_(params: list[torch.Tensor], value: float, mode: str) -> None:
    """Clip the gradients of ``params`` in place as timm's ``dispatch_clip_grad(params, value, mode)`` does;
    ``agc`` runs effvit's batched AGC, equal to timm's bit for bit with a fraction of its kernel launches."""
    if mode == "agc":
        adaptive_clip_grad_(params, clip_factor=value)
    elif mode in ("norm", "value"):
        dispatch_clip_grad(params, value=value, mode=mode)
    else:
        raise ValueError(f"optim.clip_mode must be agc, norm or value, got {mode!r}")


class LossWatch:
    """The losses since the last check, kept on the device: ``check`` (every log interval and at the end of
    the epoch, where the loss is read for the progress bar anyway) finds the first non-finite one, on
    every rank at the same step, without a host-device sync per step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []

    def record(self, step: int, loss: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def check(self) -> tuple[int, float | None] | None:
        """(step, the loss there or None if it was on another rank) of the first non-finite loss on any rank
        since the last check; None when all were finite."""
        none = torch.iinfo(torch.int64).max
        mine = none
        if self.losses:
            finite = torch.isfinite(torch.stack(self.losses)).cpu()
            if not finite.all():
                mine = self.steps[int((~finite).nonzero()[0])]
        first = du.min_over_ranks(mine)
        value = float(self.losses[self.steps.index(first)]) if first == mine != none else None
        self.steps, self.losses = [], []
        return None if first == none else (first, value)


def train_one_epoch(model: nn.Module, task: Task, loader, optimizer, *, epoch: int, cfg: Config,
                    ctx: DistContext, scheduler=None, scaler=None, ema=None,
                    raw_model: nn.Module | None = None, logger: RunLogger | None = None) -> dict[str, float]:
    raw_model = raw_model or model
    model.train()
    if task.freeze_bn:
        freeze_bn_stats(model)
    clip_params = [p for p in raw_model.parameters() if p.requires_grad]
    steps = len(loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    seen = torch.zeros((), dtype=torch.float64, device=ctx.device)
    skipped = 0
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.sched.epochs}", leave=False,
               dynamic_ncols=True, disable=not (ctx.is_main and cfg.run.progress), unit="batch")
    watch = LossWatch()
    loss = None
    t0 = time.perf_counter()
    for i, batch in enumerate(bar):
        inputs, targets, bad = unpack_batch(batch)
        report_skipped(bad, task.strict, ctx)
        skipped += len(bad)
        n = batch_size_of(targets)
        # a step holds collectives (DDP's gradient all-reduce): every rank steps, or none does
        fewest = du.min_over_ranks(n)
        if fewest < MIN_TRAIN_BATCH:
            unreadable = du.min_over_ranks(-len(bad)) < 0  # on any rank: every rank takes this branch
            if ctx.is_main:
                why = (f"{fewest} readable image(s) left in a batch after skipping unreadable ones" if unreadable
                       else f"{fewest} image(s) in the batch")
                (logger.info if logger else tqdm.write)(
                    f"warning: step {i + 1}/{steps} dropped{' on every process' * ctx.distributed}: {why} (a "
                    f"training step needs at least {MIN_TRAIN_BATCH})")
        else:
            inputs, targets = to_device(inputs, ctx.device), to_device(targets, ctx.device)
            if task.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            num_updates = epoch * steps + i
            loss = train_step(model, task, inputs, targets, optimizer, device=ctx.device, amp=cfg.run.amp,
                              scaler=scaler, clip_grad=cfg.optim.clip_grad, clip_mode=cfg.optim.clip_mode,
                              clip_params=clip_params, check_finite=False)
            watch.record(i, loss)
            loss_sum += loss.double() * n
            seen += n
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates + 1)
            if ema is not None:
                ema.update(raw_model, step=num_updates + 1)
        if (i + 1) % cfg.run.log_interval == 0 or i + 1 == steps:
            if (bad_step := watch.check()) is not None:
                at, value = bad_step
                where = "on another rank" if value is None else f"{value} on this rank"
                raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {at + 1}/{steps}: the loss "
                                         f"is {where}")
            if loss is not None:
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}")
                if logger is not None:
                    logger.scalars({"loss": float(loss), "lr": lr}, epoch * steps + i + 1, prefix="train/")
    elapsed = time.perf_counter() - t0
    counts = du.all_reduce_sum(torch.stack([loss_sum, seen, torch.tensor(float(skipped), dtype=torch.float64,
                                                                        device=ctx.device)]))
    if counts[1] == 0:
        raise ValueError(f"epoch {epoch + 1} took no training step: every batch was dropped (too few readable "
                         "images per batch); nothing was learned, so the run stops")
    return {"train_loss": float(counts[0] / counts[1].clamp(min=1)),
            "lr": optimizer.param_groups[0]["lr"],
            "train_img_s": float(counts[1]) / elapsed,
            "train_time_s": elapsed,
            "skipped": int(counts[2])}


# -- evaluation ------------------------------------------------------------------------------------
def _reduce_stats(totals: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Sum each statistic over ranks; a rank that saw no batch contributes zeros of the right shape."""
    mine = {k: (tuple(v.shape), str(v.dtype).split(".")[-1]) for k, v in totals.items()}
    specs = du.all_gather_object(mine)
    spec = next((s for s in specs if s), {})
    out = {}
    for k in sorted(spec):
        shape, dtype = spec[k]
        t = totals[k] if k in totals else torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
        out[k] = du.all_reduce_sum(t.to(device)).cpu()
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: Task, *, ctx: DistContext | None = None, amp: str = "none",
             strict: bool = False, channels_last: bool = False, progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Metrics of ``model`` over ``loader`` (summed over batches and ranks, then ``task.summarize``)."""
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, unit="batch",
                      disable=not (ctx.is_main and progress)):
        inputs, targets, bad = unpack_batch(batch)
        report_skipped(bad, strict, ctx)
        skipped += bad
        if batch_size_of(targets) == 0:
            continue
        inputs, targets = to_device(inputs, ctx.device), to_device(targets, ctx.device)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(ctx.device, amp):
            outputs = model(inputs)
        for k, v in task.eval_stats(outputs, targets).items():
            v = v.detach().to(ctx.device)
            totals[k] = totals[k] + v if k in totals else v.clone()
    stats = _reduce_stats(totals, ctx.device)
    model.train(was_training)
    if not stats:
        raise ValueError("the evaluation data yielded no readable sample")
    return EvalResult(task.summarize(stats), stats, skipped)


# -- the run ---------------------------------------------------------------------------------------
def default_run_name(task: Task) -> str:
    """The start time and the task's name, one folder level (a '/' in the name would nest folders)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{task.name.replace('/', '-')}"


def _better(value: float, best: float | None, mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def train(task: Task, cfg: Config, *, output_dir: str | Path | None = None, resume: str | Path | None = None,
          ctx: DistContext | None = None) -> TrainResult:
    """Train ``task.model`` on ``task.train_dataset`` as ``cfg`` says; see the module docstring.

    ``output_dir``: where logs and checkpoints go (default ``cfg.run.output / cfg.run.name``, or the
    folder of ``resume``); a folder that already holds files is refused unless resuming or
    ``cfg.run.overwrite``, and it is locked while the run writes. ``resume``: a ``last.pth`` to continue
    from (model, EMA, optimizer, schedule, scaler, RNG states, history). ``ctx``: the process group
    (default: from torchrun's environment).
    """
    cfg.check()  # before the run folder exists: a refused setting leaves nothing behind
    ctx = ctx or du.init_distributed(cfg.run.device)
    r = cfg.run
    configure_threads(r.threads, ctx)
    configure_determinism(r.deterministic)
    if output_dir is None:
        output_dir = Path(resume).parent if resume else Path(r.output) / (r.name or default_run_name(task))
    out = Path(du.broadcast_object(str(output_dir)))
    folder = RunFolder(out)
    notes = claim_run_folder(folder, ctx, resume=bool(resume), overwrite=r.overwrite)
    try:
        return _train(task, cfg, out, resume, ctx, notes)
    finally:
        folder.release()


def claim_run_folder(folder: RunFolder, ctx: DistContext, *, resume: bool, overwrite: bool) -> list[str]:
    """Rank 0 claims the run folder (``RunFolder.claim``); if it cannot, every rank raises (none is left
    waiting for the others)."""
    notes: list[str] = []
    error: OSError | None = None
    if ctx.is_main:
        try:
            notes = folder.claim(resume=resume, overwrite=overwrite)
        except OSError as e:
            error = e
    failed = du.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if failed:
        raise FileExistsError(failed)
    return notes


def _train(task: Task, cfg: Config, out: Path, resume: str | Path | None, ctx: DistContext,
           notes: list[str]) -> TrainResult:
    r = cfg.run
    logger = RunLogger(out, enabled=ctx.is_main, tensorboard=r.tensorboard)
    for note in notes:
        logger.info(f"note: {note}")
    seed_everything(r.seed + ctx.rank)  # ranks augment differently; DDP syncs the initial weights

    model = task.model.to(ctx.device)
    if task.channels_last:
        model = model.to(memory_format=torch.channels_last)
    task.prepare(ctx.device)
    d = cfg.data
    sampler = build_train_sampler(task.train_dataset, ctx, r.seed, d.repeated_aug, d.train_fraction)
    loader_kw = dict(rank=ctx.rank, world_size=ctx.world_size, num_workers=d.num_workers,
                     pin_memory=d.pin_memory and ctx.device.type == "cuda", collate_fn=task.collate_fn)
    train_loader = build_loader(task.train_dataset, d.batch_size, sampler=sampler, train=True, **loader_kw)
    val_loader = None
    if task.val_dataset is not None and r.eval_every > 0:
        val_loader = build_loader(task.val_dataset, d.val_batch_size or 2 * d.batch_size, **loader_kw)
    if len(train_loader) == 0 or len(sampler) < MIN_TRAIN_BATCH:
        raise ValueError(f"the training data gives {len(sampler)} sample(s) per process and epoch "
                         f"({len(task.train_dataset)} images, data.train_fraction={d.train_fraction}, "
                         f"{ctx.world_size} process(es)); a training step needs at least {MIN_TRAIN_BATCH}: "
                         "raise data.train_fraction or add images")
    global_batch = d.batch_size * ctx.world_size
    optimizer = build_optimizer(model, cfg, global_batch)
    scheduler, num_epochs = build_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler(ctx.device.type) if r.amp == "fp16" else None
    ema = None
    if cfg.ema.enabled:
        ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)

    last_path, best_path = out / "last.pth", out / "best.pth"
    start_epoch, history, best = 0, [], None
    if resume:
        state = load_training_state(resume)
        check_same_arch(state.get("meta", {}), model, str(resume))
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as e:
            raise ValueError(f"{resume} does not fit the model built from the config: {e}") from e
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.module.load_state_dict(state["ema"])
        start_epoch, history, best = int(state["epoch"]), list(state.get("history") or []), state.get("best")
        rng = state.get("rng") or []
        if len(rng) == ctx.world_size:
            restore_rng(rng[ctx.rank])
        else:
            logger.info(f"note: {resume} was written by {len(rng)} processes, this run has {ctx.world_size}: "
                        "the random streams restart (results will differ from an uninterrupted run)")
        logger.info(f"resumed from {resume} after epoch {start_epoch}/{num_epochs}")
        if ctx.is_main and best and not best_path.exists():
            if best.get("epoch") == start_epoch:
                copy_atomic(resume, best_path)
                logger.info(f"note: re-created {best_path} from {resume} (epoch {start_epoch} is the best)")
            else:
                logger.info(f"warning: {best_path} (epoch {best.get('epoch')}, the best so far) is missing and "
                            "cannot be re-created; the next epoch that improves on it writes a new one")

    train_model: nn.Module = model
    if ctx.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)

    if ctx.is_main:
        (out / "config.yaml").write_text(cfg.to_yaml())
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{type(model).__name__} {getattr(model, 'variant', '')} ({n_params / 1e6:.3f}M params) on "
                f"{ctx.world_size} x {ctx.device.type}"
                f"{f' ({torch.get_num_threads()} threads)' if ctx.device.type == 'cpu' else ''}; "
                f"{len(task.train_dataset)} training samples, "
                f"{len(task.val_dataset) if task.val_dataset is not None else 0} validation; batch "
                f"{d.batch_size} x {ctx.world_size}, lr {optimizer.param_groups[0]['lr']:.3g} -> schedule "
                f"{cfg.sched.sched}, {num_epochs} epochs, amp {r.amp}; output {out}")

    key = f"val_{task.best_metric}"
    stop_at = num_epochs if r.stop_after is None else min(num_epochs, start_epoch + r.stop_after)
    epochs_bar = tqdm(range(start_epoch, stop_at), desc="training", dynamic_ncols=True, unit="epoch",
                      disable=not (ctx.is_main and r.progress), initial=start_epoch, total=num_epochs)
    for epoch in epochs_bar:
        sampler.set_epoch(epoch)
        task.start_epoch(epoch)
        try:
            row = train_one_epoch(train_model, task, train_loader, optimizer, epoch=epoch, cfg=cfg, ctx=ctx,
                                  scheduler=scheduler, scaler=scaler, ema=ema, raw_model=model, logger=logger)
        except NonFiniteLossError as e:
            done = history[-1]["epoch"] if history else start_epoch
            good = (f"the last good checkpoint is {last_path} (epoch {done})" if last_path.exists()
                    else "no checkpoint was written yet")
            msg = (f"{e}. Training stopped; {good}. Lower the learning rate (optim.lr / optim.base_lr), keep "
                   "gradient clipping on (optim.clip_grad), or use run.amp=bf16 instead of fp16")
            logger.info(f"error: {msg}")
            raise NonFiniteLossError(msg) from None
        task.end_epoch(epoch)
        if scheduler is not None:
            scheduler.step(epoch + 1)
        if ctx.distributed:  # BN running statistics are per rank: average them (weights already agree)
            distribute_bn(model, ctx.world_size, reduce=True)
            if ema is not None:
                distribute_bn(ema.module, ctx.world_size, reduce=True)
        row = {"epoch": epoch + 1, **row}
        last_epoch = epoch + 1 == num_epochs
        if val_loader is not None and ((epoch + 1) % r.eval_every == 0 or last_epoch or epoch + 1 == stop_at):
            res = evaluate(model, val_loader, task, ctx=ctx, amp=r.amp, strict=task.strict,
                           channels_last=task.channels_last, progress=r.progress, desc="eval")
            row.update({f"val_{k}": v for k, v in res.metrics.items()})
            if ema is not None and cfg.ema.evaluate:
                res = evaluate(ema.module, val_loader, task, ctx=ctx, amp=r.amp, strict=task.strict,
                               channels_last=task.channels_last, progress=r.progress, desc="eval ema")
                row.update({f"ema_{k}": v for k, v in res.metrics.items()})
        history.append(row)
        is_best = val_loader is None or _better(row.get(key), best["value"] if best else None, task.best_mode)
        if is_best:
            best = {"epoch": epoch + 1, "metric": key, "value": row.get(key)}
        logger.epoch(history)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "lr")
        logger.info(f"epoch {epoch + 1}/{num_epochs}: {shown}")
        epochs_bar.set_postfix({key: f"{row[key]:.4g}"} if key in row else {})
        rng = du.all_gather_object(capture_rng())
        if ctx.is_main:
            state = training_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                   ema=ema, epoch=epoch + 1, rng=rng, config=cfg.to_dict(), meta=task.meta,
                                   history=history, best=best)
            save_epoch(state, last_path, best_path if is_best else None)
        du.barrier()
    epochs_bar.close()
    if ctx.is_main and history:
        plot_curves(history, out / "curves.png", metric=task.best_metric)
        if best and best.get("value") is not None:
            saved = ", ".join(str(p) for p in (last_path, best_path) if p.exists())
            logger.info(f"best {best['metric']} {best['value']:.4g} at epoch {best['epoch']}; checkpoints {saved}")
    logger.close()
    return TrainResult(out, history, best, last_path, best_path)


def launch(build_task: Callable[..., Task], cfg: Config, *, resume: str | Path | None = None,
           on_done: Callable[[TrainResult, Task], Any] | None = None) -> TrainResult | None:
    """What a training command runs, alone or under torchrun: join the process group, build the task
    (``build_task(cfg, log=...)``, the same initial weights on every rank), train, then call
    ``on_done(result, task)`` on rank 0. Returns the result on rank 0, None on the other ranks."""
    ctx = du.init_distributed(cfg.run.device)
    try:
        seed_everything(cfg.run.seed)  # before building: identical initial weights on every rank
        task = build_task(cfg, log=print if ctx.is_main else (lambda *_: None))
        result = train(task, cfg, resume=resume, ctx=ctx)
        if ctx.is_main and on_done is not None:
            on_done(result, task)
    finally:
        du.cleanup()
    return result if ctx.is_main else None
