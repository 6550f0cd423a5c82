"""Reading, converting and writing EfficientViT-M weights.

Three layouts are read, detected from the keys: the official release (a dict with the state dict under
'model', keys like ``blocks2.3.mixer.m.attn.qkvs.0.c.weight``), timm's (``stages.1.blocks.0...``; our
modules use the same names) and effvit's own checkpoints (timm layout plus metadata). Everything is
loaded with ``weights_only=True`` or safetensors: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv
from torch import nn
from tqdm.auto import tqdm

from .attention import resize_bias_table
from .efficientvit import VARIANTS
from .fused import is_fused
from .token_merging import MERGE_MODES

FORMAT_TAG = "effvit-checkpoint-v1"


# -- reading ---------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_file(url: str, cache: Path) -> Path:
    """The cache entry of ``url``: a folder named by a hash of the whole URL (host, path and query: two
    URLs never share an entry), holding the file under its own name."""
    name = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    return cache / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _copy_response(url: str, dst: Path) -> tuple[int, int | None]:
    """(bytes written to ``dst``, the Content-Length announced or None)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dst, "wb") as f:
        if "html" in response.headers.get("Content-Type", ""):
            raise ValueError(f"{url} answered with an HTML page, not a checkpoint (an error or login page?): "
                             "check the URL")
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        got = 0
        with tqdm(total=expected, unit="B", unit_scale=True, desc=dst.name, disable=None) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return got, expected


def _fetch(url: str, dst: Path) -> None:
    """Download ``url`` to ``dst`` through a temporary file beside it, renamed only once the transfer is
    complete (its Content-Length) and not an HTML page: an interrupted transfer never reaches ``dst``."""
    tmp = dst.with_name(f".part{os.getpid()}-{dst.name}")  # same suffix: _read_file picks the format by it
    try:
        try:
            got, expected = _copy_response(url, tmp)
        except (OSError, http.client.HTTPException) as e:
            raise OSError(f"could not download {url}: {e}. Try again, or download it by hand and pass the "
                          "file path") from e
        if expected is not None and got != expected:
            raise OSError(f"the download of {url} stopped after {got} of {expected} bytes; nothing was "
                          "cached: try again")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _check_cached(path: Path, url: str, sha256: str | None) -> None:
    """ValueError (the file removed) unless ``path`` matches ``sha256`` and loads as a checkpoint."""
    if sha256 and (got := _sha256(path)) != sha256.lower():
        path.unlink()
        raise ValueError(f"SHA-256 mismatch for {url}: expected {sha256}, got {got}; the file was removed "
                         "from the cache. Check the URL and the hash")
    try:
        _read_file(path)
    except ValueError as e:
        path.unlink()
        raise ValueError(f"{url} did not give a loadable checkpoint, so it was not cached: {e}") from None


def download(url: str, sha256: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Fetch ``url`` into the torch hub cache (once), verifying its SHA-256 when one is given.

    The cache is keyed by the whole URL. Only a complete transfer (its Content-Length) that is not an HTML
    page, matches the hash and loads as a checkpoint is kept; a cached copy that fails those checks is
    removed and fetched again."""
    cache = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints" / "effvit"
    dst = _cache_file(url, cache)
    if dst.is_file():
        try:
            _check_cached(dst, url, sha256)
            return dst
        except ValueError:
            pass  # removed: fetch a fresh copy
    dst.parent.mkdir(parents=True, exist_ok=True)
    _fetch(url, dst)
    _check_cached(dst, url, sha256)
    return dst


def describe_load_error(path: Path, error: Exception, damaged: str = "fetch it again") -> ValueError:
    """What a file that ``torch.load(weights_only=True)`` refused actually is, as a ValueError (``damaged``:
    what to do about a truncated one). torch's advice to retry with weights_only=False (which runs
    arbitrary code) is never passed on."""
    msg = str(error)
    with open(path, "rb") as f:
        head = f.read(64)
    objects = re.findall(r"GLOBAL ([\w.]*\w)", msg) or re.findall(r"Unsupported globals?: ([\w.]*\w)", msg)
    never = ("effvit never unpickles arbitrary objects: save a plain state dict "
             "(torch.save(model.state_dict(), path)) or safetensors instead")
    if objects:
        return ValueError(f"{path} holds pickled Python objects ({', '.join(dict.fromkeys(objects))}); {never}")
    if head.startswith(b"\x80"):
        return ValueError(f"{path} is a Python pickle, not a plain PyTorch weights file; {never}")
    if head.startswith(b"PK\x03\x04"):
        return ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}); it may be "
                          f"truncated or corrupt: {damaged}")
    if head.lstrip()[:1] == b"<":
        return ValueError(f"{path} is an HTML or XML page, not a checkpoint: download the file itself")
    return ValueError(f"{path} is not a PyTorch checkpoint (it starts with {head[:8]!r}): it is corrupt or "
                      "another kind of file")


def _read_file(path: Path) -> Mapping:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint: give the .pth or .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                             "or corrupt: fetch it again") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise describe_load_error(path, e) from None


def _safetensors_meta(path: Path) -> dict:
    """The metadata ``save_checkpoint`` writes into a .safetensors header (JSON values)."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:  # a plain string (other writers, e.g. timm's "format": "pt")
            meta[k] = v
    return meta


def read_checkpoint(source: str | Path, sha256: str | None = None,
                    use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in timm layout, metadata) from a path or URL in any layout effvit reads or writes: the
    official release, timm's .pth/.safetensors, effvit checkpoints (.pth or .safetensors, with metadata)
    and training checkpoints (their EMA weights with ``use_ema``)."""
    source = str(source)
    is_url = re.match(r"^(https?|file)://", source) is not None
    path = download(source, sha256) if is_url else Path(source)
    if sha256 and not is_url and _sha256(path) != sha256.lower():
        raise ValueError(f"SHA-256 mismatch for {path}: expected {sha256}")
    obj = _read_file(path)
    meta: dict = _safetensors_meta(path) if path.suffix == ".safetensors" else {}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_TAG:
        meta = obj.get("meta", {})
        meta = dict(meta) if isinstance(meta, Mapping) else meta  # anything else is refused below
        if use_ema and not obj.get("ema"):
            raise ValueError(f"{source} has no EMA weights (trained with ema.enabled=false); drop --ema")
        obj = obj["ema"] if use_ema else obj["state_dict"]
    elif use_ema:
        raise ValueError(f"{source} is not a training checkpoint, so it has no EMA weights; drop --ema")
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model"):  # official: {'model': sd}; trainers: {'state_dict': sd}
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors (top-level keys: "
                         f"{list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__})")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    sd = official_to_timm(sd) if is_official_layout(sd) else sd
    check_meta(meta, sd, source)
    return sd, meta


# -- metadata --------------------------------------------------------------------------------------
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_meta(meta, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse metadata that would build a wrong model or fail later with a stray traceback: each known
    field's type and range, and the lengths against the weights (classes, class names, channels)."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"{source}: its metadata is a {type(meta).__name__}, not a mapping of fields: the file "
                         "was not written by effvit or is damaged")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"{source}: metadata field {field!r} is {meta[field]!r}; it should be {want}. Fix or "
                          "remove it: a .pth keeps its metadata under 'meta', a .safetensors file in its header")

    head = sd.get("head.linear.weight")
    stem = sd.get("patch_embed.conv1.conv.weight")
    if meta.get("arch") is not None and not isinstance(meta["arch"], str):
        raise bad("arch", "a model name such as 'efficientvit_m0'")
    if meta.get("num_classes") is not None:
        if not _is_count(meta["num_classes"]):
            raise bad("num_classes", "a positive whole number")
        if head is not None and head.shape[0] != meta["num_classes"]:
            raise bad("num_classes", f"{head.shape[0]}, the number of outputs of the weights' head")
    if meta.get("in_chans") is not None:
        if not _is_count(meta["in_chans"]):
            raise bad("in_chans", "a positive whole number (3 for RGB, 1 for grey)")
        if stem is not None and stem.shape[1] != meta["in_chans"]:
            raise bad("in_chans", f"{stem.shape[1]}, the input channels of the weights' first convolution")
    size = meta.get("img_size")
    if size is not None and not (_is_count(size) or (isinstance(size, (list, tuple)) and len(size) == 2
                                                     and all(_is_count(v) for v in size))):
        raise bad("img_size", "a size in pixels: one positive whole number or [height, width]")
    chans = meta.get("in_chans") or (stem.shape[1] if stem is not None else 3)
    for key in ("mean", "std"):
        v = meta.get(key)
        if v is None:
            continue
        if not (isinstance(v, (list, tuple)) and len(v) in {1, 3, chans} and all(_is_number(x) for x in v)):
            raise bad(key, f"a list of 1 or {chans} numbers, one per input channel")
        if key == "std" and any(x <= 0 for x in v):
            raise bad(key, "positive numbers (each channel is divided by its std)")
    if meta.get("interpolation") is not None and meta["interpolation"] not in INTERPOLATIONS:
        raise bad("interpolation", "one of " + ", ".join(INTERPOLATIONS))
    crop = meta.get("crop_pct")
    if crop is not None and not (_is_number(crop) and 0 < crop <= 1):
        raise bad("crop_pct", "a fraction in (0, 1], the share of the resized image kept by the centre crop")
    names = meta.get("class_names")
    if names is not None:
        classes = meta.get("num_classes") or (head.shape[0] if head is not None else None)
        if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
            raise bad("class_names", "a list of strings, one per class")
        if classes is not None and len(names) != classes:
            raise bad("class_names", f"a list of {classes} names, one per class ({len(names)} given)")
    ltm = meta.get("ltm")
    if ltm is not None:
        keeps = ltm if isinstance(ltm, (list, tuple)) else [ltm]
        if not (keeps and all(_is_number(k) and 0 < k <= 1 for k in keeps)):
            raise bad("ltm", "a keep ratio in (0, 1] or a list of them, one per block")
    if meta.get("ltm_mode") is not None and meta["ltm_mode"] not in MERGE_MODES:
        raise bad("ltm_mode", "one of " + ", ".join(MERGE_MODES))
    if meta.get("distillation") is not None and not isinstance(meta["distillation"], bool):
        raise bad("distillation", "true or false")


# -- official <-> timm layout ----------------------------------------------------------------------
def is_official_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("blocks1.", "patch_embed.0.")) for k in sd)


_LEAF = {"c": "conv", "l": "linear", "conv_reduce": "fc1", "conv_expand": "fc2"}


def _official_key(key: str) -> str | None:
    if key.endswith("attention_bias_idxs"):
        return None  # derived buffer, rebuilt by the model
    parts = key.split(".")
    parts = [_LEAF.get(p, p) if i >= len(parts) - 2 else p for i, p in enumerate(parts)]
    if parts[0] == "patch_embed":
        parts[1:2] = [f"conv{int(parts[1]) // 2 + 1}"]
    elif parts[0] in ("blocks1", "blocks2", "blocks3"):
        stage, j = int(parts[0][-1]) - 1, int(parts[1])
        if stage == 0:
            parts[:2] = ["stages", "0", "blocks", str(j)]
        elif j < 3:
            parts[:2] = ["stages", str(stage), "downsample", ("res1", "patchmerge", "res2")[j]]
        else:
            parts[:2] = ["stages", str(stage), "blocks", str(j - 3)]
    return ".".join(parts)


def official_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state dict to timm's layout (bit-exact; derived buffers dropped)."""
    out = {}
    for k, v in sd.items():
        new = _official_key(k)
        if new is not None:
            out[new] = v
    return out


def timm_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse mapping, for tests and for users of the official code."""
    inv_leaf = {"conv": "c", "linear": "l", "fc1": "conv_reduce", "fc2": "conv_expand"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        p = [inv_leaf.get(x, x) if i >= len(p) - 2 else x for i, x in enumerate(p)]
        if p[0] == "patch_embed":
            p[1:2] = [str((int(p[1][-1]) - 1) * 2)]
        elif p[0] == "stages":
            s = int(p[1])
            if p[2] == "blocks":
                j = int(p[3]) + (0 if s == 0 else 3)
            else:
                j = ("res1", "patchmerge", "res2").index(p[3])
            p[:4] = [f"blocks{s + 1}", str(j)]
        out[".".join(p)] = v
    return out


# -- fitting a state dict to a model ---------------------------------------------------------------
def detect_variant(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Which EfficientViT-M variant a timm-layout state dict belongs to (None if it matches none)."""
    try:
        widths = (sd["patch_embed.conv4.conv.weight"].shape[0],
                  sd["stages.1.downsample.patchmerge.conv3.conv.weight"].shape[0],
                  sd["stages.2.downsample.patchmerge.conv3.conv.weight"].shape[0])
    except KeyError:
        return None
    depths = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"stages.{s}.blocks.")}) for s in range(3))
    heads = tuple(len({k.split(".")[8] for k in sd if k.startswith(f"stages.{s}.blocks.0.mixer.m.attn.qkvs.")})
                  for s in range(3))
    for name, v in VARIANTS.items():
        if (v.widths, v.depths, v.heads) == (widths, depths, heads):
            return name
    return None


def fit_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], strict_head: bool = True,
                   source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Adapt ``sd`` to ``model``: resize bias tables, adapt the first conv to other input channels and,
    when ``strict_head`` is False, leave a head of another class count to the model's fresh init.
    Raises ValueError naming the mismatched keys and shapes for anything else."""
    target = model.state_dict()
    sd = dict(sd)
    for k, v in list(sd.items()):
        if k not in target or target[k].shape == v.shape:
            continue
        if v.dim() == 2 and target[k].shape == (*v.shape, 1, 1):
            sd[k] = v[:, :, None, None]  # some official 1x1 conv weights are stored 2-D
        elif k.endswith("attention_biases") and v.shape[0] == target[k].shape[0]:
            sd[k] = resize_bias_table(v, int(round(target[k].shape[1] ** 0.5)))
        elif k == "patch_embed.conv1.conv.weight" and v.shape[0] == target[k].shape[0]:
            sd[k] = adapt_input_conv(target[k].shape[1], v)
        elif not strict_head and k.startswith(("head.", "head_dist.")):
            del sd[k]
    if "head_dist.linear.weight" in sd and "head_dist.linear.weight" not in target:
        sd = {k: v for k, v in sd.items() if not k.startswith("head_dist.")}  # a distilled checkpoint
    if "head.linear.weight" not in target:  # a headless model (num_classes=0) takes the trunk only
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
    if not strict_head:
        for k in target:
            if k.startswith(("head.", "head_dist.")):
                sd.setdefault(k, target[k])
    for k in target:  # token merging's mask modules, new to an unmerged checkpoint: their fresh init
        if ".merge." in k:
            sd.setdefault(k, target[k])
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
             for k in sd if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        found, want = detect_variant(sd), getattr(model, "variant", None)
        hint = ""
        if found and want and found != want:
            hint = f"{source} holds {found} weights but the model is {want}: use create_model('{found}', ...). "
        elif any(k.startswith("head.") for k in wrong):
            hint = "The head differs in classes: pass num_classes to re-create it. "
        lines = [f"{len(missing)} missing: {missing[:6]}", f"{len(unexpected)} unexpected: {unexpected[:6]}",
                 f"{len(wrong)} shape mismatches: {wrong[:6]}"]
        raise ValueError(f"{hint}{source} does not fit the model:\n  " + "\n  ".join(lines))
    return sd


@torch.no_grad()
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's hook for loading a checkpoint into ``model``: official or timm layout, bias tables resized
    to the model's windows, the head left out if the model has none."""
    sd = official_to_timm(state_dict) if is_official_layout(state_dict) else dict(state_dict)
    return fit_state_dict(model, sd, strict_head=False)


def load_checkpoint(model: nn.Module, source: str | Path, sha256: str | None = None,
                    strict_head: bool = True) -> dict:
    """Load weights of any supported layout from a path or URL into ``model``; returns the metadata."""
    sd, meta = read_checkpoint(source, sha256)
    sd = fit_state_dict(model, sd, strict_head=strict_head, source=str(source))
    model.load_state_dict(sd, strict=False)  # fit_state_dict has already checked every key
    return meta


# -- writing ---------------------------------------------------------------------------------------
def model_meta(model: nn.Module, extra: dict | None = None) -> dict:
    """What a reader needs to rebuild the network: architecture, classes, input size and channels, the
    distillation head and token merging; ``extra`` added over it."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {"arch": getattr(model, "variant", None) or cfg.get("architecture") or type(model).__name__,
            "num_classes": getattr(model, "num_classes", None),
            "img_size": list(getattr(model, "img_size", ())) or None,
            "in_chans": getattr(model, "in_chans", None),
            "distillation": getattr(model, "distillation", False)}
    if getattr(model, "ltm", None) is not None:
        meta.update(ltm=list(model.ltm), ltm_mode=model.ltm_mode)
    meta.update(extra or {})
    return meta


def save_checkpoint(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write the model's weights in timm layout: ``.safetensors`` (loadable by timm as is) or an effvit
    ``.pth``, both with metadata (architecture, classes and their names, input size and channels,
    normalisation) that ``effvit.load_model`` reads back. Written atomically."""
    if is_fused(model):
        raise ValueError("this is a fused (inference-only) model, whose weights are folded; save the model "
                         "before effvit.fuse, and fuse again after loading")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    preprocessing = {k: cfg[f] for k, f in (("mean", "mean"), ("std", "std"), ("interpolation", "interpolation"),
                                            ("crop_pct", "crop_pct"), ("class_names", "label_names")) if cfg.get(f)}
    meta = model_meta(model, {**preprocessing, **(meta or {})})
    meta = {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file(sd, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    else:
        torch.save({"format": FORMAT_TAG, "state_dict": sd, "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def check_same_arch(meta: dict, model: nn.Module, source: str) -> None:
    """Refuse a checkpoint of another EfficientViT-M variant than ``model``, naming both."""
    want, found = getattr(model, "variant", None), meta.get("arch")
    if want and found and want != found:
        raise ValueError(f"{source} holds {found} weights but the model being built is {want}: use "
                         f"model.name={found} (or --model {found}), or start a new run")
