"""The run folder: one process writes it, and a new run never mixes its files with an old run's.

``RunFolder.claim`` takes an exclusive lock on ``.lock`` (an OS lock, released when the process ends,
however it ends), refuses a folder that already holds files unless the run resumes or was told to
overwrite, and removes the temporary files a killed process left behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder checks still apply
    fcntl = None

LOCK = ".lock"
# what a run writes: removed by an overwrite (anything else in the folder is left alone)
RUN_FILES = ("last.pth", "best.pth", "best.safetensors", "log.csv", "log.txt", "config.yaml", "curves.png",
             "tensorboard", "samples_rank*.txt", "weights_rank*.pth")
TEMPORARY = (".*.tmp*", "*.tmp")


class RunFolder:
    """A run's output folder, held by one process from ``claim`` to ``release`` (or the process's end)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def claim(self, *, resume: bool = False, overwrite: bool = False) -> list[str]:
        """Lock the folder for this process and make it ready; returns notes on what was cleaned."""
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"run folder {self.path} is a file: choose another --name or --output")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            notes = self._clean(self.path, TEMPORARY, "left by an interrupted run")
            others = [p.name for p in self.path.iterdir() if p.name != LOCK]
            if others and not resume:
                if not overwrite:
                    last = self.path / "last.pth"
                    resume_hint = f"resume it with --resume {last}, " if last.is_file() else ""
                    raise FileExistsError(
                        f"run folder {self.path} already holds files ({', '.join(sorted(others)[:5])}"
                        f"{' ...' if len(others) > 5 else ''}): {resume_hint}replace it with --overwrite "
                        "(run.overwrite=true), or choose another --name")
                notes += self._clean(self.path, RUN_FILES, "of the run it replaces")
        except BaseException:
            self.release()
            raise
        return notes

    def _lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"run folder {self.path} is in use by another process (pid {holder}): wait "
                                  "for it to finish, or choose another --name") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def _clean(folder: Path, patterns: tuple[str, ...], why: str) -> list[str]:
        removed = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.name != LOCK})
        for p in removed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return [f"removed {', '.join(p.name for p in removed)} ({why})"] if removed else []
