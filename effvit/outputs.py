"""Output locations, checked before the work that fills them: a long evaluation or a folder of photos is
not computed only to find at the end that nothing can be written; and ``write_csv``, a table written
whole or not at all."""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path


def writable_dir(path: str | Path, flag: str = "--output") -> Path:
    """``path`` as a folder (created if missing) in which a file could be written just now; an OSError
    naming it and ``flag`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output folder {path} is a file: choose another with {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(f"cannot write to the output folder {path} ({e.strerror or e}): choose another with "
                      f"{flag}") from None
    return path


def writable_file(path: str | Path, flag: str = "--output") -> Path:
    """``path`` as a file that could be written (its folder created if missing); an OSError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output file {path} is a folder: give a file name with {flag}")
    writable_dir(path.parent, flag)
    if path.exists():
        try:
            with open(path, "r+b"):
                pass
        except OSError as e:
            raise OSError(f"cannot write {path} ({e.strerror or e}): choose another file with {flag}") from None
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file (after links; hard links too when both exist)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def output_file(path: str | Path, inputs: Iterable[str | Path], *, is_own: Callable[[Path], bool],
                overwrite: bool = False, flag: str = "--output") -> Path:
    """``path`` as a file to write that is none of ``inputs`` and, if it exists, is an earlier output of
    the same kind (``is_own``) or may be replaced (``overwrite``); an error naming it otherwise."""
    path = writable_file(path, flag)
    for src in inputs:
        if same_file(path, src):
            raise ValueError(f"{flag} {path} is one of the inputs ({src}): writing it would destroy that file; "
                             f"choose another file with {flag}")
    if path.exists() and path.stat().st_size and not overwrite and not is_own(path):
        raise FileExistsError(f"{flag} {path} exists and does not hold output of this command: choose another "
                              f"file with {flag}, or pass --overwrite to replace it")
    return path


def write_text(text: str, path: str | Path) -> None:
    """``text`` into ``path``, replacing it atomically: the old file or the whole new one, never half."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; it replaces ``path`` when the block ends without an
    error and is removed otherwise, so ``path`` is either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a plain name: the file gets the umask's mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """``rows`` as CSV (the union of their keys as columns; floats to 6 digits), replacing ``path`` atomically."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})
    tmp.replace(path)


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)
