"""Training configuration: typed sections, read from YAML, overridden from the command line.

The defaults are the official EfficientViT-M ImageNet recipe (paper section 5.1 and its released code),
so a config file only has to say what differs. Sections ``run``, ``optim``, ``sched``, ``ema`` and the
loader fields of ``data`` are read by the task-agnostic engine; ``model``, the source fields of
``data``, ``aug`` and ``distill`` by the classification task; ``task`` is free-form for other tasks.

Overrides are ``section.key=value`` strings, parsed by the key's declared type: text for a string
(``run.name=007`` is '007', ``data.root=data/good #2`` keeps its '#'; ``null`` for an optional one), YAML for
the rest (``[0.5, 1.0]``, ``null``, ``true``), then checked, so a typo fails with the list of valid keys.
Command-line flags are applied as the typed values argparse gave them (``values`` of ``load_config``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    name: str = "efficientvit_m0"
    num_classes: int | None = None  # None: the number of class folders in the training data
    img_size: int = 224
    in_chans: int = 3
    pretrained: str | None = None  # weights to start from, same classes and size (any layout)
    finetune: str | None = None  # weights to fine-tune: head re-created, bias tables resized
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (small data sets)
    channels_last: bool = False
    ltm: float | tuple[float, ...] | None = None  # token merging: keep ratio per block (one or each)
    ltm_mode: str = "learned"  # learned | pool (fixed area-pool merge, the baseline)


@dataclass
class DataConfig:
    dataset: str = "folder"  # folder (ImageNet layout: root/train/<class>/*.jpg) | fashion_mnist
    root: str | None = None  # folder: the data root; fashion_mnist: the IDX files (None: Debian path)
    train_split: str = "train"
    val_split: str = "val"
    strict: bool = False  # stop at the first image that cannot be decoded instead of skipping it
    # read by the engine
    batch_size: int = 256  # per process
    val_batch_size: int | None = None  # None: 2x batch_size
    num_workers: int = 8
    pin_memory: bool = True
    repeated_aug: int = 3  # repeated augmentation: each image this many times per epoch (1 = off)
    train_fraction: float = 1.0  # use a random subset of the training set each epoch (quick runs)


@dataclass
class AugConfig:
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4  # timm ignores it while auto_augment is set
    interpolation: str = "bicubic"
    re_prob: float = 0.25  # random erasing
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    crop_pct: float = 0.875  # eval: resize img_size / crop_pct, centre crop img_size (256 -> 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclass
class OptimConfig:
    opt: str = "adamw"
    lr: float | None = None  # None: base_lr * global batch / lr_base_size (the linear scaling rule)
    base_lr: float = 1e-3
    lr_base_size: int = 512
    weight_decay: float = 0.025  # never on 1-D params nor bias tables (model.no_weight_decay())
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    clip_grad: float | None = 0.02
    clip_mode: str = "agc"  # agc | norm | value


@dataclass
class SchedConfig:
    sched: str = "cosine"
    epochs: int = 300
    warmup_epochs: float = 5  # fractions allowed (per-step schedule)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    step_on_epochs: bool = False  # False: the lr changes every step, so short warm-ups are smooth


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.99996
    warmup: bool = False  # timm's decay warm-up (helps short runs)
    evaluate: bool = True  # also evaluate the EMA weights each epoch


@dataclass
class DistillConfig:
    teacher: str | None = None  # an effvit name (efficientvit_m5) or a timm one (regnety_160)
    teacher_checkpoint: str | None = None
    teacher_img_size: int | None = None  # None: the student's
    type: str = "hard"  # none | soft | hard (DeiT)
    alpha: float = 0.5
    tau: float = 1.0


@dataclass
class RunConfig:
    output: str = "runs"
    name: str | None = None  # the run folder under output (None: derived from model and data)
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower; exact resume tests)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16
    # torch CPU threads per process: None = torch's default (one per physical core, or OMP_NUM_THREADS); N;
    # 'idle' = the cores idle at start by the load average (opt-in: speed and results then vary with the load)
    threads: int | str | None = None
    eval_every: int = 1  # evaluate every N epochs and after the last; 0: never during training
    log_interval: int = 50
    tensorboard: bool = False
    progress: bool = True
    stop_after: int | None = None  # stop after this many epochs of this invocation (resume later)
    debug_ranks: bool = False  # each rank writes the sample indices it drew and its final weights (tests)
    overwrite: bool = False  # a new run may replace the files of an earlier run in its folder


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: dict = field(default_factory=dict)  # free-form settings of other tasks

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so the dict is plain YAML and loads with weights_only=True."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against (and converted to) the type ``hint``; ValueError naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: cannot be null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(_coerce(v, item, where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if hint is Any or origin is dict or hint is dict:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def set_section(section: Any, values: dict, prefix: str) -> None:
    """Apply ``values`` to the dataclass ``section``, each checked against its type hint; a ValueError names
    the setting ``prefix.key`` (and the closest valid key when one is misspelt)."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix}: expected a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean {prefix}.{close[0]}?)" if close else f"; valid keys: {', '.join(hints)}"
            raise ValueError(f"unknown setting {prefix}.{key}{hint}")
        setattr(section, key, _coerce(value, hints[key], f"{prefix}.{key}"))


def config_from_dict(d: dict | None, base: Config | None = None) -> Config:
    """A Config with the values of ``d`` (nested sections) applied over ``base`` (or the defaults)."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    sections = [f.name for f in dataclasses.fields(Config)]
    for name, values in (d or {}).items():
        if name not in sections:
            close = difflib.get_close_matches(str(name), sections, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; sections: {', '.join(sections)}"
            raise ValueError(f"unknown config section {name!r}{hint}")
        if name == "task":
            cfg.task.update(values or {})
        else:
            set_section(getattr(cfg, name), values or {}, name)
    return cfg


def _declared_type(section: str, key: str) -> Any:
    """The type hint of ``section.key`` (None for the free-form task section or an unknown key)."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    if section not in fields or section == "task":
        return None
    return typing.get_type_hints(type(getattr(Config(), section))).get(key)


def _is_text(hint: Any) -> bool:
    return hint is str or set(typing.get_args(hint)) == {str, type(None)}


def parse_override(text: str) -> dict:
    """'optim.lr=1e-3' -> {'optim': {'lr': 0.001}}: the value as text for a string setting, else YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. optim.lr=1e-3 or sched.epochs=10)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"override key {key!r} must be section.key (e.g. sched.epochs); "
                         f"sections: {', '.join(f.name for f in dataclasses.fields(Config))}")
    hint = _declared_type(parts[0], parts[-1]) if len(parts) == 2 else None
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if _is_text(hint) and not quoted:
        value = None if raw.strip() in ("", "null", "~") and hint is not str else raw
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {text!r}: the value is not valid YAML ({e})") from e
    out: dict = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def flag_values(args: Any, keys: dict[str, str]) -> dict:
    """Nested config values of the command-line flags that were given: {'data': {'root': 'x'}} from
    ``keys={'data': 'data.root'}``; the values keep the types argparse gave them (never parsed as YAML)."""
    out: dict = {}
    for attr, key in keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            section, name = key.split(".")
            out.setdefault(section, {})[name] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def packaged_configs() -> list[str]:
    """Names of the configs shipped with effvit (effvit/configs/*.yaml)."""
    files = resources.files("effvit.configs").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


def resolve_config_path(spec: str | Path) -> Path:
    """A YAML path, or the name of a shipped config ('efficientvit_m0', 'fashion_mnist_m0')."""
    p = Path(spec)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if name in packaged_configs():
        return Path(str(resources.files("effvit.configs") / f"{name}.yaml"))
    raise FileNotFoundError(f"config {spec} not found: give a YAML file or one of the shipped configs "
                            f"({', '.join(packaged_configs())})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Config | dict | None = None, values: dict | None = None) -> Config:
    """Defaults <- ``base`` <- the YAML file <- ``values`` (nested, typed: command-line flags) <-
    ``overrides`` ('section.key=value')."""
    d: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{p} must hold a mapping of sections (model:, data:, ...), "
                             f"not {type(d).__name__}")
    d = _merge(d, values or {})
    for o in overrides:
        d = _merge(d, parse_override(o))
    start = config_from_dict(base) if isinstance(base, dict) else base
    return config_from_dict(d, start)
