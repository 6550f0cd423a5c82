"""The fused model's window attention as one C++ CPU kernel inside OpenVINO (an OpenVINO extension).

``window_attention.cpp`` computes a whole ``FusedLocalWindowAttention`` (window partition and padding, the
cascade of heads with their q/k/v projections, q's depthwise conv, scores plus the relative-position bias,
softmax, times v, ReLU, the output projection, window reverse and the skip) in fp32;
``openvino_extension.cpp`` makes it the op ``WindowAttention`` of opset ``effvit``, for IR files and for
ONNX nodes of domain ``effvit``. Graphs with it come from ``effvit.deploy.openvino.export_openvino_kernel``.

The extension is built from these sources on first use, with the machine's C++ compiler (``CXX`` or
c++/g++/clang++), cmake and the openvino wheel's headers, tuned for the building CPU (``-march=native``),
into a cache folder keyed by the sources, the OpenVINO version, the compiler and the CPU
(``$EFFVIT_CACHE`` or ``~/.cache/effvit``). ``make kernels`` installs g++ and cmake where they are missing
and builds it. Without a compiler ``extension_path`` raises ``KernelUnavailable`` saying what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; parallel first builds there may race
    fcntl = None

__all__ = ["KernelUnavailable", "SOURCES", "available", "build_extension", "cache_dir", "extension_path",
           "find_compiler"]

SOURCES = Path(__file__).parent
_FILES = ("CMakeLists.txt", "window_attention.hpp", "window_attention.cpp", "openvino_extension.cpp")
LIBRARY = "libeffvit_openvino.so"


class KernelUnavailable(RuntimeError):
    """The extension cannot be built or loaded here; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("EFFVIT_CACHE") or Path.home() / ".cache" / "effvit") / "kernels"


def find_compiler() -> str | None:
    """The C++ compiler cmake would use: ``CXX`` when set (None if it does not run), else the first of
    c++, g++, clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx is not None:
        return shutil.which(cxx) if cxx else None
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.machine()


def _key(compiler: str) -> str:
    import openvino

    h = hashlib.sha256()
    for name in _FILES:
        h.update((SOURCES / name).read_bytes())
    h.update(f"{openvino.__version__}|{os.path.realpath(compiler)}|{_cpu_flags()}".encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise KernelUnavailable(f"building effvit's OpenVINO extension failed ({' '.join(cmd[:2])} ...):\n{tail}")


@functools.cache
def extension_path() -> Path:
    """The built extension (a shared library for ``ov.Core().add_extension``), building it on first use;
    ``KernelUnavailable`` when it cannot be built here. Once per process (``build_extension`` itself is not
    cached)."""
    return build_extension()


def build_extension() -> Path:
    """The extension in the cache folder, built there first when it is not."""
    try:
        import openvino
    except ImportError:
        raise KernelUnavailable("effvit's CPU kernel runs inside OpenVINO, which is not installed: "
                                "pip install 'effvit[export]'") from None
    compiler, cmake = find_compiler(), shutil.which("cmake")
    if compiler is None or cmake is None:
        missing = " and no ".join(n for n, p in (("C++ compiler", compiler), ("cmake", cmake)) if p is None)
        raise KernelUnavailable(f"effvit's OpenVINO extension is built from source and this machine has no "
                                f"{missing} (CXX or c++/g++/clang++, cmake): install g++ and cmake (make kernels) "
                                "or use the standard graph")
    ov_cmake = Path(openvino.__file__).parent / "cmake"
    if not (ov_cmake / "OpenVINOConfig.cmake").exists():
        raise KernelUnavailable(f"the openvino package has no C++ development files ({ov_cmake}): install "
                                "OpenVINO from its pip wheel, which ships them")
    target = cache_dir() / _key(compiler)
    library = target / LIBRARY
    if library.exists():
        return library
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:  # parallel test workers: one builds, the others wait
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return library
        with tempfile.TemporaryDirectory(dir=target, prefix=".build") as build:
            env_cmake = [cmake, "-S", str(SOURCES), "-B", build, f"-DOpenVINO_DIR={ov_cmake}",
                         f"-DTBB_DIR={ov_cmake}", f"-DCMAKE_CXX_COMPILER={compiler}", "-DCMAKE_BUILD_TYPE=Release"]
            _run(env_cmake, target)
            _run([cmake, "--build", build, "-j", str(min(4, os.cpu_count() or 1))], target)
            os.replace(Path(build) / LIBRARY, library)  # atomic: a library in place is a finished one
    return library


def available() -> tuple[bool, str]:
    """(whether the extension is built or can be, the reason when not)."""
    try:
        extension_path()
    except KernelUnavailable as e:
        return False, str(e)
    return True, ""
