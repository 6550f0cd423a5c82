"""Output locations, checked before the work that fills them: a long evaluation or a folder of photos is
not computed only to find at the end that nothing can be written; and ``write_csv``, a table written
whole or not at all."""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterator, Sequence
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
