"""Training configuration: typed sections, read from YAML recipes, overridden from the command line.

The engine reads five sections, whose defaults are neutral (no recipe hides in them): ``data`` for the
loader (``LoaderConfig``: batch size, workers, repeated augmentation...), ``optim``, ``sched``, ``ema`` and
``run``. A task's config is a dataclass deriving from ``Config`` that declares these and its own sections,
in the order they print: ``ClassificationConfig`` (effvit.train.classification) adds ``model``, the data
source fields of ``data``, ``aug`` and ``distill``; ``RotationConfig`` (effvit.train.rotation) ``model`` and
``task``. ``EngineConfig`` holds the engine's sections alone (a custom ``Task`` with no settings of its own).

Recipes are data (effvit/configs/*.yaml). A recipe may start from another with ``base: NAME`` (a shipped
recipe or a path relative to the file) and state only what differs: ``efficientvit_m4`` is ``imagenet``
with ``model.name: efficientvit_m4``.

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
from typing import Any, TypeVar

import yaml

AMP_MODES = ("none", "bf16", "fp16")
CLIP_MODES = ("agc", "norm", "value")


def require(ok: bool, key: str, value: Any, want: str) -> None:
    """A ValueError naming the setting ``key`` and what it must be, unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed: it must be {want}")


def check_range(key: str, pair: Any, low: float, high: float | None = None) -> None:
    """``pair`` a (min, max) with low < min <= max (<= high): scales, ratios, angle windows."""
    ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)
    ok = ok and low < pair[0] <= pair[1] and (high is None or pair[1] <= high)
    span = f"({low}, {high}]" if high is not None else f"above {low}"
    require(ok, key, pair, f"[min, max] with min <= max, both {span}")


def is_whole(v: Any, least: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def is_fraction(v: Any, open_low: bool = False) -> bool:
    """A number in [0, 1] ((0, 1] with ``open_low``)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (0 < v if open_low else 0 <= v) and v <= 1


@dataclass
class LoaderConfig:
    """The loader settings of the ``data`` section (a task's data section adds where the data is)."""

    batch_size: int = 64  # per process
    val_batch_size: int | None = None  # None: 2x batch_size
    num_workers: int = 2
    pin_memory: bool = True
    repeated_aug: int = 1  # repeated augmentation: each sample this many times per epoch (1 = off)
    train_fraction: float = 1.0  # use a random subset of the training set each epoch (quick runs)

    def check(self) -> None:
        require(is_whole(self.batch_size), "data.batch_size", self.batch_size, "a whole number >= 1")
        require(self.val_batch_size is None or is_whole(self.val_batch_size), "data.val_batch_size",
                self.val_batch_size, "a whole number >= 1, or null (twice data.batch_size)")
        require(is_whole(self.num_workers, 0), "data.num_workers", self.num_workers, "a whole number >= 0")
        require(is_whole(self.repeated_aug), "data.repeated_aug", self.repeated_aug, "a whole number >= 1 (1: off)")
        require(is_fraction(self.train_fraction, open_low=True), "data.train_fraction", self.train_fraction,
                "a fraction in (0, 1] of the training set")


@dataclass
class OptimConfig:
    opt: str = "adamw"
    lr: float | None = None  # None: base_lr * global batch / lr_base_size (the linear scaling rule)
    base_lr: float = 1e-3
    lr_base_size: int = 512
    weight_decay: float = 0.05  # never on 1-D params nor on model.no_weight_decay() (bias tables)
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    clip_grad: float | None = None
    clip_mode: str = "norm"  # agc | norm | value

    def check(self) -> None:
        positive = "a number above 0"
        require(self.lr is None or self.lr > 0, "optim.lr", self.lr, positive + ", or null (scaled from base_lr)")
        require(self.base_lr > 0, "optim.base_lr", self.base_lr, positive)
        require(is_whole(self.lr_base_size), "optim.lr_base_size", self.lr_base_size, "a whole number >= 1")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "0 or more")
        require(self.eps > 0, "optim.eps", self.eps, positive)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
                "two numbers in [0, 1)")
        require(0 <= self.momentum <= 1, "optim.momentum", self.momentum, "in [0, 1]")
        require(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", self.clip_grad,
                positive + ", or null (no clipping)")
        require(self.clip_mode in CLIP_MODES, "optim.clip_mode", self.clip_mode, "one of " + ", ".join(CLIP_MODES))


@dataclass
class SchedConfig:
    sched: str = "cosine"
    epochs: int = 100
    warmup_epochs: float = 0  # fractions allowed (per-step schedule)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    step_on_epochs: bool = False  # False: the lr changes every step, so short warm-ups are smooth

    def check(self) -> None:
        require(is_whole(self.epochs), "sched.epochs", self.epochs, "a whole number >= 1")
        require(self.warmup_epochs >= 0, "sched.warmup_epochs", self.warmup_epochs, "0 or more")
        require(self.warmup_lr >= 0, "sched.warmup_lr", self.warmup_lr, "0 or more")
        require(self.min_lr >= 0, "sched.min_lr", self.min_lr, "0 or more")
        require(is_whole(self.cooldown_epochs, 0), "sched.cooldown_epochs", self.cooldown_epochs, "a whole number >= 0")


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9998
    warmup: bool = False  # timm's decay warm-up (helps short runs)
    evaluate: bool = True  # also evaluate the EMA weights each epoch

    def check(self) -> None:
        require(0 < self.decay < 1, "ema.decay", self.decay, "in (0, 1), e.g. 0.9998")


@dataclass
class RunConfig:
    output: str = "runs"
    name: str | None = None  # the run folder under output (None: the time and the task's name)
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
    overwrite: bool = False  # a new run may replace the files of an earlier run in its folder

    def check(self) -> None:
        require(self.amp in AMP_MODES, "run.amp", self.amp, "one of " + ", ".join(AMP_MODES))
        require(self.threads in (None, "idle") or is_whole(self.threads), "run.threads", self.threads,
                "a whole number >= 1, null (torch's default) or 'idle'")
        require(is_whole(self.eval_every, 0), "run.eval_every", self.eval_every, "a whole number >= 0 (0: never)")
        require(is_whole(self.log_interval), "run.log_interval", self.log_interval, "a whole number >= 1")
        require(self.stop_after is None or is_whole(self.stop_after), "run.stop_after", self.stop_after,
                "a whole number >= 1, or null")


class Config:
    """What the engine reads; a task's config derives from it as a dataclass declaring every section
    (these five and its own) in the order they print."""

    data: LoaderConfig
    optim: OptimConfig
    sched: SchedConfig
    ema: EmaConfig
    run: RunConfig

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def check(self) -> None:
        """Refuse values no run can use (a ValueError naming the key), before anything is written."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass
class EngineConfig(Config):
    """The engine's sections alone."""

    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: RunConfig = field(default_factory=RunConfig)


C = TypeVar("C", bound=Config)


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


def sections_of(kind: type[Config]) -> dict[str, type]:
    """{section name: its dataclass} of the config class ``kind``, in order."""
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind)}


def config_from_dict(kind: type[C], d: dict | None, base: C | None = None) -> C:
    """A ``kind`` config with the values of ``d`` (nested sections) applied over ``base`` (or the defaults)."""
    cfg = copy.deepcopy(base) if base is not None else kind()
    sections = list(sections_of(kind))
    for name, values in (d or {}).items():
        if name not in sections:
            close = difflib.get_close_matches(str(name), sections, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; sections: {', '.join(sections)}"
            raise ValueError(f"unknown config section {name!r} for {kind.__name__}{hint}")
        set_section(getattr(cfg, name), values or {}, name)
    return cfg


def declared_only(kind: type[Config], d: dict) -> dict:
    """The settings of ``d`` that ``kind`` declares. A saved run's config may hold settings that ``kind``
    does not have (``run.debug_ranks``; ``aug`` and ``distill`` in a rotation run): they are dropped."""
    out: dict = {}
    for name, section in sections_of(kind).items():
        if isinstance(d.get(name), dict):
            keys = typing.get_type_hints(section)
            out[name] = {k: v for k, v in d[name].items() if k in keys}
    return out


def _declared_type(kind: type[Config], section: str, key: str) -> Any:
    """The type hint of ``section.key`` (None for an unknown section or key)."""
    sections = sections_of(kind)
    if section not in sections:
        return None
    return typing.get_type_hints(sections[section]).get(key)


def _is_text(hint: Any) -> bool:
    return hint is str or set(typing.get_args(hint)) == {str, type(None)}


def parse_override(text: str, kind: type[Config]) -> dict:
    """'optim.lr=1e-3' -> {'optim': {'lr': 0.001}}: the value as text for a string setting, else YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. optim.lr=1e-3 or sched.epochs=10)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"override key {key!r} must be section.key (e.g. sched.epochs); "
                         f"sections: {', '.join(sections_of(kind))}")
    hint = _declared_type(kind, parts[0], parts[-1]) if len(parts) == 2 else None
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
    """Names of the recipes shipped with effvit (effvit/configs/*.yaml)."""
    files = resources.files("effvit.configs").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


def resolve_config_path(spec: str | Path, relative_to: Path | None = None) -> Path:
    """A YAML path (also relative to ``relative_to``), or the name of a shipped recipe ('efficientvit_m0')."""
    p = Path(spec)
    for candidate in (p, relative_to / p if relative_to is not None else None):
        if candidate is not None and candidate.is_file():
            return candidate
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if name in packaged_configs():
        return Path(str(resources.files("effvit.configs") / f"{name}.yaml"))
    raise FileNotFoundError(f"config {spec} not found: give a YAML file or one of the shipped configs "
                            f"({', '.join(packaged_configs())})")


def read_recipe(spec: str | Path, relative_to: Path | None = None, seen: tuple[Path, ...] = ()) -> dict:
    """The nested settings of a recipe file, its ``base:`` recipe (if any) applied first."""
    p = resolve_config_path(spec, relative_to)
    if p.resolve() in seen:
        raise ValueError(f"{p}: 'base:' loops back to a recipe that is already being read")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{p} must hold a mapping of sections (model:, data:, ...), not {type(d).__name__}")
    base = d.pop("base", None)
    if base is None:
        return d
    if not isinstance(base, str):
        raise ValueError(f"{p}: 'base:' must name one recipe, got {base!r}")
    return _merge(read_recipe(base, p.parent, (*seen, p.resolve())), d)


def load_config(kind: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                *, base: C | dict | None = None, values: dict | None = None) -> C:
    """A ``kind`` config: its defaults <- ``base`` (a config, or a run's saved one as a dict) <- the recipe
    at ``path`` <- ``values`` (nested, typed: command-line flags) <- ``overrides`` ('section.key=value')."""
    d = read_recipe(path) if path is not None else {}
    d = _merge(d, values or {})
    for o in overrides:
        d = _merge(d, parse_override(o, kind))
    start = config_from_dict(kind, declared_only(kind, base)) if isinstance(base, dict) else base
    cfg = config_from_dict(kind, d, start)
    cfg.check()
    return cfg
